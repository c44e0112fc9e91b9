/**
 * What the benchmark summarizers (bench/summarize.ts, bench/listeners_summarize.ts,
 * bench/cache_summarize.ts) share: reading their TSV files and formatting numbers.
 *
 * @module
 */

/** One TSV line, by the column names of the file's first line. */
export type Row = Record<string, string>;

/** The rows of a TSV file with a header line; none when the file is missing or empty. */
export function readTsv(path: string): Row[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch {
    return [];
  }
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  if (lines.length === 0) return [];
  const head = lines[0].split("\t");
  return lines.slice(1).map((l) => {
    const cells = l.split("\t");
    const row: Row = {};
    head.forEach((h, i) => (row[h] = cells[i] ?? ""));
    return row;
  });
}

/** The cells of a TSV file without a header line; none when the file is missing. */
export function readPlainTsv(path: string): string[][] {
  try {
    return Deno.readTextFileSync(path).split("\n").filter((l) => l.trim() !== "").map((l) =>
      l.split("\t")
    );
  } catch {
    return [];
  }
}

/** A cell as a number; null for an empty cell, "-" or anything not a finite number. */
export function num(s: string | undefined): number | null {
  if (s === undefined || s === "" || s === "-") return null;
  const n = Number(s);
  return Number.isFinite(n) ? n : null;
}

/** The mean of the known values; null when none is known. */
export function mean(xs: (number | null)[]): number | null {
  const v = xs.filter((x): x is number => x !== null);
  return v.length === 0 ? null : v.reduce((a, b) => a + b, 0) / v.length;
}

/** A number with thousands separators and `digits` decimals; "–" for null. */
export function fmt(n: number | null, digits = 0): string {
  if (n === null) return "–";
  return n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
}
