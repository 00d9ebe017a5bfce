/**
 * `kubectl apply` for our own manifests, without its three-way merge: each object is created, or,
 * when it exists, kept as it is or replaced. Used by the test control plane (CRDs, RBAC) and the
 * sandbox (`sallyport sandbox apply`).
 */
import { parseAllDocuments } from "yaml";
import { API_VERSION, KINDS, type KindName } from "../api/types.ts";
import {
  isAlreadyExists,
  type KubeClient,
  type KubeObject,
  MANIFEST_KINDS,
  ours,
  type Resource,
} from "./client.ts";

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

/** @returns one line per object: `kind/name created|configured|unchanged` */
export async function applyObjects(
  client: KubeClient,
  objects: Iterable<KubeObject>,
  existing: "keep" | "replace",
): Promise<string[]> {
  const done: string[] = [];
  for (const obj of objects) {
    const resource = resourceOf(obj);
    if (resource.namespaced) obj.metadata.namespace ??= "default";
    const what = `${obj.kind?.toLowerCase()}/${obj.metadata.name}`;
    try {
      await client.create(resource, obj);
      done.push(`${what} created`);
    } catch (e) {
      if (!isAlreadyExists(e)) throw e;
      if (existing === "keep") {
        done.push(`${what} unchanged`);
        continue;
      }
      const current = await client.get(resource, obj.metadata.name ?? "", obj.metadata.namespace);
      if (current.metadata.resourceVersion !== undefined)
        obj.metadata.resourceVersion = current.metadata.resourceVersion;
      await client.replace(resource, obj);
      done.push(`${what} configured`);
    }
  }
  return done;
}

/** applyObjects for the documents of a multi-document YAML text. */
export function applyManifests(
  client: KubeClient,
  yaml: string,
  existing: "keep" | "replace",
): Promise<string[]> {
  const objects = parseAllDocuments(yaml)
    .map((d) => d.toJS() as KubeObject | null)
    .filter((o): o is KubeObject => o !== null);
  return applyObjects(client, objects, existing);
}
