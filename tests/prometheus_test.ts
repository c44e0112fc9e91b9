/**
 * The shared Prometheus text parser and its helpers (`support/prometheus.ts`). Its rejection
 * of malformed text is tested against the proxy's own registry in `observability_test.ts`;
 * here: values, escapes, timestamps, histograms and the lookup helpers.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  familyValues,
  metricValue,
  parsePrometheus,
  sampleValue,
  selectSamples,
  sumMetric,
} from "./support/prometheus.ts";

const TEXT = [
  "# HELP demo_queries_total Queries\\nby \\\\ transport.",
  "# TYPE demo_queries_total counter",
  'demo_queries_total{transport="udp",rcode="NOERROR"} 4',
  'demo_queries_total{transport="tcp",rcode="NOERROR"} 2',
  'demo_queries_total{transport="udp",rcode="SERVFAIL"} 1 1700000000000',
  "# HELP demo_healthy Up.",
  "# TYPE demo_healthy gauge",
  'demo_healthy{upstream="127.0.0.1:853#dns.test",note="a \\"q\\" \\\\ b\\nc, {d}"} 1',
  'demo_healthy{upstream="[::1]:853#dns.test",} 0',
  "# HELP demo_special Special values.",
  "# TYPE demo_special gauge",
  'demo_special{v="nan"} NaN',
  'demo_special{v="inf"} +Inf',
  'demo_special{v="-inf"} -Inf',
  'demo_special{v="exp"} -1.5e-3',
  "# HELP demo_seconds Latency.",
  "# TYPE demo_seconds histogram",
  'demo_seconds_bucket{upstream="a",le="0.005"} 1',
  'demo_seconds_bucket{upstream="a",le="0.5"} 3',
  'demo_seconds_bucket{upstream="a",le="+Inf"} 4',
  'demo_seconds_sum{upstream="a"} 1.25',
  'demo_seconds_count{upstream="a"} 4',
  'demo_seconds_bucket{upstream="b",le="0.005"} 0',
  'demo_seconds_bucket{upstream="b",le="0.5"} 0',
  'demo_seconds_bucket{upstream="b",le="+Inf"} 1',
  'demo_seconds_sum{upstream="b"} 2',
  'demo_seconds_count{upstream="b"} 1',
  "# HELP demo_summary A summary.",
  "# TYPE demo_summary summary",
  'demo_summary{quantile="0.5"} 0.1',
  "demo_summary_sum 3",
  "demo_summary_count 7",
  "",
].join("\n");

Deno.test("prometheus: families, types, unescaped HELP and labels, timestamps", () => {
  const families = parsePrometheus(TEXT);
  assert.deepEqual([...families.keys()], [
    "demo_queries_total",
    "demo_healthy",
    "demo_special",
    "demo_seconds",
    "demo_summary",
  ]);
  const queries = families.get("demo_queries_total");
  assert.equal(queries?.type, "counter");
  assert.equal(queries?.help, "Queries\nby \\ transport.");
  assert.deepEqual(queries?.samples[2], {
    name: "demo_queries_total",
    labels: { transport: "udp", rcode: "SERVFAIL" },
    value: 1,
    timestamp: 1700000000000,
  });
  assert.equal(queries?.samples[0].timestamp, undefined);
  assert.deepEqual(families.get("demo_healthy")?.samples[0].labels, {
    upstream: "127.0.0.1:853#dns.test",
    note: 'a "q" \\ b\nc, {d}',
  });
  assert.equal(families.get("demo_seconds")?.type, "histogram");
  assert.equal(families.get("demo_summary")?.samples.length, 3);
});

Deno.test("prometheus: NaN, +Inf, -Inf and exponents", () => {
  assert.ok(Number.isNaN(metricValue(TEXT, "demo_special", { v: "nan" })));
  assert.equal(metricValue(TEXT, "demo_special", { v: "inf" }), Infinity);
  assert.equal(metricValue(TEXT, "demo_special", { v: "-inf" }), -Infinity);
  assert.equal(metricValue(TEXT, "demo_special", { v: "exp" }), -0.0015);
});

Deno.test("prometheus: metricValue matches the exact label set", () => {
  const families = parsePrometheus(TEXT);
  assert.equal(metricValue(TEXT, "demo_queries_total", { transport: "udp", rcode: "NOERROR" }), 4);
  // Label order does not matter; missing or extra labels do.
  assert.equal(
    metricValue(families, "demo_queries_total", { rcode: "NOERROR", transport: "tcp" }),
    2,
  );
  assert.equal(metricValue(families, "demo_queries_total", { transport: "udp" }), undefined);
  assert.equal(metricValue(families, "demo_nothing_total"), undefined);
  assert.equal(metricValue(families, "demo_healthy", { upstream: "[::1]:853#dns.test" }), 0);
  // Histogram series by their sample names.
  assert.equal(metricValue(families, "demo_seconds_bucket", { upstream: "a", le: "0.5" }), 3);
  assert.equal(metricValue(families, "demo_seconds_bucket", { upstream: "a", le: "+Inf" }), 4);
  assert.equal(metricValue(families, "demo_seconds_count", { upstream: "b" }), 1);
  assert.equal(metricValue(families, "demo_seconds_sum", { upstream: "a" }), 1.25);
  assert.equal(metricValue(families, "demo_summary_count"), 7);
  assert.equal(metricValue(families, "demo_summary", { quantile: "0.5" }), 0.1);
  // sampleValue is the same on parsed families.
  assert.equal(sampleValue(families, "demo_seconds_count", { upstream: "a" }), 4);
});

Deno.test("prometheus: sumMetric and selectSamples filter by a subset of labels", () => {
  assert.equal(sumMetric(TEXT, "demo_queries_total"), 7);
  assert.equal(sumMetric(TEXT, "demo_queries_total", { transport: "udp" }), 5);
  assert.equal(sumMetric(TEXT, "demo_queries_total", { rcode: "NOERROR" }), 6);
  assert.equal(sumMetric(TEXT, "demo_queries_total", { rcode: "REFUSED" }), 0);
  assert.equal(sumMetric(TEXT, "demo_seconds_count"), 5);
  assert.equal(sumMetric(TEXT, "demo_seconds_bucket", { le: "+Inf" }), 5);
  assert.deepEqual(
    selectSamples(TEXT, "demo_seconds_sum").map((s) => [s.labels.upstream, s.value]),
    [["a", 1.25], ["b", 2]],
  );
  // A misspelt name fails loudly instead of summing to 0.
  assert.throws(() => sumMetric(TEXT, "demo_query_total"), /no metric family exposes/);
  assert.throws(() => sumMetric(TEXT, "demo_healthy_count"), /no metric family exposes/);
});

Deno.test("prometheus: familyValues, and the helpers parse text strictly", () => {
  const families = parsePrometheus(TEXT);
  assert.deepEqual(familyValues(families, "demo_queries_total"), {
    '{"transport":"udp","rcode":"NOERROR"}': 4,
    '{"transport":"tcp","rcode":"NOERROR"}': 2,
    '{"transport":"udp","rcode":"SERVFAIL"}': 1,
  });
  assert.throws(() => familyValues(families, "demo_missing"), /missing/);
  const broken = TEXT.replace('rcode="SERVFAIL"} 1', 'rcode="SERVFAIL} 1');
  assert.throws(() => metricValue(broken, "demo_healthy"), /unterminated|expected/);
  assert.throws(() => sumMetric(TEXT + "stray 1\n", "demo_healthy"), /family declared/);
  assert.throws(() => parsePrometheus(TEXT.replace(" 0.1\n", " 0.1 12.5\n")), /timestamp/);
  assert.throws(
    () => parsePrometheus(TEXT.replace('le="+Inf"} 4', 'le="+Inf"} 5')),
    /differs from _count/,
  );
  assert.throws(() => parsePrometheus(TEXT.replace("} -1.5e-3", "} 1,5")), /no float/);
});
