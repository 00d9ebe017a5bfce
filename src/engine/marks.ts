/**
 * Packet and connection marks, in one documented 32-bit layout.
 *
 *   bits 31..24  prefix   0x26 = steer toward a gateway node, 0x27 = steer a reply back through
 *                         the tunnel, 0x12 = "keep": already steered, let it through unchanged
 *   bits 23..8   node id  16 bits, 65,536 nodes (0x26 only)
 *   bits  7..0   free     never written by Sallyport
 *
 * The seed's `0x26 + 16-bit value + 0000` is 40 bits and cannot be a mark; this layout keeps its
 * prefix byte and its 16-bit node id. Every write uses `--set-xmark value/0xffffff00`, so the low
 * byte other components may use is preserved. kube-proxy's masquerade (0x4000) and drop (0x8000)
 * bits fall inside the node-id field: our marks only live between mangle PREROUTING and mangle
 * FORWARD on packets bound for external destinations, which kube-proxy never marks.
 *
 * The seed matches `--mark $NODE_MARK/0x26000000`, which never matches: the kernel compares
 * `(mark & mask) == value` without masking the value, so any node id bit makes it false and the
 * CNI's masquerade rewrites the source before the tunnel (spidernet-io/egressgateway#2025 has that
 * symptom). We match the prefix instead: `--mark 0x26000000/0xfe000000` (0x26 and 0x27).
 */
export const MARK_WRITE_MASK = 0xffffff00;
export const PREFIX_MASK = 0xff000000;
export const STEER_PREFIX = 0x26000000;
export const REPLY_PREFIX = 0x27000000;
/** Matches both STEER_PREFIX and REPLY_PREFIX. */
export const STEERED_MATCH_MASK = 0xfe000000;
export const KEEP_MARK = 0x12000000;
/**
 * Matches the keep mark whatever its low 16 bits: on its way into the tunnel a steered packet
 * carries its connection's tunnel class there (TUNNEL_CLASS_MASK), for the VXLAN header.
 */
export const KEEP_MATCH_MASK = 0xffff0000;
/**
 * The tunnel class (src/engine/tunnel_classes.ts): in the connection mark of a steered connection
 * on its source node, in the packet mark as it enters the tunnel (VXLAN GBP carries these 16 bits),
 * and in the mark of the decapsulated packet on the gateway.
 */
export const TUNNEL_CLASS_MASK = 0x0000ffff;
export const MAX_NODE_ID = 0xffff;

export function nodeMark(nodeID: number): number {
  if (!Number.isInteger(nodeID) || nodeID < 0 || nodeID > MAX_NODE_ID) {
    throw new RangeError(
      `Cannot make a node mark as the node id must be 0-${MAX_NODE_ID}: current value is ${nodeID}`,
    );
  }
  return (STEER_PREFIX | (nodeID << 8)) >>> 0;
}

export function nodeIDOfMark(mark: number): number | undefined {
  if ((mark & PREFIX_MASK) >>> 0 !== STEER_PREFIX) return undefined;
  return (mark >>> 8) & MAX_NODE_ID;
}

/** `0x26000100`, the form iptables-save and `ip -json rule` print. */
export function hex(value: number): string {
  return `0x${(value >>> 0).toString(16).padStart(8, "0")}`;
}

/** Tunnel MAC of a node: locally administered, derived from its unique id, so unique too. */
export function tunnelMac(nodeID: number): string {
  return `02:53:50:00:${((nodeID >> 8) & 0xff).toString(16).padStart(2, "0")}:${(nodeID & 0xff).toString(16).padStart(2, "0")}`;
}
