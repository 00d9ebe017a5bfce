/**
 * `make demo`: seed 003's verification and a gateway failure, in the sandbox, end to end.
 * Every step checks what it shows; the demo exits 0 only if all of them held.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { printStatus } from "../cli/sandbox.ts";
import { ExecRunner } from "../kernel/runner.ts";
import { ours } from "../kube/client.ts";
import { FailoverProbe, probeOnce, stream } from "./probe.ts";
import { Sandbox } from "./sandbox.ts";
import { nodeAddress } from "./topology.ts";

const EIP = "192.168.77.100";

export async function demo(prefix = "sp"): Promise<boolean> {
  const results: { step: string; ok: boolean; detail: string }[] = [];
  const step = (name: string, ok: boolean, detail: string) => {
    results.push({ step: name, ok, detail });
    console.log(`${ok ? "✔" : "✘"} ${name}: ${detail}`);
  };
  const say = (line: string) => console.log(`\n== ${line}`);
  let sb: Sandbox | undefined;
  try {
    say(
      "building the sandbox: 3 nodes (node-2 and node-3 may be gateways) with kube-proxy and a bridge CNI pod network, an external server, a real control plane",
    );
    sb = await Sandbox.up({ prefix, nodes: 3, families: [4] }, (l) => console.log(`   ${l}`));
    const pod = await sb.addPod("mediabot", {
      node: 1,
      labels: { org: "empire", class: "mediabot" },
    });
    console.log(`   pod default/mediabot on node-1 with ${pod.ips[4]}`);
    const api = await sb.addPod("api", { node: 3, labels: { app: "api" }, echo: true });
    const service = await sb.addService("api", {
      selector: { app: "api" },
      ports: [{ port: 80, targetPort: 8080 }],
    });
    const apiTarget = `${service.clusterIPs[4]}:80`;
    console.log(
      `   pod default/api on node-3 with ${api.ips[4]} behind Service default/api ${service.clusterIPs[4]} (kube-proxy, ${sb.proxyMode} mode)`,
    );
    const target = sb.externalTarget(4);

    say("without a policy: the external server sees the pod's node (seed 003's first expectation)");
    const before = await probeOnce(pod.netns, target);
    step(
      "without a policy the source is node-1",
      before.saw === nodeAddress(1, 4),
      `the server saw ${before.saw ?? before.error}`,
    );

    say("applying examples/egress-sample.yaml");
    for (const line of await sb.apply(
      readFileSync(join(import.meta.dirname, "..", "..", "examples", "egress-sample.yaml"), "utf8"),
    ))
      console.log(`   ${line}`);
    const ready = await waitReady(sb, "egress-sample", 30_000);
    step("the policy is Ready", ready.ready, ready.detail);
    const after = await probeUntilSeen(pod.netns, target, EIP, 15_000);
    step("with the policy the source is the egress IP", after === EIP, `the server saw ${after}`);
    const inside = await probeUntilSeen(pod.netns, apiTarget, pod.ips[4]!, 15_000);
    step(
      "traffic inside the cluster keeps its path: Service default/api (its backend on node-3) sees the pod's own address",
      inside === pod.ips[4],
      `the backend saw ${inside}`,
    );
    console.log(`\n${await printStatus(sb)}`);

    const holder = ready.node;
    const holderIndex = Number((holder ?? "node-2").split("-")[1]);
    say(
      `killing ${holder}, the node holding ${EIP}, while the pod sends a request every 20 ms and a line every 20 ms over one TCP connection opened before`,
    );
    const probe = new FailoverProbe(pod.netns, target, EIP, 20, 100);
    await probe.start();
    const connection = stream(pod.netns, target, 4, 20);
    await new Promise((r) => setTimeout(r, 1000));
    const killedAt = Date.now();
    await sb.killNode(holderIndex);
    const gap = await probe.gapAfter(killedAt, 20_000);
    await probe.stop();
    const moved = await waitReady(sb, "egress-sample", 10_000);
    step(
      "after the failure requests arrive from the egress IP again, through another node",
      gap !== undefined && moved.node !== undefined && moved.node !== holder,
      gap === undefined
        ? "traffic did not come back"
        : `gap ${gap} ms; ${EIP} is now on ${moved.node}`,
    );
    const tcp = await connection;
    step(
      "the TCP connection opened before the failure goes on after it, from the egress IP",
      !tcp.reset && tcp.echoed === tcp.sent && tcp.sources.every((a) => a === EIP),
      `${tcp.echoed} of ${tcp.sent} lines echoed${tcp.reset ? ", then reset" : ", no reset"}; the server saw ${tcp.sources.join(", ")}`,
    );
    const last = await probeOnce(pod.netns, target);
    step(
      "the source is still the egress IP",
      last.saw === EIP,
      `the server saw ${last.saw ?? last.error}`,
    );
  } catch (e) {
    step("the demo ran to the end", false, (e as Error).message);
  } finally {
    say("tearing down");
    if (sb !== undefined) await sb.destroy();
    const left = (await new ExecRunner().run(["ip", "netns", "list"])).stdout
      .split("\n")
      .filter((l) => l.startsWith(`${prefix}-`));
    step(
      "nothing is left behind",
      left.length === 0,
      left.length === 0
        ? "no namespace or process of the sandbox remains"
        : `left: ${left.join(" ")}`,
    );
  }
  const ok = results.every((r) => r.ok);
  say(`summary: ${results.filter((r) => r.ok).length}/${results.length} steps held`);
  for (const r of results) console.log(`  ${r.ok ? "✔" : "✘"} ${r.step} (${r.detail})`);
  return ok;
}

async function waitReady(
  sb: Sandbox,
  name: string,
  ms: number,
): Promise<{ ready: boolean; node: string | undefined; detail: string }> {
  const end = Date.now() + ms;
  let detail = "no status yet";
  let node: string | undefined;
  while (Date.now() < end) {
    try {
      const p = await sb.admin().get<{
        metadata: object;
        status?: {
          gatewayNode?: string;
          programmed?: string;
          egressIPs?: string[];
          conditions?: { type: string; status: string; reason: string; message: string }[];
        };
      }>(ours("EgressPolicy"), name, "default");
      const r = p.status?.conditions?.find((c) => c.type === "Ready");
      node = p.status?.gatewayNode;
      detail =
        r === undefined
          ? "no status yet"
          : `${r.status}: ${r.message} (programmed ${p.status?.programmed ?? "?"})`;
      if (r?.status === "True") return { ready: true, node, detail };
    } catch (e) {
      detail = (e as Error).message;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  return { ready: false, node, detail };
}

async function probeUntilSeen(
  netns: string,
  target: string,
  want: string,
  ms: number,
): Promise<string | undefined> {
  const end = Date.now() + ms;
  let saw: string | undefined;
  while (Date.now() < end) {
    saw = (await probeOnce(netns, target)).saw;
    if (saw === want) return saw;
    await new Promise((r) => setTimeout(r, 200));
  }
  return saw;
}
