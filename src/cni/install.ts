/**
 * `sallyport cni install|uninstall`: what the agent DaemonSet's init container runs on every
 * node, in the manner of Istio's install-cni and Multus' installer. With the host's directories
 * mounted into the container:
 *
 *  1. copies the Node.js binary and the plugin's bundle (dist/sallyport-cni.mjs) to a directory
 *     of the host (`libDir`, /opt/sallyport/cni by default), and writes the executable the
 *     runtime runs, `<binDir>/sallyport-cni`: a shell script that execs that node on that bundle;
 *  2. appends `{"type": "sallyport-cni", "socket": …}` to the configuration list the runtime
 *     uses: the first file of `confDir` in lexical order, as libcni picks it. A single-plugin
 *     `.conf` becomes a `.conflist` of the same name. Run again, it changes nothing (or only the
 *     fields of our entry); files are replaced by rename, so the runtime never reads half a file.
 *
 * `uninstall` takes the entry out again and removes the executable: a plugin entry whose agent
 * is gone makes every new pod of the node fail (fail closed), so it must go before the agents.
 */
import {
  chmodSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { basename, join } from "node:path";
import { DEFAULT_CNI_SOCKET } from "./protocol.ts";

export const PLUGIN_TYPE = "sallyport-cni";

export interface InstallOptions {
  /** The host's CNI plugin directory, as mounted here. */
  readonly binDir: string;
  /** The host's CNI configuration directory, as mounted here. */
  readonly confDir: string;
  /** Where node and the bundle go, as mounted here. */
  readonly libDir: string;
  /** `libDir` as the host sees it (the script runs on the host). @default libDir */
  readonly hostLibDir?: string;
  /** The Node.js binary to copy. */
  readonly node: string;
  /** The plugin's bundle to copy (dist/sallyport-cni.mjs). */
  readonly bundle: string;
  /** The plugin's configuration in the list. */
  readonly socket?: string;
  readonly timeoutMs?: number;
  readonly failOpen?: boolean;
}

export interface InstallReport {
  /** The configuration list now carrying the plugin. */
  readonly confFile: string;
  /** Whether the list changed (false: it held our entry already, identical). */
  readonly changed: boolean;
}

/** The configuration file the runtime uses: the first .conf, .conflist or .json by name. */
export function activeConfFile(confDir: string): string | undefined {
  if (!existsSync(confDir)) return undefined;
  const files = readdirSync(confDir)
    .filter((f) => /\.(conf|conflist|json)$/.test(f))
    .filter((f) => statSync(join(confDir, f)).isFile())
    .sort();
  return files[0] === undefined ? undefined : join(confDir, files[0]);
}

/** Writes `text` to `file` through a rename, so that no reader sees half of it. */
function replaceFile(file: string, text: string | Buffer, mode?: number): void {
  const tmp = join(file, "..", `.${basename(file)}.sallyport-tmp`);
  writeFileSync(tmp, text);
  if (mode !== undefined) chmodSync(tmp, mode);
  renameSync(tmp, file);
}

function copyAtomically(from: string, to: string, mode: number): void {
  const tmp = join(to, "..", `.${basename(to)}.sallyport-tmp`);
  copyFileSync(from, tmp);
  chmodSync(tmp, mode);
  renameSync(tmp, to);
}

type ConfList = {
  cniVersion?: string;
  name?: string;
  plugins?: Record<string, unknown>[];
} & Record<string, unknown>;

function readConf(file: string): ConfList {
  try {
    return JSON.parse(readFileSync(file, "utf8")) as ConfList;
  } catch (e) {
    throw new Error(
      `Cannot parse CNI configuration ${file}: ${(e as Error).message}; the primary CNI writes it, fix or reinstall that first`,
    );
  }
}

/** Installs the executable and our entry; see the top of this file. */
export function installCni(o: InstallOptions): InstallReport {
  if (activeConfFile(o.confDir) === undefined) throw noConfiguration(o.confDir);
  installFiles(o);
  return ensureEntry(o);
}

function noConfiguration(confDir: string): Error {
  return new Error(
    `Cannot install sallyport-cni: no CNI configuration in ${confDir} yet (the primary CNI writes one when it starts); will need to run again`,
  );
}

/** node, the bundle and the executable script. */
export function installFiles(o: InstallOptions): void {
  mkdirSync(o.libDir, { recursive: true });
  mkdirSync(o.binDir, { recursive: true });
  copyAtomically(o.node, join(o.libDir, "node"), 0o755);
  copyAtomically(o.bundle, join(o.libDir, "sallyport-cni.mjs"), 0o644);
  const host = o.hostLibDir ?? o.libDir;
  replaceFile(
    join(o.binDir, PLUGIN_TYPE),
    `#!/bin/sh\n# Installed by the Sallyport agent's init container (sallyport cni install).\nexec ${host}/node ${host}/sallyport-cni.mjs "$@"\n`,
    0o755,
  );
}

/**
 * Our entry, last in the list the runtime uses; put back when a primary CNI rewrote the list
 * without it (what `--watch-ms` repeats).
 */
export function ensureEntry(
  o: Pick<InstallOptions, "confDir" | "socket" | "timeoutMs" | "failOpen">,
): InstallReport {
  const conf = activeConfFile(o.confDir);
  if (conf === undefined) throw noConfiguration(o.confDir);
  const entry: Record<string, unknown> = {
    type: PLUGIN_TYPE,
    socket: o.socket ?? DEFAULT_CNI_SOCKET,
    ...(o.timeoutMs === undefined ? {} : { timeoutMs: o.timeoutMs }),
    ...(o.failOpen === true ? { failOpen: true } : {}),
  };
  const before = readConf(conf);
  let list: ConfList;
  let target = conf;
  if (Array.isArray(before.plugins)) {
    list = before;
  } else {
    // A single plugin's .conf: the same network as a list of one, then ours.
    const { cniVersion, name, ...plugin } = before;
    list = {
      cniVersion: cniVersion ?? "1.0.0",
      name: name ?? "k8s-pod-network",
      plugins: [plugin],
    };
    target = conf.replace(/\.(conf|json)$/, ".conflist");
  }
  const others = (list.plugins ?? []).filter((p) => p.type !== PLUGIN_TYPE);
  const next: ConfList = { ...list, plugins: [...others, entry] };
  const text = `${JSON.stringify(next, null, 2)}\n`;
  const changed = target !== conf || readFileSync(conf, "utf8") !== text;
  if (changed) {
    replaceFile(target, text);
    if (target !== conf) rmSync(conf, { force: true });
  }
  return { confFile: target, changed };
}

/** Takes our entry out of every configuration list and removes the executable. */
export function uninstallCni(o: Pick<InstallOptions, "binDir" | "confDir">): string[] {
  const changed: string[] = [];
  if (existsSync(o.confDir)) {
    for (const f of readdirSync(o.confDir)
      .filter((f) => f.endsWith(".conflist"))
      .sort()) {
      const file = join(o.confDir, f);
      const list = readConf(file);
      const plugins = list.plugins ?? [];
      if (!plugins.some((p) => p.type === PLUGIN_TYPE)) continue;
      const next = { ...list, plugins: plugins.filter((p) => p.type !== PLUGIN_TYPE) };
      replaceFile(file, `${JSON.stringify(next, null, 2)}\n`);
      changed.push(file);
    }
  }
  rmSync(join(o.binDir, PLUGIN_TYPE), { force: true });
  return changed;
}
