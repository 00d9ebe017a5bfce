/**
 * Tunnel classes: a small number per accepted policy, unique in the cluster, that a steering node
 * writes into the VXLAN header (Group Based Policy) of the policy's packets, so that the gateway
 * node SNATs a pod it has not heard of yet (a new pod, or a running pod a changed policy starts
 * selecting) from its first packet, instead of dropping it until the controller's endpoint slice
 * arrives (docs/datapath.md, "A pod the gateway has not heard of yet").
 *
 * The controller publishes the class in the policy's status (status.tunnelClass); every node
 * reads it from there, so the steering node and the gateway always agree on what a number means.
 *
 * Classes are sticky, like node ids: a policy keeps its class while it is accepted, and one read
 * back from its status (a new leader) is kept when no older policy holds it. Policies without one
 * get the lowest free class, oldest first, so that the same inputs give the same classes whether
 * computed incrementally or from scratch. A rejected or deleted policy gives its class back.
 *
 * Values are 1-16383: 0 is "no class", and bits 14-15 stay clear because kube-proxy gives them a
 * meaning (masquerade 0x4000, drop 0x8000) on the packets that carry the class at the gateway.
 */
export const MAX_TUNNEL_CLASS = 0x3fff;

export function isTunnelClass(value: unknown): value is number {
  return Number.isInteger(value) && (value as number) >= 1 && (value as number) <= MAX_TUNNEL_CLASS;
}

export interface ClassRequest {
  readonly key: string;
  readonly createdAt: string;
  /** The class it had (a previous result or its status); kept when still free. */
  readonly wanted?: number | undefined;
}

export class TunnelClasses {
  readonly #byKey = new Map<string, number>();
  readonly #used = new Set<number>();
  /** No class below this one is free. */
  #lowest = 1;

  get(key: string): number | undefined {
    return this.#byKey.get(key);
  }

  release(key: string): boolean {
    const c = this.#byKey.get(key);
    if (c === undefined) return false;
    this.#byKey.delete(key);
    this.#used.delete(c);
    if (c < this.#lowest) this.#lowest = c;
    return true;
  }

  /**
   * Gives a class to each request without one, oldest first (then by key): its wanted class when
   * free, else the lowest free one; none when all 16,383 are taken.
   * @returns the keys that got a class
   */
  assign(requests: readonly ClassRequest[]): string[] {
    const pending = requests
      .filter((r) => !this.#byKey.has(r.key))
      .sort((a, b) =>
        a.createdAt < b.createdAt
          ? -1
          : a.createdAt > b.createdAt
            ? 1
            : a.key < b.key
              ? -1
              : a.key > b.key
                ? 1
                : 0,
      );
    const rest: ClassRequest[] = [];
    const got: string[] = [];
    for (const r of pending) {
      if (isTunnelClass(r.wanted) && !this.#used.has(r.wanted)) {
        this.#take(r.key, r.wanted);
        got.push(r.key);
      } else rest.push(r);
    }
    for (const r of rest) {
      while (this.#lowest <= MAX_TUNNEL_CLASS && this.#used.has(this.#lowest)) this.#lowest++;
      if (this.#lowest > MAX_TUNNEL_CLASS) break;
      this.#take(r.key, this.#lowest);
      got.push(r.key);
    }
    return got;
  }

  #take(key: string, c: number): void {
    this.#byKey.set(key, c);
    this.#used.add(c);
  }
}
