/**
 * The operator's view of the proxy: `/metrics` scraped over real HTTP after known traffic,
 * checked to the exact counter values and against a strict parser of the Prometheus text
 * format 0.0.4 written here; `/healthz`, `/readyz` (and its 503 when the upstreams die) and
 * the HTTP routing rules; the per-upstream error reasons.
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
import { TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus text exposition format 0.0.4.

/** One sample line. */
interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** One metric family: its `# HELP`, `# TYPE` and samples, in order. */
interface MetricFamily {
  name: string;
  type: string;
  help: string;
  samples: Sample[];
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const METRIC_NAME_PREFIX = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL_NAME_PREFIX = /^[a-zA-Z_][a-zA-Z0-9_]*/;
const FLOAT = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;
const TIMESTAMP = /^-?\d+$/;
const TYPES = new Set(["counter", "gauge", "histogram", "summary", "untyped"]);
const HISTOGRAM_SUFFIXES = ["_bucket", "_sum", "_count"];

function parseValue(text: string, where: string): number {
  if (text === "NaN") return NaN;
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  if (!FLOAT.test(text)) throw new Error(`${where}: value ${JSON.stringify(text)} is no float`);
  return Number(text);
}

function unescapeHelp(text: string, where: string): string {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c !== "\\") {
      out += c;
      continue;
    }
    const next = text[++i];
    if (next === "\\") out += "\\";
    else if (next === "n") out += "\n";
    else throw new Error(`${where}: bad escape \\${next ?? ""} in HELP`);
  }
  return out;
}

/** Parses `{name="value",...}` starting at `text[start] === "{"`; returns the labels and end. */
function parseLabels(
  text: string,
  start: number,
  where: string,
): { labels: Record<string, string>; end: number } {
  const labels: Record<string, string> = {};
  let i = start + 1;
  while (i < text.length) {
    if (text[i] === "}") return { labels, end: i + 1 };
    const match = LABEL_NAME_PREFIX.exec(text.slice(i));
    if (!match) throw new Error(`${where}: bad label name at column ${i}`);
    const name = match[0];
    if (name.startsWith("__")) throw new Error(`${where}: reserved label name ${name}`);
    if (Object.hasOwn(labels, name)) throw new Error(`${where}: label ${name} repeated`);
    i += name.length;
    if (text[i] !== "=") throw new Error(`${where}: expected "=" after label ${name}`);
    if (text[i + 1] !== '"') throw new Error(`${where}: expected '"' to open label ${name}`);
    i += 2;
    let value = "";
    let closed = false;
    while (i < text.length) {
      const c = text[i];
      if (c === '"') {
        closed = true;
        i++;
        break;
      }
      if (c === "\\") {
        const next = text[i + 1];
        if (next === "\\") value += "\\";
        else if (next === '"') value += '"';
        else if (next === "n") value += "\n";
        else throw new Error(`${where}: bad escape \\${next ?? ""} in label ${name}`);
        i += 2;
        continue;
      }
      value += c;
      i++;
    }
    if (!closed) throw new Error(`${where}: unterminated value of label ${name}`);
    labels[name] = value;
    if (text[i] === ",") i++;
    else if (text[i] !== "}") throw new Error(`${where}: expected "," or "}" after label ${name}`);
  }
  throw new Error(`${where}: unterminated label set`);
}

function seriesKey(name: string, labels: Record<string, string>, omit = ""): string {
  const entries = Object.entries(labels).filter(([k]) => k !== omit).sort(([a], [b]) =>
    a < b ? -1 : a > b ? 1 : 0
  );
  return `${name}${JSON.stringify(entries)}`;
}

/** The family a sample name belongs to, given the family declared last. */
function belongsTo(sample: string, family: MetricFamily): boolean {
  if (family.type === "histogram") {
    return HISTOGRAM_SUFFIXES.some((suffix) => sample === family.name + suffix);
  }
  if (family.type === "summary") {
    return sample === family.name || sample === family.name + "_sum" ||
      sample === family.name + "_count";
  }
  return sample === family.name;
}

function checkHistogram(family: MetricFamily): void {
  const groups = new Map<
    string,
    { buckets: { le: number; value: number }[]; sum?: number; count?: number }
  >();
  for (const sample of family.samples) {
    const key = seriesKey(family.name, sample.labels, "le");
    let group = groups.get(key);
    if (!group) {
      group = { buckets: [] };
      groups.set(key, group);
    }
    const where = `${family.name} ${key}`;
    if (sample.name.endsWith("_bucket")) {
      if (!Object.hasOwn(sample.labels, "le")) throw new Error(`${where}: bucket without le`);
      if (group.sum !== undefined || group.count !== undefined) {
        throw new Error(`${where}: bucket after _sum or _count`);
      }
      group.buckets.push({ le: parseValue(sample.labels.le, where), value: sample.value });
    } else {
      if (Object.hasOwn(sample.labels, "le")) throw new Error(`${where}: le on ${sample.name}`);
      if (sample.name.endsWith("_sum")) group.sum = sample.value;
      else group.count = sample.value;
    }
  }
  for (const [key, group] of groups) {
    const where = `${family.name} ${key}`;
    if (group.buckets.length === 0) throw new Error(`${where}: no buckets`);
    if (group.sum === undefined) throw new Error(`${where}: no _sum`);
    if (group.count === undefined) throw new Error(`${where}: no _count`);
    for (let i = 0; i < group.buckets.length; i++) {
      const { le, value } = group.buckets[i];
      if (Number.isNaN(le)) throw new Error(`${where}: le is NaN`);
      if (!Number.isInteger(value) || value < 0) {
        throw new Error(`${where}: bucket count ${value} is not a whole number`);
      }
      if (i > 0) {
        const previous = group.buckets[i - 1];
        if (!(le > previous.le)) throw new Error(`${where}: le ${le} after ${previous.le}`);
        if (value < previous.value) {
          throw new Error(`${where}: bucket le=${le} (${value}) below le=${previous.le}`);
        }
      }
    }
    const last = group.buckets[group.buckets.length - 1];
    if (last.le !== Infinity) throw new Error(`${where}: last bucket is not +Inf`);
    if (last.value !== group.count) {
      throw new Error(`${where}: +Inf bucket ${last.value} differs from _count ${group.count}`);
    }
  }
}

/**
 * Parses exposition text strictly: every sample follows the `# HELP` and `# TYPE` of its
 * family, families are contiguous and declared once, names, labels and values are well
 * formed, no series repeats, counters are non-negative and histograms consistent. dotproxy
 * writes no other comments and no blank lines, so those are rejected too.
 */
function parseExposition(text: string): Map<string, MetricFamily> {
  if (!text.endsWith("\n")) throw new Error("exposition does not end with a newline");
  if (text.includes("\r")) throw new Error("exposition contains a carriage return");
  const families = new Map<string, MetricFamily>();
  const declared = new Map<string, { help?: string; type?: string }>();
  const series = new Set<string>();
  let current: MetricFamily | null = null;
  let declaring: string | null = null;
  const lines = text.slice(0, -1).split("\n");
  for (let index = 0; index < lines.length; index++) {
    const line = lines[index];
    const where = `line ${index + 1} ${JSON.stringify(line)}`;
    if (line.startsWith("#")) {
      const match = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line);
      if (!match) throw new Error(`${where}: a comment that is neither HELP nor TYPE`);
      const [, keyword, name, rest] = match;
      if (!METRIC_NAME.test(name)) throw new Error(`${where}: bad metric name ${name}`);
      if (families.has(name)) throw new Error(`${where}: ${name} declared after its samples`);
      if (declaring !== null && declaring !== name) {
        throw new Error(`${where}: ${declaring} declared but has no TYPE before ${name}`);
      }
      const declaration = declared.get(name) ?? {};
      declared.set(name, declaration);
      if (keyword === "HELP") {
        if (declaration.help !== undefined) throw new Error(`${where}: second HELP for ${name}`);
        declaration.help = unescapeHelp(rest, where);
      } else {
        if (declaration.type !== undefined) throw new Error(`${where}: second TYPE for ${name}`);
        if (!TYPES.has(rest)) throw new Error(`${where}: unknown type ${rest}`);
        declaration.type = rest;
      }
      declaring = name;
      if (declaration.help !== undefined && declaration.type !== undefined) {
        current = { name, type: declaration.type, help: declaration.help, samples: [] };
        families.set(name, current);
        declaring = null;
      }
      continue;
    }
    if (line === "") throw new Error(`${where}: blank line`);
    const nameMatch = METRIC_NAME_PREFIX.exec(line);
    if (!nameMatch) throw new Error(`${where}: bad metric name`);
    const name = nameMatch[0];
    if (current === null || declaring !== null || !belongsTo(name, current)) {
      throw new Error(`${where}: sample not in the family declared just before it`);
    }
    let i = name.length;
    let labels: Record<string, string> = {};
    if (line[i] === "{") ({ labels, end: i } = parseLabels(line, i, where));
    if (line[i] !== " ") throw new Error(`${where}: expected one space before the value`);
    const fields = line.slice(i + 1).split(" ");
    if (fields.length > 2 || fields.some((f) => f === "")) {
      throw new Error(`${where}: expected "value [timestamp]"`);
    }
    const value = parseValue(fields[0], where);
    if (fields.length === 2 && !TIMESTAMP.test(fields[1])) {
      throw new Error(`${where}: bad timestamp`);
    }
    const key = seriesKey(name, labels);
    if (series.has(key)) throw new Error(`${where}: series repeated`);
    series.add(key);
    if (current.type === "counter" && !(value >= 0 && Number.isFinite(value))) {
      throw new Error(`${where}: counter value ${value} is not a finite non-negative number`);
    }
    if (current.type !== "histogram" && Object.hasOwn(labels, "le")) {
      throw new Error(`${where}: le label outside a histogram`);
    }
    current.samples.push({ name, labels, value });
  }
  if (declaring !== null) throw new Error(`${declaring}: HELP without TYPE or TYPE without HELP`);
  for (const family of families.values()) {
    if (family.type === "histogram") checkHistogram(family);
  }
  return families;
}

/** dotproxy's own conventions on top of the format. */
function checkConventions(families: Map<string, MetricFamily>): void {
  for (const family of families.values()) {
    assert.match(family.name, /^dotproxy_[a-z0-9_]+$/, `${family.name}: not prefixed dotproxy_`);
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

/** The value of the sample with exactly these labels, or undefined. */
function sampleValue(
  families: Map<string, MetricFamily>,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  const family = families.get(name) ??
    families.get(name.replace(/_(bucket|sum|count)$/, ""));
  if (!family) return undefined;
  const key = seriesKey(name, labels);
  return family.samples.find((s) => seriesKey(s.name, s.labels) === key)?.value;
}

/** Every sample of family `name` as `{labels JSON: value}` for whole-family comparisons. */
function familyValues(
  families: Map<string, MetricFamily>,
  name: string,
): Record<string, number> {
  const family = families.get(name);
  assert.ok(family, `family ${name} missing`);
  const out: Record<string, number> = {};
  for (const sample of family.samples) out[JSON.stringify(sample.labels)] = sample.value;
  return out;
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
  const families = parseExposition(result.body);
  checkConventions(families);
  return families;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Calls `probe` until it returns something other than undefined, at most `attempts` times
 * and for at most `timeoutMs`; fails with `what` otherwise.
 */
async function pollUntil<T>(
  what: string,
  probe: () => Promise<T | undefined>,
  { timeoutMs = 10_000, attempts = 500, intervalMs = 20 } = {},
): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (let attempt = 0; attempt < attempts && performance.now() < deadline; attempt++) {
    const result = await probe();
    if (result !== undefined) return result;
    await sleep(intervalMs);
  }
  throw new Error(`gave up waiting for ${what}`);
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
  const families = parseExposition(registry.render());
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
    assert.throws(() => parseExposition(text), Error, `accepted: ${what}`);
  }
  assert.throws(
    () => checkConventions(parseExposition("# HELP other_total X.\n# TYPE other_total counter\n")),
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
    await withProxy(testConfig([upstream.upstream()], HTTP), async ({ proxy, port }) => {
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
        for (const transport of ["udp", "tcp"]) {
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
        for (const transport of ["udp", "tcp"]) {
          for (const reason of ["malformed", "response", "overload"]) {
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
      assert.equal(ready.body, `ready: ${label} answered\n`);
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
      parseExposition(withQuery.body);
    });
  } finally {
    await upstream.close();
  }
});

Deno.test("readyz: 503 with a reason when the upstream dies, 200 when it returns", async () => {
  let upstream = DotServer.start();
  const upstreamPort = upstream.port;
  const label = `127.0.0.1:${upstreamPort}#dns.test`;
  try {
    await withProxy(
      testConfig([upstream.upstream()], { ...HTTP, timeoutMs: 1000 }),
      async ({ proxy, port }) => {
        const web = httpPort(proxy);
        // With a zero window every /readyz sends a probe query upstream.
        const first = await http(web, "/readyz");
        assert.equal(first.status, 200);
        assert.equal(first.body, `ready: ${label} answered a probe\n`);
        assert.ok(upstream.queries >= 1);

        const reply = await udpExchange(port, buildQuery("before.example"));
        assert.ok(reply);

        await upstream.close();

        const down = await pollUntil("/readyz to report 503", async () => {
          const result = await http(web, "/readyz");
          return result.status === 503 ? result : undefined;
        });
        assert.match(down.body, /^not ready: no upstream answers: .+\n$/);
        assert.ok(down.body.includes(label), down.body);
        assert.match(down.body, /refused/i);
        assert.equal(down.headers.get("content-type"), "text/plain; charset=utf-8");
        // The process itself is still alive.
        assert.equal((await http(web, "/healthz")).status, 200);

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
        const up = await pollUntil("/readyz to report 200 again", async () => {
          const result = await http(web, "/readyz");
          return result.status === 200 ? result : undefined;
        }, { timeoutMs: 15_000, attempts: 300, intervalMs: 50 });
        assert.equal(up.body, `ready: ${label} answered a probe\n`);

        const recovered = await scrape(web);
        assert.equal(sampleValue(recovered, "dotproxy_upstream_healthy", { upstream: label }), 1);
        const ok = sampleValue(recovered, "dotproxy_upstream_tls_handshakes_total", {
          upstream: label,
          result: "ok",
        });
        assert.ok(ok !== undefined && ok >= 2, `handshakes ok: ${ok}`);
      },
      { readyWindowMs: 0 },
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
        const reply = await udpExchange(port, buildQuery("tls.example", { id: 77 }));
        assert.ok(reply);
        assert.equal(parseMessage(reply).rcode, 2, "SERVFAIL expected");

        const metrics = await scrape(web);
        const errors = familyValues(metrics, "dotproxy_upstream_errors_total");
        const expected: Record<string, number> = {};
        for (
          const reason of ["timeout", "tls", "refused", "reset", "bad_response", "unavailable"]
        ) {
          // The handshake fails (tls), then the query finds its only upstream backing off
          // (unavailable).
          expected[JSON.stringify({ upstream: label, reason })] =
            reason === "tls" || reason === "unavailable" ? 1 : 0;
        }
        assert.deepEqual(errors, expected);
        assert.equal(
          sampleValue(metrics, "dotproxy_upstream_tls_handshakes_total", {
            upstream: label,
            result: "error",
          }),
          1,
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

        const ready = await http(web, "/readyz");
        assert.equal(ready.status, 503);
        assert.ok(ready.body.includes(label), ready.body);
      },
    );
  } finally {
    await upstream.close();
  }
});
