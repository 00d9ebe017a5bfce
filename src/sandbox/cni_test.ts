import assert from "node:assert/strict";
import { describe, it } from "node:test";
import type { Runner, RunOptions, RunResult } from "../kernel/runner.ts";
import { CniError, cniAdd, cniDel, LOOPBACK, nodeConfList, podIPs } from "./cni.ts";

/** A runtime's view of the plugins: every call recorded, each plugin answering from a script. */
class Plugins implements Runner {
  readonly calls: { plugin: string; env: Record<string, string>; conf: Record<string, unknown> }[] =
    [];
  readonly #answer: (plugin: string, command: string) => RunResult;
  constructor(answer: (plugin: string, command: string) => RunResult) {
    this.#answer = answer;
  }
  async run(argv: readonly string[], options?: RunOptions): Promise<RunResult> {
    assert.equal(argv[0], "env");
    const env = Object.fromEntries(
      argv.slice(1, -1).map((kv) => [kv.slice(0, kv.indexOf("=")), kv.slice(kv.indexOf("=") + 1)]),
    );
    const plugin = argv.at(-1)!.split("/").pop()!;
    this.calls.push({ plugin, env, conf: JSON.parse(options?.stdin ?? "{}") });
    return this.#answer(plugin, env.CNI_COMMAND!);
  }
}

const RESULT = {
  cniVersion: "1.1.0",
  interfaces: [
    { name: "cni0", mac: "aa:aa:aa:aa:aa:aa" },
    { name: "veth1", mac: "bb:bb:bb:bb:bb:bb" },
    { name: "eth0", mac: "cc:cc:cc:cc:cc:cc", sandbox: "/run/netns/p" },
  ],
  ips: [
    { interface: 2, address: "10.244.1.2/24", gateway: "10.244.1.1" },
    { interface: 2, address: "fd00:244:0:1::2/64", gateway: "fd00:244:0:1::1" },
  ],
};
const ok = (stdout: unknown): RunResult => ({
  code: 0,
  stdout: JSON.stringify(stdout),
  stderr: "",
});
const list = nodeConfList({
  podCIDRs: { 4: "10.244.1.0/24", 6: "fd00:244:0:1::/64" },
  ipamDataDir: "/tmp/ipam",
  chained: [{ type: "sallyport-cni", socket: "/run/sallyport.sock" }],
});
const rt = (plugins: Plugins) => ({ runner: plugins, cniPath: "/opt/cni/bin" });
const pod = { containerId: "c1", netns: "/run/netns/p" };

describe("a node's configuration list", () => {
  it("is bridge with ipMasq and host-local over the node's pod CIDRs, portmap, then the chained plugins", () => {
    assert.deepEqual(
      list.plugins.map((p) => p.type),
      ["bridge", "portmap", "sallyport-cni"],
    );
    const bridge = list.plugins[0]!;
    assert.equal(bridge.ipMasq, true);
    assert.deepEqual((bridge.ipam as { ranges: unknown }).ranges, [
      [{ subnet: "10.244.1.0/24" }],
      [{ subnet: "fd00:244:0:1::/64" }],
    ]);
  });
});

describe("CNI ADD and DEL, as a runtime calls the plugins", () => {
  it("ADD runs the list in order with the CNI_* environment and each plugin's result as the next one's prevResult", async () => {
    const plugins = new Plugins(() => ok(RESULT));
    const result = await cniAdd(rt(plugins), list, pod);
    assert.deepEqual(
      plugins.calls.map((c) => c.plugin),
      ["bridge", "portmap", "sallyport-cni"],
    );
    assert.deepEqual(plugins.calls[0]!.env, {
      CNI_COMMAND: "ADD",
      CNI_CONTAINERID: "c1",
      CNI_NETNS: "/run/netns/p",
      CNI_IFNAME: "eth0",
      CNI_PATH: "/opt/cni/bin",
    });
    assert.equal(plugins.calls[0]!.conf.prevResult, undefined);
    assert.equal(plugins.calls[0]!.conf.name, "sandbox");
    assert.equal(plugins.calls[0]!.conf.cniVersion, "1.1.0");
    assert.deepEqual(plugins.calls[1]!.conf.prevResult, RESULT);
    assert.equal(plugins.calls[2]!.conf.socket, "/run/sallyport.sock");
    assert.deepEqual(podIPs(result), { 4: "10.244.1.2", 6: "fd00:244:0:1::2" });
  });

  it("DEL runs in reverse order with the ADD's result, asks every plugin even after a failure, then throws the first", async () => {
    const plugins = new Plugins((plugin) =>
      plugin === "portmap"
        ? { code: 1, stdout: JSON.stringify({ code: 11, msg: "no chain" }), stderr: "" }
        : ok({}),
    );
    await assert.rejects(
      cniDel(rt(plugins), list, pod, RESULT),
      (e: unknown) =>
        e instanceof CniError &&
        /plugin portmap of network "sandbox" failed: no chain/.test(e.message),
    );
    assert.deepEqual(
      plugins.calls.map((c) => [c.plugin, c.env.CNI_COMMAND]),
      [
        ["sallyport-cni", "DEL"],
        ["portmap", "DEL"],
        ["bridge", "DEL"],
      ],
    );
    assert.deepEqual(plugins.calls[2]!.conf.prevResult, RESULT);
  });

  it("a failing ADD names the plugin, the network and the plugin's own message", async () => {
    const plugins = new Plugins(() => ({
      code: 1,
      stdout: JSON.stringify({ code: 999, msg: "failed to allocate", details: "range full" }),
      stderr: "",
    }));
    await assert.rejects(
      cniAdd(rt(plugins), LOOPBACK, pod),
      /Cannot ADD pod network c1: plugin loopback of network "cni-loopback" failed: failed to allocate \(range full\) \[CNI error 999\]/,
    );
  });
});
