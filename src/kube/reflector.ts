/**
 * A reflector: keeps a local store of one resource equal to the API server's, as client-go's does.
 *
 *  - list (paged), then watch from that resourceVersion with bookmarks and a server-side timeout
 *    of 5-10 minutes (randomized, so that many watchers do not reconnect together);
 *  - a clean close or the client's inactivity timeout (30 s without a byte, which also catches
 *    half-open connections) re-watches from the last resourceVersion without listing;
 *  - "410 Gone" (the resourceVersion was compacted) relists, and the store is diffed against the
 *    list so that deletions missed while disconnected are delivered;
 *  - any other error re-watches after an exponential backoff with jitter (0.5 s to 5 s);
 *  - every `resyncMs` every object is delivered again ("sync"), so that handlers stay
 *    level-triggered even if one of them dropped something.
 *
 * @kubernetes/client-node's ListWatch stops on connection errors (#2385) and never asks for
 * bookmarks; its Watch is a good transport, which is what this uses.
 */
import { Watch } from "@kubernetes/client-node";
import type { Clock, Timer } from "../lib/clock.ts";
import type { Logger } from "../lib/log.ts";
import type { KubeClient, KubeObject, Resource } from "./client.ts";
import { resourcePath } from "./client.ts";

export type ChangeType = "add" | "update" | "delete" | "sync";

export interface ReflectorOptions<T extends KubeObject> {
  readonly client: KubeClient;
  readonly resource: Resource;
  readonly namespace?: string;
  readonly labelSelector?: string;
  readonly fieldSelector?: string;
  readonly clock: Clock;
  readonly log: Logger;
  readonly onChange?: (type: ChangeType, obj: T, old: T | undefined) => void;
  /** @default 300000 */
  readonly resyncMs?: number;
}

export function objectKey(obj: KubeObject): string {
  return obj.metadata.namespace === undefined || obj.metadata.namespace === ""
    ? (obj.metadata.name ?? "")
    : `${obj.metadata.namespace}/${obj.metadata.name}`;
}

export class Reflector<T extends KubeObject> {
  readonly #o: ReflectorOptions<T>;
  readonly #store = new Map<string, T>();
  #resourceVersion = "";
  #stopped = true;
  #abort: AbortController | undefined;
  #retryTimer: Timer | undefined;
  #resyncTimer: Timer | undefined;
  #failures = 0;
  #synced!: Promise<void>;
  #resolveSynced!: () => void;
  #connected = false;
  #connectedAt = Number.POSITIVE_INFINITY;
  #listedAt = Number.NEGATIVE_INFINITY;
  /** Bumped by every new watch and relist: callbacks of an older watch are ignored. */
  #generation = 0;
  /** Restarts and relists, for metrics and tests. */
  readonly stats = { watches: 0, relists: 0, errors: 0 };

  constructor(options: ReflectorOptions<T>) {
    this.#o = options;
    this.#synced = new Promise((r) => {
      this.#resolveSynced = r;
    });
  }

  /** Resolves once the first list is in the store. */
  get synced(): Promise<void> {
    return this.#synced;
  }

  /** True while a watch is established and no error has been seen since. */
  get connected(): boolean {
    return this.#connected;
  }

  /** Since when (clock time) a watch has been established without interruption. */
  get connectedAt(): number {
    return this.#connected ? this.#connectedAt : Number.POSITIVE_INFINITY;
  }

  /** When (clock time) the store was last filled by a complete list. */
  get listedAt(): number {
    return this.#listedAt;
  }

  /** Drops the current watch and lists again (after our view may have gone stale). */
  relist(): void {
    if (this.#stopped) return;
    this.#generation++;
    this.#abort?.abort();
    this.#retryTimer?.cancel();
    this.#resourceVersion = "";
    void this.#listAndWatch();
  }

  get(key: string): T | undefined {
    return this.#store.get(key);
  }

  items(): IterableIterator<T> {
    return this.#store.values();
  }

  get size(): number {
    return this.#store.size;
  }

  start(): void {
    this.#stopped = false;
    void this.#listAndWatch();
    this.#scheduleResync();
  }

  stop(): void {
    this.#stopped = true;
    this.#connected = false;
    this.#abort?.abort();
    this.#retryTimer?.cancel();
    this.#resyncTimer?.cancel();
  }

  #emit(type: ChangeType, obj: T, old: T | undefined): void {
    try {
      this.#o.onChange?.(type, obj, old);
    } catch (e) {
      this.#o.log.error(
        { err: (e as Error).message, resource: this.#o.resource.plural },
        "change handler failed",
      );
    }
  }

  #scheduleResync(): void {
    const ms = this.#o.resyncMs ?? 300_000;
    this.#resyncTimer = this.#o.clock.after(ms, () => {
      if (this.#stopped) return;
      for (const obj of this.#store.values()) this.#emit("sync", obj, obj);
      this.#scheduleResync();
    });
  }

  async #listAndWatch(): Promise<void> {
    if (this.#stopped) return;
    try {
      const { items, resourceVersion } = await this.#o.client.listAll<T>(this.#o.resource, {
        ...(this.#o.labelSelector === undefined ? {} : { labelSelector: this.#o.labelSelector }),
        ...(this.#o.fieldSelector === undefined ? {} : { fieldSelector: this.#o.fieldSelector }),
        ...(this.#o.namespace === undefined ? {} : { namespace: this.#o.namespace }),
      });
      this.stats.relists++;
      const seen = new Set<string>();
      for (const obj of items) {
        const key = objectKey(obj);
        seen.add(key);
        const old = this.#store.get(key);
        this.#store.set(key, obj);
        if (old === undefined) this.#emit("add", obj, undefined);
        else if (old.metadata.resourceVersion !== obj.metadata.resourceVersion)
          this.#emit("update", obj, old);
      }
      for (const [key, old] of [...this.#store]) {
        if (!seen.has(key)) {
          this.#store.delete(key);
          this.#emit("delete", old, old);
        }
      }
      this.#resourceVersion = resourceVersion;
      this.#listedAt = this.#o.clock.now();
      this.#resolveSynced();
      await this.#watch();
    } catch (e) {
      this.#failed(e, true);
    }
  }

  async #watch(): Promise<void> {
    if (this.#stopped) return;
    const path = resourcePath(this.#o.resource, { namespace: this.#o.namespace });
    const timeoutSeconds = 300 + Math.floor(Math.random() * 300);
    let relist = false;
    let watchError: { code?: number; reason?: string; message?: string } | undefined;
    const generation = ++this.#generation;
    this.stats.watches++;
    let ended = false;
    this.#abort = await new Watch(this.#o.client.config).watch(
      path,
      {
        resourceVersion: this.#resourceVersion,
        allowWatchBookmarks: true,
        timeoutSeconds,
        labelSelector: this.#o.labelSelector,
        fieldSelector: this.#o.fieldSelector,
      },
      (type: string, obj: T & { code?: number }) => {
        if (generation !== this.#generation) return;
        this.#established();
        if (type === "ERROR") {
          // The server ends the watch after an ERROR event. 410 (Expired/Gone): our
          // resourceVersion is older than what etcd kept, so list again; anything else is a
          // failure of this watch, retried with backoff from where we are. Never silent.
          const status = obj as unknown as { code?: number; reason?: string; message?: string };
          relist ||= status.code === 410 || status.reason === "Expired" || status.reason === "Gone";
          watchError = status;
          this.#o.log.warn(
            {
              resource: this.#o.resource.plural,
              code: status.code,
              reason: status.reason,
              message: status.message,
              relist,
            },
            "watch ended with an error event",
          );
          this.#abort?.abort();
          return;
        }
        const rv = obj.metadata?.resourceVersion;
        if (rv !== undefined) this.#resourceVersion = rv;
        if (type === "BOOKMARK") return;
        const key = objectKey(obj);
        const old = this.#store.get(key);
        if (type === "DELETED") {
          this.#store.delete(key);
          this.#emit("delete", obj, old);
        } else {
          this.#store.set(key, obj);
          this.#emit(old === undefined ? "add" : "update", obj, old);
        }
      },
      (err: unknown) => {
        ended = true;
        if (this.#stopped || generation !== this.#generation) return;
        const status = (err as { statusCode?: number } | null)?.statusCode;
        if (relist || status === 410) {
          this.#connected = false;
          void this.#listAndWatch();
        } else if (watchError !== undefined) {
          this.#failed(
            new Error(
              `watch error event ${watchError.code ?? ""} ${watchError.reason ?? ""}: ${watchError.message ?? ""}`,
            ),
            false,
          );
        } else if (err === null || err === undefined || (err as Error).name === "TimeoutError") {
          // Clean end of the watch or the inactivity timeout: continue from where we are.
          void this.#watch().catch((e) => this.#failed(e, false));
        } else {
          this.#failed(err, false);
        }
      },
    );
    // The server answered the watch (the client returns once it has the response, or has called
    // back with the error): it is established, though a quiet resource sends nothing for minutes.
    if (!ended && !this.#stopped && generation === this.#generation) this.#established();
  }

  #established(): void {
    if (!this.#connected) this.#connectedAt = this.#o.clock.now();
    this.#connected = true;
    this.#failures = 0;
  }

  #failed(e: unknown, relist: boolean): void {
    if (this.#stopped) return;
    this.#connected = false;
    this.stats.errors++;
    this.#failures++;
    const base = Math.min(5000, 500 * 2 ** Math.min(this.#failures - 1, 4));
    const delay = base / 2 + Math.random() * (base / 2);
    this.#o.log.debug(
      {
        err: (e as Error)?.message ?? String(e),
        resource: this.#o.resource.plural,
        retryMs: Math.round(delay),
      },
      "watch failed",
    );
    this.#retryTimer = this.#o.clock.after(delay, () => {
      if (relist || this.#resourceVersion === "") void this.#listAndWatch();
      else void this.#watch().catch((err) => this.#failed(err, true));
    });
  }
}
