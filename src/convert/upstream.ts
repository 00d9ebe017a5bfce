/**
 * What `sallyport convert` reads: the peers' kinds, as their CRDs define them, written as TypeBox
 * schemas so that ajv checks their shape and names every field it does not know.
 *
 * - Cilium `CiliumEgressGatewayPolicy` (`cilium.io/v2`, cluster-scoped): cilium/cilium
 *   `pkg/k8s/apis/cilium.io/v2/cegp_types.go` and `Documentation/network/egress-gateway/
 *   egress-gateway.rst` (the newest text, with `excludedCIDRs`, `selectors[].nodeSelector`, IPv6
 *   and the `egressGateways` list of CFP-38341).
 * - spidernet-io/egressgateway `EgressGateway`, `EgressPolicy` (namespaced) and
 *   `EgressClusterPolicy` (`egressgateway.spidernet.io/v1beta1`): `charts/crds/*.yaml` and
 *   `docs/reference/*.en.md`.
 *
 * Objects exported from a cluster carry `status` and server-set metadata; both are accepted.
 */
import { type Static, type TSchema, Type } from "@sinclair/typebox";

export const CILIUM_GROUP = "cilium.io";
export const SPIDERNET_GROUP = "egressgateway.spidernet.io";

const Strict = { additionalProperties: false } as const;
const Open = { additionalProperties: true } as const;

export const UpstreamSelectorSchema = Type.Object(
  {
    matchLabels: Type.Optional(Type.Record(Type.String(), Type.String())),
    matchExpressions: Type.Optional(
      Type.Array(
        Type.Object(
          {
            key: Type.String({ minLength: 1 }),
            operator: Type.Union([
              Type.Literal("In"),
              Type.Literal("NotIn"),
              Type.Literal("Exists"),
              Type.Literal("DoesNotExist"),
            ]),
            values: Type.Optional(Type.Array(Type.String())),
          },
          Strict,
        ),
      ),
    ),
  },
  Strict,
);

const Metadata = Type.Object(
  {
    name: Type.String({ minLength: 1 }),
    namespace: Type.Optional(Type.String()),
    labels: Type.Optional(Type.Record(Type.String(), Type.String())),
    annotations: Type.Optional(Type.Record(Type.String(), Type.String())),
  },
  Open,
);

// ---------------------------------------------------------------------------------------------
// Cilium

export const CiliumGatewaySchema = Type.Object(
  {
    nodeSelector: Type.Optional(UpstreamSelectorSchema),
    interface: Type.Optional(Type.String()),
    egressIP: Type.Optional(Type.String()),
  },
  Strict,
);

export const CiliumEgressGatewayPolicySchema = Type.Object(
  {
    apiVersion: Type.String(),
    kind: Type.Literal("CiliumEgressGatewayPolicy"),
    metadata: Metadata,
    spec: Type.Object(
      {
        selectors: Type.Array(
          Type.Object(
            {
              podSelector: Type.Optional(UpstreamSelectorSchema),
              namespaceSelector: Type.Optional(UpstreamSelectorSchema),
              nodeSelector: Type.Optional(UpstreamSelectorSchema),
            },
            Strict,
          ),
        ),
        destinationCIDRs: Type.Array(Type.String()),
        excludedCIDRs: Type.Optional(Type.Array(Type.String())),
        egressGateway: Type.Optional(CiliumGatewaySchema),
        egressGateways: Type.Optional(Type.Array(CiliumGatewaySchema)),
      },
      Strict,
    ),
    status: Type.Optional(Type.Unknown()),
  },
  Strict,
);

// ---------------------------------------------------------------------------------------------
// spidernet-io/egressgateway

export const SpidernetGatewaySchema = Type.Object(
  {
    apiVersion: Type.String(),
    kind: Type.Literal("EgressGateway"),
    metadata: Metadata,
    spec: Type.Object(
      {
        clusterDefault: Type.Optional(Type.Boolean()),
        ippools: Type.Optional(
          Type.Object(
            {
              ipv4: Type.Optional(Type.Array(Type.String())),
              ipv6: Type.Optional(Type.Array(Type.String())),
              ipv4DefaultEIP: Type.Optional(Type.String()),
              ipv6DefaultEIP: Type.Optional(Type.String()),
            },
            Strict,
          ),
        ),
        nodeSelector: Type.Object(
          {
            selector: Type.Optional(UpstreamSelectorSchema),
            policy: Type.Optional(Type.String()),
          },
          Strict,
        ),
      },
      Strict,
    ),
    status: Type.Optional(Type.Unknown()),
  },
  Strict,
);

const SpidernetEgressIP = Type.Object(
  {
    ipv4: Type.Optional(Type.String()),
    ipv6: Type.Optional(Type.String()),
    useNodeIP: Type.Optional(Type.Boolean()),
    allocatorPolicy: Type.Optional(Type.String()),
  },
  Strict,
);

const SpidernetPolicyStatus = Type.Object(
  {
    eip: Type.Optional(
      Type.Object({ ipv4: Type.Optional(Type.String()), ipv6: Type.Optional(Type.String()) }, Open),
    ),
    node: Type.Optional(Type.String()),
  },
  Open,
);

const appliedTo = {
  podSelector: Type.Optional(UpstreamSelectorSchema),
  podSubnet: Type.Optional(Type.Array(Type.String())),
};

function spidernetPolicy<K extends string, A extends TSchema>(kind: K, appliedToSchema: A) {
  return Type.Object(
    {
      apiVersion: Type.String(),
      kind: Type.Literal(kind),
      metadata: Metadata,
      spec: Type.Object(
        {
          egressGatewayName: Type.Optional(Type.String()),
          egressIP: Type.Optional(SpidernetEgressIP),
          appliedTo: appliedToSchema,
          destSubnet: Type.Optional(Type.Array(Type.String())),
          priority: Type.Optional(Type.Integer()),
        },
        Strict,
      ),
      status: Type.Optional(SpidernetPolicyStatus),
    },
    Strict,
  );
}

export const SpidernetPolicySchema = spidernetPolicy(
  "EgressPolicy",
  Type.Object(appliedTo, Strict),
);
export const SpidernetClusterPolicySchema = spidernetPolicy(
  "EgressClusterPolicy",
  Type.Object({ ...appliedTo, namespaceSelector: Type.Optional(UpstreamSelectorSchema) }, Strict),
);

export type UpstreamSelector = Static<typeof UpstreamSelectorSchema>;
export type CiliumGateway = Static<typeof CiliumGatewaySchema>;
export type CiliumEgressGatewayPolicy = Static<typeof CiliumEgressGatewayPolicySchema>;
export type SpidernetGateway = Static<typeof SpidernetGatewaySchema>;
/** Either spidernet policy kind; `appliedTo.namespaceSelector` only on EgressClusterPolicy. */
export type SpidernetPolicy = Omit<Static<typeof SpidernetPolicySchema>, "kind" | "spec"> & {
  kind: "EgressPolicy" | "EgressClusterPolicy";
  spec: Static<typeof SpidernetClusterPolicySchema>["spec"];
};
