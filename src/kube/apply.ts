/**
 * `kubectl apply` for our own manifests, without its three-way merge: each object is created, or,
 * when it exists, kept as it is or replaced. Used by the test control plane (CRDs, RBAC) and the
 * sandbox (`sallyport sandbox apply`).
 *
 * Like `kubectl apply`, it asks the API server for strict field validation, so that a misspelled
 * field (`egresIP`) is rejected with its name instead of being dropped, and it goes on with the
 * other objects when one fails, reporting every failure at the end.
 */
import { API_VERSION, KINDS, type KindName } from "../api/types.ts";
import {
  isAlreadyExists,
  type KubeClient,
  type KubeObject,
  MANIFEST_KINDS,
  ours,
  type Resource,
  resourcePath,
} from "./client.ts";
import { parseManifests } from "./manifests.ts";

export { ManifestError, parseManifests } from "./manifests.ts";

/** The API server's `fieldValidation` query parameter (Kubernetes ≥ 1.27 defaults to Strict). */
export type FieldValidation = "Strict" | "Warn" | "Ignore";

export interface ApplyFailure {
  /** `egresspolicy/egress-sample` */
  readonly what: string;
  readonly verb: "creating" | "replacing" | "reading" | "applying";
  readonly error: unknown;
}

/** Some objects could not be applied; the others were. */
export class ApplyError extends Error {
  override readonly name = "ApplyError";
  /** One line per object applied: `kind/name created|configured|unchanged`. */
  readonly done: readonly string[];
  readonly failures: readonly ApplyFailure[];
  constructor(done: readonly string[], failures: readonly ApplyFailure[]) {
    super(
      failures
        .map(
          (f) =>
            `Cannot apply ${f.what}: error when ${f.verb}: ${f.error instanceof Error ? f.error.message : String(f.error)}`,
        )
        .join("; "),
    );
    this.done = done;
    this.failures = failures;
  }
}

function resourceOf(obj: KubeObject): Resource {
  const r =
    obj.apiVersion === API_VERSION && obj.kind !== undefined && obj.kind in KINDS
      ? ours(obj.kind as KindName)
      : MANIFEST_KINDS[obj.kind ?? ""];
  if (r === undefined)
    throw new Error(
      `Cannot apply ${obj.apiVersion}/${obj.kind} ${obj.metadata?.name ?? ""}: not a kind Sallyport applies (Sallyport's kinds and those of deploy/)`,
    );
  return r;
}

export interface ApplyOptions {
  /** @default "Strict", as `kubectl apply` */
  readonly fieldValidation?: FieldValidation;
  /** Called with each line as soon as its object is applied. */
  readonly onApplied?: (line: string) => void;
}

/**
 * @returns one line per object: `kind/name created|configured|unchanged`
 * @throws ApplyError after trying every object, when some failed
 */
export async function applyObjects(
  client: KubeClient,
  objects: Iterable<KubeObject>,
  existing: "keep" | "replace",
  options: ApplyOptions = {},
): Promise<string[]> {
  const query = { fieldValidation: options.fieldValidation ?? "Strict" };
  const done: string[] = [];
  const failures: ApplyFailure[] = [];
  const report = (line: string) => {
    done.push(line);
    options.onApplied?.(line);
  };
  for (const obj of objects) {
    const what = `${obj.kind?.toLowerCase() ?? "(no kind)"}/${obj.metadata?.name ?? "(no name)"}`;
    let resource: Resource;
    try {
      resource = resourceOf(obj);
      if (typeof obj.metadata?.name !== "string" || obj.metadata.name === "")
        throw new Error(`Cannot apply ${what}: metadata.name is required`);
    } catch (error) {
      failures.push({ what, verb: "applying", error });
      continue;
    }
    if (resource.namespaced) obj.metadata.namespace ??= "default";
    let verb: ApplyFailure["verb"] = "creating";
    try {
      try {
        await client.create(resource, obj, query);
        report(`${what} created`);
        continue;
      } catch (e) {
        if (!isAlreadyExists(e)) throw e;
      }
      if (existing === "keep") {
        report(`${what} unchanged`);
        continue;
      }
      verb = "reading";
      const current = await client.get(resource, obj.metadata.name, obj.metadata.namespace);
      if (current.metadata.resourceVersion !== undefined)
        obj.metadata.resourceVersion = current.metadata.resourceVersion;
      verb = "replacing";
      await client.request(
        "PUT",
        resourcePath(resource, { namespace: obj.metadata.namespace, name: obj.metadata.name }),
        { body: obj, query },
      );
      report(`${what} configured`);
    } catch (error) {
      failures.push({ what, verb, error });
    }
  }
  if (failures.length > 0) throw new ApplyError(done, failures);
  return done;
}

/** applyObjects for the documents of a multi-document YAML text. */
export function applyManifests(
  client: KubeClient,
  yaml: string,
  existing: "keep" | "replace",
  options: ApplyOptions & { source?: string } = {},
): Promise<string[]> {
  return applyObjects(client, parseManifests(yaml, options.source), existing, options);
}
