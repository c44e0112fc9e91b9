/**
 * The operator's view of the proxy: `/metrics` scraped over real HTTP after known traffic,
 * checked to the exact counter values and against the strict parser of the Prometheus text
 * format 0.0.4 in `support/prometheus.ts`; `/healthz`, `/readyz` (and its 503 when the
 * upstreams die) and the HTTP routing rules; the per-upstream error reasons.
 *
 * Run with `deno test --allow-net --allow-env --allow-read tests/observability_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { Registry } from "../src/metrics.ts";
import { VERSION } from "../src/version.ts";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery, parseMessage } from "./support/dns.ts";
import {
  familyValues,
  type MetricFamily,
  parsePrometheus,
  sampleValue,
} from "./support/prometheus.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { waitFor } from "./support/wait.ts";

// ---------------------------------------------------------------------------------------------
// The exposition is parsed by the shared strict parser in ./support/prometheus.ts.

/** dotproxy's own conventions on top of the format. */
function checkConventions(families: Map<string, MetricFamily>): void {
  for (const family of families.values()) {
    // Every family is dotproxy's own, but for the standard process families.
    assert.match(
      family.name,
      /^(dotproxy|process)_[a-z0-9_]+$/,
      `${family.name}: not prefixed dotproxy_ (or process_)`,
    );
    assert.ok(family.help.trim().length > 0, `${family.name}: empty HELP`);
    if (family.type === "counter") {
      assert.match(family.name, /_total$/, `${family.name}: a counter not named *_total`);
    } else {
      assert.doesNotMatch(family.name, /_total$/, `${family.name}: a ${family.type} named *_total`);
    }
    if (family.type === "histogram") {
      assert.match(family.name, /_seconds$/, `${family.name}: histogram without a unit suffix`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP and polling helpers.

interface HttpResult {
  status: number;
  body: string;
  headers: Headers;
}

/** One HTTP request to the proxy; the body is always read, so nothing is left open. */
async function http(port: number, path: string, init: RequestInit = {}): Promise<HttpResult> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, {
    ...init,
    signal: AbortSignal.timeout(5000),
  });
  const body = await response.text();
  return { status: response.status, body, headers: response.headers };
}

async function scrape(port: number): Promise<Map<string, MetricFamily>> {
  const result = await http(port, "/metrics");
  assert.equal(result.status, 200);
  assert.equal(result.headers.get("content-type"), "text/plain; version=0.0.4; charset=utf-8");
  const families = parsePrometheus(result.body);
  checkConventions(families);
  return families;
}

/**
 * Calls `probe` until it returns something other than undefined, for at most `timeoutMs`
 * (see `waitFor`); fails with `what` otherwise.
 */
async function pollUntil<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  { timeoutMs = 10_000, intervalMs = 20 } = {},
): Promise<T> {
  let result: T | undefined;
  await waitFor(what, async () => (result = await probe()) !== undefined, timeoutMs, intervalMs);
  return result as T;
}

const HTTP = { http: { hostname: "127.0.0.1", port: 0 } };

function httpPort(proxy: { http: { addr: Deno.NetAddr } | null }): number {
  assert.ok(proxy.http, "the proxy has no HTTP endpoint");
  return proxy.http.addr.port;
}

// ---------------------------------------------------------------------------------------------
// The parser is strict: prove it rejects what it should.

Deno.test("exposition parser: accepts the registry's output, escapes included", () => {
  const registry = new Registry();
  const counter = registry.counter(
    "dotproxy_escape_total",
    "Help with a \\ backslash\nand a newline.",
    ["value"],
  );
  counter.labels('quote " backslash \\ newline \n end').inc(2);
  counter.labels("").inc();
  registry.gauge("dotproxy_nan", "A gauge.").set(NaN);
  registry.histogram("dotproxy_h_seconds", "A histogram.", ["k"], [0.1, 1]).labels("a")
    .observe(0.5);
  const families = parsePrometheus(registry.render());
  assert.equal(
    families.get("dotproxy_escape_total")?.help,
    "Help with a \\ backslash\nand a newline.",
  );
  assert.equal(
    sampleValue(families, "dotproxy_escape_total", {
      value: 'quote " backslash \\ newline \n end',
    }),
    2,
  );
  assert.equal(sampleValue(families, "dotproxy_escape_total", { value: "" }), 1);
  assert.ok(Number.isNaN(sampleValue(families, "dotproxy_nan")));
  assert.equal(sampleValue(families, "dotproxy_h_seconds_bucket", { k: "a", le: "0.1" }), 0);
  assert.equal(sampleValue(families, "dotproxy_h_seconds_bucket", { k: "a", le: "1" }), 1);
  assert.equal(sampleValue(families, "dotproxy_h_seconds_bucket", { k: "a", le: "+Inf" }), 1);
  assert.equal(sampleValue(families, "dotproxy_h_seconds_count", { k: "a" }), 1);
  assert.equal(sampleValue(families, "dotproxy_h_seconds_sum", { k: "a" }), 0.5);
});

Deno.test("exposition parser: rejects malformed text", () => {
  const head = "# HELP dotproxy_x_total X.\n# TYPE dotproxy_x_total counter\n";
  const histogram = "# HELP dotproxy_h_seconds H.\n# TYPE dotproxy_h_seconds histogram\n";
  const bad: [string, string][] = [
    ["no trailing newline", head + "dotproxy_x_total 1"],
    ["sample before TYPE", "dotproxy_x_total 1\n" + head],
    ["TYPE without HELP", "# TYPE dotproxy_x_total counter\ndotproxy_x_total 1\n"],
    ["foreign sample", head + "dotproxy_y_total 1\n"],
    ["unknown type", "# HELP dotproxy_x X.\n# TYPE dotproxy_x thing\n"],
    ["bad name", "# HELP 1x X.\n# TYPE 1x counter\n"],
    ["bad label name", head + 'dotproxy_x_total{1a="b"} 1\n'],
    ["reserved label", head + 'dotproxy_x_total{__a="b"} 1\n'],
    ["unquoted label", head + "dotproxy_x_total{a=b} 1\n"],
    ["bad escape", head + 'dotproxy_x_total{a="\\t"} 1\n'],
    ["unterminated value", head + 'dotproxy_x_total{a="b} 1\n'],
    ["repeated label", head + 'dotproxy_x_total{a="b",a="c"} 1\n'],
    ["bad value", head + "dotproxy_x_total one\n"],
    ["two spaces", head + "dotproxy_x_total  1\n"],
    ["negative counter", head + "dotproxy_x_total -1\n"],
    ["repeated series", head + "dotproxy_x_total 1\ndotproxy_x_total 2\n"],
    ["redeclared family", head + "dotproxy_x_total 1\n" + head],
    ["blank line", head + "\ndotproxy_x_total 1\n"],
    ["comment", "# just a comment\n" + head],
    [
      "buckets not cumulative",
      histogram + 'dotproxy_h_seconds_bucket{le="1"} 2\ndotproxy_h_seconds_bucket{le="+Inf"} 1\n' +
      "dotproxy_h_seconds_sum 1\ndotproxy_h_seconds_count 1\n",
    ],
    [
      "le out of order",
      histogram + 'dotproxy_h_seconds_bucket{le="2"} 0\ndotproxy_h_seconds_bucket{le="1"} 0\n' +
      'dotproxy_h_seconds_bucket{le="+Inf"} 0\ndotproxy_h_seconds_sum 0\n' +
      "dotproxy_h_seconds_count 0\n",
    ],
    [
      "+Inf differs from count",
      histogram + 'dotproxy_h_seconds_bucket{le="+Inf"} 2\ndotproxy_h_seconds_sum 1\n' +
      "dotproxy_h_seconds_count 3\n",
    ],
    [
      "no +Inf bucket",
      histogram + 'dotproxy_h_seconds_bucket{le="1"} 1\ndotproxy_h_seconds_sum 1\n' +
      "dotproxy_h_seconds_count 1\n",
    ],
    [
      "no _count",
      histogram + 'dotproxy_h_seconds_bucket{le="+Inf"} 1\ndotproxy_h_seconds_sum 1\n',
    ],
    ["le outside a histogram", head + 'dotproxy_x_total{le="1"} 1\n'],
  ];
  for (const [what, text] of bad) {
    assert.throws(() => parsePrometheus(text), Error, `accepted: ${what}`);
  }
  assert.throws(
    () => checkConventions(parsePrometheus("# HELP other_total X.\n# TYPE other_total counter\n")),
    /dotproxy_/,
  );
});

// ---------------------------------------------------------------------------------------------
// The proxy's metrics after known traffic.

Deno.test("metrics: exact counters after known traffic, scraped over HTTP", async () => {
  const started = Date.now() / 1000;
  const upstream = DotServer.start();
  const label = `127.0.0.1:${upstream.port}#dns.test`;
  try {
    // Exact counts of queries and connections below: one connection, no hedges, no nudges
    // (each of those writes a query twice or opens connections by design).
    const config = testConfig([upstream.upstream()], {
      ...HTTP,
      hedgeDelay: 0,
      upstreamConnections: 1,
      upstreamNudge: false,
    });
    await withProxy(config, async ({ proxy, port }) => {
      const web = httpPort(proxy);

      // Before any traffic: every family present, all pre-created series at zero.
      const before = await scrape(web);
      for (const [, value] of Object.entries(familyValues(before, "dotproxy_queries_total"))) {
        assert.equal(value, 0);
      }
      assert.equal(sampleValue(before, "dotproxy_upstream_healthy", { upstream: label }), 1);
      // One connection per upstream is opened at start, before any query.
      assert.equal(sampleValue(before, "dotproxy_upstream_connections", { upstream: label }), 1);
      // Unlabelled counters are exposed at zero before their first increment.
      assert.equal(sampleValue(before, "dotproxy_udp_truncated_total"), 0);
      assert.equal(sampleValue(before, "dotproxy_tcp_connections_rejected_total"), 0);
      assert.equal(sampleValue(before, "dotproxy_tcp_connections_open"), 0);

      // 3 UDP NOERROR.
      for (let i = 0; i < 3; i++) {
        const reply = await udpExchange(port, buildQuery(`ok${i}.example`, { id: 100 + i }));
        assert.ok(reply, `udp query ${i} unanswered`);
        assert.equal(parseMessage(reply).rcode, 0);
      }
      // 1 UDP NXDOMAIN.
      const nx = await udpExchange(port, buildQuery("nx.example", { id: 200 }));
      assert.ok(nx);
      assert.equal(parseMessage(nx).rcode, 3);
      // 1 UDP FORMERR: a well-formed question followed by a stray byte.
      const formerr = await udpExchange(port, new Uint8Array([...buildQuery("x.example"), 0]));
      assert.ok(formerr);
      assert.equal(parseMessage(formerr).rcode, 1);
      // 1 UDP answer truncated: 2000 bytes of TXT asked for without EDNS (limit 512).
      const big = await udpExchange(port, buildQuery("big2000.test", { type: 16, id: 300 }));
      assert.ok(big);
      assert.ok(big.length <= 512);
      assert.equal(parseMessage(big).tc, true);
      assert.equal(parseMessage(big).rcode, 0);
      // 1 UDP datagram too short for a header: dropped without a response.
      const dropSocket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
      try {
        await dropSocket.send(new Uint8Array([1, 2, 3, 4, 5]), {
          transport: "udp",
          hostname: "127.0.0.1",
          port,
        });
      } finally {
        dropSocket.close();
      }
      // 2 TCP NOERROR on one connection, which stays open for the gauge.
      const tcp = await TcpDnsClient.connect(port);
      try {
        for (let i = 0; i < 2; i++) {
          await tcp.send(buildQuery(`tcp${i}.example`, { id: 400 + i }));
          const reply = await tcp.receive();
          assert.ok(reply);
          assert.equal(parseMessage(reply).rcode, 0);
        }

        // The dropped datagram has no reply to wait for: poll the counter.
        const metrics = await pollUntil("the dropped datagram to be counted", async () => {
          const families = await scrape(web);
          const dropped = sampleValue(families, "dotproxy_dropped_total", {
            transport: "udp",
            reason: "malformed",
          });
          return dropped === 1 ? families : undefined;
        });

        const queries = familyValues(metrics, "dotproxy_queries_total");
        const expected: Record<string, number> = {};
        for (const transport of ["udp", "tcp", "dot", "doh"]) {
          for (const rcode of ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"]) {
            expected[JSON.stringify({ transport, rcode })] = 0;
          }
        }
        expected[JSON.stringify({ transport: "udp", rcode: "NOERROR" })] = 4;
        expected[JSON.stringify({ transport: "udp", rcode: "NXDOMAIN" })] = 1;
        expected[JSON.stringify({ transport: "udp", rcode: "FORMERR" })] = 1;
        expected[JSON.stringify({ transport: "tcp", rcode: "NOERROR" })] = 2;
        assert.deepEqual(queries, expected);

        const dropped = familyValues(metrics, "dotproxy_dropped_total");
        const expectedDropped: Record<string, number> = {};
        for (const transport of ["udp", "tcp", "dot", "doh"]) {
          for (const reason of ["malformed", "response", "overload", "rate_limit"]) {
            expectedDropped[JSON.stringify({ transport, reason })] = 0;
          }
        }
        expectedDropped[JSON.stringify({ transport: "udp", reason: "malformed" })] = 1;
        assert.deepEqual(dropped, expectedDropped);

        const value = (name: string, labels: Record<string, string> = {}) =>
          sampleValue(metrics, name, labels);
        assert.equal(value("dotproxy_udp_truncated_total"), 1);
        assert.equal(value("dotproxy_query_duration_seconds_count", { transport: "udp" }), 6);
        assert.equal(value("dotproxy_query_duration_seconds_count", { transport: "tcp" }), 2);
        // Forwarded: 3 + NXDOMAIN + big over UDP, 2 over TCP. FORMERR never leaves the proxy.
        assert.equal(value("dotproxy_upstream_answers_total", { upstream: label }), 7);
        assert.equal(upstream.queries, 7);
        assert.equal(
          value("dotproxy_upstream_query_duration_seconds_count", { upstream: label }),
          7,
        );
        for (const reason of ["timeout", "tls", "refused", "reset", "bad_response"]) {
          assert.equal(
            value("dotproxy_upstream_errors_total", { upstream: label, reason }),
            0,
            reason,
          );
        }
        assert.equal(
          value("dotproxy_upstream_errors_total", {
            upstream: label,
            reason: "unavailable",
          }),
          0,
        );
        // Sequential queries never need a second pipelined connection.
        assert.equal(
          value("dotproxy_upstream_tls_handshakes_total", { upstream: label, result: "ok" }),
          1,
        );
        assert.equal(
          value("dotproxy_upstream_tls_handshakes_total", { upstream: label, result: "error" }),
          0,
        );
        assert.equal(value("dotproxy_upstream_reconnects_total", { upstream: label }), 0);
        assert.equal(value("dotproxy_upstream_healthy", { upstream: label }), 1);
        assert.equal(value("dotproxy_upstream_inflight", { upstream: label }), 0);
        assert.equal(value("dotproxy_upstream_connections", { upstream: label }), 1);
        assert.equal(value("dotproxy_tcp_connections_total"), 1);
        assert.equal(value("dotproxy_tcp_connections_rejected_total"), 0);
        assert.equal(value("dotproxy_tcp_connections_open"), 1);
        assert.equal(
          value("dotproxy_build_info", { version: VERSION, deno: Deno.version.deno }),
          1,
        );
        const startTime = value("dotproxy_process_start_time_seconds");
        assert.ok(startTime !== undefined && startTime >= started - 1, `start ${startTime}`);
        assert.ok(startTime <= Date.now() / 1000 + 1, `start ${startTime} in the future`);
        // The standard process families, of this (test) process: plausible, and typed.
        assert.equal(value("process_start_time_seconds"), startTime);
        assert.equal(metrics.get("process_cpu_seconds_total")?.type, "counter");
        assert.equal(metrics.get("process_resident_memory_bytes")?.type, "gauge");
        const cpu = value("process_cpu_seconds_total");
        const elapsed = Date.now() / 1000 - started;
        // Two cores at most, and at least the TLS handshakes and parsing done above.
        assert.ok(cpu !== undefined && cpu > 0 && cpu <= 2 * (elapsed + 60), `cpu ${cpu}`);
        const rss = value("process_resident_memory_bytes");
        assert.ok(rss !== undefined && rss > 16 * 2 ** 20 && rss < 4 * 2 ** 30, `rss ${rss}`);
        const heap = value("dotproxy_heap_used_bytes");
        assert.ok(heap !== undefined && heap > 2 ** 20 && heap < rss, `heap ${heap}`);
        // CPU time only grows: a scrape after more work reads more.
        const busyUntil = performance.now() + 30;
        while (performance.now() < busyUntil) crypto.getRandomValues(new Uint8Array(1024));
        const cpuLater = sampleValue(await scrape(web), "process_cpu_seconds_total");
        assert.ok(cpuLater !== undefined && cpuLater > cpu, `cpu ${cpu} then ${cpuLater}`);

        // The histogram sums are plausible: positive, below count * deadline.
        for (
          const [name, labels, count] of [
            ["dotproxy_query_duration_seconds", { transport: "udp" }, 6],
            ["dotproxy_upstream_query_duration_seconds", { upstream: label }, 7],
          ] as const
        ) {
          const sum = value(`${name}_sum`, labels);
          assert.ok(sum !== undefined && sum > 0 && sum < count * 2, `${name}_sum ${sum}`);
        }

        // The same numbers through the in-process accessors.
        assert.equal(proxy.metrics.queries.get("udp", "NOERROR"), 4);
        assert.equal(proxy.metrics.tcpOpen.get(), 1);
      } finally {
        tcp.close();
      }

      // The open-connections gauge drops back once the client is gone.
      await pollUntil("the TCP connection gauge to reach 0", async () => {
        const families = await scrape(web);
        return sampleValue(families, "dotproxy_tcp_connections_open") === 0 ? true : undefined;
      });
      const after = await scrape(web);
      assert.equal(sampleValue(after, "dotproxy_tcp_connections_total"), 1);

      const ready = await http(web, "/readyz");
      assert.equal(ready.status, 200);
      assert.equal(ready.body, "ready: serving\n");
      const upstreams = await http(web, "/healthz/upstreams");
      assert.equal(upstreams.status, 200);
      assert.equal(upstreams.body, `ok: ${label} answered\n`);
    });
  } finally {
    await upstream.close();
  }
});

Deno.test("http: routes, methods and content types", async () => {
  const upstream = DotServer.start();
  try {
    await withProxy(testConfig([upstream.upstream()], HTTP), async ({ proxy }) => {
      const web = httpPort(proxy);
      const healthz = await http(web, "/healthz");
      assert.equal(healthz.status, 200);
      assert.equal(healthz.body, "ok\n");
      assert.equal(healthz.headers.get("content-type"), "text/plain; charset=utf-8");

      const head = await http(web, "/healthz", { method: "HEAD" });
      assert.equal(head.status, 200);
      assert.equal(head.body, "");

      for (const path of ["/", "/metric", "/metrics/", "/healthz/x", "/favicon.ico"]) {
        const missing = await http(web, path);
        assert.equal(missing.status, 404, path);
        assert.equal(missing.body, "not found\n", path);
      }
      for (const method of ["POST", "PUT", "DELETE"]) {
        for (const path of ["/metrics", "/healthz", "/readyz"]) {
          const refused = await http(web, path, { method, body: method === "DELETE" ? null : "x" });
          assert.equal(refused.status, 405, `${method} ${path}`);
          assert.equal(refused.headers.get("allow"), "GET, HEAD");
        }
      }
      // A query string does not change the route.
      const withQuery = await http(web, "/metrics?name[]=dotproxy_queries_total");
      assert.equal(withQuery.status, 200);
      parsePrometheus(withQuery.body);
    });
  } finally {
    await upstream.close();
  }
});

Deno.test("healthz/upstreams: 503 with a reason when the upstream dies, 200 when it returns; readyz stays 200", async () => {
  let upstream = DotServer.start();
  const upstreamPort = upstream.port;
  const label = `127.0.0.1:${upstreamPort}#dns.test`;
  try {
    await withProxy(
      testConfig([upstream.upstream()], { ...HTTP, timeoutMs: 1000 }),
      async ({ proxy, port }) => {
        const web = httpPort(proxy);
        // With a zero window every /healthz/upstreams sends a probe query upstream.
        const first = await http(web, "/healthz/upstreams");
        assert.equal(first.status, 200);
        assert.equal(first.body, `ok: ${label} answered a probe\n`);
        assert.ok(upstream.probes >= 1);
        assert.equal(upstream.probesWithRd, 0, "health checks ask without RD");

        const reply = await udpExchange(port, buildQuery("before.example"));
        assert.ok(reply);

        await upstream.close();

        const down = await pollUntil("/healthz/upstreams to report 503", async () => {
          const result = await http(web, "/healthz/upstreams");
          return result.status === 503 ? result : undefined;
        });
        assert.match(down.body, /^failing: no upstream answers: .+\n$/);
        assert.ok(down.body.includes(label), down.body);
        assert.match(down.body, /refused/i);
        assert.equal(down.headers.get("content-type"), "text/plain; charset=utf-8");
        // The process itself is still alive, and still ready: a fault every replica shares.
        assert.equal((await http(web, "/healthz")).status, 200);
        assert.equal((await http(web, "/readyz")).status, 200);

        const failing = await scrape(web);
        const refused = sampleValue(failing, "dotproxy_upstream_errors_total", {
          upstream: label,
          reason: "refused",
        });
        assert.ok(refused !== undefined && refused >= 1, `refused errors: ${refused}`);
        for (const reason of ["tls", "bad_response", "timeout"]) {
          assert.equal(
            sampleValue(failing, "dotproxy_upstream_errors_total", { upstream: label, reason }),
            0,
            reason,
          );
        }
        assert.equal(
          sampleValue(failing, "dotproxy_upstream_connections", { upstream: label }),
          0,
        );

        // The upstream comes back on the same port; the pool finds it after its backoff.
        upstream = await pollUntil("the upstream port to be free again", () => {
          try {
            return Promise.resolve(DotServer.start({ port: upstreamPort }));
          } catch (error) {
            if (error instanceof Deno.errors.AddrInUse) return Promise.resolve(undefined);
            throw error;
          }
        });
        const up = await pollUntil("/healthz/upstreams to report 200 again", async () => {
          const result = await http(web, "/healthz/upstreams");
          return result.status === 200 ? result : undefined;
        }, { timeoutMs: 15_000, intervalMs: 50 });
        assert.equal(up.body, `ok: ${label} answered a probe\n`);

        const recovered = await scrape(web);
        assert.equal(sampleValue(recovered, "dotproxy_upstream_healthy", { upstream: label }), 1);
        const ok = sampleValue(recovered, "dotproxy_upstream_tls_handshakes_total", {
          upstream: label,
          result: "ok",
        });
        assert.ok(ok !== undefined && ok >= 2, `handshakes ok: ${ok}`);
      },
    );
  } finally {
    await upstream.close();
  }
});

Deno.test("metrics: a wrong TLS name counts a tls error and a failed handshake", async () => {
  const upstream = DotServer.start();
  const label = `127.0.0.1:${upstream.port}#wrong.test`;
  try {
    await withProxy(
      testConfig([upstream.upstream("wrong.test")], HTTP),
      async ({ proxy, port }) => {
        const web = httpPort(proxy);
        // The health check at start meets the wrong certificate and marks the upstream down.
        await pollUntil("the upstream to be marked down", async () => {
          const families = await scrape(web);
          return sampleValue(families, "dotproxy_upstream_healthy", { upstream: label }) === 0
            ? true
            : undefined;
        });
        const reply = await udpExchange(port, buildQuery("tls.example", { id: 77 }));
        assert.ok(reply);
        assert.equal(parseMessage(reply).rcode, 2, "SERVFAIL expected");

        const metrics = await scrape(web);
        const errors = familyValues(metrics, "dotproxy_upstream_errors_total");
        const expected: Record<string, number> = {};
        for (
          const reason of [
            "timeout",
            "tls",
            "refused",
            "unreachable",
            "reset",
            "bad_response",
            "unavailable",
          ]
        ) {
          // The handshake fails (tls), then the query finds its only upstream down
          // (unavailable).
          expected[JSON.stringify({ upstream: label, reason })] =
            reason === "tls" || reason === "unavailable" ? 1 : 0;
        }
        // Health checks retry the handshake every 500 ms while down: count what they did.
        const tls = sampleValue(metrics, "dotproxy_upstream_errors_total", {
          upstream: label,
          reason: "tls",
        }) ?? 0;
        assert.ok(tls >= 1, `tls errors: ${tls}`);
        expected[JSON.stringify({ upstream: label, reason: "tls" })] = tls;
        assert.deepEqual(errors, expected);
        assert.equal(
          sampleValue(metrics, "dotproxy_upstream_tls_handshakes_total", {
            upstream: label,
            result: "error",
          }),
          tls,
        );
        assert.equal(
          sampleValue(metrics, "dotproxy_upstream_tls_handshakes_total", {
            upstream: label,
            result: "ok",
          }),
          0,
        );
        assert.equal(
          sampleValue(metrics, "dotproxy_upstream_answers_total", { upstream: label }),
          0,
        );
        assert.equal(
          sampleValue(metrics, "dotproxy_queries_total", { transport: "udp", rcode: "SERVFAIL" }),
          1,
        );
        assert.equal(upstream.queries, 0, "no query may cross an unverified connection");

        const upstreams = await http(web, "/healthz/upstreams");
        assert.equal(upstreams.status, 503);
        assert.ok(upstreams.body.includes(label), upstreams.body);
        assert.equal((await http(web, "/readyz")).status, 200, "serving, if only SERVFAIL");
      },
    );
  } finally {
    await upstream.close();
  }
});

Deno.test("dotproxy_queries_inflight: the client queries waiting on the upstream now, back to 0 when answered", async () => {
  // Questions under slow.test are answered after a second.
  const upstream = DotServer.start({
    delayMs: (query) => parseMessage(query).question?.name.endsWith("slow.test.") ? 1000 : 0,
  });
  try {
    await withProxy(
      testConfig([upstream.upstream()], { ...HTTP, hedgeDelay: 0 }),
      async ({ proxy, port }) => {
        const web = httpPort(proxy);
        const inflight = async () =>
          sampleValue(
            parsePrometheus((await http(web, "/metrics")).body),
            "dotproxy_queries_inflight",
          );
        assert.equal(await inflight(), 0);
        // Three different slow questions, and the first asked again by another client
        // (coalesced: it waits too), then a fast one that must not count once answered.
        const waiting = [
          udpExchange(port, buildQuery("a.slow.test", { id: 1 }), 3000),
          udpExchange(port, buildQuery("b.slow.test", { id: 2 }), 3000),
          udpExchange(port, buildQuery("c.slow.test", { id: 3 }), 3000),
          udpExchange(port, buildQuery("a.slow.test", { id: 4 }), 3000),
        ];
        assert.ok(await udpExchange(port, buildQuery("fast.test", { id: 5 })));
        assert.equal(
          await pollUntil("four queries waiting", async () => {
            const value = await inflight();
            return value === 4 ? value : undefined;
          }, { timeoutMs: 800 }),
          4,
        );
        for (const reply of await Promise.all(waiting)) {
          assert.ok(reply, "every slow query answered");
        }
        assert.equal(await inflight(), 0);
      },
    );
  } finally {
    await upstream.close();
  }
});
