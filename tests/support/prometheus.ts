/**
 * One strict parser of the Prometheus text exposition format 0.0.4 for every test that reads
 * `/metrics`, and small helpers to pick values out of a scrape. Malformed text throws, so a
 * test fails as soon as the proxy's `/metrics` output breaks.
 *
 * Stricter than the format, because dotproxy's output is: every family has `# HELP` and
 * `# TYPE` before its samples, families are contiguous and declared once, and there are no
 * other comments and no blank lines.
 *
 * @example
 * ```ts
 * const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
 * const families = parsePrometheus(text); // throws on malformed text
 * metricValue(families, "dotproxy_upstream_healthy", { upstream: label }); // 1
 * sumMetric(families, "dotproxy_queries_total", { rcode: "SERVFAIL" }); // over transports
 * ```
 *
 * @module
 */

/** The metric types of the format. */
export type MetricType = "counter" | "gauge" | "histogram" | "summary" | "untyped";

/** One sample line. */
export interface Sample {
  /** Sample name: the family name, or for histograms `<family>_bucket|_sum|_count`. */
  name: string;
  /** Label names to unescaped values. */
  labels: Record<string, string>;
  /** The value; `+Inf`, `-Inf` and `NaN` included. */
  value: number;
  /** Milliseconds since the epoch, when the line has one. */
  timestamp?: number;
}

/** One metric family: its `# HELP` (unescaped), `# TYPE` and samples, in order. */
export interface MetricFamily {
  /** Family name. */
  name: string;
  /** Declared type. */
  type: MetricType;
  /** Help text, unescaped. */
  help: string;
  /** Samples in exposition order. */
  samples: Sample[];
}

/** Parsed exposition: family name to family, in exposition order. */
export type Families = Map<string, MetricFamily>;

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const METRIC_NAME_PREFIX = /^[a-zA-Z_:][a-zA-Z0-9_:]*/;
const LABEL_NAME_PREFIX = /^[a-zA-Z_][a-zA-Z0-9_]*/;
const FLOAT = /^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$/;
const TIMESTAMP = /^-?\d+$/;
const TYPES = new Set<string>(["counter", "gauge", "histogram", "summary", "untyped"]);
const HISTOGRAM_SUFFIXES = ["_bucket", "_sum", "_count"];
/** Lines parsed at most (a bound, far above any real scrape). */
const MAX_LINES = 1_000_000;

/** Parses a sample value: a float, `+Inf`, `-Inf` or `NaN`. */
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

/** A key naming one series: sample name and sorted labels (without `omit`). */
function seriesKey(name: string, labels: Record<string, string>, omit = ""): string {
  const entries = Object.entries(labels).filter(([k]) => k !== omit).sort(([a], [b]) =>
    a < b ? -1 : a > b ? 1 : 0
  );
  return `${name}${JSON.stringify(entries)}`;
}

/** Whether a sample name belongs to `family`. */
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

/**
 * Histogram rules: per label set, buckets with `le` strictly increasing and cumulative
 * whole counts, a last `+Inf` bucket equal to `_count`, and a `_sum`.
 */
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
 * Parses exposition text strictly and returns its families by name. Throws an `Error`
 * naming the line on: a missing final newline, a carriage return, a blank line, a comment
 * other than `# HELP`/`# TYPE`, a family without HELP or TYPE or declared twice or after
 * its samples, an unknown type, a sample outside the family declared just before it, a bad
 * metric or label name, a reserved (`__`) or repeated label, an unquoted or unterminated
 * label value, an escape other than `\\`, `\"`, `\n` (labels) or `\\`, `\n` (HELP), a
 * value that is no float/`+Inf`/`-Inf`/`NaN`, anything but one space before the value, a
 * bad timestamp, a repeated series, a counter that is negative or not finite, `le` outside a
 * histogram, and a histogram that breaks the rules of `checkHistogram`.
 */
export function parsePrometheus(text: string): Families {
  if (!text.endsWith("\n")) throw new Error("exposition does not end with a newline");
  if (text.includes("\r")) throw new Error("exposition contains a carriage return");
  const families: Families = new Map();
  const declared = new Map<string, { help?: string; type?: MetricType }>();
  const series = new Set<string>();
  let current: MetricFamily | null = null;
  let declaring: string | null = null;
  const lines = text.slice(0, -1).split("\n");
  if (lines.length > MAX_LINES) throw new Error(`more than ${MAX_LINES} lines`);
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
        declaration.type = rest as MetricType;
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
    const sample: Sample = { name, labels, value };
    if (fields.length === 2) sample.timestamp = Number(fields[1]);
    current.samples.push(sample);
  }
  if (declaring !== null) throw new Error(`${declaring}: HELP without TYPE or TYPE without HELP`);
  for (const family of families.values()) {
    if (family.type === "histogram") checkHistogram(family);
  }
  return families;
}

function familiesOf(source: string | Families): Families {
  return typeof source === "string" ? parsePrometheus(source) : source;
}

/** The family holding samples named `name` (`x_bucket`, `x_sum`, `x_count` belong to `x`). */
function familyFor(families: Families, name: string): MetricFamily | undefined {
  const direct = families.get(name);
  if (direct) return direct;
  const base = /^(.*)_(bucket|sum|count)$/.exec(name)?.[1];
  const family = base === undefined ? undefined : families.get(base);
  return family && belongsTo(name, family) ? family : undefined;
}

/**
 * The value of the sample named `name` whose labels are exactly `labels` (no more, no
 * fewer), or undefined when there is none. `name` may be a histogram's `_bucket` (give
 * `le`), `_sum` or `_count`.
 */
export function sampleValue(
  families: Families,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  const family = familyFor(families, name);
  if (!family) return undefined;
  const key = seriesKey(name, labels);
  return family.samples.find((s) => seriesKey(s.name, s.labels) === key)?.value;
}

/** Like {@linkcode sampleValue}, from exposition text (parsed strictly) or parsed families. */
export function metricValue(
  source: string | Families,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  return sampleValue(familiesOf(source), name, labels);
}

/**
 * Samples named `name` whose labels include every pair of `labelFilter` (other labels may
 * be anything). Throws when no family has samples of that name, so a misspelt name fails
 * rather than matching nothing.
 */
export function selectSamples(
  source: string | Families,
  name: string,
  labelFilter: Record<string, string> = {},
): Sample[] {
  const family = familyFor(familiesOf(source), name);
  if (!family) throw new Error(`no metric family exposes ${name}`);
  return family.samples.filter((sample) =>
    sample.name === name &&
    Object.entries(labelFilter).every(([k, v]) => sample.labels[k] === v)
  );
}

/**
 * The sum of {@linkcode selectSamples}: 0 when the family exists but no series matches;
 * throws when no family exposes `name`.
 */
export function sumMetric(
  source: string | Families,
  name: string,
  labelFilter: Record<string, string> = {},
): number {
  return selectSamples(source, name, labelFilter).reduce((sum, s) => sum + s.value, 0);
}

/**
 * Every sample of family `name` as `{JSON of its labels: value}`, for comparing a whole
 * family at once. Throws when the family is missing.
 */
export function familyValues(families: Families, name: string): Record<string, number> {
  const family = families.get(name);
  if (!family) throw new Error(`family ${name} missing`);
  const out: Record<string, number> = {};
  for (const sample of family.samples) out[JSON.stringify(sample.labels)] = sample.value;
  return out;
}
