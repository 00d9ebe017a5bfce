import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { type AgentTransport, podAddresses, podIdentity, runPlugin } from "./plugin.ts";

const dir = mkdtempSync(join(tmpdir(), "sallyport-cni-plugin-"));
after(() => rmSync(dir, { recursive: true, force: true }));
/** A socket path nothing listens on. */
const NOWHERE = join(dir, "absent.sock");

const prevResult = {
  cniVersion: "1.0.0",
  interfaces: [
    { name: "cni0", mac: "aa:aa:aa:aa:aa:aa" },
    { name: "veth1", mac: "cc:cc:cc:cc:cc:cc" },
    { name: "eth0", mac: "bb:bb:bb:bb:bb:bb", sandbox: "/run/netns/p" },
  ],
  ips: [
    { address: "10.244.1.9/24", gateway: "10.244.1.1", interface: 2 },
    { address: "fd00:244:0:1::9/64", gateway: "fd00:244:0:1::1", interface: 2 },
    { address: "10.244.1.1/24", interface: 0 },
  ],
  dns: {},
};

function env(command: string, extra: Record<string, string> = {}) {
  return {
    CNI_COMMAND: command,
    CNI_CONTAINERID: "0123abcd",
    CNI_NETNS: "/run/netns/p",
    CNI_IFNAME: "eth0",
    CNI_PATH: "/opt/cni/bin",
    CNI_ARGS:
      "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=0123abcd",
    ...extra,
  };
}

function conf(fields: Record<string, unknown> = {}): string {
  return JSON.stringify({
    cniVersion: "1.0.0",
    name: "k8s-pod-network",
    type: "sallyport-cni",
    socket: NOWHERE,
    timeoutMs: 300,
    delTimeoutMs: 300,
    prevResult,
    ...fields,
  });
}

/** Records calls; answers with `reply` (or throws it). */
function recorder(
  reply: { status: number; body: unknown } | Error = { status: 200, body: { policies: [] } },
) {
  const calls: { socket: string; path: string; body: unknown; timeoutMs: number }[] = [];
  const transport: AgentTransport = async (socket, path, body, timeoutMs) => {
    calls.push({ socket, path, body, timeoutMs });
    if (reply instanceof Error) throw reply;
    return reply;
  };
  return { calls, transport };
}

function error(stdout: string): {
  cniVersion: string;
  code: number;
  msg: string;
  details?: string;
} {
  return JSON.parse(stdout) as never;
}

describe("sallyport-cni", () => {
  it("VERSION: the versions it speaks", async () => {
    const out = await runPlugin({
      env: { CNI_COMMAND: "VERSION" },
      stdin: '{"cniVersion":"1.0.0"}',
    });
    assert.equal(out.exitCode, 0);
    assert.deepEqual(JSON.parse(out.stdout), {
      cniVersion: "1.0.0",
      supportedVersions: ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    });
  });

  it("ADD: hands the pod's own addresses and name to the agent and returns prevResult", async () => {
    const { calls, transport } = recorder();
    const out = await runPlugin({
      env: env("ADD"),
      stdin: conf({ cniVersion: "1.1.0" }),
      transport,
    });
    assert.equal(out.exitCode, 0, out.stdout);
    assert.deepEqual(JSON.parse(out.stdout), { ...prevResult, cniVersion: "1.1.0" });
    assert.deepEqual(calls, [
      {
        socket: NOWHERE,
        path: "/v1/add",
        timeoutMs: 300,
        body: {
          containerId: "0123abcd",
          ifname: "eth0",
          namespace: "shop",
          name: "web-0",
          ips: ["10.244.1.9", "fd00:244:0:1::9"],
        },
      },
    ]);
  });

  it("ADD fails closed when the agent does not answer: try again later", async () => {
    const out = await runPlugin({ env: env("ADD"), stdin: conf() });
    assert.equal(out.exitCode, 1);
    const e = error(out.stdout);
    assert.equal(e.cniVersion, "1.0.0");
    assert.equal(e.code, 11);
    assert.match(e.msg, /^Cannot reach the Sallyport agent at .*absent\.sock: connect ENOENT/);
    assert.match(e.msg, /fail closed/);
  });

  it("ADD times out against an agent that accepts and never answers", async () => {
    const { calls, transport } = recorder(new Error("no answer within 300 ms"));
    const out = await runPlugin({ env: env("ADD"), stdin: conf(), transport });
    assert.equal(calls.length, 1);
    assert.equal(error(out.stdout).code, 11);
    assert.match(error(out.stdout).msg, /no answer within 300 ms/);
  });

  it("ADD with failOpen lets the pod start and says so on stderr", async () => {
    const out = await runPlugin({ env: env("ADD"), stdin: conf({ failOpen: true }) });
    assert.equal(out.exitCode, 0, out.stdout);
    assert.deepEqual(JSON.parse(out.stdout), prevResult);
    assert.match(
      out.stderr,
      /^sallyport-cni: shop\/web-0 \(10\.244\.1\.9, fd00:244:0:1::9\) starts unsteered/,
    );
  });

  it("ADD: the agent's refusal is an error whatever failOpen says", async () => {
    const { transport } = recorder({
      status: 400,
      body: { error: "Cannot parse pod address", retry: false },
    });
    const out = await runPlugin({ env: env("ADD"), stdin: conf({ failOpen: true }), transport });
    assert.equal(out.exitCode, 1);
    assert.deepEqual(error(out.stdout), {
      cniVersion: "1.0.0",
      code: 100,
      msg: "The Sallyport agent refused: Cannot parse pod address",
    });
  });

  it("ADD without prevResult: not chained", async () => {
    const out = await runPlugin({ env: env("ADD"), stdin: conf({ prevResult: undefined }) });
    assert.equal(error(out.stdout).code, 7);
    assert.match(error(out.stdout).msg, /chained plugin; put it last/);
  });

  it("ADD of something that is not a Kubernetes pod passes prevResult through", async () => {
    const { calls, transport } = recorder();
    const out = await runPlugin({
      env: env("ADD", { CNI_ARGS: "IgnoreUnknown=1" }),
      stdin: conf(),
      transport,
    });
    assert.equal(out.exitCode, 0);
    assert.deepEqual(JSON.parse(out.stdout), prevResult);
    assert.equal(calls.length, 0);
  });

  it("errors: environment, version, configuration, command", async () => {
    const noId = await runPlugin({ env: env("ADD", { CNI_CONTAINERID: "" }), stdin: conf() });
    assert.deepEqual(error(noId.stdout), {
      cniVersion: "1.0.0",
      code: 4,
      msg: "Cannot run without CNI_CONTAINERID set",
    });
    const old = await runPlugin({ env: env("ADD"), stdin: conf({ cniVersion: "0.2.0" }) });
    assert.equal(error(old.stdout).code, 1);
    const bad = await runPlugin({ env: env("ADD"), stdin: "{not json" });
    assert.equal(error(bad.stdout).code, 6);
    assert.equal(error(bad.stdout).msg, "Cannot parse the network configuration on stdin");
    const field = await runPlugin({ env: env("ADD"), stdin: conf({ timeoutMs: "10s" }) });
    assert.deepEqual(error(field.stdout), {
      cniVersion: "1.0.0",
      code: 7,
      msg: 'Cannot use the plugin\'s field "timeoutMs": current value is "10s", expected a number',
    });
    const cmd = await runPlugin({ env: env("FROB"), stdin: conf() });
    assert.equal(error(cmd.stdout).code, 4);
  });

  it("DEL asks the agent to remove the addresses; succeeds (and logs) when it cannot", async () => {
    const { calls, transport } = recorder();
    const out = await runPlugin({ env: env("DEL"), stdin: conf(), transport });
    assert.deepEqual(out, { exitCode: 0, stdout: "", stderr: "" });
    assert.equal(calls[0]?.path, "/v1/del");
    const down = await runPlugin({ env: env("DEL"), stdin: conf() });
    assert.equal(down.exitCode, 0);
    assert.equal(down.stdout, "");
    assert.match(
      down.stderr,
      /DEL of shop\/web-0 \(10\.244\.1\.9, fd00:244:0:1::9\) went on without the agent/,
    );
    // Without prevResult (the runtime lost its cache) and without a netns: still a DEL by name.
    const bare = recorder();
    const again = await runPlugin({
      env: env("DEL", { CNI_NETNS: "" }),
      stdin: conf({ prevResult: undefined }),
      transport: bare.transport,
    });
    assert.equal(again.exitCode, 0);
    assert.deepEqual(
      bare.calls.map((c) => (c.body as { ips: string[] }).ips),
      [[]],
    );
  });

  it("CHECK: the agent not holding the pod is an error", async () => {
    const { transport } = recorder({ status: 404, body: { error: "not held", retry: false } });
    const out = await runPlugin({ env: env("CHECK"), stdin: conf(), transport });
    assert.equal(error(out.stdout).code, 101);
    const ok = await runPlugin({
      env: env("CHECK"),
      stdin: conf(),
      transport: recorder().transport,
    });
    assert.deepEqual(ok, { exitCode: 0, stdout: "", stderr: "" });
  });

  it("STATUS: code 50 while the agent does not answer; GC: nothing to do", async () => {
    const out = await runPlugin({
      env: { CNI_COMMAND: "STATUS" },
      stdin: conf({ cniVersion: "1.1.0" }),
    });
    assert.equal(error(out.stdout).code, 50);
    const gc = await runPlugin({
      env: { CNI_COMMAND: "GC" },
      stdin: conf({ cniVersion: "1.1.0" }),
    });
    assert.equal(gc.exitCode, 0);
  });

  it("reads K8S_POD_* from CNI_ARGS and the pod's addresses from prevResult", () => {
    assert.deepEqual(podIdentity("K8S_POD_NAME=a;K8S_POD_NAMESPACE=b"), {
      namespace: "b",
      name: "a",
    });
    assert.equal(podIdentity("K8S_POD_NAME=a"), undefined);
    assert.equal(podIdentity(undefined), undefined);
    // 0.3.x results name no interface: every address counts.
    assert.deepEqual(podAddresses({ ips: [{ address: "10.1.0.5/24" }] }), ["10.1.0.5"]);
  });

  it("runs as the executable a runtime calls (node on main.ts)", () => {
    const r = spawnSync(process.execPath, [join(import.meta.dirname, "main.ts")], {
      env: { ...process.env, ...env("ADD") },
      input: conf(),
      encoding: "utf8",
    });
    assert.equal(r.status, 1);
    assert.equal(error(r.stdout).code, 11);
    const v = spawnSync(process.execPath, [join(import.meta.dirname, "main.ts")], {
      env: { ...process.env, CNI_COMMAND: "VERSION" },
      input: "",
      encoding: "utf8",
    });
    assert.equal(v.status, 0);
    assert.equal((JSON.parse(v.stdout) as { cniVersion: string }).cniVersion, "1.1.0");
  });
});
