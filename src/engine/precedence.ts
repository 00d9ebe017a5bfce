/**
 * Which policy wins when several select the same pod and destination: the highest `priority`;
 * on a tie the older policy (creationTimestamp); then the key, in code-point order. The order is
 * a pure function of the policies, so every node and every run agrees on it.
 */
export interface Ranked {
  readonly key: string;
  readonly priority: number;
  /** RFC 3339 creation timestamp; compares as text. */
  readonly createdAt: string;
}

export function comparePrecedence(a: Ranked, b: Ranked): number {
  if (a.priority !== b.priority) return b.priority - a.priority;
  if (a.createdAt !== b.createdAt) return a.createdAt < b.createdAt ? -1 : 1;
  return a.key < b.key ? -1 : a.key > b.key ? 1 : 0;
}
