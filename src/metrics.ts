/**
 * Counters, gauges and histograms updated in place, rendered on demand in the Prometheus
 * text exposition format 0.0.4. A module adds its own family in a line:
 *
 * ```ts
 * import { Registry } from "./metrics.ts";
 * const registry = new Registry();
 * const hits = registry.counter("dotproxy_cache_hits_total", "Answers served from cache.");
 * hits.inc();
 * ```
 *
 * Label values are bound once (`family.labels("udp", "NOERROR")`) and the child kept, so
 * the hot path increments a number and allocates nothing.
 *
 * @module
 */

/** Default latency buckets in seconds: 100 µs to 10 s. */
export const LATENCY_BUCKETS: readonly number[] = [
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
];

function escapeLabelValue(value: string): string {
  return value.replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/"/g, '\\"');
}

function escapeHelp(text: string): string {
  return text.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

function formatNumber(value: number): string {
  if (Number.isNaN(value)) return "NaN";
  if (value === Infinity) return "+Inf";
  if (value === -Infinity) return "-Inf";
  return String(value);
}

function labelText(names: readonly string[], values: readonly string[], extra = ""): string {
  const parts: string[] = [];
  for (let i = 0; i < names.length; i++) {
    parts.push(`${names[i]}="${escapeLabelValue(values[i])}"`);
  }
  if (extra) parts.push(extra);
  return parts.length > 0 ? `{${parts.join(",")}}` : "";
}

/** Common shape of a metric family. */
export interface Family {
  /** Metric name, e.g. `dotproxy_queries_total`. */
  readonly name: string;
  /** Appends this family's lines in the text exposition format to `out`. */
  render(out: string[]): void;
}

/** Base of the metric families: one child per distinct set of label values. */
export abstract class LabelledFamily<Child> implements Family {
  /** Metric name, e.g. `dotproxy_queries_total`. */
  readonly name: string;
  /** Text for the `# HELP` line. */
  readonly help: string;
  /** Label names, in the order `labels()` takes their values. */
  readonly labelNames: readonly string[];
  /** Children keyed by their label values joined with NUL. */
  protected readonly children: Map<string, { values: string[]; child: Child }> = new Map();

  /** Creates a family; prefer the {@linkcode Registry} factory methods. */
  constructor(name: string, help: string, labelNames: readonly string[]) {
    this.name = name;
    this.help = help;
    this.labelNames = labelNames;
  }

  /** Makes a fresh child for a new set of label values. */
  protected abstract create(): Child;
  /** Appends this family's lines in the text exposition format to `out`. */
  abstract render(out: string[]): void;

  /** The child for these label values (in `labelNames` order); keep it for the hot path. */
  labels(...values: string[]): Child {
    if (values.length !== this.labelNames.length) {
      throw new RangeError(
        `${this.name}: expected ${this.labelNames.length} label values, got ${values.length}`,
      );
    }
    const key = values.join("\u0000");
    let entry = this.children.get(key);
    if (!entry) {
      entry = { values, child: this.create() };
      this.children.set(key, entry);
    }
    return entry.child;
  }

  /** Appends the `# HELP` and `# TYPE` lines. */
  protected header(out: string[], type: string): void {
    // An unlabelled family always shows its one series, at zero until first touched, so a
    // scrape sees it exist and `rate()` sees its first increment.
    if (this.labelNames.length === 0 && this.children.size === 0) this.labels();
    out.push(`# HELP ${this.name} ${escapeHelp(this.help)}`);
    out.push(`# TYPE ${this.name} ${type}`);
  }
}

/** A monotonically increasing value. */
export class CounterChild {
  /** The current value. */
  value = 0;
  /** Adds `n` (default 1). */
  inc(n = 1): void {
    this.value += n;
  }
}

/** Reports current values at scrape time: `set(value, ...labelValues)` per series. */
export type Collect = (set: (value: number, ...labels: string[]) => void) => void;

/**
 * Base of the families with one number per series (counters and gauges): set in place, or
 * reported at scrape time by a `collect` callback (for state another module or the runtime
 * owns, like open connections or the process's CPU time).
 */
export abstract class ValueFamily<Child extends { value: number }> extends LabelledFamily<Child> {
  readonly #collect?: Collect;
  readonly #type: "counter" | "gauge";
  readonly #makeChild: () => Child;
  #unlabelled: Child | undefined;

  /** Creates a family of `type`; prefer the {@linkcode Registry} factory methods. */
  constructor(
    name: string,
    help: string,
    labelNames: readonly string[],
    type: "counter" | "gauge",
    makeChild: () => Child,
    collect?: Collect,
  ) {
    super(name, help, labelNames);
    this.#type = type;
    this.#makeChild = makeChild;
    this.#collect = collect;
  }
  /** Makes a zeroed series. */
  protected create(): Child {
    return this.#makeChild();
  }
  /** The series of a family without labels. */
  protected get unlabelled(): Child {
    return this.#unlabelled ??= this.labels();
  }
  /** Value for these label values (0 if never touched); for tests and health logic. */
  get(...values: string[]): number {
    this.#runCollect();
    return this.children.get(values.join("\u0000"))?.child.value ?? 0;
  }
  #runCollect(): void {
    if (this.#collect) {
      this.#collect((value, ...labels) => {
        this.labels(...labels).value = value;
      });
    }
  }
  /** Runs the `collect` callback, then appends the family's lines to `out`. */
  render(out: string[]): void {
    this.#runCollect();
    this.header(out, this.#type);
    for (const { values, child } of this.children.values()) {
      out.push(`${this.name}${labelText(this.labelNames, values)} ${formatNumber(child.value)}`);
    }
  }
}

/**
 * A counter family. Use `inc()` directly when it has no labels, or give a `collect` callback
 * that reports the current totals at scrape time.
 */
export class Counter extends ValueFamily<CounterChild> {
  /** Creates a counter; prefer {@linkcode Registry.counter}. */
  constructor(name: string, help: string, labelNames: readonly string[], collect?: Collect) {
    super(name, help, labelNames, "counter", () => new CounterChild(), collect);
  }
  /** Increments the unlabelled counter. */
  inc(n = 1): void {
    this.unlabelled.inc(n);
  }
}

/** A value that goes up and down. */
export class GaugeChild {
  /** The current value. */
  value = 0;
  /** Sets the value. */
  set(v: number): void {
    this.value = v;
  }
  /** Adds `n` (default 1). */
  inc(n = 1): void {
    this.value += n;
  }
  /** Subtracts `n` (default 1). */
  dec(n = 1): void {
    this.value -= n;
  }
}

/**
 * A gauge family. Either set in place, or give a `collect` callback that reports current
 * values at scrape time.
 */
export class Gauge extends ValueFamily<GaugeChild> {
  /** Sets the unlabelled gauge. */
  set(v: number): void {
    this.unlabelled.set(v);
  }
  /** Creates a gauge; prefer {@linkcode Registry.gauge}. */
  constructor(name: string, help: string, labelNames: readonly string[], collect?: Collect) {
    super(name, help, labelNames, "gauge", () => new GaugeChild(), collect);
  }
}

/** One histogram series: cumulative buckets are computed when rendered. */
export class HistogramChild {
  /** Per-bucket (non-cumulative) counts; the last slot is +Inf. */
  readonly counts: Float64Array;
  /** Sum of observed values. */
  sum = 0;
  /** Number of observations. */
  count = 0;
  readonly #bounds: readonly number[];

  /** Creates a series over `bounds` (ascending upper bounds, +Inf implied). */
  constructor(bounds: readonly number[]) {
    this.#bounds = bounds;
    this.counts = new Float64Array(bounds.length + 1);
  }

  /** Records one value. */
  observe(value: number): void {
    const bounds = this.#bounds;
    let i = 0;
    while (i < bounds.length && value > bounds[i]) i++;
    this.counts[i]++;
    this.sum += value;
    this.count++;
  }
}

/** A histogram family. */
export class Histogram extends LabelledFamily<HistogramChild> {
  /** Ascending bucket upper bounds; +Inf is implied. */
  readonly buckets: readonly number[];
  #unlabelled: HistogramChild | undefined;

  /** Creates a histogram; prefer {@linkcode Registry.histogram}. */
  constructor(
    name: string,
    help: string,
    labelNames: readonly string[],
    buckets: readonly number[],
  ) {
    super(name, help, labelNames);
    this.buckets = buckets;
  }
  /** Makes a zeroed series. */
  protected create(): HistogramChild {
    return new HistogramChild(this.buckets);
  }
  /** Records a value in the unlabelled series. */
  observe(value: number): void {
    (this.#unlabelled ??= this.labels()).observe(value);
  }
  /** Appends the histogram's cumulative bucket, sum and count lines to `out`. */
  render(out: string[]): void {
    this.header(out, "histogram");
    for (const { values, child } of this.children.values()) {
      let cumulative = 0;
      for (let i = 0; i < this.buckets.length; i++) {
        cumulative += child.counts[i];
        const le = `le="${formatNumber(this.buckets[i])}"`;
        out.push(`${this.name}_bucket${labelText(this.labelNames, values, le)} ${cumulative}`);
      }
      cumulative += child.counts[this.buckets.length];
      out.push(
        `${this.name}_bucket${labelText(this.labelNames, values, 'le="+Inf"')} ${cumulative}`,
      );
      out.push(`${this.name}_sum${labelText(this.labelNames, values)} ${formatNumber(child.sum)}`);
      out.push(`${this.name}_count${labelText(this.labelNames, values)} ${child.count}`);
    }
  }
}

/**
 * A set of metric families rendered together.
 *
 * @example
 * ```ts
 * import { Registry } from "./metrics.ts";
 * const registry = new Registry();
 * const queries = registry.counter("dotproxy_queries_total", "Queries.", ["transport"]);
 * queries.labels("udp").inc();
 * registry.render(); // "# HELP dotproxy_queries_total Queries.\n# TYPE ..."
 * ```
 */
export class Registry {
  readonly #families: Family[] = [];
  readonly #names = new Set<string>();

  #add<F extends Family>(family: F): F {
    if (this.#names.has(family.name)) {
      throw new Error(`metric family ${family.name} registered twice`);
    }
    this.#names.add(family.name);
    this.#families.push(family);
    return family;
  }

  /** Registers a counter family, optionally read at scrape time by `collect`. */
  counter(name: string, help: string, labels: readonly string[] = [], collect?: Collect): Counter {
    return this.#add(new Counter(name, help, labels, collect));
  }

  /** Registers a gauge family, optionally computed at scrape time by `collect`. */
  gauge(name: string, help: string, labels: readonly string[] = [], collect?: Collect): Gauge {
    return this.#add(new Gauge(name, help, labels, collect));
  }

  /** Registers a histogram family. */
  histogram(
    name: string,
    help: string,
    labelNames: readonly string[] = [],
    buckets: readonly number[] = LATENCY_BUCKETS,
  ): Histogram {
    return this.#add(new Histogram(name, help, labelNames, buckets));
  }

  /** Renders every family in the Prometheus text format 0.0.4. */
  render(): string {
    const out: string[] = [];
    for (const family of this.#families) family.render(out);
    return out.join("\n") + "\n";
  }
}
