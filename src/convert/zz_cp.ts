import { ControlPlane } from "../sandbox/controlplane.ts";

const cp = await ControlPlane.start({ tag: "scratch-cli" });
console.log(cp.kubeconfig(), cp.dir);
await new Promise((r) => setTimeout(r, 3_000_000));
