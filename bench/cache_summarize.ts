/**
 * Summarizes one run of bench/cache_bench.sh: reads DIR/runs.tsv, DIR/rss.tsv and
 * DIR/meta.txt, writes DIR/summary.md (the tables and the checks of issue 9).
 *
 * Usage: deno run --allow-read=DIR --allow-write=DIR bench/cache_summarize.ts DIR
 */

import { fmt, mean, num, type Row } from "./summary_lib.ts";

function readTsv(path: string): Row[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch {
    return [];
  }
  const [header, ...lines] = text.trim().split("\n");
  const names = header.split("\t");
  return lines.filter((l) => l !== "").map((line) => {
    const cells = line.split("\t");
    return Object.fromEntries(names.map((n, i) => [n, cells[i] ?? ""]));
  });
}

function fmtCpu(value: number | null): string {
  return value === null ? "–" : value.toPrecision(3);
}

interface Group {
  target: string;
  runs: number;
  qps: number | null;
  qpsMin: number | null;
  qpsMax: number | null;
  lost: number;
  p50: number | null;
  p99: number | null;
  p999: number | null;
  max: number | null;
  cpu: number | null;
  core0: number | null;
  core1: number | null;
  other0: number | null;
}

function group(rows: Row[], phase: string): Map<string, Group> {
  const out = new Map<string, Group>();
  const targets = [...new Set(rows.filter((r) => r.phase === phase).map((r) => r.target))];
  for (const target of targets) {
    const mine = rows.filter((r) => r.phase === phase && r.target === target);
    const qps = mine.map((r) => num(r.qps)).filter((v): v is number => v !== null);
    out.set(target, {
      target,
      runs: mine.length,
      qps: mean(qps),
      qpsMin: qps.length ? Math.min(...qps) : null,
      qpsMax: qps.length ? Math.max(...qps) : null,
      lost: mine.reduce((sum, r) => sum + (num(r.lost) ?? 0), 0),
      p50: mean(mine.map((r) => num(r.p50_ms))),
      p99: mean(mine.map((r) => num(r.p99_ms))),
      p999: mean(mine.map((r) => num(r.p999_ms))),
      max: mine.reduce<number | null>((m, r) => {
        const v = num(r.max_ms);
        return v === null ? m : m === null ? v : Math.max(m, v);
      }, null),
      cpu: mean(mine.map((r) => num(r.cpu_s_per_1k))),
      core0: mean(mine.map((r) => num(r.proxy_core_busy))),
      core1: mean(mine.map((r) => num(r.load_core_busy))),
      other0: mean(mine.map((r) => num(r.other_core0))),
    });
  }
  return out;
}

function pct(value: number | null): string {
  return value === null ? "–" : `${Math.round(value * 100)}%`;
}

function qpsCell(g: Group): string {
  return g.runs > 1 ? `${fmt(g.qps)} (${fmt(g.qpsMin)}–${fmt(g.qpsMax)})` : fmt(g.qps);
}

function ratio(a: number | null | undefined, b: number | null | undefined): number | null {
  return a === null || a === undefined || b === null || b === undefined || b === 0 ? null : a / b;
}

interface Check {
  check: string;
  value: string;
  goal: string;
  pass: boolean | null;
}

const dir = Deno.args[0];
if (!dir) {
  console.error("usage: cache_summarize.ts DIR");
  Deno.exit(2);
}
const rows = readTsv(`${dir}/runs.tsv`);
const rss = readTsv(`${dir}/rss.tsv`);
let meta = "";
try {
  meta = Deno.readTextFileSync(`${dir}/meta.txt`).trim();
} catch {
  // no meta
}

const out: string[] = [];
const checks: Check[] = [];
out.push(`# dotproxy cache benchmark ${dir.split("/").pop()}`, "");
out.push("```", meta, "```", "");
out.push(
  "Target process on core 0; dnsperf (UDP) and the upstream Unbound (DoT server) on core 1. " +
    "CPU s / 1k q: user+system CPU of the target process per 1,000 answers. Core busy from " +
    "/proc/stat. qps: mean of the rounds (range in brackets).",
  "",
);

const hits = group(rows, "hits");
if (hits.size > 0) {
  out.push("## Cache hits, UDP saturation (1,000 hot names, dnsperf -c 8 -q 256)", "");
  out.push(
    "| target | qps | lost | CPU s / 1k q | core 0 busy | core 1 busy | other load, core 0 |",
  );
  out.push("|---|--:|--:|--:|--:|--:|--:|");
  for (const g of hits.values()) {
    out.push(
      `| ${g.target} | ${qpsCell(g)} | ${g.lost} | ${fmtCpu(g.cpu)} | ${pct(g.core0)} | ${
        pct(g.core1)
      } | ${pct(g.other0)} |`,
    );
  }
  out.push("");
  const d = hits.get("dotproxy");
  const responder = hits.get("deno-responder");
  const r = ratio(d?.qps, responder?.qps);
  checks.push({
    check: "hits: qps, dotproxy / bare Deno responder",
    value: fmt(r, 2),
    goal: "≥ 0.9",
    pass: r === null ? null : r >= 0.9,
  });
  const cpuRatio = ratio(d?.cpu, responder?.cpu);
  checks.push({
    check: "hits: CPU per query, dotproxy / bare Deno responder",
    value: fmt(cpuRatio, 2),
    goal: "(≈ 1/0.9 = 1.11)",
    pass: null,
  });
  for (const peer of ["dnsdist-cache", "unbound-cache"]) {
    const p = hits.get(peer);
    checks.push({
      check: `hits: qps, dotproxy / ${peer}`,
      value: fmt(ratio(d?.qps, p?.qps), 2),
      goal: "(compare)",
      pass: null,
    });
    checks.push({
      check: `hits: CPU per query, dotproxy / ${peer}`,
      value: fmt(ratio(d?.cpu, p?.cpu), 2),
      goal: "(compare)",
      pass: null,
    });
  }
}

const fixed = group(rows, "fixed");
if (fixed.size > 0) {
  out.push("## Cache hits at a fixed 2,000 qps, UDP", "");
  // (No core-busy columns: /proc/stat is tick-sampled and misreads light load.)
  out.push("| target | lost | p50 ms | p99 ms | p99.9 ms | max ms | CPU s / 1k q |");
  out.push("|---|--:|--:|--:|--:|--:|--:|");
  for (const g of fixed.values()) {
    out.push(
      `| ${g.target} | ${g.lost} | ${fmt(g.p50, 3)} | ${fmt(g.p99, 3)} | ${fmt(g.p999, 3)} | ${
        fmt(g.max, 1)
      } | ${fmtCpu(g.cpu)} |`,
    );
  }
  out.push("");
  const p99 = fixed.get("dotproxy")?.p99 ?? null;
  checks.push({
    check: "hits at 2,000 qps: dotproxy p99 (ms)",
    value: fmt(p99, 3),
    goal: "≤ 0.5 ms",
    pass: p99 === null ? null : p99 <= 0.5,
  });
}

const mix = group(rows, "mix");
const mixFixed = group(rows, "mixfixed");
if (mix.size > 0) {
  out.push(
    "## Realistic mix: 80% over 1,000 hot names, 20% unique names (misses), UDP",
    "",
    "Saturation (dnsperf -c 8 -q 256, with per-query latencies) and a fixed 2,000 qps.",
    "",
  );
  out.push(
    "| target | qps at saturation | lost | p50 ms | p99 ms | CPU s / 1k q | p50 ms at 2,000 qps | p99 ms at 2,000 qps |",
  );
  out.push("|---|--:|--:|--:|--:|--:|--:|--:|");
  for (const g of mix.values()) {
    const f = mixFixed.get(g.target);
    out.push(
      `| ${g.target} | ${qpsCell(g)} | ${g.lost} | ${fmt(g.p50, 3)} | ${fmt(g.p99, 3)} | ${
        fmtCpu(g.cpu)
      } | ${fmt(f?.p50 ?? null, 3)} | ${fmt(f?.p99 ?? null, 3)} |`,
    );
  }
  out.push("");
  const d = mix.get("dotproxy");
  const u = mix.get("unbound-cache");
  const r = ratio(d?.qps, u?.qps);
  checks.push({
    check: "mix: qps, dotproxy / Unbound with its cache",
    value: fmt(r, 2),
    goal: "(compare)",
    pass: null,
  });
  const p = ratio(mixFixed.get("dotproxy")?.p99, mixFixed.get("unbound-cache")?.p99);
  checks.push({
    check: "mix at 2,000 qps: p99, dotproxy / Unbound",
    value: fmt(p, 2),
    goal: "(compare)",
    pass: null,
  });
}

const miss = group(rows, "miss");
const missFixed = group(rows, "missfixed");
if (miss.size > 0) {
  out.push("## Miss path: unique names, UDP", "");
  out.push(
    "| target | qps at saturation | lost | CPU s / 1k q (saturation) | CPU s / 1k q at fixed rate | core 0 busy | other load, core 0 |",
  );
  out.push("|---|--:|--:|--:|--:|--:|--:|");
  for (const g of miss.values()) {
    out.push(
      `| ${g.target} | ${qpsCell(g)} | ${g.lost} | ${fmtCpu(g.cpu)} | ${
        fmtCpu(missFixed.get(g.target)?.cpu ?? null)
      } | ${pct(g.core0)} | ${pct(g.other0)} |`,
    );
  }
  out.push("");
  // Paired by round (the targets of one round ran back to back, so they share the machine's
  // load of the moment): the mean of the per-round ratios.
  const paired = (phase: string, peer: string, field: string): number | null => {
    const ratios: number[] = [];
    for (const row of rows.filter((r) => r.phase === phase && r.target === "dotproxy")) {
      const other = rows.find((r) =>
        r.phase === phase && r.target === peer && r.round === row.round
      );
      const v = ratio(num(row[field]), num(other?.[field]));
      if (v !== null) ratios.push(v);
    }
    return mean(ratios);
  };
  for (const peer of ["dotproxy-nocache", "dotproxy-7c925b5"]) {
    const q = paired("miss", peer, "qps");
    checks.push({
      check: `miss: qps, cache on / ${peer}, paired by round`,
      value: fmt(q, 3),
      goal: "≥ 0.95",
      pass: q === null ? null : q >= 0.95,
    });
    const c = paired("missfixed", peer, "cpu_s_per_1k");
    checks.push({
      check: `miss at fixed rate: CPU per query, cache on / ${peer}, paired by round`,
      value: fmt(c, 3),
      goal: "≤ 1.05",
      pass: c === null ? null : c <= 1.05,
    });
    const cs = paired("miss", peer, "cpu_s_per_1k");
    checks.push({
      check: `miss at saturation: CPU per query, cache on / ${peer}, paired by round`,
      value: fmt(cs, 3),
      goal: "≤ 1.05",
      pass: cs === null ? null : cs <= 1.05,
    });
  }
  const on = miss.get("dotproxy");
  for (const peer of ["dotproxy-nocache", "dotproxy-7c925b5"]) {
    const p = miss.get(peer);
    const q = ratio(on?.qps, p?.qps);
    checks.push({
      check: `miss: qps, cache on / ${peer}, means`,
      value: fmt(q, 3),
      goal: "≥ 0.95",
      pass: q === null ? null : q >= 0.95,
    });
    const c = ratio(missFixed.get("dotproxy")?.cpu, missFixed.get(peer)?.cpu);
    checks.push({
      check: `miss at fixed rate: CPU per query, cache on / ${peer}, means`,
      value: fmt(c, 3),
      goal: "≤ 1.05",
      pass: c === null ? null : c <= 1.05,
    });
  }
}

if (rss.length > 0) {
  out.push("## RSS of a fresh dotproxy under a stream of unique names (MiB)", "");
  const sizes = [...new Set(rss.map((r) => r.cache_size))];
  const steps = [...new Set(rss.map((r) => r.step))];
  // Names sent so far, as answered for the first setting (rounded to thousands).
  const names = (step: string) => {
    if (step === "0") return "at start";
    const first = rss.filter((r) => r.cache_size === sizes[0] && num(r.step)! <= num(step)!);
    const sent = first.reduce((sum, r) => sum + (num(r.completed) ?? 0), 0);
    return `after ${fmt(Math.round(sent / 1000) * 1000)} names`;
  };
  out.push(`| --cache-size | ${steps.map(names).join(" | ")} | peak (VmHWM) |`);
  out.push(`|---|${steps.map(() => "--:").join("|")}|--:|`);
  for (const size of sizes) {
    const mine = rss.filter((r) => r.cache_size === size);
    const cells = steps.map((s) => {
      const row = mine.find((r) => r.step === s);
      return row ? fmt((num(row.vmrss_kb) ?? 0) / 1024, 1) : "–";
    });
    const peak = Math.max(...mine.map((r) => num(r.vmhwm_kb) ?? 0)) / 1024;
    const label = size === "0" ? "0 (cache off)" : fmt(num(size));
    out.push(`| ${label} | ${cells.join(" | ")} | ${fmt(peak, 1)} |`);
  }
  out.push("");
  for (const size of sizes) {
    const mine = rss.filter((r) => r.cache_size === size && r.step !== "0");
    if (mine.length < 3) continue;
    const second = num(mine[1].vmrss_kb)!;
    const last = num(mine[mine.length - 1].vmrss_kb)!;
    const growth = last / second;
    checks.push({
      check: `rss, --cache-size ${size}: last sample / second sample (flat)`,
      value: fmt(growth, 2),
      goal: "≤ 1.10",
      pass: growth <= 1.1,
    });
  }
}

out.push("## Checks", "");
out.push("| check | value | goal | result |");
out.push("|---|--:|---|---|");
for (const c of checks) {
  out.push(
    `| ${c.check} | ${c.value} | ${c.goal} | ${c.pass === null ? "–" : c.pass ? "PASS" : "FAIL"} |`,
  );
}
out.push("");
Deno.writeTextFileSync(`${dir}/summary.md`, out.join("\n"));
