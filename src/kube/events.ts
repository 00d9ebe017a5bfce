/**
 * Kubernetes Events (core/v1, what `kubectl describe` and `kubectl get events` show) for what an
 * operator must see: a policy not accepted, a pool exhausted, an egress IP moved. The same
 * event on the same object within ten minutes bumps the count of the first instead of adding
 * another, as kubelet's recorder does. Recording never throws: events are best effort.
 */
import { createHash } from "node:crypto";
import type { Logger } from "../lib/log.ts";
import { CORE, type KubeClient, type KubeObject } from "./client.ts";

export interface EventTarget {
  readonly apiVersion: string;
  readonly kind: string;
  readonly name: string;
  readonly namespace?: string | undefined;
  readonly uid?: string | undefined;
}

export function targetOf(obj: KubeObject): EventTarget {
  return {
    apiVersion: obj.apiVersion ?? "",
    kind: obj.kind ?? "",
    name: obj.metadata.name ?? "",
    namespace: obj.metadata.namespace,
    uid: obj.metadata.uid,
  };
}

export class EventRecorder {
  readonly #client: KubeClient;
  readonly #component: string;
  readonly #instance: string;
  readonly #namespace: string;
  readonly #log: Logger;
  readonly #recent = new Map<
    string,
    { name: string; namespace: string; count: number; at: number }
  >();

  /** @param namespace where events about cluster-scoped objects go */
  constructor(options: {
    client: KubeClient;
    component: string;
    instance: string;
    namespace: string;
    log: Logger;
  }) {
    this.#client = options.client;
    this.#component = options.component;
    this.#instance = options.instance;
    this.#namespace = options.namespace;
    this.#log = options.log;
  }

  async record(
    target: EventTarget,
    type: "Normal" | "Warning",
    reason: string,
    message: string,
  ): Promise<void> {
    const namespace = target.namespace ?? this.#namespace;
    const key = JSON.stringify([
      target.kind,
      target.namespace,
      target.name,
      target.uid,
      type,
      reason,
      message,
    ]);
    const now = new Date();
    const prior = this.#recent.get(key);
    try {
      if (prior !== undefined && now.getTime() - prior.at < 600_000) {
        prior.count++;
        prior.at = now.getTime();
        await this.#client.mergePatch(
          CORE.events,
          prior.name,
          { count: prior.count, lastTimestamp: now.toISOString() },
          { namespace: prior.namespace },
        );
        return;
      }
      const name = `${target.name}.${createHash("sha256")
        .update(key + now.toISOString())
        .digest("hex")
        .slice(0, 12)}`;
      await this.#client.create(CORE.events, {
        apiVersion: "v1",
        kind: "Event",
        metadata: { name, namespace },
        involvedObject: {
          ...target,
          ...(target.namespace === undefined ? {} : { namespace: target.namespace }),
        },
        reason,
        message: message.slice(0, 1024),
        type,
        count: 1,
        firstTimestamp: now.toISOString(),
        lastTimestamp: now.toISOString(),
        source: { component: this.#component },
        reportingComponent: this.#component,
        reportingInstance: this.#instance,
      });
      this.#recent.set(key, { name, namespace, count: 1, at: now.getTime() });
      if (this.#recent.size > 10_000) this.#recent.delete(this.#recent.keys().next().value!);
    } catch (e) {
      this.#log.debug({ err: (e as Error).message, reason }, "cannot record event");
    }
  }
}
