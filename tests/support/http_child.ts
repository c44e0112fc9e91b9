/**
 * The HTTP endpoint alone, in a process of its own, for tests that must starve a process of
 * file descriptors without starving the test runner:
 *
 * ```sh
 * bash -c 'ulimit -n 256; exec deno run --allow-net tests/support/http_child.ts OPTIONS_JSON'
 * ```
 *
 * Prints `listening PORT` on stdout once bound, logs JSON lines (warn and up) on stderr,
 * serves until its stdin closes or SIGTERM comes, then closes the server and prints `closed`.
 * An unhandled rejection ends the process with a non-zero code, as Deno does by default.
 *
 * @module
 */

import { Logger } from "../../src/log.ts";
import { HttpServer, type HttpServerOptions } from "../../src/server/http.ts";

// Deno 2.9.6 sets up its signal handling lazily, within about a second of start, and panics
// (ext/signals: `Signals::new(...).unwrap()`, EMFILE) when descriptors run out before then.
// main.ts registers its SIGINT/SIGTERM listeners at start; so does this stand-in, first thing.
let stopBySignal: () => void = () => {};
const signalled = new Promise<void>((resolve) => stopBySignal = resolve);
const onSigterm = () => stopBySignal();
Deno.addSignalListener("SIGTERM", onSigterm);

const options: HttpServerOptions = JSON.parse(Deno.args[0] ?? "{}");
const log = new Logger({ level: "warn", format: "json" });
const server = HttpServer.listen(
  { hostname: "127.0.0.1", port: 0 },
  {
    metrics: () => "# child\n",
    readiness: () => Promise.resolve({ ready: true, reason: "child" }),
  },
  log,
  options,
);
console.log(`listening ${server.addr.port}`);

// Serve until the parent closes our stdin or sends SIGTERM.
const reader = Deno.stdin.readable.getReader();
const stdinClosed = (async () => {
  for (let chunk = 0; chunk < 1_000_000; chunk++) {
    const { done } = await reader.read();
    if (done) return;
  }
})();
await Promise.race([stdinClosed, signalled]);
Deno.removeSignalListener("SIGTERM", onSigterm);
await server.close();
console.log("closed");
// Nothing else to wait for (a read of stdin may still be pending after SIGTERM).
Deno.exit(0);
