#!/usr/bin/env node
/**
 * sallyport: one binary for every process.
 *
 *   sallyport controller …      the controller (Deployment)
 *   sallyport agent …           the node agent (DaemonSet)
 *   sallyport explain|status    what the cluster does with a packet, and what it reports
 *   sallyport convert -f FILE   Cilium's and spidernet's egress objects as Sallyport objects
 *   sallyport validate -f FILE  check manifests without a cluster
 *   sallyport cleanup           remove every kernel object Sallyport created on this host
 *   sallyport datapath …        inspect or apply a node's datapath by hand
 *   sallyport sandbox …         a whole cluster in network namespaces
 *
 * Run as `kubectl-sallyport` (bin/kubectl-sallyport sets SALLYPORT_KUBECTL_PLUGIN=1), it is the
 * kubectl plugin: `kubectl sallyport explain|status|convert|validate`.
 */
import { basename } from "node:path";
import { runCli } from "./errors.ts";
import { buildProgram } from "./program.ts";

const plugin =
  process.env.SALLYPORT_KUBECTL_PLUGIN === "1" ||
  basename(process.argv[1] ?? "").startsWith("kubectl-sallyport");

const code = await runCli(await buildProgram({ plugin, argv: process.argv }), process.argv);
// A failure ends the process even when something it started still holds the event loop (the
// controller's metrics server, a keep-alive connection), as an uncaught error used to.
if (code !== 0) process.exit(code);
