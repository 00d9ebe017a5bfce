/**
 * The command line as a user meets it: each kind of mistake prints its message, naming the flag,
 * file, line or field, exits with its code, and never shows a stack trace. The commands run as
 * processes (`node src/cli/main.ts …`); the API server's answers are in
 * test/controlplane/cli_test.ts.
 */
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { Command } from "commander";
import { parse } from "yaml";
import { ApiError } from "../kube/client.ts";
import { applyConventions, describeError, runCli } from "./errors.ts";
import { buildProgram } from "./program.ts";

const MAIN = join(import.meta.dirname, "main.ts");
const TESTDATA = join(import.meta.dirname, "..", "convert", "testdata");
const dir = mkdtempSync(join(tmpdir(), "sallyport-test-cli-"));
const file = (name: string, text: string) => {
  const path = join(dir, name);
  writeFileSync(path, text);
  return path;
};

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the CLI as a process; the tests of a group run at once (each spends its time starting Node). */
function sallyport(args: string[], env: Record<string, string> = {}, input?: string): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [MAIN, ...args], {
      env: { ...process.env, SALLYPORT_DEBUG: "", KUBECONFIG: "", HOME: dir, ...env },
      timeout: 60_000,
    });
    let stdout = "";
    let stderr = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => {
      stdout += d;
    });
    child.stderr.setEncoding("utf8").on("data", (d: string) => {
      stderr += d;
    });
    child.on("error", reject);
    child.on("close", (code) => resolve({ code, stdout, stderr }));
    child.stdin.end(input ?? "");
  });
}

/** A port nothing listens on: one the kernel just handed out and took back. */
async function closedPort(): Promise<number> {
  return new Promise((resolve) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

const STACK = /^\s+at .+:\d+:\d+\)?$/m;

function expectFailure(r: Run, code: number, ...messages: (string | RegExp)[]): void {
  assert.equal(r.code, code, `exit code; stderr:\n${r.stderr}`);
  for (const m of messages) {
    if (typeof m === "string")
      assert.ok(r.stderr.includes(m), `stderr lacks ${JSON.stringify(m)}:\n${r.stderr}`);
    else assert.match(r.stderr, m);
  }
  assert.doesNotMatch(r.stderr, STACK, "a stack trace");
  assert.doesNotMatch(r.stderr, /unexpected error/);
}

const POLICY_WITH_TYPO = `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: egress-sample
  namespace: default
spec:
  podSelector:
    matchLabels: { org: empire }
  destinationCIDRs: ["192.168.77.200/32"]
  gateway: edge
  egresIP: ["192.168.77.100"]
`;

after(() => rmSync(dir, { recursive: true, force: true }));

describe("sallyport CLI: every mistake gives a message and an exit code, never a stack trace", {
  concurrency: true,
}, () => {
  it("unknown flag: names it, points to the command's help, exit 2", async () => {
    expectFailure(
      await sallyport(["convert", "-f", "x.yaml", "--nope"]),
      2,
      "error: unknown option '--nope'",
      "See 'sallyport convert --help' for usage.",
    );
  });

  it("unknown command: exit 2", async () => {
    expectFailure(
      await sallyport(["conver"]),
      2,
      "error: unknown command 'conver'",
      "(Did you mean convert?)",
    );
  });

  it("bad flag value: names the flag and the value, exit 2", async () => {
    expectFailure(
      await sallyport(["explain", "web", "192.0.2.1", "--port", "70000"]),
      2,
      "error: option '--port <port>' argument '70000' is invalid. Expected a port number from 1 to 65535.",
    );
    expectFailure(
      await sallyport(["convert", "-f", "x.yaml", "-o", "xml"]),
      2,
      "error: option '-o, --output <format>' argument 'xml' is invalid. Allowed choices are yaml, json.",
    );
  });

  it("missing flag or argument: exit 2", async () => {
    expectFailure(
      await sallyport(["convert"]),
      2,
      "error: convert needs -f FILE (or -f - for stdin)",
    );
    expectFailure(
      await sallyport(["explain", "web"]),
      2,
      "error: missing required argument 'destination'",
    );
  });

  it("missing file: names it, exit 1", async () => {
    const missing = join(dir, "nowhere.yaml");
    expectFailure(
      await sallyport(["convert", "-f", missing]),
      1,
      `error: Cannot read file ${missing}: no such file or directory`,
    );
    expectFailure(
      await sallyport(["validate", "-f", dir]),
      1,
      `error: Cannot read file ${dir}: it is a directory`,
    );
  });

  it("YAML syntax error: names the file, line and column, and shows them, exit 1", async () => {
    const bad = file("bad.yaml", "apiVersion: v1\nkind: List\nitems: [1, 2\nmore: 3\n");
    const r = await sallyport(["convert", "-f", bad]);
    expectFailure(
      r,
      1,
      `error: Cannot parse ${bad}: line 4, column 1: Flow sequence in block collection must be sufficiently indented and end with a ]`,
    );
    assert.match(r.stderr, /\n {2}more: 3\n {2}\^/);
  });

  it("invalid object: our validator names the field and the fix, exit 1", async () => {
    const typo = file("typo.yaml", POLICY_WITH_TYPO);
    const r = await sallyport(["validate", "-f", typo]);
    expectFailure(
      r,
      1,
      `error: ${typo} has a problem:`,
      "  EgressPolicy default/egress-sample: spec.egresIP: unknown field: remove it or check its spelling",
    );
    assert.equal(r.stdout, "");
    const fine = await sallyport([
      "validate",
      "-f",
      join(import.meta.dirname, "..", "..", "examples", "egress-sample.yaml"),
    ]);
    assert.equal(fine.code, 0, fine.stderr);
    assert.equal(
      fine.stdout,
      "EgressGateway edge is valid\nEgressPolicy default/egress-sample is valid\n",
    );
  });

  it("a kubeconfig that cannot be used: exit 1", async () => {
    expectFailure(
      await sallyport(["status", "--kubeconfig", join(dir, "nope")]),
      1,
      `error: Cannot read kubeconfig ${join(dir, "nope")}: no such file`,
    );
    expectFailure(
      await sallyport(["status"]),
      1,
      "error: Cannot find a kubeconfig: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config",
    );
    const kc = file(
      "kubeconfig",
      JSON.stringify({
        apiVersion: "v1",
        kind: "Config",
        clusters: [{ name: "c", cluster: { server: "https://127.0.0.1:1" } }],
        users: [{ name: "u", user: { token: "t" } }],
        contexts: [{ name: "here", context: { cluster: "c", user: "u" } }],
        "current-context": "here",
      }),
    );
    expectFailure(
      await sallyport(["status", "--kubeconfig", kc, "--context", "there"]),
      1,
      'error: Cannot use context "there": the kubeconfig has only here',
    );
    const closed = await closedPort();
    writeFileSync(kc, readFileSync(kc, "utf8").replace("127.0.0.1:1", `127.0.0.1:${closed}`));
    expectFailure(
      await sallyport(["status"], { KUBECONFIG: kc }),
      1,
      `error: Cannot reach the API server: connect ECONNREFUSED 127.0.0.1:${closed}; check --kubeconfig, --context or KUBECONFIG`,
    );
  });

  it("help exits 0", async () => {
    const r = await sallyport(["convert", "--help"]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /Usage: sallyport convert \[options\]/);
  });
});

describe("sallyport convert", { concurrency: true }, () => {
  it("writes Sallyport YAML on stdout and the warnings on stderr, exit 0", async () => {
    const r = await sallyport(["convert", "-f", join(TESTDATA, "cilium", "seed-003.yaml")]);
    assert.equal(r.code, 0, r.stderr);
    const docs = r.stdout
      .split(/^---$/m)
      .map((d) => parse(d) as { kind: string; metadata: { name: string } });
    assert.deepEqual(
      docs.map((d) => `${d.kind}/${d.metadata.name}`),
      ["EgressGateway/node2", "EgressPolicy/egress-sample"],
    );
    assert.equal(
      r.stderr,
      "Warning: CiliumEgressGatewayPolicy/egress-sample spec.egressGateway.egressIP: approximated: Cilium needs 10.168.60.100 configured on the gateway node's interface beforehand; Sallyport assigns it to the gateway node it picks and moves it on failover: take it off the node's interface configuration when you switch\n",
    );
  });

  it("reads stdin and writes JSON", async () => {
    const r = await sallyport(
      ["convert", "-f", "-", "-o", "json"],
      {},
      `apiVersion: egressgateway.spidernet.io/v1beta1
kind: EgressGateway
metadata: {name: g}
spec: {nodeSelector: {selector: {matchLabels: {egress: "true"}}}}
`,
    );
    assert.equal(r.code, 0, r.stderr);
    assert.equal((JSON.parse(r.stdout) as { kind: string }).kind, "EgressGateway");
  });

  it("writes what it can and exits 1 naming what it cannot convert", async () => {
    const r = await sallyport(["convert", "-f", join(TESTDATA, "cilium", "gateway-choices.yaml")]);
    expectFailure(
      r,
      1,
      "error: Cannot convert CiliumEgressGatewayPolicy/ignored-by-cilium: spec.egressGateway: sets both egressIP and interface, so Cilium ignores this policy",
    );
    assert.equal(r.stdout.split(/^---$/m).length, 4, "the gateway and three policies");
  });

  it("exits 1 when the input holds nothing it reads", async () => {
    const other = file(
      "deployment.yaml",
      "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n",
    );
    expectFailure(
      await sallyport(["convert", "-f", other]),
      1,
      "Warning: Deployment.apps/web kind: skipped",
      `error: Cannot convert ${other}: it holds no CiliumEgressGatewayPolicy (cilium.io)`,
    );
  });
});

describe("sallyport as a kubectl plugin", { concurrency: true }, () => {
  it("holds only the commands that talk to the API as kubectl does", async () => {
    const r = await sallyport(["sandbox", "status"], { SALLYPORT_KUBECTL_PLUGIN: "1" });
    expectFailure(
      r,
      2,
      "error: unknown command 'sandbox'",
      "See 'kubectl sallyport --help' for usage.",
    );
    const help = await sallyport(["--help"], { SALLYPORT_KUBECTL_PLUGIN: "1" });
    assert.match(help.stdout, /Usage: kubectl sallyport/);
    for (const c of ["explain", "status", "convert", "validate"])
      assert.match(help.stdout, new RegExp(`\\n  ${c} `));
    assert.doesNotMatch(help.stdout, /\n {2}(controller|agent|sandbox|cleanup|datapath) /);
  });

  it("is bin/kubectl-sallyport", async () => {
    const r = spawnSync(
      join(import.meta.dirname, "..", "..", "bin", "kubectl-sallyport"),
      ["status", "--context", "x"],
      {
        encoding: "utf8",
        env: { ...process.env, KUBECONFIG: join(dir, "absent"), PATH: `${process.env.PATH}` },
      },
    );
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /^error: Cannot read kubeconfig .*absent: no such file\n$/);
  });
});

describe("sandbox exec passes options through to the command", () => {
  for (const argv of [
    ["sandbox", "exec", "bot", "curl", "-s", "--max-time", "2", "http://x"],
    ["sandbox", "exec", "bot", "--", "curl", "-s", "--max-time", "2", "http://x"],
    ["sandbox", "exec", "--prefix", "sp", "bot", "curl", "-s", "--max-time", "2", "http://x"],
  ]) {
    it(argv.join(" "), async () => {
      const program = await buildProgram({ argv: ["node", "sallyport", "sandbox"] });
      const exec = program.commands
        .find((c) => c.name() === "sandbox")!
        .commands.find((c) => c.name() === "exec")!;
      let seen: unknown;
      exec.action((pod: string, args: string[], f: { prefix: string }) => {
        seen = { pod, args, prefix: f.prefix };
      });
      await program.parseAsync(["node", "sallyport", ...argv]);
      const { commandOf } = await import("./sandbox.ts");
      const s = seen as { pod: string; args: string[]; prefix: string };
      assert.equal(s.pod, "bot");
      assert.equal(s.prefix, "sp");
      assert.deepEqual(commandOf(s.args), ["curl", "-s", "--max-time", "2", "http://x"]);
    });
  }
});

describe("runCli()", () => {
  const program = (action: () => void) => {
    const p = new Command("tool");
    p.command("go").action(action);
    applyConventions(p);
    return p;
  };
  const run = async (action: () => void, argv: string[], env: NodeJS.ProcessEnv = {}) => {
    const lines: string[] = [];
    const code = await runCli(program(action), ["node", "tool", ...argv], {
      stderr: (l) => lines.push(l),
      env,
    });
    return { code, text: lines.join("\n") };
  };

  it("prints an unexpected error's message with a hint, and its stack only with --debug", async () => {
    const bug = () => {
      throw new TypeError("x.y is not a function");
    };
    const plain = await run(bug, ["go"]);
    assert.equal(plain.code, 1);
    assert.match(
      plain.text,
      /^error: x\.y is not a function\n\(an unexpected error: run again with --debug/,
    );
    assert.doesNotMatch(plain.text, STACK);
    const debug = await run(bug, ["go", "--debug"]);
    assert.match(debug.text, STACK);
    const env = await run(bug, ["go"], { SALLYPORT_DEBUG: "1" });
    assert.match(env.text, STACK);
  });

  it("turns the API's Status into kubectl's line, with one line per cause", async () => {
    const invalid = new ApiError(
      "POST",
      "/apis/sallyport.dev/v1alpha1/namespaces/default/egresspolicies",
      422,
      {
        kind: "Status",
        status: "Failure",
        reason: "Invalid",
        message:
          'EgressPolicy.sallyport.dev "p" is invalid: [spec.egressIP: Invalid value: "array": egressIP and interface cannot be set together, spec.ports[0].endPort: Invalid value: "object": endPort needs port]',
        details: {
          name: "p",
          group: "sallyport.dev",
          kind: "EgressPolicy",
          causes: [
            {
              reason: "FieldValueInvalid",
              field: "spec.egressIP",
              message: 'Invalid value: "array": egressIP and interface cannot be set together',
            },
            {
              reason: "FieldValueInvalid",
              field: "spec.ports[0].endPort",
              message: 'Invalid value: "object": endPort needs port',
            },
          ],
        },
        code: 422,
      },
    );
    assert.deepEqual(describeError(invalid).lines, [
      'Error from server (Invalid): EgressPolicy.sallyport.dev "p" is invalid: [spec.egressIP: Invalid value: "array": egressIP and interface cannot be set together, spec.ports[0].endPort: Invalid value: "object": endPort needs port]',
      '  spec.egressIP: Invalid value: "array": egressIP and interface cannot be set together',
      '  spec.ports[0].endPort: Invalid value: "object": endPort needs port',
    ]);
    const noCrd = new ApiError("GET", "/apis/sallyport.dev/v1alpha1/egressgateways", 404, {
      kind: "Status",
      reason: "NotFound",
      message: "the server could not find the requested resource",
      details: {},
      code: 404,
    });
    assert.match(
      describeError(noCrd).lines.join("\n"),
      /Error from server \(NotFound\): the server could not find the requested resource\n {2}\(the API server has no Sallyport kinds/,
    );
  });
});
