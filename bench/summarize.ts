/**
 * Summarizes one benchmark run of bench/run.sh: reads DIR/runs.tsv, DIR/meta.json,
 * DIR/dead.tsv and DIR/failures.tsv, writes DIR/summary.json and DIR/summary.md (the
 * Markdown table with the ratios of issue 5).
 *
 * Usage: deno run --allow-read=DIR --allow-write=DIR bench/summarize.ts DIR
 */

import { fmt, mean, num, readPlainTsv, readTsv, type Row } from "./summary_lib.ts";

interface Group {
  kind: string;
  target: string;
  mode: string;
  runs: number;
  qps: number;
  qpsMin: number;
  qpsMax: number;
  sent: number;
  completed: number;
  lost: number;
  noerror: number;
  meanMs: number;
  p50Ms: number | null;
  p99Ms: number | null;
  p999Ms: number | null;
  maxMs: number | null;
  cpuSPer1k: number | null;
  upstreamCpuSPer1k: number | null;
  proxyCoreBusy: number | null;
  loadCoreBusy: number | null;
  foreignCores: number | null;
  /** Share of the machine's CPU time the hypervisor stole during the run (0-1). */
  steal: number | null;
  namesWrapped: boolean;
}

interface Check {
  check: string;
  dotproxy: number | null;
  peer: number | null;
  ratio: number | null;
  goal: string;
  pass: boolean | null;
}

const ORDER = [
  "dotproxy",
  "dotproxy-before",
  "stubby",
  "dnsdist",
  "unbound-fwd",
  "deno-forwarder",
  "deno-responder",
  "unbound-direct",
];

function sum(xs: (number | null)[]): number {
  return xs.reduce((a: number, b) => a + (b ?? 0), 0);
}

function group(rows: Row[]): Group[] {
  const byKey = new Map<string, Row[]>();
  for (const r of rows) {
    const key = `${r.kind}|${r.target}|${r.mode}`;
    const list = byKey.get(key) ?? [];
    list.push(r);
    byKey.set(key, list);
  }
  const groups: Group[] = [];
  for (const list of byKey.values()) {
    const qps = list.map((r) => num(r.qps) ?? 0);
    groups.push({
      kind: list[0].kind,
      target: list[0].target,
      mode: list[0].mode,
      runs: list.length,
      qps: mean(qps) ?? 0,
      qpsMin: Math.min(...qps),
      qpsMax: Math.max(...qps),
      sent: sum(list.map((r) => num(r.sent))),
      completed: sum(list.map((r) => num(r.completed))),
      lost: sum(list.map((r) => num(r.lost))),
      noerror: sum(list.map((r) => num(r.noerror))),
      meanMs: mean(list.map((r) => num(r.mean_ms))) ?? 0,
      p50Ms: mean(list.map((r) => num(r.p50_ms))),
      p99Ms: mean(list.map((r) => num(r.p99_ms))),
      p999Ms: mean(list.map((r) => num(r.p999_ms))),
      maxMs: Math.max(...list.map((r) => num(r.max_ms) ?? -1)) < 0
        ? null
        : Math.max(...list.map((r) => num(r.max_ms) ?? -1)),
      cpuSPer1k: mean(list.map((r) => num(r.cpu_s_per_1k))),
      upstreamCpuSPer1k: mean(list.map((r) => num(r.upstream_cpu_s_per_1k))),
      proxyCoreBusy: mean(list.map((r) => num(r.proxy_core_busy))),
      loadCoreBusy: mean(list.map((r) => num(r.load_core_busy))),
      foreignCores: mean(list.map((r) => num(r.foreign_cores))),
      steal: mean(list.map((r) => num(r.steal))),
      namesWrapped: list.some((r) => r.names_wrapped === "1"),
    });
  }
  const rank = (t: string): number => (ORDER.indexOf(t) + 100) % 100;
  groups.sort((a, b) =>
    a.kind.localeCompare(b.kind) || rank(a.target) - rank(b.target) ||
    b.mode.localeCompare(a.mode)
  );
  return groups;
}

/** Three significant digits, but whole numbers from 1,000 up. */
function fmtSig(n: number | null): string {
  if (n === null) return "–";
  if (Math.abs(n) >= 1000) return fmt(n);
  return n === 0 ? "0" : n.toPrecision(3);
}

function other(n: number | null): string {
  return n === null ? "–" : Math.max(0, n).toFixed(2);
}

function pct(n: number | null): string {
  return n === null ? "–" : `${Math.round(n * 100)}%`;
}

function main(): void {
  const dir = Deno.args[0];
  if (!dir) throw new Error("usage: summarize.ts RESULTS_DIR");
  const meta = JSON.parse(Deno.readTextFileSync(`${dir}/meta.json`));
  const rows = readTsv(`${dir}/runs.tsv`);
  const dead = readPlainTsv(`${dir}/dead.tsv`);
  const failures = readPlainTsv(`${dir}/failures.tsv`);
  const groups = group(rows);

  // Peak RSS per target: the largest VmHWM seen (it is the process's lifetime peak).
  const peakKb = new Map<string, number>();
  for (const r of rows) {
    const kb = num(r.vmhwm_kb) ?? 0;
    peakKb.set(r.target, Math.max(peakKb.get(r.target) ?? 0, kb));
  }

  const find = (kind: string, target: string, mode: string): Group | undefined =>
    groups.find((g) => g.kind === kind && g.target === target && g.mode === mode);

  const ratioCheck = (
    check: string,
    a: number | null | undefined,
    b: number | null | undefined,
    goal: string,
    ok: (r: number) => boolean,
  ): Check => {
    const dp = a ?? null;
    const peer = b ?? null;
    const ratio = dp !== null && peer !== null && peer > 0 ? dp / peer : null;
    return { check, dotproxy: dp, peer, ratio, goal, pass: ratio === null ? null : ok(ratio) };
  };
  const dpFixed = find("fixed", "dotproxy", "udp");
  const rssDp = peakKb.get("dotproxy");
  const rssResp = peakKb.get("deno-responder");
  const checks: Check[] = [
    ratioCheck(
      "UDP: CPU s per 1k queries, dotproxy / dnsdist",
      find("sat", "dotproxy", "udp")?.cpuSPer1k,
      find("sat", "dnsdist", "udp")?.cpuSPer1k,
      "≤ 0.8",
      (r) => r <= 0.8,
    ),
    ratioCheck(
      "UDP: qps, dotproxy / Stubby",
      find("sat", "dotproxy", "udp")?.qps,
      find("sat", "stubby", "udp")?.qps,
      "≥ 1.5",
      (r) => r >= 1.5,
    ),
    ratioCheck(
      "UDP: qps, dotproxy / Unbound forwarder",
      find("sat", "dotproxy", "udp")?.qps,
      find("sat", "unbound-fwd", "udp")?.qps,
      "≥ 1.2",
      (r) => r >= 1.2,
    ),
    ratioCheck(
      "TCP: qps, dotproxy / Unbound forwarder",
      find("sat", "dotproxy", "tcp")?.qps,
      find("sat", "unbound-fwd", "tcp")?.qps,
      "≥ 1.0",
      (r) => r >= 1.0,
    ),
    {
      check: `UDP at ${meta.fixed_rate_qps} qps: dotproxy p50 (ms)`,
      dotproxy: dpFixed?.p50Ms ?? null,
      peer: find("fixed", "dnsdist", "udp")?.p50Ms ?? null,
      ratio: null,
      goal: "≤ 0.4 ms",
      pass: dpFixed?.p50Ms == null ? null : dpFixed.p50Ms <= 0.4,
    },
    {
      check: `UDP at ${meta.fixed_rate_qps} qps: dotproxy p99 (ms)`,
      dotproxy: dpFixed?.p99Ms ?? null,
      peer: null,
      ratio: null,
      goal: "≤ 1.0 ms",
      pass: dpFixed?.p99Ms == null ? null : dpFixed.p99Ms <= 1.0,
    },
    {
      check: `UDP at ${meta.fixed_rate_qps} qps: dotproxy queries lost`,
      dotproxy: dpFixed ? dpFixed.lost : null,
      peer: null,
      ratio: null,
      goal: "0",
      pass: dpFixed ? dpFixed.lost === 0 : null,
    },
    ratioCheck(
      "Peak RSS, dotproxy / Deno responder",
      rssDp === undefined ? null : rssDp / 1024,
      rssResp === undefined ? null : rssResp / 1024,
      "≤ 1.3",
      (r) => r <= 1.3,
    ),
  ];
  // With --before: the working tree against that commit, same run (issue 8: within 5%).
  if (find("sat", "dotproxy-before", "udp")) {
    checks.push(
      ratioCheck(
        `UDP: qps, dotproxy / dotproxy at ${meta.before_rev}`,
        find("sat", "dotproxy", "udp")?.qps,
        find("sat", "dotproxy-before", "udp")?.qps,
        "≥ 0.95",
        (r) => r >= 0.95,
      ),
      ratioCheck(
        `UDP: CPU s per 1k queries, dotproxy / dotproxy at ${meta.before_rev}`,
        find("sat", "dotproxy", "udp")?.cpuSPer1k,
        find("sat", "dotproxy-before", "udp")?.cpuSPer1k,
        "≤ 1.05",
        (r) => r <= 1.05,
      ),
    );
  }

  const md: string[] = [];
  const v = meta.versions;
  const m = meta.machine;
  md.push(`# dotproxy benchmark ${meta.stamp}${meta.quick ? " (quick smoke run)" : ""}`);
  md.push("");
  md.push(
    `Machine: ${m.nproc} cores, ${m.cpu}, Linux ${m.kernel}. Target under test on core 0; ` +
      "dnsperf and the upstream Unbound (DoT server) on core 1.",
  );
  md.push("");
  md.push(
    `Versions: dotproxy ${v.dotproxy}; ${v.deno}; Unbound ${v.unbound}; ${v.stubby}; ` +
      `${v.dnsdist}; dnsperf ${v.dnsperf}; ${v.openssl}.`,
  );
  md.push("");
  md.push(
    `Saturation runs: unique names (no cache can answer), ${meta.rounds} round(s) of ` +
      `${meta.duration_s} s per target and transport, order rotated, mean of the rounds ` +
      `(qps range in brackets); dnsperf UDP \`${meta.dnsperf_udp}\`, TCP \`${meta.dnsperf_tcp}\` ` +
      `(pipelined connections). Fixed rate: ${meta.fixed_rate_qps} qps over UDP for ` +
      `${meta.fixed_duration_s} s.` +
      (meta.saturation_latency
        ? ""
        : " p99 of saturation runs not measured (`--sat-latency` turns it on): dnsperf -v" +
          " costs load-core CPU, and at saturation p99 is mostly queueing.") +
      (meta.dotproxy_args ? ` dotproxy args: \`${meta.dotproxy_args}\`.` : "") +
      (meta.v8_flags
        ? ` dotproxy, dotproxy-before and the bare Deno forwarder ran with \`${meta.v8_flags}\`` +
          " (the flags dotproxy ships with)."
        : ""),
  );
  if (meta.before_rev) {
    md.push(
      `dotproxy-before: commit ${meta.before_rev}, the same harness and flags` +
        (meta.before_args ? ` plus \`${meta.before_args}\`` : "") + ".",
    );
  }
  md.push("");

  md.push("## Saturation");
  md.push("");
  md.push(
    "| target | mode | qps | lost | mean ms | p99 ms | CPU s / 1k q | upstream CPU s / 1k q | core 0 busy | core 1 busy | other load |",
  );
  md.push("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
  for (const g of groups.filter((g) => g.kind === "sat")) {
    const range = g.runs > 1 ? ` (${fmt(g.qpsMin)}–${fmt(g.qpsMax)})` : "";
    const upstream = g.target === "deno-responder" || g.target === "unbound-direct"
      ? "–"
      : fmtSig(g.upstreamCpuSPer1k);
    md.push(
      `| ${g.target} | ${g.mode.toUpperCase()} | ${fmt(g.qps)}${range} | ${fmt(g.lost)} | ` +
        `${fmt(g.meanMs, 2)} | ${fmt(g.p99Ms, 2)} | ${fmtSig(g.cpuSPer1k)} | ${upstream} | ` +
        `${pct(g.proxyCoreBusy)} | ${pct(g.loadCoreBusy)} | ${other(g.foreignCores)} |`,
    );
  }
  md.push("");
  md.push(
    "CPU s / 1k q: user+system CPU seconds of the target process (all threads) per 1,000 " +
      "queries answered; for unbound-direct it is the upstream Unbound itself. Upstream CPU: " +
      "the same for the upstream Unbound (DoT server), the cost a proxy puts on its upstream. " +
      "Core busy: /proc/stat. Other load: CPU (in cores) used by anything but the target, " +
      "the upstream and dnsperf during the run (other processes on the machine).",
  );
  md.push("");

  md.push(`## Fixed rate, ${fmt(meta.fixed_rate_qps)} qps, UDP`);
  md.push("");
  md.push(
    "| target | qps | lost | mean ms | p50 ms | p99 ms | p99.9 ms | max ms | CPU s / 1k q | CPU steal |",
  );
  md.push("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
  for (const g of groups.filter((g) => g.kind === "fixed")) {
    md.push(
      `| ${g.target} | ${fmt(g.qps)} | ${fmt(g.lost)} | ${fmt(g.meanMs, 3)} | ` +
        `${fmt(g.p50Ms, 3)} | ${fmt(g.p99Ms, 3)} | ${fmt(g.p999Ms, 3)} | ${fmt(g.maxMs, 1)} | ` +
        `${fmtSig(g.cpuSPer1k)} | ${g.steal === null ? "–" : `${(g.steal * 100).toFixed(1)}%`} |`,
    );
  }
  md.push("");
  md.push(
    "CPU steal: the share of the machine's CPU time the hypervisor gave to other guests during " +
      "the run (/proc/stat); with a few percent of it, every stage of every target is slower.",
  );
  md.push("");

  md.push("## Peak RSS (VmHWM of the target process over the whole run)");
  md.push("");
  md.push("| target | peak RSS MiB |");
  md.push("|---|--:|");
  for (const t of ORDER) {
    const kb = peakKb.get(t);
    if (kb !== undefined) md.push(`| ${t} | ${fmt(kb / 1024, 1)} |`);
  }
  md.push("");

  md.push("## Issue 5 targets");
  md.push("");
  md.push("| check | dotproxy | peer | ratio | goal | result |");
  md.push("|---|--:|--:|--:|---|---|");
  for (const c of checks) {
    const res = c.pass === null ? "n/a" : c.pass ? "PASS" : "FAIL";
    md.push(
      `| ${c.check} | ${fmtSig(c.dotproxy)} | ${fmtSig(c.peer)} | ` +
        `${c.ratio === null ? "–" : c.ratio.toFixed(2)} | ${c.goal} | ${res} |`,
    );
  }
  md.push("");

  const notes: string[] = [];
  if ((meta.load_before_start_cores ?? 0) > 0.1) {
    notes.push(
      `The machine was not idle before the start (${meta.load_before_start_cores} cores busy).`,
    );
  }
  for (const [t, why] of dead) notes.push(`**${t} was not measured**: ${why}.`);
  for (const f of failures) notes.push(`${f[0]} round ${f[1]} ${f[2]} ${f[3]}: failed (${f[4]}).`);
  for (const g of groups) {
    if (g.kind !== "sat" || g.target === "unbound-direct") continue;
    if ((g.loadCoreBusy ?? 0) >= 0.95 && (g.proxyCoreBusy ?? 1) < 0.9) {
      notes.push(
        `${g.target} ${g.mode.toUpperCase()}: core 1 (load generator + upstream) was ` +
          `${pct(g.loadCoreBusy)} busy and core 0 only ${pct(g.proxyCoreBusy)}: the ` +
          "target was not the bottleneck, its qps is a lower bound.",
      );
    }
    if ((g.foreignCores ?? 0) > 0.1) {
      notes.push(
        `${g.target} ${g.mode.toUpperCase()}: other processes used ${other(g.foreignCores)} ` +
          "cores during the runs: the numbers are skewed; run again on an idle machine.",
      );
    }
    if (g.namesWrapped && (g.target === "dotproxy" || g.target === "unbound-fwd")) {
      notes.push(`${g.target} ${g.mode}: names repeated within a run; a cache could have helped.`);
    }
    if (g.noerror < g.completed) {
      notes.push(
        `${g.target} ${g.mode}: ${fmt(g.completed - g.noerror)} answers were not NOERROR.`,
      );
    }
  }
  if (notes.length > 0) {
    md.push("## Notes");
    md.push("");
    for (const n of notes) md.push(`- ${n}`);
    md.push("");
  }

  Deno.writeTextFileSync(`${dir}/summary.md`, md.join("\n"));
  Deno.writeTextFileSync(
    `${dir}/summary.json`,
    JSON.stringify(
      { meta, groups, peakRssKb: Object.fromEntries(peakKb), checks, dead, failures, notes },
      null,
      2,
    ) + "\n",
  );
}

if (import.meta.main) main();
