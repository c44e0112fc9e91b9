/**
 * A small leveled logger: one line per event, as text or JSON, on stderr.
 *
 * Fields are structured (`{ upstream, client, reason, ... }`), so a log pipeline can
 * parse them; text lines render them as `key=value` pairs after the message.
 *
 * @module
 */

/** The log levels, from most to least verbose. */
export type LogLevel = "debug" | "info" | "warn" | "error";

/** The two line formats. */
export type LogFormat = "text" | "json";

/** Structured context attached to a log line. */
export type LogFields = Record<string, string | number | boolean | undefined | null>;

/** All log levels, in order of increasing severity. */
export const LOG_LEVELS: readonly LogLevel[] = ["debug", "info", "warn", "error"];

const SEVERITY: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** Where log lines go; defaults to a synchronous write on stderr. */
export type LogSink = (line: string) => void;

const encoder = new TextEncoder();

function stderrSink(line: string): void {
  try {
    Deno.stderr.writeSync(encoder.encode(line + "\n"));
  } catch {
    // A closed or broken stderr must never take the proxy down with it.
  }
}

function renderTextValue(value: string | number | boolean): string {
  const text = String(value);
  return /^[^\s"=]+$/.test(text) ? text : JSON.stringify(text);
}

/**
 * A leveled logger writing one line per event.
 *
 * @example
 * ```ts
 * import { Logger } from "./log.ts";
 * const log = new Logger({ level: "info", format: "json" });
 * log.warn("upstream handshake failed", { upstream: "1.1.1.1:853", reason: "tls" });
 * ```
 */
export class Logger {
  /** Lowest level written. */
  readonly level: LogLevel;
  /** Line format: plain text or one JSON object per line. */
  readonly format: LogFormat;
  #threshold: number;
  #sink: LogSink;
  #now: () => Date;

  /** Creates a logger; lines below `level` are discarded cheaply. */
  constructor(
    options: { level?: LogLevel; format?: LogFormat; sink?: LogSink; now?: () => Date } = {},
  ) {
    this.level = options.level ?? "info";
    this.format = options.format ?? "text";
    this.#threshold = SEVERITY[this.level];
    this.#sink = options.sink ?? stderrSink;
    this.#now = options.now ?? (() => new Date());
  }

  /** True when lines at `level` would be written; guard expensive field building with it. */
  enabled(level: LogLevel): boolean {
    return SEVERITY[level] >= this.#threshold;
  }

  /** Logs at debug level. */
  debug(message: string, fields?: LogFields): void {
    if (this.#threshold <= 10) this.#write("debug", message, fields);
  }

  /** Logs at info level. */
  info(message: string, fields?: LogFields): void {
    if (this.#threshold <= 20) this.#write("info", message, fields);
  }

  /** Logs at warn level. */
  warn(message: string, fields?: LogFields): void {
    if (this.#threshold <= 30) this.#write("warn", message, fields);
  }

  /** Logs at error level. */
  error(message: string, fields?: LogFields): void {
    this.#write("error", message, fields);
  }

  #write(level: LogLevel, message: string, fields: LogFields | undefined): void {
    const time = this.#now().toISOString();
    if (this.format === "json") {
      const record: Record<string, unknown> = { time, level, msg: message };
      if (fields) {
        for (const key in fields) {
          const value = fields[key];
          if (value !== undefined && value !== null) record[key] = value;
        }
      }
      this.#sink(JSON.stringify(record));
      return;
    }
    let line = `${time} ${level.toUpperCase().padEnd(5)} ${message}`;
    if (fields) {
      for (const key in fields) {
        const value = fields[key];
        if (value !== undefined && value !== null) line += ` ${key}=${renderTextValue(value)}`;
      }
    }
    this.#sink(line);
  }
}

/**
 * The text a log line gives for a thrown value: an `Error`'s message, else the value as a
 * string.
 *
 * @example
 * ```ts
 * import { errorMessage } from "./log.ts";
 * errorMessage(new Error("Connection refused")); // "Connection refused"
 * errorMessage("timeout"); // "timeout"
 * ```
 */
export function errorMessage(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * Lets through at most one line per `intervalMs` for a noisy event (for example malformed
 * packets from a flood), and reports how many were suppressed in between.
 *
 * @example
 * ```ts
 * import { Logger, RateLimitedLog } from "./log.ts";
 * const limited = new RateLimitedLog(new Logger(), 10_000);
 * limited.warn("tcp connection limit reached", { limit: 1000 });
 * ```
 */
export class RateLimitedLog {
  #log: Logger;
  #intervalMs: number;
  #last = -Infinity;
  #suppressed = 0;
  #now: () => number;

  /** Wraps `log`, letting one line through per `intervalMs`. */
  constructor(log: Logger, intervalMs: number, now: () => number = () => performance.now()) {
    this.#log = log;
    this.#intervalMs = intervalMs;
    this.#now = now;
  }

  /** Logs at debug level unless a line went out less than `intervalMs` ago. */
  debug(message: string, fields: LogFields = {}): void {
    const passed = this.#pass(fields);
    if (passed) this.#log.debug(message, passed);
  }

  /** Logs at warn level unless a line went out less than `intervalMs` ago. */
  warn(message: string, fields: LogFields = {}): void {
    const passed = this.#pass(fields);
    if (passed) this.#log.warn(message, passed);
  }

  /** Logs at error level unless a line went out less than `intervalMs` ago. */
  error(message: string, fields: LogFields = {}): void {
    const passed = this.#pass(fields);
    if (passed) this.#log.error(message, passed);
  }

  /** The fields to write (with the count suppressed since the last line), or null. */
  #pass(fields: LogFields): LogFields | null {
    const now = this.#now();
    if (now - this.#last < this.#intervalMs) {
      this.#suppressed++;
      return null;
    }
    this.#last = now;
    const suppressed = this.#suppressed;
    this.#suppressed = 0;
    return suppressed > 0 ? { ...fields, suppressed } : fields;
  }
}
