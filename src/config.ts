/**
 * Configuration from command-line flags and `DOTPROXY_*` environment variables, validated
 * once at start. Flags win over the environment, the environment over defaults. Every
 * error names the flag or variable and the value that was wrong.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { LOG_LEVELS, type LogFormat, type LogLevel } from "./log.ts";

/** An address to listen on. */
export interface ListenAddress {
  /** IP literal (no brackets). */
  hostname: string;
  /** Port, 1-65535. */
  port: number;
}

/** A DNS-over-TLS upstream. */
export interface UpstreamSpec {
  /** IP literal dialled (no brackets); the proxy never resolves names to reach upstreams. */
  address: string;
  /** TCP port, 853 unless given. */
  port: number;
  /** The name the certificate is verified against and sent as SNI. */
  tlsName: string;
  /** How the upstream is shown in logs and metric labels: `address:port#tlsName`. */
  label: string;
}

/** The validated configuration, built once and passed down. */
export interface Config {
  /** The subcommand: serve (default) or healthcheck. */
  command: "serve" | "healthcheck";
  /** Addresses to serve DNS on, UDP and TCP each. */
  listen: ListenAddress[];
  /** DoT upstreams, in configured order. */
  upstreams: UpstreamSpec[];
  /** Per-query deadline in milliseconds. */
  timeoutMs: number;
  /** Log level. */
  logLevel: LogLevel;
  /** Log line format. */
  logFormat: LogFormat;
  /** Log one line per query (names are private: off by default). */
  logQueries: boolean;
  /** Extra CA certificates (PEM blocks) trusted for upstream verification. */
  caCerts: string[];
  /** Where the metrics and health HTTP endpoint listens, if anywhere. */
  http: ListenAddress | null;
  /** Largest UDP answer sent to any client (EDNS sizes above are clamped). */
  udpMaxSize: number;
  /** Most TCP client connections open at once. */
  maxTcpConnections: number;
  /** Most queries in flight on one TCP client connection. */
  maxTcpQueriesPerConnection: number;
  /** Idle TCP client connections close after this many milliseconds. */
  tcpIdleTimeoutMs: number;
  /** Most queries in flight in the whole proxy; beyond it new queries are dropped. */
  maxInflight: number;
  /** Most TLS connections per upstream. */
  upstreamConnections: number;
  /** Idle upstream connections close after this many milliseconds. */
  upstreamIdleTimeoutMs: number;
}

/** Raised for invalid configuration; the message is the one line shown to the user. */
export class ConfigError extends Error {
  /** Creates an error whose message names the input and the bad value. */
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** A request for help or the version rather than a configuration. */
export type ConfigRequest = { kind: "help" } | { kind: "version" } | {
  kind: "config";
  config: Config;
};

/** One command-line flag with its environment variable, as `--help` lists it. */
export interface Setting {
  /** Flag name without the leading `--`. */
  flag: string;
  /** Environment variable that sets the same value. */
  env: string;
  /** Placeholder for the value in `--help`. */
  arg: string;
  /** Default shown in `--help`. */
  defaultText: string;
  /** One-line description for `--help`. */
  help: string;
}

/** Every setting, in the order `--help` shows them. */
export const SETTINGS: readonly Setting[] = [
  {
    flag: "listen",
    env: "DOTPROXY_LISTEN",
    arg: "ADDR:PORT",
    defaultText: "127.0.0.1:5300",
    help: "address to serve DNS on, UDP and TCP (repeatable; env: comma-separated)",
  },
  {
    flag: "upstream",
    env: "DOTPROXY_UPSTREAMS",
    arg: "IP[:PORT][#TLS_NAME]",
    defaultText: "1.1.1.1:853#cloudflare-dns.com,1.0.0.1:853#cloudflare-dns.com",
    help: "DNS-over-TLS upstream; the certificate is verified against TLS_NAME " +
      "(repeatable; env: comma-separated)",
  },
  {
    flag: "timeout",
    env: "DOTPROXY_TIMEOUT_MS",
    arg: "MS",
    defaultText: "4000",
    help: "per-query deadline; a query unanswered by then gets SERVFAIL",
  },
  {
    flag: "log-level",
    env: "DOTPROXY_LOG_LEVEL",
    arg: "LEVEL",
    defaultText: "info",
    help: "debug, info, warn or error",
  },
  {
    flag: "log-format",
    env: "DOTPROXY_LOG_FORMAT",
    arg: "FORMAT",
    defaultText: "text",
    help: "text or json",
  },
  {
    flag: "log-queries",
    env: "DOTPROXY_LOG_QUERIES",
    arg: "",
    defaultText: "off",
    help: "log one line per query at info (names are private; env: true/false)",
  },
  {
    flag: "http",
    env: "DOTPROXY_HTTP",
    arg: "ADDR:PORT",
    defaultText: "off",
    help: "serve /metrics, /healthz and /readyz over HTTP here",
  },
  {
    flag: "udp-max-size",
    env: "DOTPROXY_UDP_MAX_SIZE",
    arg: "BYTES",
    defaultText: "1232",
    help: "largest UDP answer (512-65535); larger answers are truncated with TC=1",
  },
  {
    flag: "max-tcp-connections",
    env: "DOTPROXY_MAX_TCP_CONNECTIONS",
    arg: "N",
    defaultText: "1000",
    help: "most TCP client connections open at once",
  },
  {
    flag: "max-tcp-queries",
    env: "DOTPROXY_MAX_TCP_QUERIES",
    arg: "N",
    defaultText: "128",
    help: "most queries in flight on one TCP client connection",
  },
  {
    flag: "tcp-idle-timeout",
    env: "DOTPROXY_TCP_IDLE_TIMEOUT_MS",
    arg: "MS",
    defaultText: "10000",
    help: "idle TCP client connections close after this long",
  },
  {
    flag: "max-inflight",
    env: "DOTPROXY_MAX_INFLIGHT",
    arg: "N",
    defaultText: "10000",
    help: "most queries in flight in the whole proxy; more are dropped",
  },
  {
    flag: "upstream-connections",
    env: "DOTPROXY_UPSTREAM_CONNECTIONS",
    arg: "N",
    defaultText: "2",
    help: "most pipelined TLS connections per upstream",
  },
  {
    flag: "upstream-idle-timeout",
    env: "DOTPROXY_UPSTREAM_IDLE_TIMEOUT_MS",
    arg: "MS",
    defaultText: "30000",
    help: "idle upstream connections close after this long",
  },
  {
    flag: "",
    env: "DOTPROXY_CA_CERTS",
    arg: "",
    defaultText: "Deno's built-in roots only",
    help: "PEM text of extra CA certificates to trust for upstreams (text, not a path)",
  },
];

/**
 * The `--help` text: every flag with its environment variable and default.
 */
export function helpText(): string {
  const lines = [
    "dotproxy: forwards plain DNS (UDP and TCP) to DNS-over-TLS upstreams.",
    "",
    "Usage: dotproxy [healthcheck] [flags]",
    "",
    "  healthcheck   check a running proxy configured by the same flags and environment;",
    "                exit 0 when it answers, 1 otherwise",
    "",
    "Flags (flags win over environment variables, which win over defaults):",
  ];
  for (const setting of SETTINGS) {
    const name = setting.flag
      ? `--${setting.flag}${setting.arg ? " " + setting.arg : ""}`
      : "(env only)";
    lines.push(`  ${name}`);
    lines.push(`      ${setting.help}`);
    lines.push(`      env: ${setting.env}   default: ${setting.defaultText}`);
  }
  lines.push("  -h, --help       print this help");
  lines.push("  -V, --version    print the version");
  return lines.join("\n");
}

const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;

function isIpv6(text: string): boolean {
  if (!/^[0-9a-fA-F:.]+$/.test(text) || !text.includes(":")) return false;
  try {
    new URL(`http://[${text}]/`);
    return true;
  } catch {
    return false;
  }
}

/** True for an IPv4 or IPv6 literal (IPv6 without brackets). */
export function isIpLiteral(text: string): boolean {
  return IPV4.test(text) || isIpv6(text);
}

function isHostname(text: string): boolean {
  if (text.length === 0 || text.length > 253) return false;
  const labels = text.endsWith(".") ? text.slice(0, -1).split(".") : text.split(".");
  return labels.every((label) =>
    label.length > 0 && label.length <= 63 &&
    /^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$/.test(label)
  );
}

function parsePort(text: string, what: string): number {
  if (!/^\d{1,5}$/.test(text)) throw new ConfigError(`${what}: port "${text}" is not a number`);
  const port = Number(text);
  if (port < 1 || port > 65535) {
    throw new ConfigError(`${what}: port ${port} is out of range 1-65535`);
  }
  return port;
}

/** Splits `host:port`, `[v6]:port`, `host` or `[v6]` into its parts. */
function splitHostPort(text: string, what: string): { host: string; port: string | null } {
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    if (close < 0) throw new ConfigError(`${what}: missing "]" in "${text}"`);
    const host = text.slice(1, close);
    const rest = text.slice(close + 1);
    if (rest === "") return { host, port: null };
    if (!rest.startsWith(":")) throw new ConfigError(`${what}: unexpected "${rest}" in "${text}"`);
    return { host, port: rest.slice(1) };
  }
  const colons = text.split(":").length - 1;
  if (colons > 1) {
    throw new ConfigError(`${what}: IPv6 address "${text}" must be in brackets, like [::1]:5300`);
  }
  if (colons === 1) {
    const at = text.indexOf(":");
    return { host: text.slice(0, at), port: text.slice(at + 1) };
  }
  return { host: text, port: null };
}

/**
 * Parses `ADDR:PORT` (IPv6 in brackets) for a listening socket.
 *
 * @example
 * ```ts
 * import { parseListenAddress } from "./config.ts";
 * parseListenAddress("[::1]:5300", "--listen"); // { hostname: "::1", port: 5300 }
 * ```
 */
export function parseListenAddress(text: string, what: string): ListenAddress {
  const trimmed = text.trim();
  const { host, port } = splitHostPort(trimmed, `${what} "${trimmed}"`);
  if (port === null) throw new ConfigError(`${what} "${trimmed}": missing port (ADDR:PORT)`);
  const hostname = host === "localhost" ? "127.0.0.1" : host;
  if (!isIpLiteral(hostname)) {
    throw new ConfigError(`${what} "${trimmed}": "${host}" is not an IP address`);
  }
  return { hostname, port: parsePort(port, `${what} "${trimmed}"`) };
}

/**
 * Parses `IP[:PORT][#TLS_NAME]` for an upstream. Without `#TLS_NAME` the certificate is
 * verified against the IP address itself.
 *
 * @example
 * ```ts
 * import { parseUpstream } from "./config.ts";
 * parseUpstream("[2606:4700:4700::1111]#cloudflare-dns.com", "--upstream");
 * // { address: "2606:4700:4700::1111", port: 853, tlsName: "cloudflare-dns.com", ... }
 * ```
 */
export function parseUpstream(text: string, what: string): UpstreamSpec {
  const trimmed = text.trim();
  const context = `${what} "${trimmed}"`;
  if (trimmed === "") throw new ConfigError(`${what}: empty upstream`);
  const hash = trimmed.indexOf("#");
  const hostPort = hash >= 0 ? trimmed.slice(0, hash) : trimmed;
  const { host, port } = splitHostPort(hostPort, context);
  if (!isIpLiteral(host)) {
    throw new ConfigError(
      `${context}: "${host}" is not an IP address (dotproxy never resolves names to reach ` +
        `its upstreams; write IP#${host})`,
    );
  }
  const tlsName = hash >= 0 ? trimmed.slice(hash + 1) : host;
  if (!isHostname(tlsName) && !isIpLiteral(tlsName)) {
    throw new ConfigError(`${context}: TLS name "${tlsName}" is not a valid host name`);
  }
  const portNumber = port === null ? 853 : parsePort(port, context);
  const shownHost = host.includes(":") ? `[${host}]` : host;
  return {
    address: host,
    port: portNumber,
    tlsName,
    label: `${shownHost}:${portNumber}#${tlsName}`,
  };
}

const PEM_BLOCK = /-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/g;

/**
 * Splits PEM text into certificate blocks, checking each is base64 of a DER SEQUENCE.
 * Throws {@linkcode ConfigError} naming `what` when the text holds no valid certificate.
 */
export function parsePemCertificates(text: string, what: string): string[] {
  const blocks: string[] = [];
  const stripped = text.replace(PEM_BLOCK, (block, body: string) => {
    const base64 = body.replace(/\s+/g, "");
    let der: Uint8Array;
    try {
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(base64)) throw new Error("not base64");
      der = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    } catch {
      throw new ConfigError(`${what}: certificate ${blocks.length + 1} is not valid base64`);
    }
    if (der.length < 64 || der[0] !== 0x30) {
      throw new ConfigError(`${what}: certificate ${blocks.length + 1} is not a DER certificate`);
    }
    blocks.push(block);
    return "";
  });
  if (blocks.length === 0) {
    const shown = text.length > 40 ? text.slice(0, 40) + "..." : text;
    throw new ConfigError(`${what}: no PEM certificate found in ${JSON.stringify(shown)}`);
  }
  if (/-----BEGIN/.test(stripped)) {
    throw new ConfigError(`${what}: unterminated or non-certificate PEM block`);
  }
  return blocks;
}

function parseInteger(text: string, what: string, min: number, max: number): number {
  const trimmed = text.trim();
  if (!/^\d+$/.test(trimmed)) throw new ConfigError(`${what}: "${text}" is not a whole number`);
  const value = Number(trimmed);
  if (value < min || value > max) {
    throw new ConfigError(`${what}: ${value} is out of range ${min}-${max}`);
  }
  return value;
}

function parseBoolean(text: string, what: string): boolean {
  const lower = text.trim().toLowerCase();
  if (["1", "true", "yes", "on"].includes(lower)) return true;
  if (["0", "false", "no", "off", ""].includes(lower)) return false;
  throw new ConfigError(`${what}: "${text}" is not true or false`);
}

function splitList(text: string): string[] {
  return text.split(",").map((s) => s.trim()).filter((s) => s !== "");
}

/**
 * The `DOTPROXY_*` names among `names` that no setting reads (typos, or variables that
 * Kubernetes service links inject), sorted.
 *
 * @example
 * ```ts
 * import { unknownVariables } from "./config.ts";
 * unknownVariables(["PATH", "DOTPROXY_UPSTREAM", "DOTPROXY_LISTEN"]); // ["DOTPROXY_UPSTREAM"]
 * ```
 */
export function unknownVariables(names: string[]): string[] {
  const known = new Set(SETTINGS.map((setting) => setting.env));
  return names.filter((name) => name.startsWith("DOTPROXY_") && !known.has(name)).sort();
}

/** Reads one environment variable; injected so tests and the config never touch globals. */
export type EnvReader = (name: string) => string | undefined;

/**
 * Builds the configuration from arguments and environment.
 *
 * @example
 * ```ts
 * import { parseConfig } from "./config.ts";
 * const request = parseConfig(["--listen", "127.0.0.1:5353"], (name) => Deno.env.get(name));
 * if (request.kind === "config") console.log(request.config.listen);
 * ```
 */
export function parseConfig(args: string[], env: EnvReader): ConfigRequest {
  type Values = Record<string, string | boolean | string[] | undefined>;
  let values: Values;
  let positionals: string[];
  try {
    const options: Record<
      string,
      { type: "string" | "boolean"; multiple?: boolean; short?: string }
    > = {
      help: { type: "boolean", short: "h" },
      version: { type: "boolean", short: "V" },
    };
    for (const setting of SETTINGS) {
      if (!setting.flag) continue;
      options[setting.flag] = setting.arg === ""
        ? { type: "boolean" }
        : { type: "string", multiple: setting.flag === "listen" || setting.flag === "upstream" };
    }
    const parsed = parseArgs({ args, options, strict: true, allowPositionals: true });
    values = parsed.values as Values;
    positionals = parsed.positionals;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const unknown = /Unknown option '([^']+)'/.exec(message);
    if (unknown) throw new ConfigError(`unknown flag ${unknown[1]} (see --help)`);
    const missing = /Option '([^']+?)(?: <value>)?' argument missing/.exec(message);
    if (missing) throw new ConfigError(`flag ${missing[1].split(",").pop()?.trim()} needs a value`);
    throw new ConfigError(message.split("\n")[0]);
  }
  if (values.help) return { kind: "help" };
  if (values.version) return { kind: "version" };

  let command: Config["command"] = "serve";
  if (positionals.length > 0) {
    if (positionals[0] !== "healthcheck" || positionals.length > 1) {
      const extra = positionals[0] === "healthcheck" ? positionals[1] : positionals[0];
      throw new ConfigError(`unknown command "${extra}" (see --help)`);
    }
    command = "healthcheck";
  }

  /** The raw text of a setting and the name to blame when it is wrong. */
  const pick = (flag: string, envName: string): { text: string; what: string } | null => {
    const value = values[flag];
    if (typeof value === "string") return { text: value, what: `--${flag}` };
    const fromEnv = env(envName);
    if (fromEnv !== undefined) return { text: fromEnv, what: envName };
    return null;
  };
  const pickList = (flag: string, envName: string): { items: string[]; what: string } | null => {
    const value = values[flag];
    if (Array.isArray(value) && value.length > 0) {
      return { items: value.flatMap(splitList), what: `--${flag}` };
    }
    const fromEnv = env(envName);
    if (fromEnv !== undefined) return { items: splitList(fromEnv), what: envName };
    return null;
  };
  const integer = (flag: string, envName: string, fallback: number, min: number, max: number) => {
    const raw = pick(flag, envName);
    return raw ? parseInteger(raw.text, raw.what, min, max) : fallback;
  };

  const listenRaw = pickList("listen", "DOTPROXY_LISTEN");
  if (listenRaw && listenRaw.items.length === 0) {
    throw new ConfigError(`${listenRaw.what}: no listen address given`);
  }
  const listen = listenRaw
    ? listenRaw.items.map((item) => parseListenAddress(item, listenRaw.what))
    : [{ hostname: "127.0.0.1", port: 5300 }];

  const upstreamRaw = pickList("upstream", "DOTPROXY_UPSTREAMS");
  if (upstreamRaw && upstreamRaw.items.length === 0) {
    throw new ConfigError(`${upstreamRaw.what}: the upstream list is empty`);
  }
  const upstreams = (upstreamRaw?.items ??
    ["1.1.1.1:853#cloudflare-dns.com", "1.0.0.1:853#cloudflare-dns.com"])
    .map((item) => parseUpstream(item, upstreamRaw?.what ?? "default upstream"));

  const levelRaw = pick("log-level", "DOTPROXY_LOG_LEVEL");
  const logLevel = (levelRaw?.text.trim().toLowerCase() ?? "info") as LogLevel;
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(
      `${levelRaw?.what}: unknown log level "${levelRaw?.text}" (debug, info, warn or error)`,
    );
  }
  const formatRaw = pick("log-format", "DOTPROXY_LOG_FORMAT");
  const logFormat = (formatRaw?.text.trim().toLowerCase() ?? "text") as LogFormat;
  if (logFormat !== "text" && logFormat !== "json") {
    throw new ConfigError(
      `${formatRaw?.what}: unknown log format "${formatRaw?.text}" (text or json)`,
    );
  }

  let logQueries = false;
  if (values["log-queries"] === true) logQueries = true;
  else {
    const raw = env("DOTPROXY_LOG_QUERIES");
    if (raw !== undefined) logQueries = parseBoolean(raw, "DOTPROXY_LOG_QUERIES");
  }

  const httpRaw = pick("http", "DOTPROXY_HTTP");
  const http = httpRaw && httpRaw.text.trim() !== ""
    ? parseListenAddress(httpRaw.text, httpRaw.what)
    : null;

  const caRaw = env("DOTPROXY_CA_CERTS");
  const caCerts = caRaw !== undefined && caRaw.trim() !== ""
    ? parsePemCertificates(caRaw, "DOTPROXY_CA_CERTS")
    : [];

  return {
    kind: "config",
    config: {
      command,
      listen,
      upstreams,
      timeoutMs: integer("timeout", "DOTPROXY_TIMEOUT_MS", 4000, 50, 600_000),
      logLevel,
      logFormat,
      logQueries,
      caCerts,
      http,
      udpMaxSize: integer("udp-max-size", "DOTPROXY_UDP_MAX_SIZE", 1232, 512, 65535),
      maxTcpConnections: integer(
        "max-tcp-connections",
        "DOTPROXY_MAX_TCP_CONNECTIONS",
        1000,
        1,
        1_000_000,
      ),
      maxTcpQueriesPerConnection: integer(
        "max-tcp-queries",
        "DOTPROXY_MAX_TCP_QUERIES",
        128,
        1,
        65535,
      ),
      tcpIdleTimeoutMs: integer(
        "tcp-idle-timeout",
        "DOTPROXY_TCP_IDLE_TIMEOUT_MS",
        10_000,
        100,
        3_600_000,
      ),
      maxInflight: integer("max-inflight", "DOTPROXY_MAX_INFLIGHT", 10_000, 1, 1_000_000),
      upstreamConnections: integer(
        "upstream-connections",
        "DOTPROXY_UPSTREAM_CONNECTIONS",
        2,
        1,
        64,
      ),
      upstreamIdleTimeoutMs: integer(
        "upstream-idle-timeout",
        "DOTPROXY_UPSTREAM_IDLE_TIMEOUT_MS",
        30_000,
        100,
        3_600_000,
      ),
    },
  };
}
