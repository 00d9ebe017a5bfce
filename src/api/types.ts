/**
 * The Sallyport API, group `sallyport.dev`, version `v1alpha1`: the single source of truth.
 *
 * Each kind is a TypeBox schema. From it come the TypeScript types (`Static<>`), the validator used
 * by the CLI, the controller and the webhook (`validate.ts`), and the CRD manifests under
 * `deploy/crds/` (`crds.ts`). Cross-field rules that the API server can check are written as CEL
 * `x-kubernetes-validations` next to the fields they constrain; `validate.ts` checks the same
 * rules in TypeScript so that every entry point gives the same message.
 */
import { type Static, type TSchema, Type } from "@sinclair/typebox";

export const GROUP = "sallyport.dev";
export const VERSION = "v1alpha1";
export const API_VERSION = `${GROUP}/${VERSION}`;

/** Largest pool entries accepted: bigger blocks are a typo far more often than an intent. */
export const MAX_POOL_PREFIX_V4 = 8;
export const MAX_POOL_PREFIX_V6 = 64;
export const MAX_PRIORITY = 1000;
/**
 * Egress IPs of one family a policy may have (explicit or allocated): new connections are spread
 * over them, each adding a source port range toward every destination. Bounded so that a typo
 * cannot take a whole pool, and so that a policy's SNAT stays a handful of rules.
 */
export const MAX_EGRESS_IPS_PER_FAMILY = 8;

interface CelRule {
  rule: string;
  message?: string;
  messageExpression?: string;
  fieldPath?: string;
  reason?: string;
}

function cel<T extends TSchema>(schema: T, ...rules: CelRule[]): T {
  return { ...schema, "x-kubernetes-validations": rules } as T;
}

const Strict = { additionalProperties: false } as const;

// ---------------------------------------------------------------------------------------------
// Shared pieces

export const SelectorRequirementSchema = Type.Object(
  {
    key: Type.String({ minLength: 1, maxLength: 317 }),
    operator: Type.Union([
      Type.Literal("In"),
      Type.Literal("NotIn"),
      Type.Literal("Exists"),
      Type.Literal("DoesNotExist"),
    ]),
    values: Type.Optional(Type.Array(Type.String({ maxLength: 63 }), { maxItems: 256 })),
  },
  Strict,
);

export const LabelSelectorSchema = cel(
  Type.Object(
    {
      matchLabels: Type.Optional(
        Type.Record(Type.String(), Type.String({ maxLength: 63 }), { maxProperties: 64 }),
      ),
      matchExpressions: Type.Optional(Type.Array(SelectorRequirementSchema, { maxItems: 64 })),
    },
    { ...Strict, description: "A Kubernetes label selector. {} selects everything." },
  ),
  {
    rule: "!has(self.matchExpressions) || self.matchExpressions.all(r, (r.operator in ['In', 'NotIn']) ? (has(r.values) && size(r.values) > 0) : (!has(r.values) || size(r.values) == 0))",
    message: "matchExpressions: In and NotIn need values; Exists and DoesNotExist take none",
  },
);

const IPAddress = Type.String({
  maxLength: 45,
  "x-kubernetes-validations": [{ rule: "isIP(self)", message: "must be an IPv4 or IPv6 address" }],
} as object);

const CIDR = Type.String({
  maxLength: 49,
  "x-kubernetes-validations": [
    { rule: "isCIDR(self)", message: "must be a CIDR such as 10.0.0.0/8 or fd00::/64" },
  ],
} as object);

export const ConditionSchema = Type.Object(
  {
    type: Type.String({ maxLength: 316 }),
    status: Type.Union([Type.Literal("True"), Type.Literal("False"), Type.Literal("Unknown")]),
    reason: Type.String({ maxLength: 1024 }),
    message: Type.String({ maxLength: 32768 }),
    lastTransitionTime: Type.String({ format: "date-time" }),
    observedGeneration: Type.Optional(Type.Integer({ minimum: 0 })),
  },
  Strict,
);

const Conditions = Type.Array(ConditionSchema, {
  maxItems: 16,
  "x-kubernetes-list-type": "map",
  "x-kubernetes-list-map-keys": ["type"],
} as object);

export const ObjectMetaSchema = Type.Object({
  name: Type.Optional(Type.String()),
  namespace: Type.Optional(Type.String()),
  labels: Type.Optional(Type.Record(Type.String(), Type.String())),
  annotations: Type.Optional(Type.Record(Type.String(), Type.String())),
  uid: Type.Optional(Type.String()),
  resourceVersion: Type.Optional(Type.String()),
  generation: Type.Optional(Type.Integer()),
  creationTimestamp: Type.Optional(Type.String()),
  deletionTimestamp: Type.Optional(Type.String()),
  finalizers: Type.Optional(Type.Array(Type.String())),
  ownerReferences: Type.Optional(Type.Array(Type.Unknown())),
  managedFields: Type.Optional(Type.Array(Type.Unknown())),
  generateName: Type.Optional(Type.String()),
});

function kindObject<K extends string, S extends TSchema, T extends TSchema>(
  kind: K,
  spec: S,
  status: T,
) {
  return Type.Object(
    {
      apiVersion: Type.Literal(API_VERSION),
      kind: Type.Literal(kind),
      metadata: ObjectMetaSchema,
      spec,
      status: Type.Optional(status),
    },
    Strict,
  );
}

// ---------------------------------------------------------------------------------------------
// EgressGateway (cluster-scoped)

export const EgressGatewaySpecSchema = cel(
  Type.Object(
    {
      nodeSelector: Type.Unsafe<Static<typeof LabelSelectorSchema>>({
        ...LabelSelectorSchema,
        description:
          "Nodes that may hold this gateway's egress IPs. Required; use matchLabels to name them.",
      }),
      pool: Type.Optional(
        Type.Array(
          Type.String({
            maxLength: 100,
            description: "A single address, a range first-last, or a CIDR. IPv4 and IPv6.",
            "x-kubernetes-validations": [
              {
                rule: "isIP(self) || isCIDR(self) || (self.split('-').size() == 2 && isIP(self.split('-')[0]) && isIP(self.split('-')[1]) && ip(self.split('-')[0]).family() == ip(self.split('-')[1]).family())",
                message:
                  "must be an address, a CIDR or a range first-last of one family (e.g. 10.0.0.10-10.0.0.20)",
              },
              {
                rule: `!isCIDR(self) || cidr(self).prefixLength() >= (cidr(self).ip().family() == 4 ? ${MAX_POOL_PREFIX_V4} : ${MAX_POOL_PREFIX_V6})`,
                message: `is too large: IPv4 blocks may be at most /${MAX_POOL_PREFIX_V4} and IPv6 blocks at most /${MAX_POOL_PREFIX_V6}`,
              },
            ],
          } as object),
          { maxItems: 64, description: "Egress IPs that policies of this gateway are given." },
        ),
      ),
      interface: Type.Optional(
        Type.String({
          maxLength: 15,
          pattern: "^[a-zA-Z0-9_.:@-]+$",
          description:
            "Interface on which egress IPs are announced (ARP/NDP). Default: the interface holding the node's InternalIP.",
        }),
      ),
      namespaceSelector: Type.Optional(
        Type.Unsafe<Static<typeof LabelSelectorSchema>>({
          ...LabelSelectorSchema,
          description:
            "Namespaces whose EgressPolicies may use this gateway. Unset: every namespace. ClusterEgressPolicies are not restricted.",
        }),
      ),
      failback: Type.Optional(
        Type.Boolean({
          default: false,
          description:
            "Move egress IPs back to a node that recovers. Default false: an IP stays where failover put it.",
        }),
      ),
    },
    Strict,
  ),
  {
    rule: "(has(self.nodeSelector.matchLabels) && size(self.nodeSelector.matchLabels) > 0) || (has(self.nodeSelector.matchExpressions) && size(self.nodeSelector.matchExpressions) > 0)",
    message:
      "nodeSelector must name the gateway nodes (matchLabels or matchExpressions): an empty selector would make every node a gateway",
    fieldPath: ".nodeSelector",
  },
);

export const EgressGatewayStatusSchema = Type.Object(
  {
    observedGeneration: Type.Optional(Type.Integer({ minimum: 0 })),
    readyNodes: Type.Optional(Type.Integer({ minimum: 0 })),
    totalNodes: Type.Optional(Type.Integer({ minimum: 0 })),
    nodes: Type.Optional(
      Type.Array(
        Type.Object(
          {
            name: Type.String(),
            ready: Type.Boolean(),
            egressIPs: Type.Optional(Type.Array(Type.String())),
            policies: Type.Optional(Type.Integer({ minimum: 0 })),
          },
          Strict,
        ),
      ),
    ),
    pool: Type.Optional(
      Type.Object(
        {
          ipv4: Type.Optional(
            Type.Object({ size: Type.String(), allocated: Type.Integer() }, Strict),
          ),
          ipv6: Type.Optional(
            Type.Object({ size: Type.String(), allocated: Type.Integer() }, Strict),
          ),
        },
        Strict,
      ),
    ),
    poolUsage: Type.Optional(Type.String({ description: "allocated/size, for display" })),
    conditions: Type.Optional(Conditions),
  },
  Strict,
);

export const EgressGatewaySchema = kindObject(
  "EgressGateway",
  EgressGatewaySpecSchema,
  EgressGatewayStatusSchema,
);

// ---------------------------------------------------------------------------------------------
// EgressPolicy (namespaced) and ClusterEgressPolicy (cluster-scoped)

export const PortSchema = cel(
  Type.Object(
    {
      protocol: Type.Union([Type.Literal("TCP"), Type.Literal("UDP"), Type.Literal("SCTP")], {
        default: "TCP",
      }),
      port: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535 })),
      endPort: Type.Optional(Type.Integer({ minimum: 1, maximum: 65535 })),
    },
    Strict,
  ),
  { rule: "!has(self.endPort) || has(self.port)", message: "endPort needs port" },
  { rule: "!has(self.endPort) || self.endPort >= self.port", message: "endPort must be >= port" },
);

const policySpecProperties = {
  podSelector: Type.Unsafe<Static<typeof LabelSelectorSchema>>({
    ...LabelSelectorSchema,
    description: "Pods whose traffic leaves through the gateway. {} selects every pod.",
  }),
  nodeSelector: Type.Optional(
    Type.Unsafe<Static<typeof LabelSelectorSchema>>({
      ...LabelSelectorSchema,
      description: "Only pods running on these nodes are selected.",
    }),
  ),
  destinationCIDRs: Type.Optional(
    Type.Array(CIDR, {
      maxItems: 256,
      description:
        "Destinations sent through the gateway. Empty: everything outside the cluster's own CIDRs. In-cluster destinations are never captured.",
    }),
  ),
  excludedCIDRs: Type.Optional(
    Type.Array(CIDR, { maxItems: 256, description: "Destinations that keep their usual path." }),
  ),
  ports: Type.Optional(
    Type.Array(PortSchema, {
      maxItems: 32,
      description: "Only these destination ports. Empty: all traffic.",
    }),
  ),
  gateway: Type.String({
    minLength: 1,
    maxLength: 253,
    description: "Name of the EgressGateway that carries this traffic.",
  }),
  egressIP: Type.Optional(
    Type.Array(IPAddress, {
      minItems: 1,
      maxItems: 2 * MAX_EGRESS_IPS_PER_FAMILY,
      description: `Explicit egress IPs from the gateway's pool, up to ${MAX_EGRESS_IPS_PER_FAMILY} per family: new connections are spread over the addresses of their family. Shared by every policy naming the same address (such policies share a gateway node).`,
    }),
  ),
  egressIPCount: Type.Optional(
    Type.Integer({
      description: `Pool addresses to allocate per family, 1-${MAX_EGRESS_IPS_PER_FAMILY} (default 1): new connections are spread over them, so that more connections to one destination fit (each egress IP has its own source ports). Not with egressIP, interface or useNodeIP.`,
      "x-kubernetes-validations": [
        {
          rule: `self >= 1 && self <= ${MAX_EGRESS_IPS_PER_FAMILY}`,
          message: `must be between 1 and ${MAX_EGRESS_IPS_PER_FAMILY}: the number of pool addresses per family`,
        },
      ],
    } as object),
  ),
  interface: Type.Optional(
    Type.String({
      maxLength: 15,
      pattern: "^[a-zA-Z0-9_.:@-]+$",
      description: "Use the first address of this interface on the gateway node.",
    }),
  ),
  useNodeIP: Type.Optional(Type.Boolean({ description: "Use the gateway node's own InternalIP." })),
  priority: Type.Optional(
    Type.Integer({
      minimum: 0,
      maximum: MAX_PRIORITY,
      default: 0,
      description:
        "When several policies select the same pod and destination, the highest priority wins; ties go to the older policy, then to the name.",
    }),
  ),
};

const policySpecRules: CelRule[] = [
  {
    rule: "!(has(self.egressIP) && has(self.interface))",
    message:
      "egressIP and interface cannot be set together: keep egressIP to use a pool address, or interface to use that interface's address",
    fieldPath: ".egressIP",
  },
  {
    rule: "!(has(self.useNodeIP) && self.useNodeIP && (has(self.egressIP) || has(self.interface)))",
    message: "useNodeIP cannot be combined with egressIP or interface",
    fieldPath: ".useNodeIP",
  },
  {
    rule: "!has(self.egressIPCount) || !(has(self.egressIP) || has(self.interface) || (has(self.useNodeIP) && self.useNodeIP))",
    message:
      "egressIPCount sets how many pool addresses to allocate: remove it, or remove egressIP, interface and useNodeIP to take addresses from the pool",
    fieldPath: ".egressIPCount",
  },
  {
    rule: `!has(self.egressIP) || (self.egressIP.filter(e, isIP(e) && ip(e).family() == 4).size() <= ${MAX_EGRESS_IPS_PER_FAMILY} && self.egressIP.filter(e, isIP(e) && ip(e).family() == 6).size() <= ${MAX_EGRESS_IPS_PER_FAMILY})`,
    message: `egressIP may hold at most ${MAX_EGRESS_IPS_PER_FAMILY} addresses of each family: remove some`,
    fieldPath: ".egressIP",
  },
  {
    rule: "!has(self.egressIP) || self.egressIP.all(a, !isIP(a) || self.egressIP.exists_one(b, isIP(b) && ip(b) == ip(a)))",
    message: "egressIP lists an address twice: list each address once",
    fieldPath: ".egressIP",
  },
  {
    rule: "!has(self.egressIP) || !has(self.destinationCIDRs) || self.destinationCIDRs.all(d, !isCIDR(d) || self.egressIP.exists(e, isIP(e) && ip(e).family() == cidr(d).ip().family()))",
    message:
      "destinationCIDRs has an address family for which egressIP has no address: add one of that family or drop those destinations",
    fieldPath: ".destinationCIDRs",
  },
  {
    rule: "!has(self.excludedCIDRs) || !has(self.destinationCIDRs) || size(self.destinationCIDRs) == 0 || self.excludedCIDRs.all(x, !isCIDR(x) || self.destinationCIDRs.exists(d, isCIDR(d) && (cidr(d).containsCIDR(x) || cidr(x).containsCIDR(d))))",
    message:
      "excludedCIDRs has an entry outside every destinationCIDR, so it would exclude nothing: remove it or fix the destination",
    fieldPath: ".excludedCIDRs",
  },
];

export const EgressPolicySpecSchema = cel(
  Type.Object(policySpecProperties, Strict),
  ...policySpecRules,
);

export const ClusterEgressPolicySpecSchema = cel(
  Type.Object(
    {
      ...policySpecProperties,
      namespaceSelector: Type.Unsafe<Static<typeof LabelSelectorSchema>>({
        ...LabelSelectorSchema,
        description:
          "Namespaces whose pods the podSelector applies to. {} selects every namespace.",
      }),
    },
    Strict,
  ),
  ...policySpecRules,
);

export const ShadowSchema = Type.Object(
  {
    policy: Type.String({ description: "Kind/namespace/name of the winning policy" }),
    pods: Type.Integer({ minimum: 0, description: "Pods of this policy it takes over" }),
  },
  Strict,
);

export const EgressPolicyStatusSchema = Type.Object(
  {
    observedGeneration: Type.Optional(Type.Integer({ minimum: 0 })),
    gatewayNode: Type.Optional(Type.String()),
    standbyNodes: Type.Optional(
      Type.Array(Type.String(), {
        maxItems: 16,
        description:
          "The nodes that take the egress IPs over, in this order, when gatewayNode is lost: the first of them still live gets them. Published in advance; empty when no other node qualifies",
      }),
    ),
    egressIPs: Type.Optional(
      Type.Array(Type.String(), {
        maxItems: 2 * MAX_EGRESS_IPS_PER_FAMILY,
        description:
          "Every egress IP of the policy, IPv4 first, each family in address order: new connections leave with one of their family",
      }),
    ),
    tunnelClass: Type.Optional(
      Type.Integer({
        minimum: 1,
        maximum: 16383,
        description:
          "Number the steering nodes carry in the VXLAN header of this policy's packets, shared by the policies with the same egress IPs: the gateway node SNATs them from the first packet, before it has heard of the pod. Absent when all are taken",
      }),
    ),
    matchedPods: Type.Optional(Type.Integer({ minimum: 0 })),
    programmedNodes: Type.Optional(Type.Integer({ minimum: 0 })),
    targetNodes: Type.Optional(Type.Integer({ minimum: 0 })),
    programmed: Type.Optional(
      Type.String({ description: "programmedNodes/targetNodes, for display" }),
    ),
    revision: Type.Optional(
      Type.String({ description: "Hash of what the datapath must hold for this policy" }),
    ),
    shadowedBy: Type.Optional(Type.Array(ShadowSchema, { maxItems: 16 })),
    conditions: Type.Optional(Conditions),
  },
  Strict,
);

export const EgressPolicySchema = kindObject(
  "EgressPolicy",
  EgressPolicySpecSchema,
  EgressPolicyStatusSchema,
);
export const ClusterEgressPolicySchema = kindObject(
  "ClusterEgressPolicy",
  ClusterEgressPolicySpecSchema,
  EgressPolicyStatusSchema,
);

// ---------------------------------------------------------------------------------------------
// Internal kinds

/** A destination toward which an egress IP is running out of source ports (src/agent/traffic.ts). */
export const SnatSaturationSchema = Type.Object(
  {
    egressIP: Type.String(),
    destination: Type.String(),
    port: Type.Integer({ minimum: 0, maximum: 65535, description: "0 for ICMP" }),
    protocol: Type.String({ maxLength: 16 }),
    percent: Type.Integer({
      minimum: 0,
      maximum: 100,
      description: "Source ports in use when the threshold was crossed, in percent",
    }),
  },
  Strict,
);

/** Per-node identity allocated by the controller (spec) and realization reported by the agent. */
export const EgressNodeSchema = kindObject(
  "EgressNode",
  Type.Object(
    {
      nodeID: Type.Integer({ minimum: 0, maximum: 65535 }),
      mark: Type.String({ pattern: "^0x[0-9a-f]{8}$" }),
      tunnel: Type.Object(
        {
          mac: Type.String({ pattern: "^([0-9a-f]{2}:){5}[0-9a-f]{2}$" }),
          ipv4: Type.Optional(Type.String()),
          ipv6: Type.Optional(Type.String()),
        },
        Strict,
      ),
      addresses: Type.Optional(
        Type.Object(
          { ipv4: Type.Optional(Type.String()), ipv6: Type.Optional(Type.String()) },
          { ...Strict, description: "The node's InternalIPs, copied from its Node" },
        ),
      ),
      podCIDRs: Type.Optional(
        Type.Array(Type.String(), {
          maxItems: 2,
          description: "node.spec.podCIDRs, copied from its Node",
        }),
      ),
      gatewayCapable: Type.Optional(
        Type.Boolean({
          description:
            "The node matches an EgressGateway's nodeSelector: its agent renews a Lease so that failures are detected",
        }),
      ),
    },
    Strict,
  ),
  Type.Object(
    {
      datapath: Type.Optional(
        Type.Union([Type.Literal("iptables"), Type.Literal("nftables")], {
          description: "The packet filter that carries this node's rules",
        }),
      ),
      underlay: Type.Optional(
        Type.Object(
          {
            interface: Type.String(),
            ipv4: Type.Optional(Type.String()),
            ipv6: Type.Optional(Type.String()),
            mtu: Type.Optional(Type.Integer()),
          },
          Strict,
        ),
      ),
      interfaces: Type.Optional(
        Type.Array(
          Type.Object({ name: Type.String(), addresses: Type.Array(Type.String()) }, Strict),
          { maxItems: 64 },
        ),
      ),
      programmed: Type.Optional(
        Type.Record(Type.String(), Type.String(), {
          description: "Policy key → revision the datapath of this node holds",
          // One field for server-side apply's bookkeeping, not one per policy: with 1,000 keys
          // an update cost the API server 80 ms of CPU as a granular map, 35 ms atomic
          // (measured on a 2-core EPYC VM, kube-apiserver 1.37); agents merge-patch it alike.
          "x-kubernetes-map-type": "atomic",
        }),
      ),
      lastSync: Type.Optional(Type.String()),
      repairs: Type.Optional(Type.Integer({ minimum: 0 })),
      tunnelClasses: Type.Optional(
        Type.Boolean({
          description:
            "This node's tunnel takes tunnel classes (VXLAN Group Based Policy): its peers name policies in the packets they steer to it. Absent: an agent of an earlier version, whose tunnel drops such packets",
        }),
      ),
      downNodes: Type.Optional(
        Type.Array(Type.String(), {
          maxItems: 256,
          description:
            "Gateway nodes this node judges down by its liveness probes (a majority of the voters no longer hears them): their egress IPs went to their first standby on every node without waiting for the controller, which then moves them too. Absent: none",
        }),
      ),
      snatSaturation: Type.Optional(
        Type.Array(SnatSaturationSchema, {
          maxItems: 16,
          description:
            "Destinations toward which an egress IP this node holds uses 80% or more of its SNAT source ports (until it falls below 70%). Written when the list changes, never per measurement; the controller sets SNATPortsSaturated on the policies concerned",
        }),
      ),
      conditions: Type.Optional(Conditions),
    },
    Strict,
  ),
);

/** The cluster's own CIDRs: traffic to them is never sent through a gateway. Singleton "default". */
export const EgressClusterInfoSchema = kindObject(
  "EgressClusterInfo",
  Type.Object(
    {
      extraCIDRs: Type.Optional(Type.Array(CIDR, { maxItems: 256 })),
      serviceCIDRs: Type.Optional(
        Type.Array(CIDR, {
          maxItems: 16,
          description: "Service CIDRs for clusters whose API has no ServiceCIDR objects",
        }),
      ),
    },
    Strict,
  ),
  Type.Object(
    {
      nodeIPs: Type.Optional(Type.Array(Type.String())),
      podCIDRs: Type.Optional(Type.Array(Type.String())),
      serviceCIDRs: Type.Optional(Type.Array(Type.String())),
      ignoredCIDRs: Type.Optional(
        Type.Array(Type.String(), {
          description:
            "Union of the above and extraCIDRs, aggregated: what agents put in the ignore set",
        }),
      ),
    },
    Strict,
  ),
);

export const EndpointSchema = Type.Object(
  {
    pod: Type.String({ description: "namespace/name" }),
    node: Type.String(),
    ips: Type.Array(Type.String(), { maxItems: 2 }),
  },
  Strict,
);

/** Pods matched by one policy, in chunks, so that agents need not watch every Pod. */
export const EgressEndpointSliceSchema = Type.Object(
  {
    apiVersion: Type.Literal(API_VERSION),
    kind: Type.Literal("EgressEndpointSlice"),
    metadata: ObjectMetaSchema,
    policy: Type.String({
      description: "Key of the policy: EgressPolicy/ns/name or ClusterEgressPolicy/name",
    }),
    endpoints: Type.Array(EndpointSchema, { maxItems: 1000 }),
  },
  Strict,
);

export type LabelSelectorSpec = Static<typeof LabelSelectorSchema>;
export type Condition = Static<typeof ConditionSchema>;
export type ObjectMeta = Static<typeof ObjectMetaSchema>;
export type EgressGateway = Static<typeof EgressGatewaySchema>;
export type EgressGatewaySpec = Static<typeof EgressGatewaySpecSchema>;
export type EgressGatewayStatus = Static<typeof EgressGatewayStatusSchema>;
export type EgressPolicy = Static<typeof EgressPolicySchema>;
export type ClusterEgressPolicy = Static<typeof ClusterEgressPolicySchema>;
export type EgressPolicySpec = Static<typeof EgressPolicySpecSchema>;
export type ClusterEgressPolicySpec = Static<typeof ClusterEgressPolicySpecSchema>;
export type EgressPolicyStatus = Static<typeof EgressPolicyStatusSchema>;
export type PortSpec = Static<typeof PortSchema>;
export type EgressNode = Static<typeof EgressNodeSchema>;
export type SnatSaturationReport = Static<typeof SnatSaturationSchema>;
export type EgressClusterInfo = Static<typeof EgressClusterInfoSchema>;
export type EgressEndpointSlice = Static<typeof EgressEndpointSliceSchema>;
export type Endpoint = Static<typeof EndpointSchema>;

/** Either policy kind. */
export type AnyPolicy = EgressPolicy | ClusterEgressPolicy;

export interface KindInfo {
  readonly kind: string;
  readonly plural: string;
  readonly singular: string;
  readonly shortNames: readonly string[];
  readonly namespaced: boolean;
  readonly schema: TSchema;
  readonly hasStatus: boolean;
  readonly categories: readonly string[];
}

export const KINDS = {
  EgressGateway: {
    kind: "EgressGateway",
    plural: "egressgateways",
    singular: "egressgateway",
    shortNames: ["egw"],
    namespaced: false,
    schema: EgressGatewaySchema,
    hasStatus: true,
    categories: ["sallyport"],
  },
  EgressPolicy: {
    kind: "EgressPolicy",
    plural: "egresspolicies",
    singular: "egresspolicy",
    shortNames: ["egp"],
    namespaced: true,
    schema: EgressPolicySchema,
    hasStatus: true,
    categories: ["sallyport"],
  },
  ClusterEgressPolicy: {
    kind: "ClusterEgressPolicy",
    plural: "clusteregresspolicies",
    singular: "clusteregresspolicy",
    shortNames: ["cegp"],
    namespaced: false,
    schema: ClusterEgressPolicySchema,
    hasStatus: true,
    categories: ["sallyport"],
  },
  EgressNode: {
    kind: "EgressNode",
    plural: "egressnodes",
    singular: "egressnode",
    shortNames: ["egn"],
    namespaced: false,
    schema: EgressNodeSchema,
    hasStatus: true,
    categories: ["sallyport"],
  },
  EgressClusterInfo: {
    kind: "EgressClusterInfo",
    plural: "egressclusterinfos",
    singular: "egressclusterinfo",
    shortNames: ["egci"],
    namespaced: false,
    schema: EgressClusterInfoSchema,
    hasStatus: true,
    categories: ["sallyport"],
  },
  EgressEndpointSlice: {
    kind: "EgressEndpointSlice",
    plural: "egressendpointslices",
    singular: "egressendpointslice",
    shortNames: ["egeps"],
    namespaced: false,
    schema: EgressEndpointSliceSchema,
    hasStatus: false,
    categories: ["sallyport"],
  },
} as const satisfies Record<string, KindInfo>;

export type KindName = keyof typeof KINDS;

/** Stable key of a policy, used in names, statuses and messages. */
export function policyKey(policy: {
  kind: string;
  metadata: { name?: string | undefined; namespace?: string | undefined };
}): string {
  return policy.kind === "EgressPolicy"
    ? `EgressPolicy/${policy.metadata.namespace ?? ""}/${policy.metadata.name ?? ""}`
    : `ClusterEgressPolicy/${policy.metadata.name ?? ""}`;
}
