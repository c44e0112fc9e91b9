/**
 * The HTTP endpoint (src/server/http.ts) over real sockets on 127.0.0.1: routes and headers
 * through `fetch` and raw HTTP/1.1, malformed requests, the connection cap, every deadline
 * (request head, idle keep-alive, handler, response write), accept errors, `close()`, and a
 * child process run out of file descriptors.
 *
 * Run with `deno test --allow-net --allow-run --allow-read tests/http_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Logger } from "../src/log.ts";
import {
  type HttpHandlers,
  HttpRequestError,
  HttpServer,
  type HttpServerOptions,
  parseRequestHead,
  route,
} from "../src/server/http.ts";
import type { Acceptor } from "../src/net/accept_loop.ts";
import { sleep, waitFor } from "./support/wait.ts";

const encoder = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// Helpers.

/** JSON log lines captured from a server under test. */
class Logs {
  readonly records: Record<string, unknown>[] = [];
  logger(): Logger {
    return new Logger({
      level: "debug",
      format: "json",
      sink: (line) => this.records.push(JSON.parse(line)),
    });
  }
  find(msg: string): Record<string, unknown>[] {
    return this.records.filter((r) => r.msg === msg);
  }
}

const HANDLERS: HttpHandlers = {
  metrics: () => "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n",
  readiness: () => Promise.resolve({ ready: true, reason: "fine" }),
};

interface Served {
  server: HttpServer;
  port: number;
  logs: Logs;
}

/** Runs `fn` against a server on an ephemeral loopback port, closing it however `fn` ends. */
async function withServer(
  fn: (s: Served) => Promise<void>,
  options: HttpServerOptions = {},
  handlers: HttpHandlers = HANDLERS,
): Promise<void> {
  const logs = new Logs();
  const server = HttpServer.listen(
    { hostname: "127.0.0.1", port: 0 },
    handlers,
    logs.logger(),
    options,
  );
  try {
    await fn({ server, port: server.addr.port, logs });
  } finally {
    await server.close();
  }
}

/** A response as read off the wire. */
interface RawResponse {
  statusLine: string;
  status: number;
  headers: Map<string, string>;
  body: string;
}

/** A raw HTTP/1.1 client over one TCP connection, with deadlines on every wait. */
class RawClient {
  readonly conn: Deno.TcpConn;
  #buffer = "";
  #eof = false;
  #closed = false;

  private constructor(conn: Deno.TcpConn) {
    this.conn = conn;
  }

  static async connect(port: number): Promise<RawClient> {
    return new RawClient(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  async send(text: string | Uint8Array): Promise<void> {
    const bytes = typeof text === "string" ? encoder.encode(text) : text;
    for (let off = 0; off < bytes.length;) off += await this.conn.write(bytes.subarray(off));
  }

  /** Reads more bytes; false at end of stream, on a reset, or when `deadline` closes it. */
  async #fill(): Promise<boolean> {
    if (this.#eof) return false;
    const chunk = new Uint8Array(65536);
    try {
      const n = await this.conn.read(chunk);
      if (n === null) {
        this.#eof = true;
        return false;
      }
      // Latin-1 keeps one character per byte, so Content-Length counts characters.
      this.#buffer += String.fromCharCode(...chunk.subarray(0, n));
      return true;
    } catch {
      this.#eof = true;
      return false;
    }
  }

  /** Runs `fn`, closing the connection if it takes longer than `timeoutMs`. */
  async #within<T>(timeoutMs: number, fn: () => Promise<T>): Promise<T> {
    const timer = setTimeout(() => this.close(), timeoutMs);
    try {
      return await fn();
    } finally {
      clearTimeout(timer);
    }
  }

  /** Reads one response; a HEAD response (`bodyless`) has no body whatever it announces. */
  readResponse(bodyless = false, timeoutMs = 3000): Promise<RawResponse> {
    return this.#within(timeoutMs, async () => {
      for (let i = 0; i < 10_000; i++) {
        const parsed = this.#parse(bodyless);
        if (parsed) return parsed;
        if (!(await this.#fill())) break;
      }
      throw new Error(`no complete response; got ${JSON.stringify(this.#buffer.slice(0, 200))}`);
    });
  }

  #parse(bodyless: boolean): RawResponse | null {
    const end = this.#buffer.indexOf("\r\n\r\n");
    if (end < 0) return null;
    const lines = this.#buffer.slice(0, end).split("\r\n");
    const headers = new Map<string, string>();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      assert.ok(colon > 0, `malformed header line ${JSON.stringify(line)}`);
      headers.set(line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim());
    }
    const length = bodyless ? 0 : Number(headers.get("content-length") ?? "0");
    if (this.#buffer.length < end + 4 + length) return null;
    const body = this.#buffer.slice(end + 4, end + 4 + length);
    this.#buffer = this.#buffer.slice(end + 4 + length);
    const statusLine = lines[0];
    return { statusLine, status: Number(statusLine.split(" ")[1]), headers, body };
  }

  /** True when the server closes (or resets) the connection within `timeoutMs`. */
  waitClosed(timeoutMs = 3000): Promise<boolean> {
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      this.close();
    }, timeoutMs);
    return (async () => {
      try {
        for (let i = 0; i < 100_000 && (await this.#fill()); i++) this.#buffer = "";
        return !timedOut;
      } finally {
        clearTimeout(timer);
      }
    })();
  }

  /** Bytes received and not yet parsed. */
  get pending(): string {
    return this.#buffer;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.conn.close();
    } catch {
      // Already closed.
    }
  }
}

/** Sends `request` on a fresh connection and reads one response. */
async function exchange(port: number, request: string, bodyless = false): Promise<RawResponse> {
  const client = await RawClient.connect(port);
  try {
    await client.send(request);
    return await client.readResponse(bodyless);
  } finally {
    client.close();
  }
}

const GET_HEALTHZ = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

// ---------------------------------------------------------------------------------------------
// Parsing, without sockets.

Deno.test("http: parseRequestHead reads request lines, fields and bodies by RFC 9112", () => {
  const head = (text: string) => parseRequestHead(encoder.encode(text));
  const get = head("GET /metrics?name[]=x HTTP/1.1\r\nHost: a\r\nAccept: b\r\naccept: c\r\n");
  assert.equal(get.method, "GET");
  assert.equal(get.path, "/metrics");
  assert.equal(get.target, "/metrics?name[]=x");
  assert.equal(get.version, "HTTP/1.1");
  assert.equal(get.fields.get("accept"), "b, c");
  assert.equal(get.hasBody, false);
  assert.equal(head("GET http://h:1/readyz?x HTTP/1.0\n").path, "/readyz");
  assert.equal(head("GET http://h HTTP/1.1\nHost: h\n").path, "/");
  assert.equal(head("OPTIONS * HTTP/1.1\r\nHost: h\r\n").path, "*");
  assert.equal(head("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n").hasBody, true);
  assert.equal(head("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n").hasBody, false);
  assert.equal(head("POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 3\r\n").hasBody, true);
  assert.equal(
    head("POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n").hasBody,
    true,
  );
  // HTTP/1.0 needs no Host; HTTP/1.1 needs exactly one (RFC 9112 section 3.2), empty allowed.
  assert.equal(head("GET /healthz HTTP/1.0\r\n").path, "/healthz");
  assert.equal(head("GET /healthz HTTP/1.1\r\nhost:\r\n").fields.get("host"), "");

  const rejected: [string, number][] = [
    ["", 400],
    ["GET /\r\n", 400],
    ["GET  / HTTP/1.1\r\n", 400],
    ["GET / HTTP/1.1 \r\n", 400],
    ["G@T / HTTP/1.1\r\n", 400],
    ["GET healthz HTTP/1.1\r\n", 400],
    ["GET / HTTP/2.0\r\n", 505],
    ["GET / HTTPS/1.1\r\n", 400],
    ["GET / HTTP/1.1\r\nno colon\r\n", 400],
    ["GET / HTTP/1.1\r\nBad Name: x\r\n", 400],
    ["GET / HTTP/1.1\r\nA: b\r\n folded\r\n", 400],
    ["GET / HTTP/1.1\r\nA: b\x01c\r\n", 400],
    ["GET / HTTP/1.1\rA: b\r\n", 400],
    ["GET / HTTP/1.1\r\nContent-Length: -1\r\n", 400],
    ["GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n", 400],
    ["GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n", 400],
    ["GET /healthz HTTP/1.1\r\n", 400],
    ["GET /healthz HTTP/1.1\r\nAccept: */*\r\n", 400],
    ["GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n", 400],
    ["GET /healthz HTTP/1.0\r\nHost: a\r\nhost: a\r\n", 400],
  ];
  for (const [text, status] of rejected) {
    assert.throws(
      () => head(text),
      (e) => e instanceof HttpRequestError && e.status === status,
      JSON.stringify(text),
    );
  }
});

// ---------------------------------------------------------------------------------------------
// Routes and headers.

Deno.test("http: routes, methods, status codes and headers through fetch", async () => {
  let ready = true;
  const handlers: HttpHandlers = {
    metrics: HANDLERS.metrics,
    readiness: () => Promise.resolve({ ready, reason: ready ? "fine" : "down" }),
  };
  await withServer(
    async ({ port }) => {
      const get = async (path: string, init: RequestInit = {}) => {
        const response = await fetch(`http://127.0.0.1:${port}${path}`, {
          ...init,
          signal: AbortSignal.timeout(5000),
        });
        return { response, body: await response.text() };
      };
      const healthz = await get("/healthz");
      assert.equal(healthz.response.status, 200);
      assert.equal(healthz.body, "ok\n");
      assert.equal(healthz.response.headers.get("content-type"), "text/plain; charset=utf-8");
      assert.equal(healthz.response.headers.get("content-length"), "3");
      assert.equal(healthz.response.headers.get("cache-control"), "no-store");

      const head = await get("/healthz", { method: "HEAD" });
      assert.equal(head.response.status, 200);
      assert.equal(head.body, "");

      const metrics = await get("/metrics?name[]=x_total");
      assert.equal(metrics.response.status, 200);
      assert.equal(
        metrics.response.headers.get("content-type"),
        "text/plain; version=0.0.4; charset=utf-8",
      );
      assert.equal(metrics.body, HANDLERS.metrics());

      assert.equal((await get("/readyz")).body, "ready: fine\n");
      ready = false;
      const notReady = await get("/readyz");
      assert.equal(notReady.response.status, 503);
      assert.equal(notReady.body, "not ready: down\n");

      for (const path of ["/", "/metric", "/metrics/", "/healthz/x", "/favicon.ico"]) {
        const missing = await get(path);
        assert.equal(missing.response.status, 404, path);
        assert.equal(missing.body, "not found\n", path);
      }
      for (const method of ["POST", "PUT", "DELETE", "PATCH"]) {
        for (const path of ["/metrics", "/healthz", "/readyz"]) {
          const refused = await get(path, { method, body: method === "DELETE" ? null : "x" });
          assert.equal(refused.response.status, 405, `${method} ${path}`);
          assert.equal(refused.response.headers.get("allow"), "GET, HEAD");
          assert.equal(refused.body, "method not allowed\n");
        }
      }
    },
    {},
    handlers,
  );

  // route() still serves a Request for callers that hold one.
  const routed = await route(new Request("http://x/metrics?a=1"), HANDLERS);
  assert.equal(routed.status, 200);
  assert.equal(routed.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  assert.equal(await routed.text(), HANDLERS.metrics());
  const refused = await route(new Request("http://x/readyz", { method: "POST" }), HANDLERS);
  assert.equal(refused.status, 405);
  assert.equal(refused.headers.get("allow"), "GET, HEAD");
  await refused.body?.cancel();
});

Deno.test("http: raw HTTP/1.1: status line, headers, keep-alive, pipelining, HEAD, close", async () => {
  await withServer(async ({ port }) => {
    // Keep-alive: two requests, one connection; HEAD announces the length it does not send.
    const client = await RawClient.connect(port);
    try {
      await client.send(GET_HEALTHZ);
      const first = await client.readResponse();
      assert.equal(first.statusLine, "HTTP/1.1 200 OK");
      assert.equal(first.headers.get("content-type"), "text/plain; charset=utf-8");
      assert.equal(first.headers.get("content-length"), "3");
      assert.ok(first.headers.has("date"));
      assert.equal(first.headers.get("connection"), undefined, "HTTP/1.1 stays open");
      assert.equal(first.body, "ok\n");
      await client.send("HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
      const head = await client.readResponse(true);
      assert.equal(head.status, 200);
      assert.equal(head.headers.get("content-length"), String(HANDLERS.metrics().length));
      assert.equal(client.pending, "", "no body after a HEAD response");

      // Pipelined: three requests in one write (and an empty line before the first one,
      // which RFC 9112 2.2 says to ignore), answered in order.
      await client.send(
        "\r\nGET /readyz HTTP/1.1\r\nHost: t\r\n\r\n" +
          "HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n" +
          "GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
      );
      const readyz = await client.readResponse();
      assert.equal(readyz.body, "ready: fine\n");
      const headHealthz = await client.readResponse(true);
      assert.equal(headHealthz.status, 200);
      const nope = await client.readResponse();
      assert.equal(nope.statusLine, "HTTP/1.1 404 Not Found");
      assert.equal(nope.headers.get("connection"), "close");
      assert.ok(await client.waitClosed(), "Connection: close closes the connection");
    } finally {
      client.close();
    }

    // HTTP/1.0: answered, then closed. Absolute-form targets route by path. LF-only lines.
    const old = await RawClient.connect(port);
    try {
      await old.send("GET http://127.0.0.1/healthz HTTP/1.0\n\n");
      const response = await old.readResponse();
      assert.equal(response.statusLine, "HTTP/1.1 200 OK");
      assert.equal(response.headers.get("connection"), "close");
      assert.ok(await old.waitClosed());
    } finally {
      old.close();
    }
  });

  // The last request a connection may carry says so and closes it.
  await withServer(async ({ port }) => {
    const client = await RawClient.connect(port);
    try {
      await client.send(GET_HEALTHZ.repeat(3));
      assert.equal((await client.readResponse()).headers.get("connection"), undefined);
      assert.equal((await client.readResponse()).headers.get("connection"), "close");
      assert.ok(await client.waitClosed());
      assert.equal(client.pending, "", "the third request is not answered");
    } finally {
      client.close();
    }
  }, { maxRequestsPerConnection: 2 });
});

Deno.test("http: malformed requests get 400 (431, 505) and a closed connection", async () => {
  await withServer(async ({ port, logs }) => {
    const cases: [string, number][] = [
      ["GARBAGE\r\n\r\n", 400],
      ["GET /healthz\r\n\r\n", 400],
      ["GET  /healthz HTTP/1.1\r\n\r\n", 400],
      ["GET /healthz HTTP/1.1\r\nno colon\r\n\r\n", 400],
      ["GET /healthz HTTP/1.1\r\nHost: t\r\n folded\r\n\r\n", 400],
      ["GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n", 400],
      ["GET /healthz HTTP/1.1\r\n\r\n", 400],
      ["GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400],
      ["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400],
      ["GET /healthz HTTP/2.0\r\n\r\n", 505],
      [`GET /healthz HTTP/1.1\r\nX-Pad: ${"a".repeat(9000)}\r\n\r\n`, 431],
    ];
    for (const [request, status] of cases) {
      const client = await RawClient.connect(port);
      try {
        await client.send(Uint8Array.from(request, (c) => c.charCodeAt(0)));
        const response = await client.readResponse();
        assert.equal(response.status, status, JSON.stringify(request.slice(0, 40)));
        assert.match(response.statusLine, /^HTTP\/1\.1 \d{3} [A-Za-z ]+$/);
        assert.equal(response.headers.get("connection"), "close");
        assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
        assert.ok(await client.waitClosed(), `closed after ${status}`);
      } finally {
        client.close();
      }
    }
    assert.ok(logs.find("http request rejected").length >= cases.length);
    assert.ok(logs.records.every((r) => r.level === "debug"), "client mistakes log at debug");
    // And the server still serves.
    assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);
  });
});

Deno.test("http: a request with a body is answered, drained and closed", async () => {
  await withServer(async ({ port }) => {
    const client = await RawClient.connect(port);
    try {
      await client.send("POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
      const response = await client.readResponse();
      assert.equal(response.status, 405);
      assert.equal(response.headers.get("allow"), "GET, HEAD");
      assert.equal(response.headers.get("connection"), "close");
      assert.ok(await client.waitClosed());
    } finally {
      client.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Deadlines.

Deno.test("http: a slowloris client is closed after the head timeout; others are served", async () => {
  const headTimeoutMs = 600;
  await withServer(async ({ port, logs }) => {
    const slow = await RawClient.connect(port);
    const started = performance.now();
    let trickling = true;
    // One header line every 100 ms: always sending, never finishing the head.
    const trickle = (async () => {
      try {
        await slow.send("GET /healthz HTTP/1.1\r\n");
        for (let i = 0; i < 100 && trickling; i++) {
          await sleep(100);
          await slow.send(`X-Slow-${i}: 1\r\n`);
        }
      } catch {
        // Closed by the server: the point of the test.
      }
    })();
    try {
      // Meanwhile other clients are served, promptly.
      for (let i = 0; i < 3; i++) {
        const t0 = performance.now();
        assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);
        assert.ok(performance.now() - t0 < 500, "a normal request waits for nobody");
        await sleep(100);
      }
      assert.ok(await slow.waitClosed(5000), "the slow client must be closed");
      const elapsed = performance.now() - started;
      assert.ok(elapsed >= headTimeoutMs - 50, `closed after ${elapsed} ms, too early`);
      assert.ok(elapsed < headTimeoutMs + 1500, `closed after ${elapsed} ms, too late`);
      assert.equal(slow.pending, "", "no response to a head that never ended");
    } finally {
      trickling = false;
      slow.close();
      await trickle;
    }
    await waitFor("the log line", () => logs.find("http connection closed").length > 0);
    assert.equal(logs.find("http connection closed")[0].reason, "request head timeout");
  }, { headTimeoutMs });
});

Deno.test("http: silent and idle keep-alive connections are closed on their deadlines", async () => {
  await withServer(async ({ port, server, logs }) => {
    // Connected, never a byte: the head deadline.
    const silent = await RawClient.connect(port);
    // Served once, then idle: the idle deadline.
    const idle = await RawClient.connect(port);
    try {
      const t0 = performance.now();
      await idle.send(GET_HEALTHZ);
      assert.equal((await idle.readResponse()).status, 200);
      assert.ok(await idle.waitClosed(3000), "idle keep-alive connection closed");
      const idleFor = performance.now() - t0;
      assert.ok(idleFor >= 250 && idleFor < 2000, `idle close after ${idleFor} ms`);
      assert.ok(await silent.waitClosed(3000), "silent connection closed");
      await waitFor("no connections", () => server.openConnections === 0);
      const reasons = logs.find("http connection closed").map((r) => r.reason).sort();
      assert.deepEqual(reasons, ["idle", "request head timeout"]);
    } finally {
      silent.close();
      idle.close();
    }
  }, { idleTimeoutMs: 300, headTimeoutMs: 700 });
});

Deno.test("http: a handler that throws gets 500, one that hangs gets 503", async () => {
  let calls = 0;
  const handlers: HttpHandlers = {
    metrics: () => {
      calls++;
      throw new Error("registry broken");
    },
    // Never settles, and holds no timer: only the server's deadline ends the wait.
    readiness: () => new Promise(() => {}),
  };
  await withServer(
    async ({ port, logs }) => {
      for (let i = 0; i < 3; i++) {
        const failed = await exchange(port, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert.equal(failed.statusLine, "HTTP/1.1 500 Internal Server Error");
        assert.equal(failed.body, "internal server error: the handler failed\n");
      }
      assert.equal(calls, 3);
      const errors = logs.find("http handler failed");
      assert.equal(errors.length, 1, "a flood of failures logs once per interval");
      assert.equal(errors[0].level, "error");
      assert.equal(errors[0].error, "registry broken");

      const t0 = performance.now();
      const hung = await exchange(port, "GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
      assert.equal(hung.status, 503);
      assert.equal(hung.body, "service unavailable: no answer within 300 ms\n");
      assert.ok(performance.now() - t0 >= 250);
      assert.equal(logs.find("http handler timed out")[0].level, "warn");
      // The connection survives both: the server keeps serving.
      assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);
    },
    { handlerTimeoutMs: 300 },
    handlers,
  );
});

Deno.test("http: a response write that stalls is abandoned after the write timeout", async () => {
  // Far more than loopback socket buffers hold, to a client that never reads.
  const big = "x".repeat(32 * 1024 * 1024);
  const handlers: HttpHandlers = { ...HANDLERS, metrics: () => big };
  await withServer(
    async ({ port, server, logs }) => {
      const stuck = await RawClient.connect(port);
      try {
        await stuck.send("GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        await waitFor("the stalled write to be abandoned", () => server.openConnections === 0);
        const closed = logs.find("http connection closed");
        assert.equal(closed.length, 1);
        assert.equal(closed[0].reason, "response write timeout");
        // Others are served meanwhile and after.
        assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);
      } finally {
        stuck.close();
      }
    },
    { writeTimeoutMs: 400 },
    handlers,
  );
});

// ---------------------------------------------------------------------------------------------
// Limits, accept errors, close().

Deno.test("http: connections beyond the cap are closed at once; new ones work when some go", async () => {
  const maxConnections = 3;
  await withServer(async ({ port, server, logs }) => {
    const held: RawClient[] = [];
    try {
      for (let i = 0; i < maxConnections; i++) held.push(await RawClient.connect(port));
      await waitFor("the cap to fill", () => server.openConnections === maxConnections);
      for (let i = 0; i < 3; i++) {
        const extra = await RawClient.connect(port);
        try {
          await extra.send(GET_HEALTHZ).catch(() => {});
          const t0 = performance.now();
          assert.ok(await extra.waitClosed(2000), "over the cap: closed");
          assert.ok(performance.now() - t0 < 1000, "closed at once, not on a deadline");
          assert.equal(extra.pending, "", "closed without an answer");
        } finally {
          extra.close();
        }
      }
      const limit = logs.find("http connection limit reached; closing new connection");
      assert.equal(limit.length, 1, "logged once per interval");
      assert.equal(limit[0].level, "warn");
      assert.equal(limit[0].limit, maxConnections);
    } finally {
      for (const client of held) client.close();
    }
    await waitFor("the held connections to go", () => server.openConnections === 0);
    assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);
  }, { maxConnections });
});

/** `GET /healthz` with curl from `source` (another loopback address); the status, 0 for none. */
async function probeFrom(source: string, port: number): Promise<number> {
  const output = await new Deno.Command("curl", {
    args: [
      "-s",
      "-o",
      "/dev/null",
      "-w",
      "%{http_code}",
      "--max-time",
      "2",
      "--interface",
      source,
      `http://127.0.0.1:${port}/healthz`,
    ],
    stdout: "piped",
    stderr: "null",
  }).output();
  return Number(new TextDecoder().decode(output.stdout).trim() || "0");
}

/**
 * A hog on 127.0.0.1: keeps up to `count` connections open with a partial head each, and
 * opens a new one for each the server closes, until `stop()`.
 */
function hog(port: number, count: number): { opened: () => number; stop: () => Promise<void> } {
  const held = new Set<Deno.TcpConn>();
  let stopped = false;
  let opened = 0;
  const loops = Array.from({ length: count }, async () => {
    for (let i = 0; i < 1000 && !stopped; i++) {
      let conn: Deno.TcpConn;
      try {
        conn = await Deno.connect({ hostname: "127.0.0.1", port });
      } catch {
        await sleep(20);
        continue;
      }
      opened++;
      held.add(conn);
      try {
        await conn.write(encoder.encode("GET /healthz HTTP/1.1\r\nHo"));
        // Until the server closes it (or the test ends).
        await conn.read(new Uint8Array(1024));
      } catch {
        // Reset: open the next one.
      } finally {
        held.delete(conn);
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
      await sleep(5);
    }
  });
  return {
    opened: () => opened,
    stop: async () => {
      stopped = true;
      for (const conn of held) {
        try {
          conn.close();
        } catch {
          // Already closed.
        }
      }
      await Promise.all(loops);
    },
  };
}

Deno.test("http: one client holding every connection with partial heads cannot keep a probe from another address out", async () => {
  // The per-client cap lifted, so one loopback address can fill the server, as many
  // addresses can in a cluster: a new client still takes a hogged connection's place.
  await withServer(async ({ port, server, logs }) => {
    const attack = hog(port, 16);
    try {
      await waitFor("the hog to fill the server", () => server.openConnections >= 16);
      for (let i = 0; i < 10; i++) {
        assert.equal(await probeFrom("127.0.0.2", port), 200, `probe ${i} answered`);
      }
      assert.ok(
        logs.find(
          "http connection limit reached; closed an idle connection of the client holding the most",
        ).length > 0,
      );
    } finally {
      await attack.stop();
    }
  }, { maxConnections: 16, maxConnectionsPerClient: 16 });
});

Deno.test("http: the default per-client cap: one address gets 8 connections, other addresses are served", async () => {
  await withServer(async ({ port, server, logs }) => {
    const attack = hog(port, 64);
    try {
      await waitFor("the hog's connections", () => attack.opened() >= 64);
      assert.ok(server.openConnections <= 8, `${server.openConnections} open`);
      for (let i = 0; i < 10; i++) {
        assert.equal(await probeFrom("127.0.0.2", port), 200, `probe ${i} answered`);
      }
      // At its cap, the client's own longest-idle connection (a partial head) makes room.
      const evicted = logs.find("http connections per client reached; closed its longest-idle one");
      assert.ok(evicted.length > 0);
      assert.equal(evicted[0].limit, 8);
    } finally {
      await attack.stop();
    }
  });
});

/** Wraps a real listener, failing `accept()` as `script` says before delegating. */
class FlakyListener implements Acceptor<Deno.TcpConn> {
  readonly #inner: Deno.TcpListener;
  readonly #script: ("aborted" | "emfile")[];
  /** When each scripted failure was handed out, and what it was. */
  readonly failures: { kind: string; at: number }[] = [];

  constructor(inner: Deno.TcpListener, script: ("aborted" | "emfile")[]) {
    this.#inner = inner;
    this.#script = script;
  }

  get addr(): Deno.Addr {
    return this.#inner.addr;
  }

  accept(): Promise<Deno.TcpConn> {
    const next = this.#script.shift();
    if (next === undefined) return this.#inner.accept();
    this.failures.push({ kind: next, at: performance.now() });
    const error = next === "aborted"
      ? Object.assign(new Error("Software caused connection abort (os error 103)"), {
        code: "ECONNABORTED",
      })
      : Object.assign(new Error("Too many open files (os error 24)"), { code: "EMFILE" });
    return Promise.reject(error);
  }

  close(): void {
    this.#inner.close();
  }
}

Deno.test("http: accept errors are survived; only running out of descriptors pauses", async () => {
  const script: ("aborted" | "emfile")[] = [
    ...Array<"aborted">(150).fill("aborted"),
    ...Array<"emfile">(5).fill("emfile"),
  ];
  const listener = new FlakyListener(
    Deno.listen({ hostname: "127.0.0.1", port: 0 }),
    script,
  );
  const logs = new Logs();
  const server = HttpServer.serve(listener, HANDLERS, logs.logger());
  try {
    // The clients wait in the backlog while accept() fails.
    assert.equal((await exchange(server.addr.port, GET_HEALTHZ)).status, 200);
    const { failures } = listener;
    assert.equal(failures.length, 155);
    const aborted = failures.filter((f) => f.kind === "aborted");
    const burst = aborted[aborted.length - 1].at - aborted[0].at;
    // 150 failures at once: no pause at all (a reset before accept never counts towards the
    // spin guard; a pause per error would take 150 * 10 ms at least).
    assert.ok(burst < 1000, `150 ECONNABORTED took ${burst} ms: paused on them`);
    // Out of descriptors: pauses of 10, 20, 40, 50 and 50 ms.
    const emfile = failures.filter((f) => f.kind === "emfile").map((f) => f.at);
    const gaps = emfile.slice(1).map((at, i) => at - emfile[i]);
    const expected = [10, 20, 40, 50];
    for (const [i, gap] of gaps.entries()) {
      assert.ok(gap >= expected[i] - 2, `pause ${i + 1} was ${gap} ms, expected ${expected[i]}`);
    }
    const acceptLogs = logs.find("http accept failed");
    assert.equal(acceptLogs.length, 1, "rate limited");
    assert.equal(acceptLogs[0].level, "warn");
    const exhausted = logs.find("http accept failed: out of file descriptors; pausing");
    assert.equal(exhausted.length, 1, "rate limited");
    assert.equal(exhausted[0].pause_ms, 10);
  } finally {
    await server.close();
  }
});

Deno.test("http: close() stops accepting and closes every connection promptly", async () => {
  const logs = new Logs();
  const server = HttpServer.listen({ hostname: "127.0.0.1", port: 0 }, {
    ...HANDLERS,
    readiness: () => new Promise(() => {}),
  }, logs.logger());
  const port = server.addr.port;
  const clients: RawClient[] = [];
  try {
    clients.push(await RawClient.connect(port)); // silent
    clients.push(await RawClient.connect(port)); // half a head
    await clients[1].send("GET /healthz HTTP/1.1\r\n");
    clients.push(await RawClient.connect(port)); // waiting for a handler
    await clients[2].send("GET /readyz HTTP/1.1\r\nHost: t\r\n\r\n");
    clients.push(await RawClient.connect(port)); // idle keep-alive
    await clients[3].send(GET_HEALTHZ);
    assert.equal((await clients[3].readResponse()).status, 200);
    await waitFor("four connections", () => server.openConnections === 4);

    const t0 = performance.now();
    await Promise.all([server.close(), server.close()]);
    const took = performance.now() - t0;
    assert.ok(took < 500, `close() took ${took} ms`);
    assert.equal(server.openConnections, 0);
    for (const client of clients) assert.ok(await client.waitClosed(1000));
    await assert.rejects(Deno.connect({ hostname: "127.0.0.1", port }));
  } finally {
    for (const client of clients) client.close();
    await server.close();
  }
});

// ---------------------------------------------------------------------------------------------
// A process out of file descriptors.

/** Reads `stream` line by line into `lines` until it ends. */
async function collectLines(stream: ReadableStream<Uint8Array>, lines: string[]): Promise<void> {
  let rest = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    const parts = (rest + chunk).split("\n");
    rest = parts.pop() ?? "";
    lines.push(...parts);
  }
  if (rest !== "") lines.push(rest);
}

Deno.test({
  name: "http: a child out of file descriptors keeps running and serves once they free up",
  // `ulimit -n` through bash: a Unix test.
  ignore: Deno.build.os === "windows",
  fn: childOutOfDescriptors,
});

async function childOutOfDescriptors(): Promise<void> {
  // The caps are raised and the head deadline lengthened so that idle HTTP connections alone
  // exhaust the child's 256 descriptors (in production the DNS side's clients do).
  const options: HttpServerOptions = {
    maxConnections: 10_000,
    maxConnectionsPerClient: 10_000,
    headTimeoutMs: 60_000,
  };
  const script = new URL("./support/http_child.ts", import.meta.url).pathname;
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      'ulimit -n 256 && exec "$0" run --allow-net "$1" "$2"',
      Deno.execPath(),
      script,
      JSON.stringify(options),
    ],
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout: string[] = [];
  const stderr: string[] = [];
  const reading = Promise.all([
    collectLines(child.stdout, stdout),
    collectLines(child.stderr, stderr),
  ]);
  let exited = false;
  const exit = child.status.finally(() => exited = true);
  const killer = setTimeout(() => child.kill("SIGKILL"), 60_000);
  const held: Deno.TcpConn[] = [];
  const explain = () => `stdout: ${stdout.join("\n")}\nstderr: ${stderr.slice(-5).join("\n")}`;
  try {
    await waitFor("the child to listen", () => stdout.length > 0, 20_000);
    const match = stdout[0].match(/^listening (\d+)$/);
    assert.ok(match, explain());
    const port = Number(match[1]);
    assert.equal((await exchange(port, GET_HEALTHZ)).status, 200);

    const exhausted = () => stderr.some((l) => l.includes("out of file descriptors"));
    try {
      // Idle connections until the child says it is out of descriptors (~230 of them).
      for (let i = 0; i < 600 && !exhausted(); i++) {
        held.push(await Deno.connect({ hostname: "127.0.0.1", port }));
        if (i % 8 === 7) await sleep(10);
      }
      await waitFor("the child to run out of descriptors", exhausted, 5000);

      // A request now most likely waits in the backlog until we give up on it; whatever
      // becomes of it, the child must live through it.
      const probe = await RawClient.connect(port);
      try {
        await probe.send(GET_HEALTHZ);
        await probe.readResponse(false, 500).catch(() => undefined);
      } finally {
        probe.close();
      }
      assert.ok(!exited, `the child died: ${explain()}`);
    } finally {
      for (const conn of held.splice(0)) conn.close();
    }

    // Descriptors free up: served again.
    let status = 0;
    for (let i = 0; i < 100 && status !== 200; i++) {
      try {
        status = (await exchange(port, GET_HEALTHZ)).status;
      } catch {
        await sleep(100);
      }
    }
    assert.equal(status, 200, explain());
    assert.ok(!exited, `the child died: ${explain()}`);
    assert.ok(!stderr.some((l) => /uncaught/i.test(l)), explain());
  } finally {
    for (const conn of held.splice(0)) conn.close();
    await child.stdin.close().catch(() => {});
    const status = await exit;
    clearTimeout(killer);
    await reading;
    assert.equal(status.code, 0, explain());
    assert.equal(stdout[stdout.length - 1], "closed", explain());
  }
}
