/**
 * Summarizes one run of bench/listeners.sh: reads DIR/runs.tsv, DIR/idle.tsv, DIR/meta.json,
 * DIR/skipped.tsv and DIR/failures.tsv, writes DIR/summary.json and DIR/summary.md (the tables
 * and dotproxy's ratios to each peer, issues 25 and 26).
 *
 * Usage: deno run --allow-read=DIR --allow-write=DIR bench/listeners_summarize.ts DIR
 *
 * @module
 */

import { fmt, mean, num, readPlainTsv, readTsv, type Row } from "./summary_lib.ts";

const TARGETS = ["dotproxy", "dnsdist", "unbound"];
const PEERS = ["dnsdist", "unbound"];
const CASES: Record<string, string> = {
  "dot-hits": "DoT, cache hits",
  "dot-misses": "DoT, misses (unique names)",
  "dot-conn1": "DoT hits, 1 query per connection",
  "dot-conn10": "DoT hits, 10 queries per connection",
  "dot-conn100": "DoT hits, 100 queries per connection",
  "doh-h2-hits": "DoH HTTP/2 GET, cache hits",
  "doh-h2-post": "DoH HTTP/2 POST, one cached query",
  "doh-h2-misses": "DoH HTTP/2 GET, misses (one connection)",
  "doh-h1-hits": "DoH HTTP/1.1 GET, cache hits",
};

function pct(n: number | null): string {
  return n === null ? "–" : `${Math.round(n * 100)}%`;
}

/** One target and case, its rounds averaged. */
interface Load {
  target: string;
  case: string;
  runs: number;
  qps: number;
  qpsMin: number;
  qpsMax: number;
  sent: number;
  ok: number;
  lost: number;
  meanMs: number | null;
  cpuUsPerQ: number | null;
  qpsPerCpu: number | null;
  upstreamCpuUsPerQ: number | null;
  proxyCoreBusy: number | null;
  loadCoreBusy: number | null;
  foreignCores: number | null;
  steal: number | null;
}

interface Idle {
  target: string;
  proto: string;
  count: number;
  open: number;
  failed: number;
  held: number;
  rssBeforeKb: number;
  rssAfterKb: number;
  kbPerConn: number | null;
  cpuMsPerConn: number | null;
}

interface Ratio {
  what: string;
  peer: string;
  dotproxy: number | null;
  other: number | null;
  ratio: number | null;
  better: "higher" | "lower";
}

function loads(rows: Row[]): Load[] {
  const by = new Map<string, Row[]>();
  for (const r of rows) {
    const k = `${r.target}|${r.case}`;
    by.set(k, [...(by.get(k) ?? []), r]);
  }
  const out: Load[] = [];
  for (const list of by.values()) {
    const qps = list.map((r) => num(r.qps) ?? 0);
    const total = (f: string) => list.reduce((a, r) => a + (num(r[f]) ?? 0), 0);
    out.push({
      target: list[0].target,
      case: list[0].case,
      runs: list.length,
      qps: mean(qps) ?? 0,
      qpsMin: Math.min(...qps),
      qpsMax: Math.max(...qps),
      sent: total("sent"),
      ok: total("ok"),
      lost: total("lost"),
      meanMs: mean(list.map((r) => num(r.mean_ms))),
      cpuUsPerQ: mean(list.map((r) => num(r.cpu_us_per_q))),
      qpsPerCpu: mean(list.map((r) => num(r.qps_per_cpu))),
      upstreamCpuUsPerQ: mean(list.map((r) => num(r.upstream_cpu_us_per_q))),
      proxyCoreBusy: mean(list.map((r) => num(r.proxy_core_busy))),
      loadCoreBusy: mean(list.map((r) => num(r.load_core_busy))),
      foreignCores: mean(list.map((r) => num(r.foreign_cores))),
      steal: mean(list.map((r) => num(r.steal))),
    });
  }
  const caseRank = (c: string) => Object.keys(CASES).indexOf(c);
  return out.sort((a, b) =>
    caseRank(a.case) - caseRank(b.case) || TARGETS.indexOf(a.target) - TARGETS.indexOf(b.target)
  );
}

function idles(rows: Row[]): Idle[] {
  return rows.map((r) => ({
    target: r.target,
    proto: r.proto,
    count: num(r.count) ?? 0,
    open: num(r.open) ?? 0,
    failed: num(r.failed) ?? 0,
    held: num(r.held) ?? 0,
    rssBeforeKb: num(r.rss_before_kb) ?? 0,
    rssAfterKb: num(r.rss_after_kb) ?? 0,
    kbPerConn: num(r.kb_per_conn),
    cpuMsPerConn: num(r.cpu_ms_per_conn),
  }));
}

function ratios(load: Load[], idle: Idle[]): Ratio[] {
  const out: Ratio[] = [];
  const find = (t: string, c: string) => load.find((l) => l.target === t && l.case === c);
  for (const c of Object.keys(CASES)) {
    const d = find("dotproxy", c);
    if (!d) continue;
    for (const p of PEERS) {
      const o = find(p, c);
      if (!o) continue;
      out.push({
        what: `${CASES[c]}: queries per CPU-second`,
        peer: p,
        dotproxy: d.qpsPerCpu,
        other: o.qpsPerCpu,
        ratio: d.qpsPerCpu !== null && o.qpsPerCpu ? d.qpsPerCpu / o.qpsPerCpu : null,
        better: "higher",
      });
      out.push({
        what: `${CASES[c]}: qps`,
        peer: p,
        dotproxy: d.qps,
        other: o.qps,
        ratio: o.qps ? d.qps / o.qps : null,
        better: "higher",
      });
    }
  }
  const conn = (t: string) =>
    connectionCost(load.filter((l) => l.target === t && l.case.startsWith("dot-conn")));
  const dConn = conn("dotproxy");
  for (const p of PEERS) {
    const o = conn(p);
    if (dConn === null || o === null) continue;
    out.push({
      what: "CPU µs per new DoT connection",
      peer: p,
      dotproxy: dConn,
      other: o,
      ratio: o > 0 ? dConn / o : null,
      better: "lower",
    });
  }
  for (const proto of ["dot", "h2"]) {
    const d = idle.find((i) => i.target === "dotproxy" && i.proto === proto);
    if (!d) continue;
    for (const p of PEERS) {
      const o = idle.find((i) => i.target === p && i.proto === proto);
      if (!o) continue;
      out.push({
        what: `RSS per idle ${proto === "dot" ? "DoT" : "DoH (HTTP/2)"} connection, kB`,
        peer: p,
        dotproxy: d.kbPerConn,
        other: o.kbPerConn,
        ratio: d.kbPerConn !== null && o.kbPerConn ? d.kbPerConn / o.kbPerConn : null,
        better: "lower",
      });
    }
  }
  return out;
}

/** CPU µs of one new connection from the runs at the smallest and largest N (see above). */
function connectionCost(runs: Load[]): number | null {
  const withN = runs.map((l) => ({ n: Number(l.case.slice("dot-conn".length)), l }))
    .filter((x) => x.l.cpuUsPerQ !== null && x.n > 0).sort((a, b) => a.n - b.n);
  if (withN.length < 2) return null;
  const a = withN[0], b = withN[withN.length - 1];
  if (a.n === b.n) return null;
  return ((a.l.cpuUsPerQ ?? 0) - (b.l.cpuUsPerQ ?? 0)) / (1 / a.n - 1 / b.n);
}

function main(dir: string): void {
  const meta = JSON.parse(Deno.readTextFileSync(`${dir}/meta.json`));
  const load = loads(readTsv(`${dir}/runs.tsv`));
  const idle = idles(readTsv(`${dir}/idle.tsv`));
  const skipped = readPlainTsv(`${dir}/skipped.tsv`);
  const failures = readPlainTsv(`${dir}/failures.tsv`);
  const rs = ratios(load, idle);
  const md: string[] = [];
  const v = meta.versions;
  md.push(`# dotproxy listener benchmark ${meta.stamp}${meta.quick ? " (--quick)" : ""}`, "");
  md.push(
    `Machine: ${meta.machine.nproc} cores, ${meta.machine.cpu}, Linux ${meta.machine.kernel}. ` +
      `Target on core 0; the load generator and the upstream Unbound on core 1. ` +
      `Load on the machine before the start: ${meta.load_before_start_cores} cores busy.`,
    "",
    `Versions: dotproxy ${v.dotproxy} (${meta.dotproxy_repo}); ${v.deno}; Unbound ${v.unbound}; ` +
      `${v.dnsdist}; dnsperf ${v.dnsperf}; ${v.h2load}; ${v.openssl}.`,
    "",
    `Load: ${meta.rounds} round(s) of ${meta.duration_s} s per target and case, order rotated, ` +
      `mean of the rounds (qps range in brackets). dnsperf -m dot \`${meta.dnsperf_dot}\`; ` +
      `new connections \`${meta.dnsperf_conn} -O num-queries-per-conn=N\`; h2load HTTP/2 ` +
      `\`${meta.h2load_h2}\` (misses \`${meta.h2load_h2_misses}\`), HTTP/1.1 \`${meta.h2load_h1}\`. ` +
      `Cache hits: ${meta.hot_names} names, all cached before the runs; misses: a new name ` +
      `per query. Every target has its cache on. Idle: ${meta.idle_conns} connections per ` +
      `target and protocol, each in a fresh process. dotproxy: ${meta.v8_flags}` +
      `${meta.dotproxy_limit_args ? `,${meta.dotproxy_limit_args}` : ""}` +
      `${meta.dotproxy_args ? ` ${meta.dotproxy_args}` : ""}.`,
    "",
  );
  if (skipped.length > 0) {
    md.push("Not measured:", "");
    for (const [t, what, why] of skipped) md.push(`- ${t} ${what}: ${why}`);
    md.push("");
  }
  if (failures.length > 0) {
    md.push("Failed runs:", "");
    for (const f of failures) md.push(`- ${f.join(" ")}`);
    md.push("");
  }

  if (idle.length > 0) {
    md.push("## RSS per idle connection", "");
    md.push(
      "| target | protocol | open (failed) | held by the server | RSS before MiB | RSS after MiB | kB per connection | CPU ms per connection opened |",
      "|---|---|--:|--:|--:|--:|--:|--:|",
    );
    for (const i of idle) {
      md.push(
        `| ${i.target} | ${i.proto === "dot" ? "DoT" : "DoH HTTP/2"} | ${fmt(i.open)} (${
          fmt(i.failed)
        }) | ${fmt(i.held)} | ${fmt(i.rssBeforeKb / 1024, 1)} | ${fmt(i.rssAfterKb / 1024, 1)} | ${
          fmt(i.kbPerConn, 1)
        } | ${fmt(i.cpuMsPerConn, 2)} |`,
      );
    }
    md.push("");
  }

  if (load.length > 0) {
    md.push("## Load", "");
    md.push(
      "| case | target | qps | answered / sent | mean ms | CPU µs / q | q per CPU-s | upstream CPU µs / q | core 0 busy | core 1 busy | other load | steal |",
      "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    );
    for (const l of load) {
      const range = l.runs > 1 ? ` (${fmt(l.qpsMin)}–${fmt(l.qpsMax)})` : "";
      md.push(
        `| ${CASES[l.case] ?? l.case} | ${l.target} | ${fmt(l.qps)}${range} | ${fmt(l.ok)} / ${
          fmt(l.sent)
        } | ${fmt(l.meanMs, 2)} | ${fmt(l.cpuUsPerQ, 1)} | ${fmt(l.qpsPerCpu)} | ${
          fmt(l.upstreamCpuUsPerQ, 1)
        } | ${pct(l.proxyCoreBusy)} | ${pct(l.loadCoreBusy)} | ${fmt(l.foreignCores, 2)} | ${
          pct(l.steal)
        } |`,
      );
    }
    md.push("");
    const bound = load.filter((l) => (l.loadCoreBusy ?? 0) >= 0.95 && (l.proxyCoreBusy ?? 1) < 0.9);
    if (bound.length > 0) {
      md.push(
        "Load-bound (core 1 ≥ 95% busy, core 0 not saturated): qps is a lower bound of the " +
          "target's, compare queries per CPU-second instead: " +
          bound.map((l) => `${l.target} ${l.case}`).join(", ") + ".",
        "",
      );
    }
    // The cost of a connection. With N queries per connection, CPU per query = q + C / N
    // (q: a query on a warm connection, C: a connection's handshake, set-up and teardown);
    // the runs at the smallest and the largest N give C = (cpu(Nmin) - cpu(Nmax)) /
    // (1 / Nmin - 1 / Nmax). Both runs have the same concurrency, unlike dot-hits.
    const conn = load.filter((l) => l.case.startsWith("dot-conn"));
    if (conn.length > 0) {
      md.push("## The cost of a new DoT connection", "");
      md.push(
        "dnsperf `-O num-queries-per-conn=N` on cache hits: each connection asks N questions, " +
          "then closes and a new one is opened. CPU per query = q + C / N, so the runs at the " +
          "smallest and largest N give C, the CPU of one connection (TLS handshake, set-up, " +
          "teardown): C = (CPU/q at N₁ − CPU/q at N₂) / (1/N₁ − 1/N₂).",
        "",
        "| target | N | qps | CPU µs / q | q per CPU-s |",
        "|---|--:|--:|--:|--:|",
      );
      for (const l of conn) {
        md.push(
          `| ${l.target} | ${l.case.slice("dot-conn".length)} | ${fmt(l.qps)} | ${
            fmt(l.cpuUsPerQ, 1)
          } | ${fmt(l.qpsPerCpu)} |`,
        );
      }
      md.push("", "| target | CPU µs per new DoT connection |", "|---|--:|");
      for (const t of TARGETS) {
        const c = connectionCost(conn.filter((l) => l.target === t));
        if (c !== null) md.push(`| ${t} | ${fmt(c)} |`);
      }
      md.push("");
    }
  }

  if (rs.length > 0) {
    md.push("## Ratios: dotproxy / peer", "");
    md.push(
      "Higher is better for qps and queries per CPU-second, lower for kB per connection. " +
        "The issues' aim: ahead of both peers in queries per CPU-second.",
      "",
      "| measure | peer | dotproxy | peer's | ratio | dotproxy ahead |",
      "|---|---|--:|--:|--:|---|",
    );
    for (const r of rs) {
      const ahead = r.ratio === null
        ? "–"
        : (r.better === "higher" ? r.ratio >= 1 : r.ratio <= 1)
        ? "yes"
        : "no";
      const digits = r.what.includes("kB") ? 1 : 0;
      md.push(
        `| ${r.what} | ${r.peer} | ${fmt(r.dotproxy, digits)} | ${fmt(r.other, digits)} | ${
          r.ratio === null ? "–" : `${r.ratio.toFixed(2)}×`
        } | ${ahead} |`,
      );
    }
    md.push("");
  } else {
    md.push('No ratios: dotproxy was not measured (see "Not measured").', "");
  }

  Deno.writeTextFileSync(`${dir}/summary.md`, md.join("\n"));
  Deno.writeTextFileSync(
    `${dir}/summary.json`,
    JSON.stringify({ meta, idle, load, ratios: rs, skipped, failures }, null, 2) + "\n",
  );
}

if (import.meta.main) {
  if (Deno.args.length !== 1) {
    console.error("usage: listeners_summarize.ts DIR");
    Deno.exit(2);
  }
  main(Deno.args[0]);
}
