/**
 * Summarizes a `bench/failover.sh` run: reads `runs.tsv` and `meta.json` in the run's
 * directory and writes `summary.md` (one table: a row per target, a column per scenario,
 * each cell `p50 / p99 / max` in milliseconds with lost queries and SERVFAILs) and
 * `summary.json`.
 *
 * ```sh
 * deno run --allow-read=DIR --allow-write=DIR bench/failover_summarize.ts DIR
 * ```
 *
 * @module
 */

/** One measurement, as `bench/failover.sh` writes it. */
export interface Run {
  scenario: string;
  target: string;
  rate: number;
  durationS: number;
  sent: number;
  completed: number;
  lost: number;
  noerror: number;
  servfail: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
  /** The 1-minute load average before and after the run ("1.9/2.1"). */
  load: string;
}

const SCENARIO_TITLES: Record<string, string> = {
  healthy: "both healthy",
  dead: "one dead (refused)",
  blackhole: "one black-holed",
  frozen: "one frozen (SIGSTOP)",
  slow10: "one slow for 10%",
};

const TARGET_TITLES: Record<string, string> = {
  dnsdist: "dnsdist 1.7 (health checks 1 s)",
  "unbound-fwd": "Unbound (TLS forwarder, cache off)",
  stubby: "Stubby (round robin)",
};

/** Parses `runs.tsv` (header line first). */
export function parseRuns(text: string): Run[] {
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  const number = (s: string) => (s === "-" || s === "" ? NaN : Number(s));
  return lines.slice(1).map((line) => {
    const f = line.split("\t");
    return {
      scenario: f[0],
      target: f[1],
      rate: number(f[2]),
      durationS: number(f[3]),
      sent: number(f[4]),
      completed: number(f[5]),
      lost: number(f[6]),
      noerror: number(f[7]),
      servfail: number(f[8]),
      p50: number(f[9]),
      p99: number(f[10]),
      p999: number(f[11]),
      max: number(f[12]),
      load: f[13] ?? "",
    };
  });
}

function ms(value: number): string {
  if (!Number.isFinite(value)) return "-";
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

/** One cell: `p50 / p99 / max`, then what went wrong, if anything. */
export function cell(run: Run | undefined): string {
  if (run === undefined) return "";
  let out = `${ms(run.p50)} / ${ms(run.p99)} / ${ms(run.max)}`;
  const failed: string[] = [];
  if (run.lost > 0) failed.push(`${run.lost} lost`);
  if (run.servfail > 0) failed.push(`${run.servfail} SERVFAIL`);
  if (failed.length > 0) out += ` (**${failed.join(", ")}**)`;
  return out;
}

function title(target: string): string {
  if (target.startsWith("dotproxy-")) return `dotproxy \`--strategy ${target.slice(9)}\``;
  return TARGET_TITLES[target] ?? target;
}

/** The summary table in Markdown. */
export function summarize(runs: Run[], meta: Record<string, unknown>): string {
  const scenarios = [...new Set(runs.map((r) => r.scenario))];
  const targets = [...new Set(runs.map((r) => r.target))];
  const find = (scenario: string, target: string) =>
    runs.find((r) => r.scenario === scenario && r.target === target);
  const versions = (meta.versions ?? {}) as Record<string, string>;
  const machine = (meta.machine ?? {}) as Record<string, unknown>;
  const rate = runs[0]?.rate ?? NaN;
  const duration = runs[0]?.durationS ?? NaN;
  const out: string[] = [
    `# dotproxy failover benchmark ${meta.stamp ?? ""}`,
    "",
    `Machine: ${machine.nproc ?? "?"} cores, ${machine.cpu ?? "?"}, Linux ${
      machine.kernel ?? "?"
    }. ` +
    "Target on core 0; dnsperf and the upstreams on core 1.",
    "",
    `Versions: dotproxy ${versions.dotproxy ?? "?"}; ${versions.deno ?? "deno ?"}; Unbound ` +
    `${versions.unbound ?? "?"}; ${versions.dnsdist ?? "dnsdist ?"}; ${
      versions.stubby ?? "stubby ?"
    }; ` +
    `dnsperf ${versions.dnsperf ?? "?"}.`,
    "",
    `Each cell: latency p50 / p99 / max in ms over ${duration} s at ${rate} qps over UDP ` +
    "(dnsperf, unique names, 5 s timeout), after a 2 s warm-up; queries lost (no answer within " +
    "5 s) and SERVFAILs in bold. Two DoT upstreams, the broken one listed first.",
    "",
    `| target | ${scenarios.map((s) => SCENARIO_TITLES[s] ?? s).join(" | ")} |`,
    `| --- | ${scenarios.map(() => "---").join(" | ")} |`,
  ];
  for (const target of targets) {
    out.push(`| ${title(target)} | ${scenarios.map((s) => cell(find(s, target))).join(" | ")} |`);
  }
  const loads = runs.flatMap((r) => r.load.split("/").map(Number)).filter(Number.isFinite);
  if (loads.length > 0) {
    out.push(
      "",
      `1-minute load average around the runs: ${Math.min(...loads).toFixed(2)} to ` +
        `${Math.max(...loads).toFixed(2)} (the benchmark alone keeps two cores busy: about 2; ` +
        "more means other work shared the machine, see `runs.tsv`).",
    );
  }
  out.push("");
  return out.join("\n");
}

if (import.meta.main) {
  const dir = Deno.args[0];
  if (!dir) {
    console.error("usage: failover_summarize.ts DIR");
    Deno.exit(2);
  }
  const runs = parseRuns(await Deno.readTextFile(`${dir}/runs.tsv`));
  let meta: Record<string, unknown> = {};
  try {
    meta = JSON.parse(await Deno.readTextFile(`${dir}/meta.json`));
  } catch {
    // A run without metadata still gets its table.
  }
  await Deno.writeTextFile(`${dir}/summary.md`, summarize(runs, meta));
  await Deno.writeTextFile(`${dir}/summary.json`, JSON.stringify({ meta, runs }, null, 2) + "\n");
}
