/**
 * The Grafana dashboard in `deploy/grafana/dotproxy.json` only uses metrics the proxy
 * exposes: every `dotproxy_*` and `process_*` name in a PromQL expression (panels and
 * template variables) must be a series a running proxy's `/metrics` serves, `rate()` only
 * ever wraps counters, and every label a query groups or filters by exists on the metrics
 * it names.
 *
 * Run with `deno test --allow-net --allow-env --allow-read tests/dashboard_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery } from "./support/dns.ts";
import { parsePrometheus } from "./support/prometheus.ts";
import { testConfig, udpExchange, withProxy } from "./support/proxy.ts";

const DASHBOARD = new URL("../deploy/grafana/dotproxy.json", import.meta.url);
const GRID_WIDTH = 24;
/** Labels Prometheus attaches at scrape time, not exposed by the proxy. */
const TARGET_LABELS = new Set(["job", "instance"]);
/** Families the dashboard must chart (the panels operators rely on). */
const REQUIRED = [
  "dotproxy_queries_total",
  "dotproxy_query_duration_seconds_bucket",
  "dotproxy_upstream_healthy",
  "dotproxy_upstream_query_duration_seconds_bucket",
  "dotproxy_upstream_errors_total",
  "dotproxy_tcp_connections_open",
  "dotproxy_udp_truncated_total",
  "dotproxy_dropped_total",
  "dotproxy_upstream_tls_handshakes_total",
  "dotproxy_upstream_reconnects_total",
  "dotproxy_upstream_hedges_total",
  "dotproxy_upstream_retries_total",
  "dotproxy_upstream_health_checks_total",
  "dotproxy_cache_lookups_total",
  "process_cpu_seconds_total",
  "process_resident_memory_bytes",
];

type Obj = Record<string, unknown>;

function isObj(value: unknown): value is Obj {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function obj(value: unknown, what: string): Obj {
  assert.ok(isObj(value), `${what}: expected an object, got ${JSON.stringify(value)}`);
  return value;
}

function list(value: unknown, what: string): unknown[] {
  assert.ok(Array.isArray(value), `${what}: expected a list, got ${JSON.stringify(value)}`);
  return value;
}

function text(value: unknown, what: string): string {
  assert.equal(typeof value, "string", `${what}: expected a string`);
  return value as string;
}

function num(value: unknown, what: string): number {
  assert.equal(typeof value, "number", `${what}: expected a number`);
  return value as number;
}

async function loadDashboard(): Promise<Obj> {
  return obj(JSON.parse(await Deno.readTextFile(DASHBOARD)), "dashboard");
}

/** Every panel, rows' nested panels included, in file order. */
function allPanels(dashboard: Obj): Obj[] {
  const out: Obj[] = [];
  for (const [i, entry] of list(dashboard.panels, "panels").entries()) {
    const panel = obj(entry, `panels[${i}]`);
    out.push(panel);
    if (panel.type === "row" && panel.panels !== undefined) {
      for (const [j, nested] of list(panel.panels, `row ${panel.title}`).entries()) {
        out.push(obj(nested, `row ${panel.title} panels[${j}]`));
      }
    }
  }
  return out;
}

/** `[where, expr]` for every PromQL expression: panel targets and query variables. */
function expressions(dashboard: Obj): [string, string][] {
  const out: [string, string][] = [];
  for (const panel of allPanels(dashboard)) {
    if (panel.type === "row") continue;
    const targets = list(panel.targets, `panel ${panel.title} targets`);
    for (const [i, entry] of targets.entries()) {
      const target = obj(entry, `panel ${panel.title} targets[${i}]`);
      out.push([`panel "${panel.title}" ${target.refId}`, text(target.expr, "expr")]);
    }
  }
  const templating = obj(dashboard.templating, "templating");
  for (const entry of list(templating.list, "templating.list")) {
    const variable = obj(entry, "variable");
    if (variable.type !== "query") continue;
    const query = isObj(variable.query) ? variable.query.query : variable.query;
    out.push([`variable $${variable.name}`, text(query, `variable ${variable.name} query`)]);
  }
  return out;
}

/** The `dotproxy_*` and `process_*` identifiers an expression names. */
function metricNames(expr: string): string[] {
  return [...expr.matchAll(/(?<![a-zA-Z0-9_:])(?:dotproxy|process)_[a-zA-Z0-9_:]*/g)].map((m) =>
    m[0]
  );
}

/** A scrape reduced to what the dashboard needs: series names, types, labels. */
interface Exposed {
  /** Family name to type. */
  types: Map<string, string>;
  /** Series name (histograms as `_bucket`, `_sum`, `_count`) to its family. */
  series: Map<string, string>;
  /** Family name to every label name seen on its samples. */
  labels: Map<string, Set<string>>;
}

function readExposition(body: string): Exposed {
  const types = new Map<string, string>();
  const series = new Map<string, string>();
  const labels = new Map<string, Set<string>>();
  for (const family of parsePrometheus(body).values()) {
    types.set(family.name, family.type);
    const names = family.type === "histogram"
      ? [`${family.name}_bucket`, `${family.name}_sum`, `${family.name}_count`]
      : [family.name];
    for (const s of names) series.set(s, family.name);
    const seen = new Set<string>();
    for (const sample of family.samples) {
      for (const label of Object.keys(sample.labels)) seen.add(label);
    }
    labels.set(family.name, seen);
  }
  return { types, series, labels };
}

async function scrapeRunningProxy(): Promise<Exposed> {
  const upstream = DotServer.start();
  try {
    let exposed: Exposed | undefined;
    await withProxy(
      testConfig([upstream.upstream()], { http: { hostname: "127.0.0.1", port: 0 } }),
      async ({ proxy, port }) => {
        const reply = await udpExchange(port, buildQuery("dashboard.example"));
        assert.ok(reply, "the proxy did not answer");
        const httpPort = proxy.http?.addr.port;
        assert.ok(httpPort);
        const response = await fetch(`http://127.0.0.1:${httpPort}/metrics`, {
          signal: AbortSignal.timeout(5000),
        });
        const body = await response.text();
        assert.equal(response.status, 200);
        exposed = readExposition(body);
      },
    );
    assert.ok(exposed);
    return exposed;
  } finally {
    await upstream.close();
  }
}

/** Label names an expression filters on (`{a="x"}`) or groups by (`by (a, b)`). */
function labelNames(expr: string): string[] {
  const out: string[] = [];
  for (const m of expr.matchAll(/\{([^}]*)\}/g)) {
    for (const l of m[1].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)/g)) out.push(l[1]);
  }
  for (const m of expr.matchAll(/\b(?:by|without)\s*\(([^)]*)\)/g)) {
    for (const l of m[1].split(",")) if (l.trim() !== "") out.push(l.trim());
  }
  return out;
}

function checkBalanced(where: string, expr: string): void {
  const pairs: Record<string, string> = { ")": "(", "]": "[", "}": "{" };
  const stack: string[] = [];
  let quoted = false;
  for (let i = 0; i < expr.length; i++) {
    const c = expr[i];
    if (quoted) {
      if (c === "\\") i++;
      else if (c === '"') quoted = false;
      continue;
    }
    if (c === '"') quoted = true;
    else if (c === "(" || c === "[" || c === "{") stack.push(c);
    else if (c in pairs) assert.equal(stack.pop(), pairs[c], `${where}: unbalanced ${c}`);
  }
  assert.ok(!quoted, `${where}: unterminated string`);
  assert.deepEqual(stack, [], `${where}: unclosed ${stack.join("")}`);
}

Deno.test("dashboard: well-formed Grafana JSON with a Prometheus data source variable", async () => {
  const dashboard = await loadDashboard();
  assert.equal(text(dashboard.uid, "uid"), "dotproxy");
  assert.ok(text(dashboard.title, "title").length > 0);
  const schema = num(dashboard.schemaVersion, "schemaVersion");
  assert.ok(schema >= 36 && schema <= 41, `schemaVersion ${schema}`);

  const variables = list(obj(dashboard.templating, "templating").list, "templating.list")
    .map((v) => obj(v, "variable"));
  const datasource = variables.find((v) => v.name === "datasource");
  assert.ok(datasource, "no datasource variable");
  assert.equal(datasource.type, "datasource");
  assert.equal(datasource.query, "prometheus");
  for (const variable of variables) {
    if (variable.type === "query") {
      assert.deepEqual(variable.datasource, { type: "prometheus", uid: "${datasource}" });
    }
  }

  const ids = new Set<number>();
  const cells = new Set<string>();
  for (const panel of allPanels(dashboard)) {
    const title = text(panel.title, "panel title");
    const id = num(panel.id, `${title} id`);
    assert.ok(!ids.has(id), `panel id ${id} repeated`);
    ids.add(id);
    const grid = obj(panel.gridPos, `${title} gridPos`);
    const [x, y, w, h] = [grid.x, grid.y, grid.w, grid.h].map((v) => num(v, `${title} gridPos`));
    assert.ok(x >= 0 && w > 0 && x + w <= GRID_WIDTH && y >= 0 && h > 0, `${title} gridPos`);
    // No two panels cover the same grid cell.
    for (let row = y; row < y + h; row++) {
      for (let col = x; col < x + w; col++) {
        const cell = `${col},${row}`;
        assert.ok(!cells.has(cell), `${title} overlaps another panel at ${cell}`);
        cells.add(cell);
      }
    }
    if (panel.type === "row") continue;
    assert.deepEqual(panel.datasource, { type: "prometheus", uid: "${datasource}" }, title);
    const targets = list(panel.targets, `${title} targets`);
    assert.ok(targets.length > 0, `${title} has no queries`);
    const refIds = new Set<string>();
    for (const entry of targets) {
      const target = obj(entry, `${title} target`);
      const refId = text(target.refId, `${title} refId`);
      assert.ok(!refIds.has(refId), `${title}: refId ${refId} repeated`);
      refIds.add(refId);
      assert.deepEqual(target.datasource, { type: "prometheus", uid: "${datasource}" }, title);
    }
  }
});

Deno.test("dashboard: PromQL is balanced, rate() wraps counters over $__rate_interval", async () => {
  const dashboard = await loadDashboard();
  for (const [where, expr] of expressions(dashboard)) {
    checkBalanced(where, expr);
    const rates = [...expr.matchAll(/\b(rate|increase|irate)\(/g)].length;
    const wellFormed = [
      ...expr.matchAll(
        /\b(?:rate|increase|irate)\(((?:dotproxy|process)_[a-zA-Z0-9_:]*)(?:\{[^}]*\})?\[\$__rate_interval\]\)/g,
      ),
    ];
    assert.equal(wellFormed.length, rates, `${where}: rate() not over a [$__rate_interval] range`);
    for (const [, name] of wellFormed) {
      assert.match(name, /(_total|_bucket|_sum|_count)$/, `${where}: rate() over ${name}`);
    }
    for (const m of expr.matchAll(/histogram_quantile\(\s*([\d.]+)\s*,(.*)$/g)) {
      const quantile = Number(m[1]);
      assert.ok(quantile > 0 && quantile < 1, `${where}: quantile ${m[1]}`);
      assert.match(m[2], /by \(([^)]*\b)?le\b/, `${where}: histogram_quantile without by (le)`);
      assert.match(m[2], /_bucket\b/, `${where}: histogram_quantile over a non-bucket series`);
    }
  }
});

Deno.test("dashboard: every metric it uses is exposed by a running proxy", async () => {
  const dashboard = await loadDashboard();
  const exposed = await scrapeRunningProxy();
  const used = new Set<string>();
  for (const [where, expr] of expressions(dashboard)) {
    const names = metricNames(expr);
    for (const name of names) {
      used.add(name);
      const family = exposed.series.get(name);
      if (family === undefined) {
        const base = name.replace(/_(bucket|sum|count)$/, "");
        const hint = exposed.types.get(base) === "histogram" || exposed.types.has(name)
          ? ` (${base} is a ${exposed.types.get(base) ?? exposed.types.get(name)})`
          : "";
        assert.fail(`${where}: ${name} is not exposed by /metrics${hint}`);
      }
    }
    // Labels the query filters or groups by exist on one of the metrics it names.
    const available = new Set<string>(TARGET_LABELS);
    available.add("le");
    for (const name of names) {
      for (const label of exposed.labels.get(exposed.series.get(name) ?? "") ?? []) {
        available.add(label);
      }
    }
    for (const label of labelNames(expr)) {
      assert.ok(available.has(label), `${where}: label ${label} is on none of ${names}`);
    }
  }
  for (const name of REQUIRED) assert.ok(used.has(name), `the dashboard does not chart ${name}`);
});

Deno.test("dashboard: hedges by result, retries by reason, health checks by result, cache hit ratio", async () => {
  const dashboard = await loadDashboard();
  const exprs = expressions(dashboard).map(([, expr]) => expr);
  const find = (family: string, by: RegExp) =>
    exprs.some((expr) => expr.includes(family) && by.test(expr));
  assert.ok(find("dotproxy_upstream_hedges_total", /by \(upstream, result\)/), "hedges by result");
  assert.ok(
    find("dotproxy_upstream_hedges_total", /\/ clamp_min\(sum\(rate\(dotproxy_queries_total/),
    "hedges per query, to hold against --hedge-budget",
  );
  assert.ok(find("dotproxy_upstream_retries_total", /by \(upstream, reason\)/), "retries");
  assert.ok(find("dotproxy_upstream_health_checks_total", /by \(upstream, result\)/), "checks");
  const hitRatio = exprs.find((expr) =>
    expr.includes('dotproxy_cache_lookups_total{job=~"$job",instance=~"$instance",result="hit"}')
  );
  assert.ok(hitRatio, "cache hits");
  assert.match(hitRatio, /\/ clamp_min\(sum\(rate\(dotproxy_cache_lookups_total\{[^}]*\}/);
  const panel = allPanels(dashboard).find((p) => p.title === "Cache hit ratio");
  assert.equal(
    obj(obj(panel?.fieldConfig, "fieldConfig").defaults, "defaults").unit,
    "percentunit",
  );
});
