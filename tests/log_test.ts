/**
 * The log output: JSON lines and text lines in their documented shapes, level filtering,
 * rate limiting, `--log-queries` lines through a running proxy, and a real `main.ts`
 * subprocess whose every stderr line is JSON (or text) in the chosen format.
 *
 * Run with `deno test --allow-net --allow-env --allow-read --allow-run tests/log_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { LOG_LEVELS, Logger, type LogLevel, RateLimitedLog } from "../src/log.ts";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery, parseMessage } from "./support/dns.ts";
import { spawnMain, TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

const FIXED = new Date("2024-05-06T07:08:09.123Z");
const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;
/** A text line: ISO time, level padded to 5, message, then key=value pairs. */
const TEXT_LINE = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO |WARN |ERROR) (\S.*)$/;

type JsonRecord = Record<string, unknown>;

function capture(
  level: LogLevel,
  format: "text" | "json",
): { log: Logger; lines: string[] } {
  const lines: string[] = [];
  const log = new Logger({ level, format, sink: (line) => lines.push(line), now: () => FIXED });
  return { log, lines };
}

/** Parses one JSON log line, checking the fields every line carries. */
function parseJsonLine(line: string): JsonRecord {
  assert.ok(!line.includes("\n"), `a log line spans lines: ${JSON.stringify(line)}`);
  const record: unknown = JSON.parse(line);
  assert.ok(typeof record === "object" && record !== null && !Array.isArray(record), line);
  const fields = record as JsonRecord;
  assert.equal(typeof fields.time, "string", line);
  assert.match(fields.time as string, ISO, line);
  assert.equal(new Date(fields.time as string).toISOString(), fields.time, line);
  assert.ok(LOG_LEVELS.includes(fields.level as LogLevel), `level in ${line}`);
  assert.equal(typeof fields.msg, "string", line);
  assert.notEqual(fields.msg, "", line);
  return fields;
}

// ---------------------------------------------------------------------------------------------
// The Logger on its own.

Deno.test("log: JSON lines carry time, level, msg and the fields", () => {
  const { log, lines } = capture("debug", "json");
  log.info("upstream reachable again", {
    upstream: "1.1.1.1:853#cloudflare-dns.com",
    failures: 3,
    fresh: true,
    skipped: undefined,
    nothing: null,
    text: 'with "quotes"\nand a newline',
  });
  assert.equal(lines.length, 1);
  const record = parseJsonLine(lines[0]);
  assert.deepEqual(record, {
    time: "2024-05-06T07:08:09.123Z",
    level: "info",
    msg: "upstream reachable again",
    upstream: "1.1.1.1:853#cloudflare-dns.com",
    failures: 3,
    fresh: true,
    text: 'with "quotes"\nand a newline',
  });
  // time, level and msg lead every line, in that order.
  assert.deepEqual(Object.keys(record).slice(0, 3), ["time", "level", "msg"]);

  log.warn("no fields");
  assert.deepEqual(parseJsonLine(lines[1]), {
    time: "2024-05-06T07:08:09.123Z",
    level: "warn",
    msg: "no fields",
  });
});

Deno.test("log: text lines are time, padded level, message, key=value", () => {
  const { log, lines } = capture("debug", "text");
  log.debug("a", { n: 1 });
  log.info("upstream connection open", { upstream: "127.0.0.1:853#dns.test" });
  log.warn("query failed; answering SERVFAIL", {
    reason: "timeout",
    error: "no answer within 4000 ms",
    empty: "",
    eq: "a=b",
    quote: 'say "hi"',
    skipped: undefined,
  });
  log.error("stopped", { ok: false });
  assert.deepEqual(lines, [
    "2024-05-06T07:08:09.123Z DEBUG a n=1",
    "2024-05-06T07:08:09.123Z INFO  upstream connection open upstream=127.0.0.1:853#dns.test",
    "2024-05-06T07:08:09.123Z WARN  query failed; answering SERVFAIL reason=timeout " +
    'error="no answer within 4000 ms" empty="" eq="a=b" quote="say \\"hi\\""',
    "2024-05-06T07:08:09.123Z ERROR stopped ok=false",
  ]);
  for (const line of lines) assert.match(line, TEXT_LINE);

  // A value with a newline stays on one line.
  log.info("x", { value: "one\ntwo" });
  assert.equal(lines[4], '2024-05-06T07:08:09.123Z INFO  x value="one\\ntwo"');
});

Deno.test("log: levels filter lines below the threshold", () => {
  for (const threshold of LOG_LEVELS) {
    for (const format of ["text", "json"] as const) {
      const { log, lines } = capture(threshold, format);
      log.debug("d");
      log.info("i");
      log.warn("w");
      log.error("e");
      const expected = LOG_LEVELS.slice(LOG_LEVELS.indexOf(threshold));
      const written = lines.map((line) =>
        format === "json"
          ? parseJsonLine(line).level
          : TEXT_LINE.exec(line)?.[2].trim().toLowerCase()
      );
      assert.deepEqual(written, expected, `${threshold} ${format}`);
      for (const level of LOG_LEVELS) {
        assert.equal(log.enabled(level), expected.includes(level), `${threshold} ${level}`);
      }
    }
  }
  assert.equal(new Logger({ sink: () => {} }).level, "info");
  assert.equal(new Logger({ sink: () => {} }).format, "text");
});

Deno.test("log: RateLimitedLog lets one line through per interval and counts the rest", () => {
  const { log, lines } = capture("debug", "json");
  let now = 0;
  const limited = new RateLimitedLog(log, 1000, () => now);
  limited.warn("flood", { client: "a" });
  now = 10;
  limited.warn("flood", { client: "b" });
  now = 999;
  limited.warn("flood", { client: "c" });
  now = 1000;
  limited.warn("flood", { client: "d" });
  now = 5000;
  limited.warn("flood", { client: "e" });
  const records = lines.map(parseJsonLine);
  assert.deepEqual(records.map((r) => [r.client, r.suppressed]), [
    ["a", undefined],
    ["d", 2],
    ["e", undefined],
  ]);
  assert.ok(records.every((r) => r.level === "warn"));
});

// ---------------------------------------------------------------------------------------------
// --log-queries through a running proxy.

/**
 * Sends a proxy the same traffic each time: a short datagram it drops (waited for through
 * `dropped`), then six queries it answers, over UDP and TCP.
 */
async function sendTraffic(
  port: number,
  dropped: () => number,
): Promise<void> {
  // A datagram too short for a header is dropped; it gets no query line.
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    await socket.send(new Uint8Array([0, 1, 2]), { transport: "udp", hostname: "127.0.0.1", port });
  } finally {
    socket.close();
  }
  for (let attempt = 0; attempt < 250 && dropped() === 0; attempt++) {
    await sleep(20);
  }
  assert.equal(dropped(), 1, "the short datagram was not seen");

  const a = await udpExchange(port, buildQuery("Mixed.Case.Example", { id: 1 }));
  assert.ok(a);
  const txt = await udpExchange(port, buildQuery("txt.example", { id: 2, type: 16 }));
  assert.ok(txt);
  const nx = await udpExchange(port, buildQuery("nx.example", { id: 3 }));
  assert.ok(nx);
  assert.equal(parseMessage(nx).rcode, 3);
  const formerr = await udpExchange(port, new Uint8Array([...buildQuery("bad.example"), 0]));
  assert.ok(formerr);
  assert.equal(parseMessage(formerr).rcode, 1);
  const odd = await udpExchange(port, buildQuery('we"ird\nname.example', { id: 5 }));
  assert.ok(odd);
  const tcp = await TcpDnsClient.connect(port);
  try {
    await tcp.send(buildQuery("tcp.example", { id: 6, type: 28 }));
    assert.ok(await tcp.receive());
  } finally {
    tcp.close();
  }
}

Deno.test("log: --log-queries writes one info line per answered query", async () => {
  const upstream = DotServer.start();
  const label = `127.0.0.1:${upstream.port}#dns.test`;
  try {
    const config = testConfig([upstream.upstream()], { logQueries: true, logLevel: "info" });
    await withProxy(config, async ({ proxy, port, logs }) => {
      await sendTraffic(port, () => proxy.metrics.dropped.get("udp", "malformed"));
      for (const line of logs.lines) parseJsonLine(line);
      const queries = logs.lines.map(parseJsonLine).filter((r) => r.msg === "query");
      const summary = queries.map((r) => [r.transport, r.name, r.type, r.rcode, r.upstream]);
      assert.deepEqual(summary, [
        ["udp", "Mixed.Case.Example.", "A", "NOERROR", label],
        ["udp", "txt.example.", "TXT", "NOERROR", label],
        ["udp", "nx.example.", "A", "NXDOMAIN", label],
        ["udp", "bad.example.", "A", "FORMERR", undefined],
        ["udp", 'we"ird\\010name.example.', "A", "NOERROR", label],
        ["tcp", "tcp.example.", "AAAA", "NOERROR", label],
      ]);
      for (const record of queries) {
        assert.equal(record.level, "info");
        assert.match(String(record.client), /^127\.0\.0\.1:\d+$/);
        // The cache took part in every forwarded answer (a miss: each name is asked once); a
        // FORMERR is answered before the cache is consulted, so it has no cache field.
        assert.equal(record.cache, record.upstream === undefined ? undefined : "miss");
        assert.equal(typeof record.duration_ms, "number");
        const ms = record.duration_ms as number;
        assert.ok(Number.isFinite(ms) && ms >= 0, `duration_ms ${ms}`);
        assert.deepEqual(
          Object.keys(record).sort(),
          [
            ...(record.cache === undefined ? [] : ["cache"]),
            "client",
            "duration_ms",
            "level",
            "msg",
            "name",
            "rcode",
            "time",
            "transport",
            "type",
            ...(record.upstream === undefined ? [] : ["upstream"]),
          ].sort(),
        );
      }
    });
  } finally {
    await upstream.close();
  }
});

Deno.test("log: without --log-queries no query lines, even at debug", async () => {
  const upstream = DotServer.start();
  try {
    const config = testConfig([upstream.upstream()], { logQueries: false, logLevel: "debug" });
    await withProxy(config, async ({ proxy, port, logs }) => {
      await sendTraffic(port, () => proxy.metrics.dropped.get("udp", "malformed"));
      const records = logs.lines.map(parseJsonLine);
      assert.deepEqual(records.filter((r) => r.msg === "query"), []);
      // No line at any level names a queried domain.
      for (const line of logs.lines) {
        assert.ok(!/Mixed\.Case|txt\.example|tcp\.example/.test(line), line);
      }
    });
  } finally {
    await upstream.close();
  }
});

// ---------------------------------------------------------------------------------------------
// The real binary's stderr.

/** A loopback port free over UDP and TCP when checked. */
function freePort(): number {
  for (let attempt = 0; attempt < 20; attempt++) {
    const udp = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const port = (udp.addr as Deno.NetAddr).port;
    try {
      Deno.listen({ transport: "tcp", hostname: "127.0.0.1", port }).close();
      return port;
    } catch {
      // Taken over TCP; try another.
    } finally {
      udp.close();
    }
  }
  throw new Error("no free loopback port found");
}

interface ServerRun {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `main.ts` against an upstream port nothing listens on, sends one query once it
 * serves, then stops it with SIGTERM. Everything is bounded; the process is killed if it
 * outlives 20 s.
 */
async function runServer(format: "json" | "text"): Promise<ServerRun> {
  const listen = freePort();
  const dead = freePort();
  const { child, timedOut, stopTimer } = spawnMain([
    "--log-format",
    format,
    "--log-level",
    "debug",
    "--log-queries",
    "--listen",
    `127.0.0.1:${listen}`,
    "--upstream",
    `127.0.0.1:${dead}#dns.test`,
    "--timeout",
    "1000",
  ]);
  const output = child.output();
  try {
    let reply: Uint8Array | null = null;
    for (let attempt = 0; attempt < 100 && reply === null && !timedOut(); attempt++) {
      reply = await udpExchange(listen, buildQuery("subprocess.example", { id: 9 }), 200);
    }
    assert.ok(reply, "the proxy never answered");
    assert.equal(parseMessage(reply).rcode, 2, "SERVFAIL expected with no upstream");
    child.kill("SIGTERM");
    const result = await output;
    assert.ok(!timedOut(), "the proxy did not stop on SIGTERM");
    const decoder = new TextDecoder();
    return {
      code: result.code,
      stdout: decoder.decode(result.stdout),
      stderr: decoder.decode(result.stderr),
    };
  } finally {
    stopTimer();
    if (!timedOut()) {
      try {
        child.kill("SIGKILL");
      } catch {
        // Already exited.
      }
    }
    await output.catch(() => {});
  }
}

Deno.test("log: main.ts --log-format json writes only JSON lines on stderr", async () => {
  const run = await runServer("json");
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout, "");
  assert.ok(run.stderr.endsWith("\n"), run.stderr);
  const lines = run.stderr.slice(0, -1).split("\n");
  const records = lines.map((line) => {
    try {
      return parseJsonLine(line);
    } catch (error) {
      throw new Error(`not a JSON log line: ${JSON.stringify(line)} (${error})`);
    }
  });
  const messages = records.map((r) => r.msg);
  assert.equal(messages[0], "dotproxy started");
  assert.ok(messages.includes("upstream connection failed"), messages.join(", "));
  const query = records.find((r) => r.msg === "query");
  assert.ok(query, messages.join(", "));
  assert.equal(query.name, "subprocess.example.");
  assert.equal(query.rcode, "SERVFAIL");
  assert.equal(query.level, "info");
  const failure = records.find((r) => r.msg === "upstream connection failed");
  assert.equal(failure?.reason, "refused");
  assert.equal(failure?.level, "error");
  assert.deepEqual(messages.slice(-2), ["shutting down", "stopped"]);
});

Deno.test("log: main.ts --log-format text writes only text lines on stderr", async () => {
  const run = await runServer("text");
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stdout, "");
  const lines = run.stderr.trimEnd().split("\n");
  for (const line of lines) assert.match(line, TEXT_LINE);
  assert.match(lines[0], / INFO {2}dotproxy started version=/);
  assert.ok(
    lines.some((l) => / INFO {2}query .*name=subprocess\.example\. .*rcode=SERVFAIL/.test(l)),
    run.stderr,
  );
  assert.match(lines[lines.length - 1], / INFO {2}stopped$/);
});
