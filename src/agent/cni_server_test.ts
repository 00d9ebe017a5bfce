import assert from "node:assert/strict";
import { mkdtempSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { after, before, beforeEach, describe, it } from "node:test";
import type { AnyPolicy, EgressEndpointSlice } from "../api/types.ts";
import { runPlugin } from "../cni/plugin.ts";
import type { PodInfo } from "../engine/snapshot.ts";
import type { Runner, RunResult } from "../kernel/runner.ts";
import { createLogger } from "../lib/log.ts";
import { CniServer, type PodNetworkAgent } from "./cni_server.ts";
import { AgentState } from "./view.ts";

const WEB = "EgressPolicy/default/web";

function policy(): AnyPolicy {
  return {
    apiVersion: "sallyport.dev/v1alpha1",
    kind: "EgressPolicy",
    metadata: { name: "web", namespace: "default" },
    spec: {
      gateway: "edge",
      destinationCIDRs: ["192.168.77.200/32"],
      podSelector: { matchLabels: { app: "web" } },
    },
    status: {
      gatewayNode: "gw",
      egressIPs: ["192.168.77.100"],
      conditions: [
        {
          type: "Accepted",
          status: "True",
          reason: "Accepted",
          message: "",
          lastTransitionTime: "2026-01-01T00:00:00Z",
        },
      ],
    },
  } as unknown as AnyPolicy;
}

/** A Pod as the node's watch shows it at CNI ADD: Pending, no addresses yet. */
function pendingPod(name: string, labels: Record<string, string>): PodInfo {
  return {
    namespace: "default",
    name,
    labels,
    nodeName: "n1",
    ips: [],
    hostNetwork: false,
    phase: "Pending",
  };
}

function endpoints(state: AgentState): string[] {
  return (state.view(WEB)?.endpoints ?? []).map((e) => `${e.pod}=${e.ips.join(",")}`);
}

/** A DatapathSync stand-in: the kernel "holds" a generation when the test says so. */
class FakeSync {
  readonly #state: AgentState;
  constructor(state: AgentState) {
    this.#state = state;
  }
  requested = 0;
  appliedUpTo = -1;
  #waiters: { g: number; resolve: () => void }[] = [];
  trigger(): number {
    return ++this.requested;
  }
  applied(g: number): Promise<void> {
    if (this.appliedUpTo >= g) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push({ g, resolve }));
  }
  /** The sync loop ran: it planned every change so far, and the kernel holds them. */
  hold(): void {
    this.#state.takeChanges();
    this.appliedUpTo = this.requested;
    for (const w of this.#waiters.splice(0)) w.resolve();
  }
}

describe("AgentState: pod networks from CNI", () => {
  it("steers a pod from the addresses CNI ADD gave, before the Pod's status has any", () => {
    const state = new AgentState("n1");
    state.setPolicy(policy());
    state.setLocalPod(pendingPod("a", { app: "web" }));
    assert.deepEqual(endpoints(state), []);
    assert.equal(state.attachPodNetwork("default/a", "c1", ["10.244.1.9"]), true);
    assert.deepEqual(endpoints(state), ["default/a=10.244.1.9"]);
    assert.deepEqual(state.selecting("default/a"), [WEB]);
    // A status update without addresses (the kubelet's Pending conditions) takes nothing away.
    state.setLocalPod({ ...pendingPod("a", { app: "web" }), phase: "Running" });
    assert.deepEqual(endpoints(state), ["default/a=10.244.1.9"]);
  });

  it("CNI DEL removes the addresses although the Pod's status and a slice still name them", () => {
    const state = new AgentState("n1");
    state.setPolicy(policy());
    state.setLocalPod({
      ...pendingPod("a", { app: "web" }),
      ips: ["10.244.1.9"],
      phase: "Running",
    });
    state.attachPodNetwork("default/a", "c1", ["10.244.1.9"]);
    state.setSlice({
      metadata: { name: "s1" },
      policy: WEB,
      endpoints: [{ pod: "default/a", node: "n1", ips: ["10.244.1.9"] }],
    } as unknown as EgressEndpointSlice);
    state.takeChanges();
    assert.equal(state.detachPodNetwork("default/a", "c1"), true);
    assert.equal(state.planDirty, true);
    assert.deepEqual(endpoints(state), []);
    // The terminating Pod's updates still carry its old status addresses.
    state.setLocalPod({
      ...pendingPod("a", { app: "web" }),
      ips: ["10.244.1.9"],
      phase: "Running",
    });
    assert.deepEqual(endpoints(state), []);
    // The Pod goes; the slice is not rewritten yet: still nothing.
    state.deleteLocalPod("default/a");
    assert.deepEqual(endpoints(state), []);
    // A new pod of the same name (a StatefulSet) gets a network again: its new address, not
    // the one the slice still names.
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.attachPodNetwork("default/a", "c2", ["10.244.1.12"]);
    assert.deepEqual(endpoints(state), ["default/a=10.244.1.12"]);
  });

  it("a DEL of an older sandbox of the pod changes nothing", () => {
    const state = new AgentState("n1");
    state.setPolicy(policy());
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.attachPodNetwork("default/a", "new", ["10.244.1.10"]);
    assert.equal(state.detachPodNetwork("default/a", "old"), false);
    assert.deepEqual(endpoints(state), ["default/a=10.244.1.10"]);
  });
});

/** The kernel's tools as the server runs them: conntrack -D, recorded; by default none matched. */
class RecordingRunner implements Runner {
  readonly calls: { argv: string; setsUpdated: boolean }[] = [];
  answer: (argv: readonly string[]) => Promise<RunResult> = async () => ({
    code: 1,
    stdout: "",
    stderr: "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n",
  });
  /** Whether the kernel holds every change so far, at the time of a call. */
  setsUpdated: () => boolean = () => true;
  run(argv: readonly string[]): Promise<RunResult> {
    this.calls.push({ argv: argv.join(" "), setsUpdated: this.setsUpdated() });
    return this.answer(argv);
  }
}

describe("CniServer with sallyport-cni", () => {
  let dir: string;
  let socket: string;
  let state: AgentState;
  let sync: FakeSync;
  let server: CniServer;
  let runner: RecordingRunner;
  let logged: Record<string, unknown>[];

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "sallyport-cni-test-"));
    socket = join(dir, "run", "cni.sock");
  });
  after(() => rmSync(dir, { recursive: true, force: true }));
  beforeEach(async () => {
    await server?.stop();
    state = new AgentState("n1");
    state.setPolicy(policy());
    state.takeChanges();
    sync = new FakeSync(state);
    sync.hold();
    const agent: PodNetworkAgent = { state, sync };
    runner = new RecordingRunner();
    const held = sync;
    runner.setsUpdated = () => held.appliedUpTo >= held.requested && !state.planDirty;
    logged = [];
    const log = createLogger("agent", {
      level: "warn",
      destination: new Writable({
        write(chunk, _encoding, done) {
          logged.push(JSON.parse(String(chunk)));
          done();
        },
      }),
    });
    server = new CniServer({ socket, agent, runner, log, podWaitMs: 300, kernelWaitMs: 500 });
    await server.start();
  });
  after(async () => server?.stop());

  const prevResult = {
    cniVersion: "1.1.0",
    interfaces: [
      { name: "cni0", mac: "aa:aa:aa:aa:aa:aa" },
      { name: "eth0", mac: "bb:bb:bb:bb:bb:bb", sandbox: "/run/netns/p" },
    ],
    ips: [{ address: "10.244.1.9/24", gateway: "10.244.1.1", interface: 1 }],
  };
  const env = (command: string, name = "a") => ({
    CNI_COMMAND: command,
    CNI_CONTAINERID: `c-${name}`,
    CNI_NETNS: "/run/netns/p",
    CNI_IFNAME: "eth0",
    CNI_PATH: "/opt/cni/bin",
    CNI_ARGS: `IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=${name};K8S_POD_INFRA_CONTAINER_ID=c-${name}`,
  });
  const conf = () =>
    JSON.stringify({
      cniVersion: "1.1.0",
      name: "k8s",
      type: "sallyport-cni",
      socket,
      timeoutMs: 2000,
      prevResult,
    });

  it("is a socket only its owner can open", () => {
    assert.equal(statSync(socket).mode & 0o777, 0o600);
  });

  it("ADD answers once a sync that started after the change succeeded", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.takeChanges();
    let done = false;
    const add = runPlugin({ env: env("ADD"), stdin: conf() }).then((out) => {
      done = true;
      return out;
    });
    while (sync.requested === 0) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(done, false, "answered before the kernel held the sets");
    assert.deepEqual(endpoints(state), ["default/a=10.244.1.9"]);
    sync.hold();
    const out = await add;
    assert.equal(out.exitCode, 0, out.stdout);
    assert.deepEqual(JSON.parse(out.stdout), prevResult);
    assert.equal(server.served.add, 1);
  });

  it("ADD waits for the Pod when the node's watch lags", async () => {
    const add = runPlugin({ env: env("ADD", "late"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    state.setLocalPod(pendingPod("late", { app: "web" }));
    sync.trigger(); // what the agent's watch handler does
    sync.hold();
    const out = await add;
    assert.equal(out.exitCode, 0, out.stdout);
    // The Pod came after the ADD: its addresses counted the moment it did.
    assert.deepEqual(endpoints(state), ["default/late=10.244.1.9"]);
  });

  it("ADD of a pod the watch never shows fails with try-again-later", async () => {
    const out = await runPlugin({ env: env("ADD", "ghost"), stdin: conf() });
    assert.equal(out.exitCode, 1);
    const e = JSON.parse(out.stdout) as { code: number; msg: string };
    assert.equal(e.code, 11);
    assert.match(e.msg, /pod default\/ghost is not among this node's pods after 300 ms/);
  });

  it("ADD fails when the kernel does not take the sets in time", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    const out = await runPlugin({ env: env("ADD"), stdin: conf() });
    assert.equal(out.exitCode, 1);
    const e = JSON.parse(out.stdout) as { code: number; msg: string };
    assert.equal(e.code, 11);
    assert.match(e.msg, /the kernel does not hold pod default\/a's sets after 500 ms/);
  });

  it("ADD of a pod no policy selects answers at once", async () => {
    state.setLocalPod(pendingPod("plain", { app: "other" }));
    state.takeChanges();
    const out = await runPlugin({ env: env("ADD", "plain"), stdin: conf() });
    assert.equal(out.exitCode, 0, out.stdout);
    assert.deepEqual(endpoints(state), []);
  });

  it("DEL answers once the addresses left the sets; CHECK then fails", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.attachPodNetwork("default/a", "c-a", ["10.244.1.9"]);
    state.takeChanges();
    sync.hold();
    const check = await runPlugin({ env: env("CHECK"), stdin: conf() });
    assert.equal(check.exitCode, 0, check.stdout);
    const del = runPlugin({ env: env("DEL"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(endpoints(state), []);
    sync.hold();
    assert.equal((await del).exitCode, 0);
    const again = await runPlugin({ env: env("CHECK"), stdin: conf() });
    assert.equal(again.exitCode, 1);
    assert.equal((JSON.parse(again.stdout) as { code: number }).code, 101);
    // DEL is idempotent.
    assert.equal((await runPlugin({ env: env("DEL"), stdin: conf() })).exitCode, 0);
  });

  it("DEL deletes the conntrack entries of each of the pod's addresses, once the sets no longer hold them", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    // The sets hold both families; the plugin's prevResult names the IPv4 address only.
    state.attachPodNetwork("default/a", "c-a", ["10.244.1.9", "fd00:244:1::9"]);
    state.takeChanges();
    sync.hold();
    const del = runPlugin({ env: env("DEL"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(endpoints(state), []);
    assert.equal(runner.calls.length, 0, "nothing deleted while the sets still hold the addresses");
    sync.hold();
    assert.equal((await del).exitCode, 0);
    assert.deepEqual(runner.calls.map((c) => c.argv).sort(), [
      "conntrack -D -f ipv4 -d 10.244.1.9",
      "conntrack -D -f ipv4 -s 10.244.1.9",
      "conntrack -D -f ipv6 -d fd00:244:1::9",
      "conntrack -D -f ipv6 -s fd00:244:1::9",
    ]);
    assert.ok(runner.calls.every((c) => c.setsUpdated));
    assert.deepEqual(logged, [], "none deleted (conntrack exits 1) is no failure");
    // A DEL of an older sandbox of a pod touches none of the addresses its new one has.
    state.setLocalPod(pendingPod("b", { app: "web" }));
    state.attachPodNetwork("default/b", "new", ["10.244.1.10"]);
    runner.calls.length = 0;
    assert.equal((await runPlugin({ env: env("DEL", "b"), stdin: conf() })).exitCode, 0);
    assert.equal(runner.calls.length, 0);
  });

  it("a repeated DEL leaves alone the connections of an address a later ADD gave another pod", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.attachPodNetwork("default/a", "c-a", ["10.244.1.9"]);
    state.takeChanges();
    sync.hold();
    const del = runPlugin({ env: env("DEL"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    sync.hold();
    assert.equal((await del).exitCode, 0);
    assert.equal(runner.calls.length, 2);
    // IPAM gives 10.244.1.9 to pod b.
    state.setLocalPod(pendingPod("b", { app: "web" }));
    state.takeChanges();
    const add = runPlugin({ env: env("ADD", "b"), stdin: conf() });
    while (sync.requested === sync.appliedUpTo) await new Promise((r) => setTimeout(r, 5));
    sync.hold();
    assert.equal((await add).exitCode, 0);
    assert.deepEqual(endpoints(state), ["default/b=10.244.1.9"]);
    // The runtime repeats pod a's DEL, with the result cached at its ADD.
    runner.calls.length = 0;
    const again = runPlugin({ env: env("DEL"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    sync.hold();
    assert.equal((await again).exitCode, 0);
    assert.equal(runner.calls.length, 0, "pod b's connections stay");
    assert.deepEqual(endpoints(state), ["default/b=10.244.1.9"]);
  });

  it("DEL succeeds when conntrack fails, and logs the pod, the address and the error", async () => {
    state.setLocalPod(pendingPod("a", { app: "web" }));
    state.attachPodNetwork("default/a", "c-a", ["10.244.1.9", "fd00:244:1::9"]);
    state.takeChanges();
    sync.hold();
    runner.answer = async (argv) => {
      if (argv.includes("ipv4")) throw new Error("Cannot run conntrack: spawn conntrack ENOENT");
      return {
        code: 1,
        stdout: "",
        stderr: "conntrack v1.4.7 (conntrack-tools): Operation failed: Operation not permitted\n",
      };
    };
    const del = runPlugin({ env: env("DEL"), stdin: conf() });
    await new Promise((r) => setTimeout(r, 50));
    sync.hold();
    const out = await del;
    assert.equal(out.exitCode, 0, out.stdout);
    assert.equal(server.served.del, 1);
    const warnings = logged
      .map((l) => [l.pod, l.ip, l.err])
      .sort((x, y) => String(x[1]).localeCompare(String(y[1])));
    assert.deepEqual(warnings, [
      ["default/a", "10.244.1.9", "Cannot run conntrack: spawn conntrack ENOENT"],
      [
        "default/a",
        "fd00:244:1::9",
        "Cannot run conntrack -D -f ipv6 -s fd00:244:1::9: exit 1: conntrack v1.4.7 (conntrack-tools): Operation failed: Operation not permitted",
      ],
    ]);
  });

  it("STATUS succeeds once the agent has synced its kernel", async () => {
    const out = await runPlugin({ env: { CNI_COMMAND: "STATUS" }, stdin: conf() });
    assert.equal(out.exitCode, 0, out.stdout);
  });

  it("refuses a request with an address it cannot parse, for good", async () => {
    const { httpTransport } = await import("../cni/plugin.ts");
    const r = await httpTransport(
      socket,
      "/v1/add",
      { containerId: "c", ifname: "eth0", namespace: "default", name: "a", ips: ["10.244.1.300"] },
      1000,
    );
    assert.equal(r.status, 400);
    assert.deepEqual(r.body, {
      error: 'Cannot parse pod address: current value is "10.244.1.300"',
      retry: false,
    });
  });
});
