/**
 * `npm run bench -- NAME`: runs one benchmark; its last line of output is one JSON object.
 * Record results in BENCHMARKS.md with the date and the machine.
 */
const name = process.argv[2];
const benches: Record<string, () => Promise<unknown>> = {
  engine: async () => (await import("./engine.ts")).run(),
  datapath: async () => (await import("./datapath.ts")).run(),
  failover: async () => (await import("./sandbox.ts")).failover(),
  "new-pod": async () => (await import("./sandbox.ts")).newPod(),
  policy: async () => (await import("./sandbox.ts")).policyBench(),
  churn: async () => (await import("./churn.ts")).churn(),
  agent: async () => (await import("./agent.ts")).run(),
  perpacket: async () => (await import("./perpacket.ts")).perpacket(),
  traffic: async () => (await import("./traffic.ts")).run(),
  capacity: async () => (await import("./capacity.ts")).run(),
  "first-connection": async () => (await import("./first_connection.ts")).firstConnection(),
};
const run = name === undefined ? undefined : benches[name];
if (run === undefined) {
  console.error(
    `Cannot run benchmark "${name ?? ""}": choose one of ${Object.keys(benches).join(", ")}`,
  );
  process.exit(2);
}
const result = await run();
console.log(JSON.stringify(result));
