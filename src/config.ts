/**
 * Configuration from command-line flags and `DOTPROXY_*` environment variables, validated
 * once at start. Flags win over the environment, the environment over defaults. Every
 * error names the flag or variable and the value that was wrong.
 *
 * Each setting is declared once, in one table: its flag, variable, placeholder, default,
 * bounds, parser, help text and the {@linkcode Config} field it fills. Parsing, `--help`,
 * the list of known variables and {@linkcode defaultConfig} are all read from that table.
 *
 * @module
 */

import { formatHostPort } from "./address.ts";
import { LOG_LEVELS, type LogFormat, type LogLevel } from "./log.ts";
import { RCODE_MNEMONICS } from "./dns/wire.ts";
import {
  CertificateError,
  checkCertificateText,
  checkKeyText,
  loadServerCertificate,
} from "./tls/certificate.ts";

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

/** A network in CIDR notation, such as `10.0.0.0/8` or `fc00::/7`. */
export interface Cidr {
  /** 4 for IPv4, 6 for IPv6. */
  family: 4 | 6;
  /** The network address, 4 or 16 bytes, host bits zeroed. */
  bytes: Uint8Array;
  /** Prefix length, 0-32 for IPv4, 0-128 for IPv6. */
  prefix: number;
  /** Canonical text, such as `10.0.0.0/8` or `fc00::/7` (IPv6 as RFC 5952 writes it). */
  text: string;
}

/** How the next upstream is chosen for a query. */
export type Strategy = "least-outstanding" | "fastest" | "round-robin" | "failover" | "random";

/** Every upstream selection strategy, as `--strategy` accepts them. */
export const STRATEGIES: readonly Strategy[] = [
  "least-outstanding",
  "fastest",
  "round-robin",
  "failover",
  "random",
];

/**
 * The strategy used unless `--strategy` says otherwise. Chosen by measurement
 * (`bench/failover.sh`, 1,000 q/s, two upstreams, the broken one first): with one frozen it
 * alone kept the maximum latency at 30 ms (the others 104-106 ms), with one black-holed or slow
 * for 10% of names it had the lowest maximum too (15 and 40 ms), and with both healthy the
 * lowest p50 and maximum, since it keeps traffic on one upstream while that one keeps up.
 */
export const DEFAULT_STRATEGY: Strategy = "least-outstanding";

/** The validated configuration, built once and passed down. */
export interface Config {
  /** The subcommand: serve (default) or healthcheck. */
  command: "serve" | "healthcheck";
  /** Addresses to serve DNS on, UDP and TCP each. */
  listen: ListenAddress[];
  /** Where the metrics and health HTTP endpoint listens, if anywhere. */
  http: ListenAddress | null;
  /**
   * The certificate chain served to TLS clients (DoT, DoH), PEM text, leaf first; `""` when
   * unset. Checked with the key by {@linkcode checkServerCertificate}.
   */
  tlsCert: string;
  /** The private key of {@linkcode Config.tlsCert}, PEM text; `""` when unset. */
  tlsKey: string;
  /** Addresses to serve DNS over TLS on (RFC 7858). */
  listenDot: ListenAddress[];
  /** Addresses to serve DNS over HTTPS on (TLS; HTTP/2 and HTTP/1.1). */
  listenDoh: ListenAddress[];
  /** Addresses to serve DNS over HTTP without TLS on, for a TLS-terminating proxy in front. */
  listenDohPlain: ListenAddress[];
  /** The DoH path (`/dns-query`). */
  dohPath: string;
  /** Peers whose `X-Forwarded-For` header is believed (DoH behind a reverse proxy). */
  trustedProxies: Cidr[];
  /** Answer `_dns.resolver.arpa` SVCB with the encrypted listeners (RFC 9462). */
  ddr: boolean;
  /** Largest UDP answer sent to any client (EDNS sizes above are clamped). */
  udpMaxSize: number;
  /** Most TCP client connections open at once. */
  maxTcpConnections: number;
  /** Most TCP connections open at once from one client address. */
  maxTcpConnectionsPerClient: number;
  /** Most queries in flight on one TCP client connection. */
  maxTcpQueriesPerConnection: number;
  /** Idle TCP client connections close after this many milliseconds. */
  tcpIdleTimeoutMs: number;
  /**
   * Most queries in flight upstream in the whole proxy; beyond it new UDP queries that need an
   * upstream are dropped (cache hits are still answered) and TCP reading pauses.
   */
  maxInflight: number;
  /** Client networks allowed to query; queries from anywhere else get REFUSED. */
  allow: Cidr[];
  /** Queries per second allowed from one client address; 0 means no limit. */
  rateLimit: number;
  /** Queries one client address may send at once above `rateLimit` (token bucket size). */
  rateLimitBurst: number;
  /** Refuse queries of type ANY (RFC 8482) rather than forwarding them. */
  refuseAny: boolean;
  /** DoT upstreams, in configured order. */
  upstreams: UpstreamSpec[];
  /** Extra CA certificates (PEM blocks) trusted for upstream verification. */
  caCerts: string[];
  /** Per-query deadline in milliseconds. */
  timeoutMs: number;
  /** Deadline for one TCP connect plus TLS handshake to an upstream, in milliseconds. */
  connectTimeoutMs: number;
  /** How the next upstream is chosen. */
  strategy: Strategy;
  /**
   * Milliseconds to wait before also sending a query to a second upstream; `"auto"` derives it
   * from measured latency, 0 turns hedging off.
   */
  hedgeDelay: "auto" | number;
  /** Most hedged queries, as a percentage of all queries sent upstream (0-100). */
  hedgeBudgetPercent: number;
  /** Answers with these response codes are retried on another upstream. */
  failoverRcodes: number[];
  /** How often upstreams are probed, in milliseconds; 0 turns probing off. */
  healthCheckIntervalMs: number;
  /** Most TLS connections per upstream. */
  upstreamConnections: number;
  /** Idle upstream connections close after this many milliseconds. */
  upstreamIdleTimeoutMs: number;
  /** Re-send a waiting query to release answers a server holds back under Nagle's algorithm. */
  upstreamNudge: boolean;
  /** Pad queries sent upstream with EDNS(0) padding (RFC 7830, RFC 8467). */
  padding: boolean;
  /** Most entries in the answer cache; 0 turns the cache off. */
  cacheSize: number;
  /** Smallest TTL kept in the cache, in seconds; smaller TTLs are raised to it. */
  cacheMinTtl: number;
  /** Largest TTL kept in the cache, in seconds; larger TTLs are lowered to it. */
  cacheMaxTtl: number;
  /** Longest time a negative answer (NXDOMAIN, NODATA) is cached, in seconds. */
  cacheMaxNegativeTtl: number;
  /**
   * Seconds after expiry that a cached answer may still be served when upstreams fail
   * (RFC 8767); 0 turns serve-stale off.
   */
  serveStaleSeconds: number;
  /** Milliseconds to wait for upstreams before answering from stale data (RFC 8767). */
  staleAnswerTimeoutMs: number;
  /** Refresh popular cache entries shortly before they expire. */
  cachePrefetch: boolean;
  /** Log level. */
  logLevel: LogLevel;
  /** Log line format. */
  logFormat: LogFormat;
  /** Log one line per query (names are private: off by default). */
  logQueries: boolean;
  /** Milliseconds to keep serving after SIGTERM (readiness already failing) before closing. */
  shutdownDelayMs: number;
  /** Milliseconds in-flight queries get to finish at shutdown before the process exits. */
  shutdownTimeoutMs: number;
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

/** How a flag takes its value on the command line. */
export type SettingKind =
  /** `--flag VALUE` or `--flag=VALUE`; given twice, the last wins. */
  | "value"
  /** Repeatable `--flag VALUE`, each value itself comma-separated (as the variable is). */
  | "list"
  /** `--flag`, `--flag=false`, or `--flag false` when the next word is a boolean word. */
  | "boolean";

/** One setting as `--help`, the README and the deploy checks see it. */
export interface Setting {
  /** Flag name without the leading `--`; `""` for a setting read from the environment only. */
  flag: string;
  /** Environment variable that sets the same value. */
  env: string;
  /** Placeholder for the value in `--help`. */
  arg: string;
  /** Default shown in `--help` and the README. */
  defaultText: string;
  /** Accepted values shown in `--help`, such as `50-600000`; `""` when `help` says it all. */
  range: string;
  /** One-line description for `--help`. */
  help: string;
  /** The heading `--help` lists the setting under. */
  group: string;
  /** The {@linkcode Config} field the setting fills. */
  field: SettingField;
  /** How the flag takes its value. */
  kind: SettingKind;
}

/** The fields that settings fill (the subcommand is a positional word, not a setting). */
export type SettingField = Exclude<keyof Config, "command">;

/** How one setting is declared in the table; the field it fills is its key there. */
interface Declaration<K extends SettingField> {
  flag: string;
  env: string;
  arg: string;
  help: string;
  group: string;
  kind: SettingKind;
  defaultText: string;
  range: string;
  /** Turns the flag's or variable's text into the field's value; `what` names the input. */
  parse: (text: string, what: string) => Config[K];
  /** The value when neither flag nor variable is given; sees the fields declared before. */
  fallback: (earlier: Readonly<Partial<Config>>) => Config[K];
}

// ---------------------------------------------------------------------------------------------
// Value parsers, shared by the table.

function parseInteger(text: string, what: string, min: number, max: number): number {
  const trimmed = text.trim();
  if (!/^\d+$/.test(trimmed)) throw new ConfigError(`${what}: "${text}" is not a whole number`);
  const value = Number(trimmed);
  if (value < min || value > max) {
    throw new ConfigError(`${what}: ${trimmed} is out of range ${min}-${max}`);
  }
  return value;
}

const TRUE_WORDS = ["true", "yes", "on", "1"];
const FALSE_WORDS = ["false", "no", "off", "0"];

function parseBoolean(text: string, what: string): boolean {
  const lower = text.trim().toLowerCase();
  if (TRUE_WORDS.includes(lower)) return true;
  // An empty variable reads as false: `DOTPROXY_X=` is the usual way to switch a thing off.
  if (lower === "" || FALSE_WORDS.includes(lower)) return false;
  throw new ConfigError(
    `${what}: "${text}" is not true or false (true/false, yes/no, on/off, 1/0)`,
  );
}

function splitList(text: string): string[] {
  return text.split(",").map((s) => s.trim()).filter((s) => s !== "");
}

/** What a kind of value decides in a declaration: its parser, its default. */
type Kind<T> = Pick<Declaration<SettingField>, "kind" | "defaultText" | "range"> & {
  parse: (text: string, what: string) => T;
  fallback: () => T;
};

/** A whole number in `min..max`. */
function whole(fallback: number, min: number, max: number): Kind<number> {
  return {
    kind: "value",
    defaultText: String(fallback),
    range: `${min}-${max}`,
    parse: (text, what) => parseInteger(text, what, min, max),
    fallback: () => fallback,
  };
}

/** A whole number that is 0 (off) or in `min..max`. */
function wholeOrOff(fallback: number, min: number, max: number): Kind<number> {
  return {
    kind: "value",
    defaultText: String(fallback),
    range: `0 (off) or ${min}-${max}`,
    parse: (text, what) => {
      const value = parseInteger(text, what, 0, max);
      if (value !== 0 && value < min) {
        throw new ConfigError(
          `${what}: ${text.trim()} is out of range (0 to turn it off, or ${min}-${max})`,
        );
      }
      return value;
    },
    fallback: () => fallback,
  };
}

/** A boolean flag. */
function toggle(fallback: boolean): Kind<boolean> & { arg: string } {
  return {
    kind: "boolean",
    arg: "[true|false]",
    defaultText: String(fallback),
    range: "",
    parse: parseBoolean,
    fallback: () => fallback,
  };
}

/** One of a fixed set of words, case-insensitive. */
function oneOf<T extends string>(words: readonly T[], fallback: T, noun: string): Kind<T> {
  return {
    kind: "value",
    defaultText: fallback,
    range: "",
    parse: (text, what) => {
      const lower = text.trim().toLowerCase();
      const found = words.find((word) => word === lower);
      if (found === undefined) {
        throw new ConfigError(`${what}: unknown ${noun} "${text}" (${sayList(words, "or")})`);
      }
      return found;
    },
    fallback: () => fallback,
  };
}

/** `a, b, c or d`. */
function sayList(words: readonly string[], conjunction: string): string {
  return words.length < 2
    ? words.join("")
    : `${words.slice(0, -1).join(", ")} ${conjunction} ${words[words.length - 1]}`;
}

const DEFAULT_LISTEN = "127.0.0.1:5300";
const DEFAULT_UPSTREAMS = ["1.1.1.1:853#cloudflare-dns.com", "1.0.0.1:853#cloudflare-dns.com"];
/** Loopback, private (RFC 1918, RFC 4193), shared (RFC 6598) and link-local networks. */
const DEFAULT_ALLOW = [
  "127.0.0.0/8",
  "10.0.0.0/8",
  "172.16.0.0/12",
  "192.168.0.0/16",
  "100.64.0.0/10",
  "169.254.0.0/16",
  "::1/128",
  "fc00::/7",
  "fe80::/10",
];
const DEFAULT_FAILOVER_RCODES = "SERVFAIL,REFUSED";

function parseRcodes(text: string, what: string): number[] {
  const codes: number[] = [];
  for (const item of splitList(text)) {
    const upper = item.toUpperCase();
    let code = RCODE_MNEMONICS.indexOf(upper);
    if (code < 0 && /^\d{1,2}$/.test(item) && Number(item) <= 15) code = Number(item);
    if (code < 0) {
      throw new ConfigError(
        `${what}: "${item}" is not a response code (${RCODE_MNEMONICS.join(", ")}, or 0-15)`,
      );
    }
    if (!codes.includes(code)) codes.push(code);
  }
  return codes;
}

function parseHedgeDelay(text: string, what: string): "auto" | number {
  const trimmed = text.trim();
  if (trimmed.toLowerCase() === "auto") return "auto";
  if (!/^\d+$/.test(trimmed)) {
    throw new ConfigError(`${what}: "${text}" is not auto or a whole number of milliseconds`);
  }
  return parseInteger(trimmed, what, 0, 60_000);
}

/** PEM text checked by `check`; `""` for an empty variable. */
function checkedPem(
  text: string,
  what: string,
  check: (text: string, variable: string) => void,
): string {
  if (text.trim() === "") return "";
  try {
    check(text, what);
  } catch (error) {
    if (error instanceof CertificateError) throw new ConfigError(error.message);
    throw error;
  }
  return text;
}

function parseOptionalListenList(text: string, what: string): ListenAddress[] {
  return splitList(text).map((item) => parseListenAddress(item, what));
}

function parseDohPath(text: string, what: string): string {
  const path = text.trim();
  if (!/^\/[A-Za-z0-9._~!$&'()*+,;=:@\/-]*$/.test(path)) {
    throw new ConfigError(
      `${what}: "${text}" is not an absolute path without query (like /dns-query)`,
    );
  }
  return path;
}

function parseListenList(text: string, what: string): ListenAddress[] {
  const items = splitList(text);
  if (items.length === 0) throw new ConfigError(`${what}: no listen address given`);
  return items.map((item) => parseListenAddress(item, what));
}

function parseUpstreamList(text: string, what: string): UpstreamSpec[] {
  const items = splitList(text);
  if (items.length === 0) throw new ConfigError(`${what}: the upstream list is empty`);
  return items.map((item) => parseUpstream(item, what));
}

function parseCidrList(text: string, what: string): Cidr[] {
  const items = splitList(text);
  if (items.length === 0) {
    throw new ConfigError(
      `${what}: the allow list is empty (0.0.0.0/0,::/0 allows everyone)`,
    );
  }
  return items.map((item) => parseCidr(item, what));
}

// ---------------------------------------------------------------------------------------------
// The table. Keyed by the Config field, so the compiler checks that every field has exactly
// one setting and that each parser returns that field's type. Its order is the order of
// `--help` and of the README table; a setting's fallback may read settings declared above it.

const TABLE: { readonly [K in SettingField]: Declaration<K> } = {
  listen: {
    flag: "listen",
    env: "DOTPROXY_LISTEN",
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "list",
    defaultText: DEFAULT_LISTEN,
    range: "",
    help: "address to serve DNS on, UDP and TCP (repeatable; env: comma-separated)",
    parse: parseListenList,
    fallback: () => [parseListenAddress(DEFAULT_LISTEN, "default --listen")],
  },
  http: {
    flag: "http",
    env: "DOTPROXY_HTTP",
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "value",
    defaultText: "off",
    range: "",
    help: "serve /metrics, /healthz and /readyz over HTTP here",
    parse: (text, what) => text.trim() === "" ? null : parseListenAddress(text, what),
    fallback: () => null,
  },
  tlsCert: {
    flag: "",
    env: "DOTPROXY_TLS_CERT",
    arg: "",
    group: "Serving",
    kind: "value",
    defaultText: "none",
    range: "",
    help: "PEM text of the certificate chain served to TLS clients, leaf first (text, not a " +
      "path); required with a TLS listener",
    parse: (text, what) => checkedPem(text, what, checkCertificateText),
    fallback: () => "",
  },
  tlsKey: {
    flag: "",
    env: "DOTPROXY_TLS_KEY",
    arg: "",
    group: "Serving",
    kind: "value",
    defaultText: "none",
    range: "",
    help: "PEM text of the private key of DOTPROXY_TLS_CERT, unencrypted (text, not a path)",
    parse: (text, what) => checkedPem(text, what, checkKeyText),
    fallback: () => "",
  },
  listenDot: {
    flag: "listen-dot",
    env: "DOTPROXY_LISTEN_DOT",
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "list",
    defaultText: "off",
    range: "",
    help: "serve DNS over TLS (RFC 7858; port 853 by convention) here; needs " +
      "DOTPROXY_TLS_CERT and DOTPROXY_TLS_KEY (repeatable; env: comma-separated)",
    parse: parseOptionalListenList,
    fallback: () => [],
  },
  listenDoh: {
    flag: "listen-doh",
    env: "DOTPROXY_LISTEN_DOH",
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "list",
    defaultText: "off",
    range: "",
    help: "serve DNS over HTTPS (RFC 8484; HTTP/2 and HTTP/1.1 over TLS) here; needs " +
      "DOTPROXY_TLS_CERT and DOTPROXY_TLS_KEY (repeatable; env: comma-separated)",
    parse: parseOptionalListenList,
    fallback: () => [],
  },
  listenDohPlain: {
    flag: "listen-doh-plain",
    env: "DOTPROXY_LISTEN_DOH_PLAIN",
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "list",
    defaultText: "off",
    range: "",
    help: "serve DNS over plain HTTP (HTTP/1.1, HTTP/2 with prior knowledge) here, for a " +
      "TLS-terminating proxy in front; loopback or private addresses only unless --allow is " +
      "given (repeatable; env: comma-separated)",
    parse: parseOptionalListenList,
    fallback: () => [],
  },
  dohPath: {
    flag: "doh-path",
    env: "DOTPROXY_DOH_PATH",
    arg: "PATH",
    group: "Serving",
    kind: "value",
    defaultText: "/dns-query",
    range: "",
    help: "the path DoH queries are served on; other paths get 404",
    parse: parseDohPath,
    fallback: () => "/dns-query",
  },
  trustedProxies: {
    flag: "trusted-proxy",
    env: "DOTPROXY_TRUSTED_PROXIES",
    arg: "CIDR",
    group: "Serving",
    kind: "list",
    defaultText: "none",
    range: "",
    help: "believe X-Forwarded-For on DoH requests from these peers only: the client is the " +
      "right-most address not in this list (repeatable; env: comma-separated)",
    parse: (text, what) => splitList(text).map((item) => parseCidr(item, what)),
    fallback: () => [],
  },
  ddr: {
    flag: "ddr",
    env: "DOTPROXY_DDR",
    group: "Serving",
    ...toggle(true),
    defaultText: "true (with an encrypted listener)",
    help: "answer _dns.resolver.arpa SVCB with the encrypted listeners, so that clients " +
      "upgrade from plain DNS (RFC 9462); nothing under resolver.arpa ever goes upstream",
  },
  udpMaxSize: {
    flag: "udp-max-size",
    env: "DOTPROXY_UDP_MAX_SIZE",
    arg: "BYTES",
    group: "Serving",
    ...whole(1232, 512, 65535),
    help: "largest UDP answer; larger answers are truncated with TC=1",
  },
  maxTcpConnections: {
    flag: "max-tcp-connections",
    env: "DOTPROXY_MAX_TCP_CONNECTIONS",
    arg: "N",
    group: "Serving",
    ...whole(1000, 1, 1_000_000),
    help: "most TCP client connections open at once",
  },
  maxTcpConnectionsPerClient: {
    flag: "max-tcp-connections-per-client",
    env: "DOTPROXY_MAX_TCP_CONNECTIONS_PER_CLIENT",
    arg: "N",
    group: "Serving",
    ...whole(64, 1, 1_000_000),
    help: "most TCP connections open at once from one client address",
  },
  maxTcpQueriesPerConnection: {
    flag: "max-tcp-queries",
    env: "DOTPROXY_MAX_TCP_QUERIES",
    arg: "N",
    group: "Serving",
    ...whole(128, 1, 65535),
    help: "most queries in flight on one TCP client connection",
  },
  tcpIdleTimeoutMs: {
    flag: "tcp-idle-timeout",
    env: "DOTPROXY_TCP_IDLE_TIMEOUT_MS",
    arg: "MS",
    group: "Serving",
    ...whole(10_000, 100, 3_600_000),
    help: "idle TCP client connections close after this long",
  },
  maxInflight: {
    flag: "max-inflight",
    env: "DOTPROXY_MAX_INFLIGHT",
    arg: "N",
    group: "Serving",
    ...whole(10_000, 1, 1_000_000),
    help: "most queries waiting on upstreams; beyond it UDP queries that need an upstream " +
      "are dropped (cache hits are still answered) and TCP reading pauses",
  },
  allow: {
    flag: "allow",
    env: "DOTPROXY_ALLOW",
    arg: "CIDR",
    group: "Clients",
    kind: "list",
    defaultText: DEFAULT_ALLOW.join(", "),
    range: "",
    help: "only clients in these networks are answered; 0.0.0.0/0 and ::/0 allow everyone " +
      "(repeatable; env: comma-separated)",
    parse: parseCidrList,
    fallback: () => DEFAULT_ALLOW.map((text) => parseCidr(text, "default --allow")),
  },
  rateLimit: {
    flag: "rate-limit",
    env: "DOTPROXY_RATE_LIMIT",
    arg: "QPS",
    group: "Clients",
    ...whole(0, 0, 1_000_000),
    help: "queries per second answered from one client address; 0 means no limit",
  },
  rateLimitBurst: {
    flag: "rate-limit-burst",
    env: "DOTPROXY_RATE_LIMIT_BURST",
    arg: "N",
    group: "Clients",
    ...whole(1, 1, 10_000_000),
    defaultText: "2x --rate-limit",
    help: "queries one client address may send at once above --rate-limit",
    // At least 1 so that the value stays in range when rate limiting is off.
    fallback: (earlier) => Math.max(1, 2 * (earlier.rateLimit ?? 0)),
  },
  refuseAny: {
    flag: "refuse-any",
    env: "DOTPROXY_REFUSE_ANY",
    group: "Clients",
    ...toggle(true),
    help: "answer ANY over UDP at once with an empty TC=1 reply (RFC 8482), so it cannot " +
      "amplify; over TCP ANY is forwarded",
  },
  upstreams: {
    flag: "upstream",
    env: "DOTPROXY_UPSTREAMS",
    arg: "IP[:PORT][#TLS_NAME]",
    group: "Upstreams",
    kind: "list",
    defaultText: DEFAULT_UPSTREAMS.join(","),
    range: "",
    help: "DNS-over-TLS upstream; the certificate is verified against TLS_NAME " +
      "(repeatable; env: comma-separated)",
    parse: parseUpstreamList,
    fallback: () => DEFAULT_UPSTREAMS.map((text) => parseUpstream(text, "default --upstream")),
  },
  caCerts: {
    flag: "",
    env: "DOTPROXY_CA_CERTS",
    arg: "",
    group: "Upstreams",
    kind: "value",
    defaultText: "Deno's built-in roots only",
    range: "",
    help: "PEM text of extra CA certificates to trust for upstreams (text, not a path)",
    parse: (text, what) => text.trim() === "" ? [] : parsePemCertificates(text, what),
    fallback: () => [],
  },
  timeoutMs: {
    flag: "timeout",
    env: "DOTPROXY_TIMEOUT_MS",
    arg: "MS",
    group: "Upstreams",
    ...whole(4000, 50, 600_000),
    help: "per-query deadline; a query unanswered by then gets SERVFAIL",
  },
  connectTimeoutMs: {
    flag: "connect-timeout",
    env: "DOTPROXY_CONNECT_TIMEOUT_MS",
    arg: "MS",
    group: "Upstreams",
    ...whole(1000, 50, 60_000),
    help: "deadline for one TCP connect and TLS handshake to an upstream (a question waiting " +
      "on a handshake also goes to another upstream long before it)",
  },
  strategy: {
    flag: "strategy",
    env: "DOTPROXY_STRATEGY",
    arg: "NAME",
    group: "Upstreams",
    ...oneOf(STRATEGIES, DEFAULT_STRATEGY, "strategy"),
    help: `how to pick an upstream: ${sayList(STRATEGIES, "or")}`,
  },
  hedgeDelay: {
    flag: "hedge-delay",
    env: "DOTPROXY_HEDGE_DELAY",
    arg: "auto|MS",
    group: "Upstreams",
    kind: "value",
    defaultText: "auto",
    range: "auto, 0 (off) or 1-60000",
    help: "also ask a second upstream when the first has not answered after this long; " +
      "auto: the fastest upstream's recent p95 answer time, 10-1000 ms",
    parse: parseHedgeDelay,
    fallback: () => "auto",
  },
  hedgeBudgetPercent: {
    flag: "hedge-budget",
    env: "DOTPROXY_HEDGE_BUDGET",
    arg: "PERCENT",
    group: "Upstreams",
    ...whole(10, 0, 100),
    help: "most hedged queries, as a percentage of all queries sent upstream",
  },
  failoverRcodes: {
    flag: "failover-rcodes",
    env: "DOTPROXY_FAILOVER_RCODES",
    arg: "LIST",
    group: "Upstreams",
    kind: "value",
    defaultText: DEFAULT_FAILOVER_RCODES,
    range: "response code names or 0-15, comma-separated; empty for none",
    help: "answers with these response codes are retried on another upstream",
    parse: parseRcodes,
    fallback: () => parseRcodes(DEFAULT_FAILOVER_RCODES, "default --failover-rcodes"),
  },
  healthCheckIntervalMs: {
    flag: "health-check-interval",
    env: "DOTPROXY_HEALTH_CHECK_INTERVAL_MS",
    arg: "MS",
    group: "Upstreams",
    ...wholeOrOff(10_000, 100, 3_600_000),
    help: "health-check an idle upstream this often, so a dead one is known before a client " +
      "pays for it (one that is down is checked every 500 ms regardless)",
  },
  upstreamConnections: {
    flag: "upstream-connections",
    env: "DOTPROXY_UPSTREAM_CONNECTIONS",
    arg: "N",
    group: "Upstreams",
    ...whole(8, 1, 64),
    help: "most pipelined TLS connections per upstream; at light load each query goes to an " +
      "idle one (answered at once), more open as needed and idle ones close",
  },
  upstreamIdleTimeoutMs: {
    flag: "upstream-idle-timeout",
    env: "DOTPROXY_UPSTREAM_IDLE_TIMEOUT_MS",
    arg: "MS",
    group: "Upstreams",
    ...whole(30_000, 100, 3_600_000),
    help: "idle upstream connections close after this long",
  },
  upstreamNudge: {
    flag: "upstream-nudge",
    env: "DOTPROXY_UPSTREAM_NUDGE",
    group: "Upstreams",
    ...toggle(true),
    help: "when answers are due, send the upstream a byte so that servers holding them back " +
      "under Nagle's algorithm (Unbound) release them; now and then a duplicate query",
  },
  padding: {
    flag: "padding",
    env: "DOTPROXY_PADDING",
    group: "Upstreams",
    ...toggle(true),
    help: "pad queries sent upstream (EDNS(0) padding, RFC 8467) so their size says less " +
      "about the name",
  },
  cacheSize: {
    flag: "cache-size",
    env: "DOTPROXY_CACHE_SIZE",
    arg: "N",
    group: "Cache",
    ...whole(10_000, 0, 10_000_000),
    help: "most answers kept in the cache; 0 turns the cache off",
  },
  cacheMinTtl: {
    flag: "cache-min-ttl",
    env: "DOTPROXY_CACHE_MIN_TTL",
    arg: "SECONDS",
    group: "Cache",
    ...whole(0, 0, 604_800),
    help: "cache answers at least this long, raising smaller TTLs",
  },
  cacheMaxTtl: {
    flag: "cache-max-ttl",
    env: "DOTPROXY_CACHE_MAX_TTL",
    arg: "SECONDS",
    group: "Cache",
    ...whole(86_400, 0, 604_800),
    help: "cache answers at most this long, lowering larger TTLs (not below --cache-min-ttl)",
  },
  cacheMaxNegativeTtl: {
    flag: "cache-max-negative-ttl",
    env: "DOTPROXY_CACHE_MAX_NEGATIVE_TTL",
    arg: "SECONDS",
    group: "Cache",
    ...whole(3600, 0, 604_800),
    help: "cache NXDOMAIN and no-data answers at most this long",
  },
  serveStaleSeconds: {
    flag: "serve-stale",
    env: "DOTPROXY_SERVE_STALE",
    arg: "SECONDS",
    group: "Cache",
    ...whole(86_400, 0, 2_592_000),
    help: "when upstreams fail, answer from expired cache entries up to this long after " +
      "expiry (RFC 8767); 0 turns it off",
  },
  staleAnswerTimeoutMs: {
    flag: "stale-answer-timeout",
    env: "DOTPROXY_STALE_ANSWER_TIMEOUT_MS",
    arg: "MS",
    group: "Cache",
    ...whole(1800, 0, 60_000),
    help: "wait this long for upstreams before answering from an expired entry; 0 answers " +
      "at once and refreshes in the background",
  },
  cachePrefetch: {
    flag: "cache-prefetch",
    env: "DOTPROXY_CACHE_PREFETCH",
    group: "Cache",
    ...toggle(true),
    help: "refresh entries that are still asked for shortly before they expire",
  },
  logLevel: {
    flag: "log-level",
    env: "DOTPROXY_LOG_LEVEL",
    arg: "LEVEL",
    group: "Logging",
    ...oneOf(LOG_LEVELS, "info", "log level"),
    help: "debug, info, warn or error",
  },
  logFormat: {
    flag: "log-format",
    env: "DOTPROXY_LOG_FORMAT",
    arg: "FORMAT",
    group: "Logging",
    ...oneOf<LogFormat>(["text", "json"], "text", "log format"),
    help: "text or json",
  },
  logQueries: {
    flag: "log-queries",
    env: "DOTPROXY_LOG_QUERIES",
    group: "Logging",
    ...toggle(false),
    help: "log one line per query at info (query names are private, so off by default)",
  },
  shutdownDelayMs: {
    flag: "shutdown-delay",
    env: "DOTPROXY_SHUTDOWN_DELAY_MS",
    arg: "MS",
    group: "Shutdown",
    ...whole(0, 0, 600_000),
    help: "on SIGTERM, fail /readyz but keep answering this long, so load balancers move away",
  },
  shutdownTimeoutMs: {
    flag: "shutdown-timeout",
    env: "DOTPROXY_SHUTDOWN_TIMEOUT_MS",
    arg: "MS",
    group: "Shutdown",
    ...whole(10_000, 0, 600_000),
    help: "then give queries in flight this long to finish before exiting",
  },
};

const FIELDS = Object.keys(TABLE) as SettingField[];

/** Every setting, in the order `--help` and the README list them. */
export const SETTINGS: readonly Setting[] = FIELDS.map((field) => {
  const { flag, env, arg, defaultText, range, help, group, kind } = TABLE[field];
  return { flag, env, arg, defaultText, range, help, group, field, kind };
});

/** Every environment variable dotproxy reads, in the order of {@linkcode SETTINGS}. */
export const KNOWN_VARIABLES: readonly string[] = SETTINGS.map((setting) => setting.env);

const BY_FLAG = new Map(SETTINGS.filter((s) => s.flag !== "").map((s) => [s.flag, s]));

const HELP_WIDTH = 80;
const HELP_INDENT = "      ";

/** Word-wraps `text` to the help width, each line indented under its flag. */
function wrap(text: string): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(" ")) {
    if (line !== "" && line.length + 1 + word.length > HELP_WIDTH) {
      lines.push(line);
      line = "";
    }
    line = line === "" ? `${HELP_INDENT}${word}` : `${line} ${word}`;
  }
  if (line !== "") lines.push(line);
  return lines;
}

/**
 * The `--help` text: every setting with its flag, environment variable, default and range,
 * under its group's heading.
 *
 * @example
 * ```ts
 * import { helpText } from "./config.ts";
 * console.log(helpText());
 * ```
 */
export function helpText(): string {
  const lines = [
    "dotproxy: forwards plain DNS (UDP and TCP) to DNS-over-TLS upstreams.",
    "",
    "Usage: dotproxy [healthcheck] [flags]",
    "",
    "  healthcheck   check a running proxy configured by the same flags and",
    "                environment; exit 0 when it answers, 1 otherwise",
    "",
    "Flags win over environment variables, which win over defaults. Boolean flags",
    "take --flag, --flag=false or --flag false (also yes/no, on/off, 1/0).",
  ];
  let group = "";
  for (const setting of SETTINGS) {
    if (setting.group !== group) {
      group = setting.group;
      lines.push("", `${group}:`);
    }
    const name = setting.flag
      ? `--${setting.flag}${setting.arg ? " " + setting.arg : ""}`
      : "(environment only)";
    lines.push(`  ${name}`);
    lines.push(...wrap(setting.help));
    const facts = [`env: ${setting.env}`, `default: ${setting.defaultText}`];
    if (setting.range) facts.push(`range: ${setting.range}`);
    const oneLine = `${HELP_INDENT}${facts.join("   ")}`;
    lines.push(...(oneLine.length <= HELP_WIDTH ? [oneLine] : facts.flatMap((fact) => wrap(fact))));
  }
  lines.push("", "Other:");
  lines.push("  -h, --help       print this help");
  lines.push("  -V, --version    print the version");
  return lines.join("\n");
}

// ---------------------------------------------------------------------------------------------
// Addresses.

function parseIpv4(text: string): Uint8Array | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  const bytes = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    // No leading zeros: some parsers read 010 as octal, so it is ambiguous.
    if (!/^(0|[1-9]\d{0,2})$/.test(parts[i])) return null;
    const value = Number(parts[i]);
    if (value > 255) return null;
    bytes[i] = value;
  }
  return bytes;
}

/** RFC 4291 section 2.2 text: eight groups, one `::`, optionally an IPv4 address at the end. */
function parseIpv6(text: string): Uint8Array | null {
  if (!text.includes(":") || !/^[0-9A-Fa-f:.]+$/.test(text)) return null;
  let groups = text;
  let ipv4: Uint8Array | null = null;
  if (text.includes(".")) {
    // The embedded IPv4 address stands for the last two groups.
    const at = text.lastIndexOf(":");
    ipv4 = parseIpv4(text.slice(at + 1));
    if (ipv4 === null) return null;
    groups = text.slice(0, at + 1) + "0:0";
  }
  const gap = groups.indexOf("::");
  if (gap >= 0 && groups.indexOf("::", gap + 1) >= 0) return null;
  const split = (part: string) => part === "" ? [] : part.split(":");
  const head = split(gap >= 0 ? groups.slice(0, gap) : groups);
  const tail = gap >= 0 ? split(groups.slice(gap + 2)) : [];
  const count = head.length + tail.length;
  // `::` stands for at least one group of zeros.
  if (gap >= 0 ? count > 7 : count !== 8) return null;
  const bytes = new Uint8Array(16);
  const put = (group: string, index: number): boolean => {
    if (!/^[0-9A-Fa-f]{1,4}$/.test(group)) return false;
    const value = parseInt(group, 16);
    bytes[index * 2] = value >> 8;
    bytes[index * 2 + 1] = value & 0xff;
    return true;
  };
  if (!head.every((group, i) => put(group, i))) return null;
  if (!tail.every((group, i) => put(group, 8 - tail.length + i))) return null;
  if (ipv4 !== null) bytes.set(ipv4, 12);
  return bytes;
}

/**
 * The bytes of an IPv4 (4 bytes) or IPv6 (16 bytes, no brackets, no zone) literal, or `null`
 * when `text` is not one.
 *
 * @example
 * ```ts
 * import { parseIpAddress } from "./config.ts";
 * parseIpAddress("::ffff:192.0.2.1"); // 16 bytes ending c0 00 02 01
 * parseIpAddress("dns.google"); // null
 * ```
 */
export function parseIpAddress(text: string): Uint8Array | null {
  return parseIpv4(text) ?? parseIpv6(text);
}

/** True for an IPv4 or IPv6 literal (IPv6 without brackets). */
export function isIpLiteral(text: string): boolean {
  return parseIpAddress(text) !== null;
}

/** IPv4 dotted, IPv6 as RFC 5952 recommends: lowercase, the longest run of zero groups `::`. */
function formatIp(bytes: Uint8Array): string {
  if (bytes.length === 4) return bytes.join(".");
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((bytes[i] << 8) | bytes[i + 1]);
  let bestStart = -1;
  let bestLength = 1; // a single zero group is not shortened (RFC 5952 section 4.2.2)
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let end = i;
    while (end < 8 && groups[end] === 0) end++;
    if (end - i > bestLength) {
      bestStart = i;
      bestLength = end - i;
    }
    i = end;
  }
  const hex = groups.map((group) => group.toString(16));
  if (bestStart < 0) return hex.join(":");
  return `${hex.slice(0, bestStart).join(":")}::${hex.slice(bestStart + bestLength).join(":")}`;
}

/**
 * Parses a network in CIDR notation; a bare address means a single host (/32 or /128).
 * Host bits must be zero, so that `10.0.0.1/8` is caught rather than silently widened.
 *
 * @example
 * ```ts
 * import { parseCidr } from "./config.ts";
 * parseCidr("fd00::/8", "--allow"); // { family: 6, prefix: 8, text: "fd00::/8", bytes: ... }
 * parseCidr("192.0.2.7", "--allow").text; // "192.0.2.7/32"
 * ```
 */
export function parseCidr(text: string, what: string): Cidr {
  const trimmed = text.trim();
  const context = `${what} "${trimmed}"`;
  const slash = trimmed.indexOf("/");
  const address = slash < 0 ? trimmed : trimmed.slice(0, slash);
  const bytes = parseIpAddress(address);
  if (bytes === null) {
    throw new ConfigError(`${context}: "${address}" is not an IP address (write ADDRESS/PREFIX)`);
  }
  const bits = bytes.length * 8;
  let prefix = bits;
  if (slash >= 0) {
    const prefixText = trimmed.slice(slash + 1);
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > bits) {
      throw new ConfigError(`${context}: prefix "${prefixText}" is not a number from 0 to ${bits}`);
    }
    prefix = Number(prefixText);
  }
  const network = bytes.map((byte, i) => byte & prefixMask(prefix, i));
  const canonical = `${formatIp(network)}/${prefix}`;
  if (!network.every((byte, i) => byte === bytes[i])) {
    throw new ConfigError(
      `${context}: host bits are set after /${prefix}; did you mean ${canonical}?`,
    );
  }
  return { family: bytes.length === 4 ? 4 : 6, bytes: network, prefix, text: canonical };
}

/** The mask byte at `index` for a prefix of `prefix` bits. */
function prefixMask(prefix: number, index: number): number {
  const bits = Math.min(8, Math.max(0, prefix - index * 8));
  return (0xff << (8 - bits)) & 0xff;
}

/**
 * True when `address` (4 or 16 bytes, as {@linkcode parseIpAddress} returns) lies in `cidr`.
 * Addresses of the other family never match; IPv4-mapped IPv6 is not unwrapped here.
 *
 * @example
 * ```ts
 * import { cidrContains, parseCidr, parseIpAddress } from "./config.ts";
 * cidrContains(parseCidr("10.0.0.0/8", "--allow"), parseIpAddress("10.1.2.3")!); // true
 * ```
 */
export function cidrContains(cidr: Cidr, address: Uint8Array): boolean {
  if (address.length !== cidr.bytes.length) return false;
  for (let i = 0; i * 8 < cidr.prefix; i++) {
    if ((address[i] & prefixMask(cidr.prefix, i)) !== cidr.bytes[i]) return false;
  }
  return true;
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

const UPSTREAM_FORM = "write upstreams as IP[:PORT][#TLS_NAME], e.g. 1.1.1.1#cloudflare-dns.com";

/** Addresses of well-known public resolvers, to turn a name into a ready-made suggestion. */
const KNOWN_RESOLVERS: Readonly<Record<string, string>> = {
  "cloudflare-dns.com": "1.1.1.1",
  "one.one.one.one": "1.1.1.1",
  "dns.google": "8.8.8.8",
  "dns.quad9.net": "9.9.9.9",
};

/**
 * Parses `IP[:PORT][#TLS_NAME]` for an upstream. Without `#TLS_NAME` the certificate is
 * verified against the IP address itself. URLs and host names are refused with a hint in
 * the right form.
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
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(trimmed);
  if (scheme) {
    const why = scheme[1].toLowerCase() === "tls" ? "" : "; dotproxy speaks DNS over TLS only";
    // The address the user meant, in the right form: "tls://9.9.9.9" -> "9.9.9.9#TLS_NAME".
    const rest = trimmed.slice(scheme[0].length).replace(/\/.*$/, "");
    const known = Object.entries(KNOWN_RESOLVERS).find(([name, ip]) =>
      rest === ip || rest.toLowerCase() === name
    );
    const form = known ? `${known[1]}#${known[0]}` : rest.includes("#") ? rest : `${rest}#TLS_NAME`;
    const meant = rest === "" ? "" : `: ${form}`;
    throw new ConfigError(`${context}: ${UPSTREAM_FORM} (no scheme${why}${meant})`);
  }
  const hash = trimmed.indexOf("#");
  const hostPort = hash >= 0 ? trimmed.slice(0, hash) : trimmed;
  const { host, port } = splitHostPort(hostPort, context);
  if (!isIpLiteral(host)) {
    if (!isHostname(host)) {
      throw new ConfigError(`${context}: "${host}" is not an IP address; ${UPSTREAM_FORM}`);
    }
    const suggestion = `${KNOWN_RESOLVERS[host.toLowerCase()] ?? "IP"}${
      port === null ? "" : ":" + port
    }#${hash >= 0 ? trimmed.slice(hash + 1) : host}`;
    throw new ConfigError(
      `${context}: "${host}" is not an IP address (dotproxy never resolves names to reach ` +
        `its upstreams); write IP[:PORT][#TLS_NAME], e.g. ${suggestion}`,
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
 *
 * @example
 * ```ts
 * import { parsePemCertificates } from "./config.ts";
 * const pem = Deno.env.get("DOTPROXY_CA_CERTS") ?? "";
 * if (pem !== "") parsePemCertificates(pem, "DOTPROXY_CA_CERTS").length;
 * ```
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

// ---------------------------------------------------------------------------------------------
// The command line and the environment.

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
  const known = new Set(KNOWN_VARIABLES);
  return names.filter((name) => name.startsWith("DOTPROXY_") && !known.has(name)).sort();
}

/** Reads one environment variable; injected so tests and the config never touch globals. */
export type EnvReader = (name: string) => string | undefined;

/** What the command line says, before any value is parsed. */
interface CommandLine {
  help: boolean;
  version: boolean;
  /** Raw values by flag name, in the order given. */
  flags: Map<string, string[]>;
  positionals: string[];
}

/** The subcommands; `serve` is what runs without one. */
const COMMANDS: readonly string[] = ["healthcheck"];

/** The known flag closest to a misspelt one, if any is close. */
function closestFlag(name: string): string | undefined {
  let best: string | undefined;
  let bestDistance = 3;
  for (const flag of BY_FLAG.keys()) {
    const distance = editDistance(name, flag);
    if (distance < bestDistance) {
      best = flag;
      bestDistance = distance;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let previous = Array.from({ length: b.length + 1 }, (_, i) => i);
  for (let i = 1; i <= a.length; i++) {
    const current = [i];
    for (let j = 1; j <= b.length; j++) {
      current[j] = Math.min(
        previous[j] + 1,
        current[j - 1] + 1,
        previous[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
    previous = current;
  }
  return previous[b.length];
}

/**
 * Splits the arguments into flags and positionals. Hand-written rather than
 * `node:util` `parseArgs`, which refuses a value starting with `-` (`--timeout -5` would be
 * "ambiguous" instead of a bad number) and has no boolean flag with an optional value.
 */
function readCommandLine(args: string[]): CommandLine {
  const line: CommandLine = { help: false, version: false, flags: new Map(), positionals: [] };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (arg === "--") {
      line.positionals.push(...args.slice(i + 1));
      break;
    }
    if (arg === "-h" || arg === "--help") {
      line.help = true;
      continue;
    }
    if (arg === "-V" || arg === "--version") {
      line.version = true;
      continue;
    }
    if (!arg.startsWith("-") || arg === "-") {
      line.positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const name = arg.startsWith("--") ? arg.slice(2, eq < 0 ? undefined : eq) : "";
    if (name === "help" || name === "version") {
      throw new ConfigError(`flag --${name} takes no value`);
    }
    const setting = BY_FLAG.get(name);
    if (setting === undefined) {
      const shown = eq < 0 ? arg : arg.slice(0, eq);
      const near = name === "" ? undefined : closestFlag(name);
      const hint = near === undefined ? "see --help" : `did you mean --${near}? see --help`;
      throw new ConfigError(`unknown flag ${shown} (${hint})`);
    }
    let value = eq < 0 ? undefined : arg.slice(eq + 1);
    if (value === undefined) {
      if (setting.kind === "boolean") {
        // A word after a boolean flag is its value unless it is a command: `--padding false`
        // works, and `--padding flase` is reported as a bad boolean, not an unknown command.
        const next = args[i + 1];
        const isValue = next !== undefined && !next.startsWith("-") && !COMMANDS.includes(next);
        value = isValue ? args[++i] : "true";
      } else if (i + 1 < args.length) {
        // Whatever follows a flag that takes a value is that value, even `-5` or `--x`, so
        // that a bad value is reported as one rather than as a confusing unknown flag.
        value = args[++i];
      } else {
        throw new ConfigError(`flag --${name} needs a value`);
      }
    }
    const values = line.flags.get(name) ?? [];
    values.push(value);
    line.flags.set(name, values);
  }
  return line;
}

/** Where a field's value came from, for errors that involve two settings. */
type Sources = Map<SettingField, string>;

/** Parses one field into `config`, from its flag, its variable or its fallback. */
function fill<K extends SettingField>(
  config: Partial<Config>,
  sources: Sources,
  field: K,
  declaration: Declaration<K>,
  flags: Map<string, string[]>,
  env: EnvReader,
): void {
  const given = declaration.flag === "" ? undefined : flags.get(declaration.flag);
  if (given !== undefined) {
    const what = `--${declaration.flag}`;
    // A list flag may be repeated; any other flag given twice counts as given last.
    const text = declaration.kind === "list" ? given.join(",") : given[given.length - 1];
    config[field] = declaration.parse(text, what);
    sources.set(field, what);
    return;
  }
  const fromEnv = env(declaration.env);
  if (fromEnv !== undefined) {
    config[field] = declaration.parse(fromEnv, declaration.env);
    sources.set(field, declaration.env);
    return;
  }
  config[field] = declaration.fallback(config);
}

/**
 * Every configured listener that serves TLS to clients, as `kind address` (`doh
 * 127.0.0.1:443`): they need `DOTPROXY_TLS_CERT` and `DOTPROXY_TLS_KEY`. Each TLS listener
 * setting (`--listen-dot`, `--listen-doh`) adds its addresses here.
 *
 * @example
 * ```ts
 * import { defaultConfig, tlsListeners } from "./config.ts";
 * tlsListeners(defaultConfig()); // []
 * ```
 */
export function tlsListeners(config: Config): string[] {
  return [
    ...config.listenDot.map((a) => `dot ${formatListen(a)}`),
    ...config.listenDoh.map((a) => `doh ${formatListen(a)}`),
  ];
}

function formatListen(address: ListenAddress): string {
  return formatHostPort(address.hostname, address.port);
}

/** Loopback, private (RFC 1918, RFC 4193), shared (RFC 6598) and link-local networks. */
const PRIVATE_NETWORKS = DEFAULT_ALLOW.map((text) => parseCidr(text, "private networks"));

/**
 * Checks the server certificate and key together when a TLS listener is configured: both
 * set, readable, the key the leaf's. Throws {@linkcode ConfigError} naming the variable.
 *
 * @example
 * ```ts
 * import { checkServerCertificate, defaultConfig } from "./config.ts";
 * checkServerCertificate(defaultConfig()); // no TLS listener: nothing to check
 * ```
 */
export function checkServerCertificate(config: Config): void {
  const listeners = tlsListeners(config);
  if (listeners.length === 0) return;
  try {
    loadServerCertificate(config.tlsCert, config.tlsKey);
  } catch (error) {
    if (!(error instanceof CertificateError)) throw error;
    throw new ConfigError(`${error.message} (needed by ${listeners[0]})`);
  }
}

/** Checks between settings, once every field has its value. */
function checkTogether(config: Config, sources: Sources): void {
  checkServerCertificate(config);
  if (!sources.has("allow")) {
    for (const address of config.listenDohPlain) {
      const bytes = parseIpAddress(address.hostname)!;
      if (PRIVATE_NETWORKS.some((cidr) => cidrContains(cidr, bytes))) continue;
      const where = sources.get("listenDohPlain") ?? "--listen-doh-plain";
      throw new ConfigError(
        `${where} ${formatListen(address)}: plain HTTP on an address that is not loopback or ` +
          "private carries every name in clear text and believes no proxy; bind it to a " +
          "loopback or private address behind your TLS proxy, or give --allow explicitly " +
          "to say who may reach it",
      );
    }
  }
  const describe = (field: SettingField) =>
    `${sources.get(field) ?? `the default --${TABLE[field].flag}`} ${String(config[field])}`;
  if (config.cacheMaxTtl < config.cacheMinTtl) {
    throw new ConfigError(
      `${describe("cacheMaxTtl")} is below ${describe("cacheMinTtl")}: ` +
        `the largest cached TTL cannot be smaller than the smallest`,
    );
  }
}

function build(command: Config["command"], flags: Map<string, string[]>, env: EnvReader): Config {
  const config: Partial<Config> = { command };
  const sources: Sources = new Map();
  for (const field of FIELDS) fill(config, sources, field, TABLE[field], flags, env);
  // Complete: TABLE's type has one declaration for every field but `command`, set above.
  const complete = config as Config;
  checkTogether(complete, sources);
  return complete;
}

/**
 * The configuration with every setting at its default, for the `serve` command: what
 * `parseConfig([], () => undefined)` returns. Tests spread it and override what they need.
 *
 * @example
 * ```ts
 * import { defaultConfig } from "./config.ts";
 * const config = { ...defaultConfig(), timeoutMs: 500 };
 * ```
 */
export function defaultConfig(): Config {
  return build("serve", new Map(), () => undefined);
}

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
  const line = readCommandLine(args);
  if (line.help) return { kind: "help" };
  if (line.version) return { kind: "version" };

  let command: Config["command"] = "serve";
  const positionals = line.positionals;
  if (positionals.length > 0) {
    if (!COMMANDS.includes(positionals[0]) || positionals.length > 1) {
      const extra = COMMANDS.includes(positionals[0]) ? positionals[1] : positionals[0];
      // `deno task start -- --listen ...` (npm's habit) passes the `--` through: say so.
      const hint = extra.startsWith("-")
        ? `; flags go before any "--" (deno task start --listen ..., no "--")`
        : "; see --help";
      throw new ConfigError(`unknown command "${extra}"${hint}`);
    }
    command = "healthcheck";
  }
  return { kind: "config", config: build(command, line.flags, env) };
}
