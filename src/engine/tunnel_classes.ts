/**
 * Tunnel classes: a small number per accepted policy that a steering node writes into the VXLAN
 * header (Group Based Policy) of the policy's packets, so that the gateway node SNATs a pod it has
 * not heard of yet (a new pod, or a running pod a changed policy starts selecting) from its first
 * packet, instead of dropping it until the controller's endpoint slice arrives (docs/datapath.md,
 * "A pod the gateway has not heard of yet").
 *
 * A class tells the gateway which egress IPs to SNAT to, nothing else: policies with the same
 * egress IPs (their "share", e.g. 10,000 policies of one egressIP) share one class, so that a
 * steering node holds one chain per class and gateway, not one per policy. Policies of the
 * gateway node's own address (nodeIP, interface) keep a class of their own: which address that
 * is depends on where each is placed.
 *
 * The controller publishes the class in the policy's status (status.tunnelClass); every node
 * reads it from there, so the steering node and the gateway always agree on what a number means.
 *
 * Classes are sticky, like node ids: a share keeps its class while one of its policies is
 * accepted, and one read back from a status (a new leader) is kept when free (first for policies
 * that still have the egress IPs they had it with, then oldest first). Other shares get the lowest
 * free class, in the order of their oldest policy, so that the same inputs give the same classes
 * whether computed incrementally or from scratch. The class is freed when the last policy of its
 * share is rejected, deleted or changes its egress IPs.
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
  /** Policies of the same share get the same class (shareOf). */
  readonly share: string;
  readonly createdAt: string;
  /** The class it had (a previous result or its status); kept when still free. */
  readonly wanted?: number | undefined;
  /**
   * The wanted class was this share's: the policy had it with the same egress IPs. Such wishes
   * go first, so that a policy that left a share (its egress IPs changed) does not take the class
   * from the share's other policies when all ask at once (a new leader).
   */
  readonly firm?: boolean | undefined;
}

/** The share of a policy: its egress IPs when it has its own (explicit or pool), else itself. */
export function shareOf(key: string, egressIPs: readonly string[] | undefined): string {
  return egressIPs === undefined || egressIPs.length === 0
    ? `policy:${key}`
    : `eips:${[...egressIPs].sort().join(",")}`;
}

/**
 * What a policy asks for: its share's class, and the class it had (`previous`, its last result or
 * status) when that was this share's. A class it had with other egress IPs stays with its old
 * share; a class read back with the same egress IPs is a firm wish.
 */
export function classRequest(
  key: string,
  egressIPs: readonly string[] | undefined,
  createdAt: string,
  previous:
    | {
        readonly egressIPs?: readonly string[] | undefined;
        readonly tunnelClass?: number | undefined;
      }
    | undefined,
): ClassRequest {
  const share = shareOf(key, egressIPs);
  const own = share === shareOf(key, undefined);
  const kept = own || (previous !== undefined && shareOf(key, previous.egressIPs) === share);
  return {
    key,
    share,
    createdAt,
    ...(kept ? { wanted: previous?.tunnelClass, firm: !own } : {}),
  };
}

export class TunnelClasses {
  readonly #byShare = new Map<string, number>();
  /** share → how many policies hold its class */
  readonly #members = new Map<string, number>();
  readonly #shares = new Map<string, string>();
  readonly #used = new Set<number>();
  /** No class below this one is free. */
  #lowest = 1;

  get(key: string): number | undefined {
    const share = this.#shares.get(key);
    return share === undefined ? undefined : this.#byShare.get(share);
  }

  /** The share under which a policy holds its class. */
  share(key: string): string | undefined {
    return this.#shares.get(key);
  }

  /** Takes a policy out of its share; the class is freed with the share's last policy. */
  release(key: string): boolean {
    const share = this.#shares.get(key);
    if (share === undefined) return false;
    this.#shares.delete(key);
    const members = this.#members.get(share)! - 1;
    this.#members.set(share, members);
    if (members === 0) {
      const c = this.#byShare.get(share)!;
      this.#members.delete(share);
      this.#byShare.delete(share);
      this.#used.delete(c);
      if (c < this.#lowest) this.#lowest = c;
    }
    return true;
  }

  /**
   * Gives a class to each request without one, oldest first (then by key): its share's class when
   * the share has one; else its wanted class when free (firm wishes first), else the lowest free
   * one; none when all 16,383 are taken.
   * @returns the keys that got a class
   */
  assign(requests: readonly ClassRequest[]): string[] {
    const pending = requests
      .filter((r) => !this.#shares.has(r.key))
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
    const got: string[] = [];
    for (const firm of [true, false])
      for (const r of pending) {
        if ((r.firm === true) !== firm || this.#shares.has(r.key)) continue;
        if (!this.#byShare.has(r.share)) {
          if (!isTunnelClass(r.wanted) || this.#used.has(r.wanted)) continue;
          this.#give(r.share, r.wanted);
        }
        this.#join(r);
        got.push(r.key);
      }
    for (const r of pending) {
      if (this.#shares.has(r.key)) continue;
      if (!this.#byShare.has(r.share)) {
        while (this.#lowest <= MAX_TUNNEL_CLASS && this.#used.has(this.#lowest)) this.#lowest++;
        if (this.#lowest > MAX_TUNNEL_CLASS) continue;
        this.#give(r.share, this.#lowest);
      }
      this.#join(r);
      got.push(r.key);
    }
    return got;
  }

  #give(share: string, c: number): void {
    this.#byShare.set(share, c);
    this.#used.add(c);
  }

  #join(r: ClassRequest): void {
    this.#shares.set(r.key, r.share);
    this.#members.set(r.share, (this.#members.get(r.share) ?? 0) + 1);
  }
}
