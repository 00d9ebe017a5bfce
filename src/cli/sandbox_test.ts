import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { parseLabels, parsePorts } from "./sandbox.ts";

describe("sandbox command arguments", () => {
  it("labels as kubectl label takes them: k=v sets, k- removes", () => {
    assert.deepEqual(parseLabels("app=web,tier-,x=", "label-pod"), {
      app: "web",
      tier: null,
      x: "",
    });
    assert.throws(() => parseLabels("app", "--labels"), /Cannot parse --labels: "app"/);
  });

  it("service ports: port, port:target, /udp", () => {
    assert.deepEqual(parsePorts("80,80:8080,53:8080/udp"), [
      { port: 80, targetPort: 80, protocol: "TCP" },
      { port: 80, targetPort: 8080, protocol: "TCP" },
      { port: 53, targetPort: 8080, protocol: "UDP" },
    ]);
    assert.throws(() => parsePorts("70000"), /Cannot parse --port: "70000"/);
  });
});
