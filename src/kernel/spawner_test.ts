import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ExecRunner } from "./runner.ts";
import { SpawnerRunner } from "./spawner.ts";

describe("SpawnerRunner", () => {
  it("runs a command exactly as ExecRunner does: argv, stdin, exit code, both outputs", async () => {
    const helper = new SpawnerRunner();
    const direct = new ExecRunner();
    for (const [argv, stdin] of [
      [["echo", "a b", "$HOME"], undefined],
      [["cat"], "payload on stdin\nsecond line\n"],
      [["sh", "-c", "echo out; echo err >&2; exit 3"], undefined],
      [["true"], "a tool that never reads its stdin"],
    ] as const) {
      const options = stdin === undefined ? undefined : { stdin };
      assert.deepEqual(await helper.run(argv, options), await direct.run(argv, options));
    }
    helper.close();
  });

  it("fails like ExecRunner for a program that does not exist", async () => {
    const helper = new SpawnerRunner();
    await assert.rejects(
      helper.run(["/nonexistent/tool"]),
      /Cannot run \/nonexistent\/tool: .*ENOENT/,
    );
    helper.close();
  });

  it("runs commands concurrently and answers each its own", async () => {
    const helper = new SpawnerRunner();
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        helper.run(["sh", "-c", `sleep 0.0${i % 5}; echo ${i}`]),
      ),
    );
    assert.deepEqual(
      results.map((r) => r.stdout.trim()),
      Array.from({ length: 20 }, (_, i) => String(i)),
    );
    helper.close();
  });

  it("fails what a dead helper held, and starts a new one for the next command", async () => {
    const helper = new SpawnerRunner();
    const pid = Number((await helper.run(["sh", "-c", "echo $PPID"])).stdout.trim());
    const held = helper.run(["sleep", "5"]);
    process.kill(pid, "SIGKILL");
    await assert.rejects(held, /the command helper exited/);
    assert.equal((await helper.run(["echo", "again"])).stdout, "again\n");
    helper.close();
  });
});
