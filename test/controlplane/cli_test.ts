/**
 * The CLI against a real kube-apiserver: what the user reads when the API server refuses an
 * object (strict field validation, CEL), when an object is missing, when RBAC forbids, and the
 * same through kubectl's plugin mechanism. Every command runs as a process.
 *
 * `sandbox apply` needs a sandbox; the test writes the state file of one whose control plane is
 * this test's (nodes and pods are not needed to apply manifests).
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { after, before, describe, it } from "node:test";
import { convert } from "../../src/convert/convert.ts";
import { parseManifests } from "../../src/kube/apply.ts";
import {
  CORE,
  isAlreadyExists,
  isNotFound,
  type KubeClient,
  type KubeObject,
  ours,
} from "../../src/kube/client.ts";
import { ControlPlane, REPO } from "../../src/sandbox/controlplane.ts";

const MAIN = join(REPO, "src", "cli", "main.ts");
const STACK = /^\s+at .+:\d+:\d+\)?$/m;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

const GATEWAY = `apiVersion: sallyport.dev/v1alpha1
kind: EgressGateway
metadata:
  name: edge
spec:
  nodeSelector:
    matchLabels: { egress: "true" }
  pool: ["192.168.77.100-192.168.77.120"]
`;

const policy = (extra: string) => `apiVersion: sallyport.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: egress-sample
  namespace: default
spec:
  podSelector:
    matchLabels: { org: empire, class: mediabot }
  destinationCIDRs: ["192.168.77.200/32"]
  gateway: edge
${extra}`;

function kubectlOnPath(): boolean {
  return (process.env.PATH ?? "")
    .split(delimiter)
    .some((d) => d !== "" && existsSync(join(d, "kubectl")));
}

describe("the CLI against a real API server", () => {
  let cp: ControlPlane;
  let client: KubeClient;
  let dir: string;
  let kubeconfig: string;

  const run = (argv: string[], env: Record<string, string> = {}): Run => {
    const r = spawnSync(process.execPath, [MAIN, ...argv], {
      encoding: "utf8",
      env: {
        ...process.env,
        SALLYPORT_CACHE: dir,
        KUBECONFIG: kubeconfig,
        SALLYPORT_DEBUG: "",
        ...env,
      },
      timeout: 60_000,
    });
    return { code: r.status, stdout: r.stdout, stderr: r.stderr };
  };
  const file = (name: string, text: string) => {
    writeFileSync(join(dir, name), text);
    return join(dir, name);
  };
  const noStack = (r: Run) => {
    assert.doesNotMatch(r.stderr, STACK);
    assert.doesNotMatch(r.stderr, /unexpected error/);
  };

  before(async () => {
    cp = await ControlPlane.start({ tag: "cli", users: { viewer: ["viewers"] } });
    client = cp.client();
    dir = mkdtempSync(join(tmpdir(), "sallyport-test-cli-api-"));
    kubeconfig = cp.kubeconfig();
    // A sandbox "t" whose control plane is this one.
    mkdirSync(join(dir, "sandbox", "t"), { recursive: true });
    writeFileSync(
      join(dir, "sandbox", "t", "state.json"),
      JSON.stringify({
        prefix: "t",
        nodes: 0,
        families: [4],
        gatewayNodes: [],
        pids: {},
        pods: [],
        apiserver: cp.url,
        cpDir: cp.dir,
        agentArgs: [],
        controllerArgs: [],
      }),
    );
  });

  after(async () => {
    await cp?.stop();
    if (dir !== undefined) rmSync(dir, { recursive: true, force: true });
  });

  it("sandbox apply asks for strict field validation: a misspelled field is refused by name", async () => {
    const typo = file("typo.yaml", `${GATEWAY}---\n${policy('  egresIP: ["192.168.77.100"]\n')}`);
    const r = run(["sandbox", "apply", "--prefix", "t", "-f", typo]);
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stdout, "egressgateway/edge created\n", "the other objects are applied");
    assert.equal(
      r.stderr,
      [
        'Error from server (BadRequest): error when creating egresspolicy/egress-sample: EgressPolicy in version "v1alpha1" cannot be handled as a EgressPolicy: strict decoding error: unknown field "spec.egresIP"',
        "  spec.egresIP: unknown field: remove it or check its spelling (kubectl explain egresspolicy.spec lists the fields)",
        "",
      ].join("\n"),
    );
    // Before strict validation the policy was created without the field and got a pool address.
    await assert.rejects(client.get(ours("EgressPolicy"), "egress-sample", "default"), isNotFound);

    const fixed = file(
      "fixed.yaml",
      `${GATEWAY}---\n${policy('  egressIP: ["192.168.77.100"]\n')}`,
    );
    const ok = run(["sandbox", "apply", "--prefix", "t", "-f", fixed]);
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal(ok.stdout, "egressgateway/edge configured\negresspolicy/egress-sample created\n");
  });

  it("a rule of the CRD (CEL) is refused with the field it names", () => {
    const both = file(
      "both.yaml",
      policy('  egressIP: ["192.168.77.101"]\n  interface: eth1\n').replace(
        "name: egress-sample",
        "name: both",
      ),
    );
    const r = run(["sandbox", "apply", "--prefix", "t", "-f", both]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr,
      /^Error from server \(Invalid\): error when creating egresspolicy\/both: EgressPolicy\.sallyport\.dev "both" is invalid: spec\.egressIP: Invalid value: .*egressIP and interface cannot be set together/,
    );
    noStack(r);
  });

  it("a missing object: kubectl's NotFound line, exit 1", () => {
    const r = run(["status", "egp/nope"]);
    assert.equal(r.code, 1);
    assert.equal(
      r.stderr,
      'Error from server (NotFound): egresspolicies.sallyport.dev "nope" not found\n',
    );
    const pod = run(["explain", "nope", "192.0.2.1"]);
    assert.equal(pod.code, 1);
    assert.equal(pod.stderr, "error: Cannot explain: pod default/nope does not exist\n");
    const elsewhere = run(["explain", "nope", "192.0.2.1", "-n", "team-b"]);
    assert.equal(elsewhere.stderr, "error: Cannot explain: pod team-b/nope does not exist\n");
  });

  it("a user without the right: Forbidden, exit 1", () => {
    const r = run(["status"], { KUBECONFIG: cp.kubeconfig("viewer") });
    assert.equal(r.code, 1);
    assert.match(
      r.stderr,
      /^Error from server \(Forbidden\): \w+\.sallyport\.dev is forbidden: User "viewer" cannot list resource "\w+" in API group "sallyport\.dev"/,
    );
    noStack(r);
  });

  it("status shows the objects, and one in detail", () => {
    const all = run(["status"]);
    assert.equal(all.code, 0, all.stderr);
    assert.match(all.stdout, /^GATEWAYS\nNAME +READY +POOL +NODES\nedge +0\/0\n/);
    assert.match(all.stdout, /\negp\/default\/egress-sample +edge\n/);
    const one = run(["status", "egress-sample", "-n", "default"]);
    assert.equal(one.code, 0, one.stderr);
    assert.match(one.stdout, /^EgressPolicy default\/egress-sample\n {2}Gateway: +edge\n/);
    assert.match(one.stdout, /Conditions:\n {2}\(none yet: is the controller running\?\)/);
    const bad = run(["status", "pods/x"]);
    assert.equal(bad.code, 2);
    assert.match(
      bad.stderr,
      /^error: Cannot show "pods\/x": write egp\/NAME \(or NAME\), cegp\/NAME or egw\/NAME/,
    );
  });

  it("what convert writes for every fixture and example, the API server accepts", async () => {
    const sources = [
      ...["cilium", "spidernet"].flatMap((d) =>
        readdirSync(join(REPO, "src", "convert", "testdata", d)).map((f) =>
          join(REPO, "src", "convert", "testdata", d, f),
        ),
      ),
      join(REPO, "examples", "migration", "cilium.yaml"),
      join(REPO, "examples", "migration", "spidernet.yaml"),
    ];
    let checked = 0;
    for (const source of sources) {
      const { objects } = convert(parseManifests(readFileSync(source, "utf8"), source));
      for (const o of objects) {
        const obj = structuredClone(o) as unknown as KubeObject;
        obj.metadata.name = `converted-${obj.metadata.name}`; // apart from the other tests' objects
        if (obj.kind === "EgressPolicy") {
          obj.metadata.namespace ??= "default";
          await client
            .create(CORE.namespaces, {
              apiVersion: "v1",
              kind: "Namespace",
              metadata: { name: obj.metadata.namespace },
            })
            .catch((e: unknown) => {
              if (!isAlreadyExists(e)) throw e;
            });
        }
        const kind = obj.kind as "EgressGateway" | "EgressPolicy" | "ClusterEgressPolicy";
        await client
          .create(ours(kind), obj, { dryRun: "All", fieldValidation: "Strict" })
          .catch((e: unknown) =>
            assert.fail(`${source}: ${kind}/${obj.metadata.name}: ${String(e)}`),
          );
        checked++;
      }
    }
    assert.ok(checked > 30, `${checked} objects`);
  });

  it("works as `kubectl sallyport` with kubectl's flags", {
    skip: !kubectlOnPath() && "no kubectl on PATH",
  }, () => {
    const env = {
      ...process.env,
      PATH: `${join(REPO, "bin")}${delimiter}${process.env.PATH}`,
      KUBECONFIG: kubeconfig,
    };
    const kubectl = (args: string[]) =>
      spawnSync("kubectl", args, { encoding: "utf8", env, timeout: 60_000 });
    const one = kubectl(["sallyport", "status", "egp/egress-sample", "-n", "default"]);
    assert.equal(one.status, 0, one.stderr);
    assert.match(one.stdout, /^EgressPolicy default\/egress-sample\n/);
    const missing = kubectl([
      "sallyport",
      "status",
      "egp/egress-sample",
      "--namespace",
      "elsewhere",
    ]);
    assert.equal(missing.status, 1);
    assert.equal(
      missing.stderr,
      'Error from server (NotFound): egresspolicies.sallyport.dev "egress-sample" not found\n',
    );
    const context = kubectl([
      "sallyport",
      "status",
      "--context",
      "nope",
      "--kubeconfig",
      kubeconfig,
    ]);
    assert.equal(context.status, 1);
    assert.equal(
      context.stderr,
      'error: Cannot use context "nope": the kubeconfig has only sandbox\n',
    );
    const usage = kubectl(["sallyport", "status", "--bogus"]);
    assert.equal(usage.status, 2);
    assert.equal(
      usage.stderr,
      "error: unknown option '--bogus'\nSee 'kubectl sallyport status --help' for usage.\n",
    );
  });
});
