import { FakeKernel } from "../kernel/fake_kernel.ts";

/** A FakeKernel of a node whose uplink `eth0` is up with `address`/24 (the agent's underlay). */
export function fakeNodeHost(address: string): FakeKernel {
  const fake = new FakeKernel();
  fake.seed(
    ["ip", "-batch", "-"],
    ["link add eth0 type dummy", "link set eth0 up", `addr add ${address}/24 dev eth0`, ""].join(
      "\n",
    ),
  );
  return fake;
}
