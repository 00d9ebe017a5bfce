/**
 * A gateway's verdict on another gateway reaches its EgressNode status (`downNodes`, which the
 * controller places by) within moments, also when the verdict changes nothing in its own
 * datapath: here node-2 carries no policy at all, so neither node-3's loss nor its return gives
 * it anything to sync. Real kube-apiserver and controller; node-2's agent on the FakeKernel, with
 * its liveness in this thread; node-1 and node-3 are played by this test through the probe
 * transport (unauthenticated probes, as the agent is configured here).
 *
 * Nodes: node-1 (no agent, the third voter), node-2 and node-3 (egress=true).
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import type { Agent } from "../../src/agent/agent.ts";
import { encodeProbe, type ProbeTransport } from "../../src/agent/liveness.ts";
import type { EgressNode } from "../../src/api/types.ts";
import type { Controller } from "../../src/controller/controller.ts";
import { type KubeClient, ours } from "../../src/kube/client.ts";
import { ControlPlane } from "../../src/sandbox/controlplane.ts";
import { fakeNodeHost } from "../../src/testing/fake_host.ts";
import { createGateway, createNode, eventually } from "../support/kube.ts";
import { fakeHostAgent, startController } from "../support/processes.ts";

const INTERVAL_MS = 50;

describe("a gateway reports its verdicts on the other gateways at once", () => {
  let cp: ControlPlane;
  let admin: KubeClient;
  let controller: Controller;
  let agent: Agent;
  let deliver: ((msg: Buffer) => void) | undefined;
  let timer: NodeJS.Timeout | undefined;
  /** What this test's node-1 and node-3 say, every interval. */
  let node3Alive = true;

  const status = () =>
    admin
      .get<EgressNode>(ours("EgressNode"), "node-2")
      .then((n) => n.status)
      .catch(() => undefined);
  const downNodes = async () => (await status())?.downNodes ?? [];
  /**
   * Past the agent's last status write and the write that its own watch event of it may follow
   * (one a second at most): a report after this is one the verdict asked for.
   */
  const quiet = () => new Promise((r) => setTimeout(r, 3000));

  before(async () => {
    cp = await ControlPlane.start({
      tag: "down-report",
      users: { controller: ["sallyport:controllers"], agent: ["sallyport:agents"] },
    });
    admin = cp.client();
    for (const [i, name] of ["node-1", "node-2", "node-3"].entries())
      await createNode(admin, name, {
        addresses: [`192.168.77.1${i + 1}`],
        podCIDRs: [`10.244.${i + 1}.0/24`],
        ...(i > 0 ? { labels: { egress: "true" } } : {}),
      });
    await createGateway(admin, ["192.168.77.100-192.168.77.110"]);
    controller = startController(cp, "down-report");
    const transport: ProbeTransport = {
      start: (onMessage) => {
        deliver = onMessage;
      },
      send: () => {},
      stop: () => {
        deliver = undefined;
      },
    };
    agent = await fakeHostAgent(cp, "node-2", fakeNodeHost("192.168.77.12"), {
      // No full sync during the test: only the verdict itself can make the agent report.
      periodMs: 600_000,
      liveness: { intervalMs: INTERVAL_MS, multiplier: 4, holdDownMs: 500 },
      probeTransport: transport,
    });
    void agent.start();
    // node-1 and node-3 probe node-2 (and hear each other) while node-3 lives.
    let stamp = Date.now();
    const probe = () => {
      stamp = Math.max(Date.now(), stamp + 1);
      const alive = node3Alive ? ["node-2", "node-3"] : ["node-2"];
      deliver?.(
        encodeProbe(
          {
            n: "node-1",
            t: stamp,
            ok: true,
            h: Object.fromEntries(alive.map((n) => [n, 0])),
            a: alive,
            u: ["node-2", "node-3"],
            d: [],
            j: [],
          },
          undefined,
        ),
      );
      if (node3Alive)
        deliver?.(
          encodeProbe(
            {
              n: "node-3",
              t: stamp,
              ok: true,
              h: { "node-2": 0 },
              a: ["node-2"],
              u: ["node-2"],
              d: [],
              j: [],
            },
            undefined,
          ),
        );
      timer = setTimeout(probe, INTERVAL_MS);
    };
    probe();
    // The agent has synced once and reported (its status names its underlay).
    await eventually(status, (s) => s?.underlay !== undefined, 30_000);
    await quiet();
  });

  after(async () => {
    clearTimeout(timer);
    await agent?.stop();
    await controller?.stop();
    await cp?.stop();
  });

  it("a lost gateway is in downNodes within seconds, and out of it once it is back, with nothing to sync", async () => {
    assert.deepEqual(await downNodes(), [], "nobody down while both are heard");
    node3Alive = false;
    assert.deepEqual(
      await eventually(downNodes, (d) => d.length > 0, 5000),
      ["node-3"],
      "node-3, no longer heard by node-2 nor by node-1",
    );
    await quiet();
    node3Alive = true;
    assert.deepEqual(
      await eventually(downNodes, (d) => d.length === 0, 5000),
      [],
      "node-3 heard again by both, past the hold-down",
    );
  });
});
