/**
 * A dotproxy process for the rotation scenarios (tests/rotation_test.ts,
 * tests/doh_rotation_test.ts): `deno run main.ts` with the test CA as its upstream trust and
 * the test server certificate for its client listeners, stderr collected.
 *
 * @module
 */

import { CA_PEM, SERVER_KEY, SERVER_PEM } from "../fixtures/certs.ts";
import { spawnMain } from "./proxy.ts";
import { sleep } from "./wait.ts";

/** One running dotproxy of a rotation scenario. */
export interface RotationProxy {
  /** Everything the process wrote to stderr so far. */
  stderr(): string;
  /** Whether the process has exited. */
  exited(): boolean;
  /** Sends `signal` (SIGTERM by default), waits for the exit; returns the exit code. */
  stop(signal?: Deno.Signal): Promise<number>;
}

/** Starts `main.ts` with `args` (killed after 60 s at the latest). */
export function startRotationProxy(args: string[]): RotationProxy {
  const main = spawnMain(args, {
    DOTPROXY_CA_CERTS: CA_PEM,
    DOTPROXY_TLS_CERT: SERVER_PEM,
    DOTPROXY_TLS_KEY: SERVER_KEY,
  }, 60_000);
  let stderr = "";
  let exited = false;
  const collected = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of main.child.stderr) stderr += decoder.decode(chunk, { stream: true });
  })();
  const drained = main.child.stdout.cancel();
  const status = main.child.status.then((s) => {
    exited = true;
    return s;
  });
  return {
    stderr: () => stderr,
    exited: () => exited,
    stop: async (signal: Deno.Signal = "SIGTERM") => {
      try {
        main.child.kill(signal);
      } catch {
        // Gone already.
      }
      const { code } = await status;
      main.stopTimer();
      await collected;
      await drained;
      return code;
    },
  };
}

/** Asks one query after another (5 ms apart) for as long as `running()` holds. */
export async function keepAsking(
  asker: { ask(): Promise<void> },
  running: () => boolean,
): Promise<void> {
  while (running()) {
    await asker.ask();
    await sleep(5);
  }
}
