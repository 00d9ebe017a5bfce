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
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { bundle } from "../../scripts/build.ts";
import { activeConfFile, ensureEntry, installCni, uninstallCni } from "./install.ts";

const root = mkdtempSync(join(tmpdir(), "sallyport-cni-install-"));
after(() => rmSync(root, { recursive: true, force: true }));
let n = 0;

/** A host's directories as the init container sees them, with a primary CNI's files. */
function host(files: Record<string, unknown>) {
  const dir = join(root, `host-${n++}`);
  const confDir = join(dir, "etc", "cni", "net.d");
  mkdirSync(confDir, { recursive: true });
  for (const [name, content] of Object.entries(files))
    writeFileSync(
      join(confDir, name),
      typeof content === "string" ? content : JSON.stringify(content),
    );
  const fakeBundle = join(dir, "bundle.mjs");
  writeFileSync(fakeBundle, "// the plugin\n");
  return {
    dir,
    confDir,
    options: {
      binDir: join(dir, "opt", "cni", "bin"),
      confDir,
      libDir: join(dir, "opt", "sallyport", "cni"),
      hostLibDir: "/opt/sallyport/cni",
      node: process.execPath,
      bundle: fakeBundle,
    },
  };
}

const calico = {
  name: "k8s-pod-network",
  cniVersion: "0.3.1",
  plugins: [
    { type: "calico", ipam: { type: "calico-ipam" } },
    { type: "portmap", capabilities: { portMappings: true }, snat: true },
  ],
};

describe("sallyport cni install", () => {
  it("appends the plugin to the list the runtime uses (the first by name), once", () => {
    const h = host({ "10-calico.conflist": calico, "99-other.conflist": { ...calico, name: "x" } });
    assert.equal(activeConfFile(h.confDir), join(h.confDir, "10-calico.conflist"));
    const r = installCni({ ...h.options, timeoutMs: 5000 });
    assert.deepEqual(r, { confFile: join(h.confDir, "10-calico.conflist"), changed: true });
    const list = JSON.parse(readFileSync(r.confFile, "utf8")) as typeof calico;
    assert.deepEqual(
      list.plugins.map((p) => p.type),
      ["calico", "portmap", "sallyport-cni"],
    );
    assert.deepEqual(list.plugins[2], {
      type: "sallyport-cni",
      socket: "/run/sallyport/cni.sock",
      timeoutMs: 5000,
    });
    assert.equal(installCni({ ...h.options, timeoutMs: 5000 }).changed, false, "idempotent");
    assert.equal(installCni({ ...h.options, timeoutMs: 7000 }).changed, true, "our fields updated");
    assert.equal(
      (JSON.parse(readFileSync(r.confFile, "utf8")) as typeof calico).plugins.length,
      3,
      "still one entry of ours",
    );
    assert.equal(
      readFileSync(join(h.options.binDir, "sallyport-cni"), "utf8"),
      '#!/bin/sh\n# Installed by the Sallyport agent\'s init container (sallyport cni install).\nexec /opt/sallyport/cni/node /opt/sallyport/cni/sallyport-cni.mjs "$@"\n',
    );
    assert.deepEqual(readdirSync(h.options.libDir).sort(), ["node", "sallyport-cni.mjs"]);
    assert.deepEqual(
      readdirSync(h.confDir).filter((f) => f.startsWith(".")),
      [],
      "no temporary file left",
    );
  });

  it("puts the entry back when the primary CNI rewrote its list without it (--watch-ms)", () => {
    const h = host({ "10-calico.conflist": calico });
    installCni(h.options);
    writeFileSync(join(h.confDir, "10-calico.conflist"), JSON.stringify(calico));
    const r = ensureEntry(h.options);
    assert.equal(r.changed, true);
    assert.deepEqual(
      (JSON.parse(readFileSync(r.confFile, "utf8")) as typeof calico).plugins.map((p) => p.type),
      ["calico", "portmap", "sallyport-cni"],
    );
    assert.equal(ensureEntry(h.options).changed, false);
  });

  it("makes a single plugin's .conf a list", () => {
    const h = host({
      "10-bridge.conf": { cniVersion: "1.0.0", name: "bridge-net", type: "bridge", bridge: "cni0" },
    });
    const r = installCni(h.options);
    assert.equal(r.confFile, join(h.confDir, "10-bridge.conflist"));
    assert.equal(existsSync(join(h.confDir, "10-bridge.conf")), false);
    assert.deepEqual(JSON.parse(readFileSync(r.confFile, "utf8")), {
      cniVersion: "1.0.0",
      name: "bridge-net",
      plugins: [
        { type: "bridge", bridge: "cni0" },
        { type: "sallyport-cni", socket: "/run/sallyport/cni.sock" },
      ],
    });
  });

  it("waits for the primary CNI: no configuration yet is an error that says so", () => {
    const h = host({});
    assert.throws(() => installCni(h.options), /no CNI configuration in .* yet/);
    const bad = host({ "10-x.conflist": "{ not json" });
    assert.throws(() => installCni(bad.options), /Cannot parse CNI configuration .*10-x\.conflist/);
  });

  it("uninstall takes the entry and the executable out again", () => {
    const h = host({ "10-calico.conflist": calico });
    installCni(h.options);
    assert.deepEqual(uninstallCni(h.options), [join(h.confDir, "10-calico.conflist")]);
    assert.deepEqual(
      JSON.parse(readFileSync(join(h.confDir, "10-calico.conflist"), "utf8")),
      calico,
    );
    assert.equal(existsSync(join(h.options.binDir, "sallyport-cni")), false);
    assert.deepEqual(uninstallCni(h.options), [], "idempotent");
  });

  it("the installed executable runs the bundled plugin", async () => {
    const h = host({ "10-calico.conflist": calico });
    const dist = join(h.dir, "dist");
    await bundle(dist);
    installCni({
      ...h.options,
      bundle: join(dist, "sallyport-cni.mjs"),
      hostLibDir: h.options.libDir,
    });
    const r = spawnSync(join(h.options.binDir, "sallyport-cni"), [], {
      env: { CNI_COMMAND: "VERSION" },
      input: '{"cniVersion":"0.3.1"}',
      encoding: "utf8",
    });
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout), {
      cniVersion: "0.3.1",
      supportedVersions: ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    });
  });
});
