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
import { VERSION } from "./version.ts";
import { RCODE_MNEMONICS } from "./dns/wire.ts";
import {
  type Cidr,
  cidrContains,
  CidrError,
  formatIp,
  isIpLiteral,
  parseCidr as parseNetwork,
  parseIpAddress,
  reverseZones,
} from "./net/ip.ts";

// Moved to net/ip.ts; still exported here for the modules and tests that took them from here.
export { type Cidr, cidrContains, isIpLiteral, parseIpAddress };
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
  /**
   * How the upstream is shown in logs and metric labels: `address:port#tlsName`, or
   * `dns://address:port` for a plain-DNS zone target.
   */
  label: string;
  /**
   * True for a plain-DNS zone target (`dns://IP[:PORT]`): UDP, TCP when truncated, no TLS
   * (`tlsName` is empty). Only `--zone` makes one; `--upstream` never does.
   */
  plain?: boolean;
}

/** A zone of `--zone`: a domain, or one of the reverse zones of a network. */
export interface ZoneName {
  /** The zone's domain, lowercase, without the final dot: `cluster.local`, `96.10.in-addr.arpa`. */
  name: string;
  /** The zone as configured, the route's metric label: `cluster.local`, `10.96.0.0/12`. */
  route: string;
}

/** One `--zone` entry: zones, and where their questions go. */
export interface ZoneRoute {
  /** The zones, CIDRs expanded to their reverse zones. */
  zones: ZoneName[];
  /** The targets, DoT or plain DNS; empty for `default` (the `--upstream` set). */
  targets: UpstreamSpec[];
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

/**
 * The default of `--cache-max-bytes`: 16 MiB. Answers of up to 16 KiB are cached, so
 * `--cache-size` alone let 10,000 entries of large answers hold 200 MB outside V8's heap
 * (233 MiB of RSS measured with 10,000 answers of 13.9 KB; issue 23). 16 MiB keeps the
 * largest other peak measured (236 MiB, 1,000 TCP connections never reading 60 KB answers)
 * under the manifests' 256 MiB with the cache full, and holds the default 10,000 entries of
 * answers up to 1.5 KiB.
 */
export const DEFAULT_CACHE_MAX_BYTES = 16 * 1024 * 1024;

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
  /** Zones whose questions go to other targets than `upstreams`, in configured order. */
  zones: ZoneRoute[];
  /**
   * Answer names that must never reach a public resolver here (localhost, invalid, onion,
   * local, home.arpa, private reverse zones); any zone of `zones` beats them.
   */
  specialUseNames: boolean;
  /** Most entries in the answer cache; 0 turns the cache off. */
  cacheSize: number;
  /** Most bytes of answers the cache holds (256 KiB chunks). */
  cacheMaxBytes: number;
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
  /**
   * Set by the container image: the settings its HEALTHCHECK needs (`--listen`, `--http`,
   * `--allow`) come from the environment only, where `dotproxy healthcheck` reads them too.
   */
  container: boolean;
}

/** Raised for invalid configuration; the message is the one line shown to the user. */
export class ConfigError extends Error {
  /** Creates an error whose message names the input and the bad value. */
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/** What to do with a valid configuration instead of running: `--print-config`, `--check-config`. */
export type ConfigMode = "print-config" | "check-config";

/** A request for help or the version rather than a configuration. */
export type ConfigRequest = { kind: "help" } | { kind: "version" } | {
  kind: "config";
  config: Config;
  /** Set when `--print-config` or `--check-config` asked to stop after parsing. */
  mode?: ConfigMode;
  /** Where each field's value came from (a flag or a variable); absent for defaults. */
  sources?: ReadonlyMap<SettingField, string>;
};

/** How a flag takes its value on the command line. */
export type SettingKind =
  /** `--flag VALUE` or `--flag=VALUE`; given twice, the last wins. */
  | "value"
  /** Repeatable `--flag VALUE`, each value itself comma-separated (as the variable is). */
  | "list"
  /** Repeatable `--flag VALUE` whose values hold commas; the variable separates them by `;`. */
  | "entries"
  /** `--flag`, `--flag=false`, or `--flag false` when the next word is a boolean word. */
  | "boolean";

/** One setting as `--help`, the README and the deploy checks see it. */
export interface Setting {
  /** Flag name without the leading `--`; `""` for a setting read from the environment only. */
  flag: string;
  /** Environment variable that sets the same value. */
  env: string;
  /** Another name of the variable, accepted as well (setting both is an error); `""` if none. */
  alias: string;
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
  /** A secret: `--print-config` shows `<redacted>` for it. */
  secret: boolean;
}

/** The fields that settings fill (the subcommand is a positional word, not a setting). */
export type SettingField = Exclude<keyof Config, "command">;

/** How one setting is declared in the table; the field it fills is its key there. */
interface Declaration<K extends SettingField> {
  flag: string;
  env: string;
  /** Another name of the variable (the name users keep writing); both set is an error. */
  alias?: string;
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
  /** A secret (a private key): `--print-config` shows `<redacted>` instead of it. */
  secret?: boolean;
  /** The value as the variable would take it, for `--print-config`, where the generic is wrong. */
  // Method syntax: checked bivariantly, so a Declaration<"listen"> is a Declaration<SettingField>.
  show?(value: Config[K]): string;
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

/** A list of items, empty unless given. */
function noneByDefault<T>(
  kind: "list" | "entries",
  parse: (text: string, what: string) => T[],
): Kind<T[]> {
  return { kind, defaultText: "none", range: "", parse, fallback: () => [] };
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

/** The row of a TLS listener's PEM setting: environment only, off (`""`) when unset. */
function pemSetting<K extends "tlsCert" | "tlsKey">(
  env: string,
  help: string,
  check: (text: string, variable: string) => void,
): Declaration<K> {
  return {
    flag: "",
    env,
    arg: "",
    group: "Serving",
    kind: "value",
    defaultText: "none",
    range: "",
    help,
    parse: (text, what) => checkedPem(text, what, check),
    fallback: () => "",
  };
}

/** The row of an optional, repeatable listener (DoT, DoH): off (no address) by default. */
function listenerSetting<K extends "listenDot" | "listenDoh" | "listenDohPlain">(
  flag: string,
  env: string,
  help: string,
): Declaration<K> {
  return {
    flag,
    env,
    arg: "ADDR:PORT",
    group: "Serving",
    kind: "list",
    defaultText: "off",
    range: "",
    help,
    parse: parseOptionalListenList,
    fallback: () => [],
  };
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
  const addresses = items.map((item) => parseListenAddress(item, what));
  const seen = new Map<string, string>();
  for (const address of addresses) {
    // The same address twice can never bind: say so rather than "address already in use".
    const key = `${formatIp(parseIpAddress(address.hostname)!)}:${address.port}`;
    const shown = formatHostPort(address.hostname, address.port);
    const first = seen.get(key);
    if (first !== undefined) {
      throw new ConfigError(
        first === shown
          ? `${what}: ${shown} is given twice`
          : `${what}: ${first} and ${shown} are the same address`,
      );
    }
    seen.set(key, shown);
  }
  // Every listener binds with SO_REUSEPORT / SO_REUSEADDR (a new process takes over while the
  // old one drains), so a wildcard and another address on the same port both bind, and the
  // kernel would split one port's traffic between them: refuse it here.
  for (const address of addresses) {
    const covering = addresses.find((other) =>
      other !== address && other.port === address.port && coversAddress(other, address)
    );
    if (covering === undefined) continue;
    const dual = covering.hostname === "::" && address.hostname.includes(".")
      ? " ([::] takes the port for IPv4 too, dual-stack)"
      : "";
    throw new ConfigError(
      `${what}: ${formatHostPort(covering.hostname, covering.port)} already takes the port of ` +
        `${formatHostPort(address.hostname, address.port)}${dual}; list only the wildcard address`,
    );
  }
  return addresses;
}

/** True when `wildcard` is a wildcard address that takes `address`'s port too. */
function coversAddress(wildcard: ListenAddress, address: ListenAddress): boolean {
  const bytes = parseIpAddress(wildcard.hostname);
  if (bytes === null || bytes.some((b) => b !== 0)) return false;
  const other = parseIpAddress(address.hostname);
  if (other === null) return false;
  // [::] is dual-stack on Linux: it takes IPv4 too. 0.0.0.0 takes IPv4 only.
  return bytes.length === 16 || other.length === 4;
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

const ZONE_FORM = "write ZONE[,ZONE...]=TARGET[,TARGET...]";
const TARGET_FORM = "IP[:PORT][#TLS_NAME] (DoT), dns://IP[:PORT] (plain DNS) or default";

/** One ZONE of `--zone`: a domain (whole labels, any case, final dot optional) or a CIDR. */
function parseZoneName(text: string, context: string): ZoneName[] {
  const item = text.trim();
  if (item.includes("/") || isIpLiteral(item)) {
    let cidr: Cidr;
    try {
      cidr = parseNetwork(item);
    } catch (error) {
      if (!(error instanceof CidrError)) throw error;
      throw new ConfigError(`${context}: zone "${item}": ${error.message}`);
    }
    return reverseZones(cidr).map((name) => ({ name, route: cidr.text }));
  }
  const name = item.toLowerCase().replace(/\.$/, "");
  if (name === "" || item === ".") {
    throw new ConfigError(
      `${context}: the root zone "." is where --upstream sends questions; set --upstream instead`,
    );
  }
  if (!isHostname(name)) {
    throw new ConfigError(`${context}: "${item}" is not a domain name or a CIDR`);
  }
  return [{ name, route: name }];
}

/** One TARGET of `--zone`. */
function parseZoneTarget(text: string, context: string): UpstreamSpec | "default" {
  const item = text.trim();
  if (item.toLowerCase() === "default") return "default";
  const scheme = /^([A-Za-z][A-Za-z0-9+.-]*):\/\//.exec(item);
  if (scheme === null) return parseUpstream(item, context);
  if (scheme[1].toLowerCase() !== "dns") {
    throw new ConfigError(`${context}: target "${item}": write ${TARGET_FORM}`);
  }
  const rest = item.slice(scheme[0].length);
  if (rest.includes("#") || rest.includes("/")) {
    throw new ConfigError(
      `${context}: target "${item}": a plain-DNS target is dns://IP[:PORT] (no TLS name, no path)`,
    );
  }
  const { host, port } = splitHostPort(rest, `${context}: target "${item}"`);
  if (!isIpLiteral(host)) {
    throw new ConfigError(
      `${context}: target "${item}": "${host}" is not an IP address (dotproxy never resolves ` +
        `names to reach its targets)`,
    );
  }
  const portNumber = port === null ? 53 : parsePort(port, `${context}: target "${item}"`);
  return {
    address: host,
    port: portNumber,
    tlsName: "",
    label: `dns://${host.includes(":") ? `[${host}]` : host}:${portNumber}`,
    plain: true,
  };
}

/** `--zone` entries, `;`-separated (repeated flags are joined with `;`). */
function parseZoneRoutes(text: string, what: string): ZoneRoute[] {
  const routes: ZoneRoute[] = [];
  const seen = new Map<string, string>();
  for (const entry of text.split(";").map((e) => e.trim()).filter((e) => e !== "")) {
    const context = `${what} "${entry}"`;
    const eq = entry.indexOf("=");
    if (eq < 0) {
      throw new ConfigError(`${context}: no "=" between zones and targets; ${ZONE_FORM}`);
    }
    const zoneItems = splitList(entry.slice(0, eq));
    const targetItems = splitList(entry.slice(eq + 1));
    if (zoneItems.length === 0) throw new ConfigError(`${context}: no zone; ${ZONE_FORM}`);
    if (targetItems.length === 0) {
      throw new ConfigError(`${context}: no target; targets are ${TARGET_FORM}`);
    }
    const zones = zoneItems.flatMap((item) => parseZoneName(item, context));
    for (const zone of zones) {
      const earlier = seen.get(zone.name);
      if (earlier !== undefined) {
        throw new ConfigError(
          `${context}: zone ${zone.name} is already routed by ${what} "${earlier}"`,
        );
      }
      seen.set(zone.name, entry);
    }
    const parsed = targetItems.map((item) => parseZoneTarget(item, context));
    const targets = parsed.filter((t): t is UpstreamSpec => t !== "default");
    if (targets.length !== parsed.length && targets.length > 0) {
      throw new ConfigError(
        `${context}: "default" stands alone (it is the whole --upstream set)`,
      );
    }
    if (new Set(targets.map((t) => t.label)).size !== targets.length) {
      throw new ConfigError(`${context}: a target is given twice`);
    }
    if (targets.length > 31) throw new ConfigError(`${context}: at most 31 targets`);
    routes.push({ zones, targets });
  }
  return routes;
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
    help: "serve /metrics, /healthz, /readyz and /healthz/upstreams over HTTP here",
    parse: (text, what) => text.trim() === "" ? null : parseListenAddress(text, what),
    fallback: () => null,
  },
  tlsCert: pemSetting(
    "DOTPROXY_TLS_CERT",
    "PEM text of the certificate chain served to TLS clients, leaf first (text, not a " +
      "path); required with a TLS listener",
    checkCertificateText,
  ),
  tlsKey: {
    ...pemSetting(
      "DOTPROXY_TLS_KEY",
      "PEM text of the private key of DOTPROXY_TLS_CERT, unencrypted (text, not a path)",
      checkKeyText,
    ),
    secret: true,
  },
  listenDot: listenerSetting(
    "listen-dot",
    "DOTPROXY_LISTEN_DOT",
    "serve DNS over TLS (RFC 7858; port 853 by convention) here; needs " +
      "DOTPROXY_TLS_CERT and DOTPROXY_TLS_KEY (repeatable; env: comma-separated)",
  ),
  listenDoh: listenerSetting(
    "listen-doh",
    "DOTPROXY_LISTEN_DOH",
    "serve DNS over HTTPS (RFC 8484; HTTP/2 and HTTP/1.1 over TLS) here; needs " +
      "DOTPROXY_TLS_CERT and DOTPROXY_TLS_KEY (repeatable; env: comma-separated)",
  ),
  listenDohPlain: listenerSetting(
    "listen-doh-plain",
    "DOTPROXY_LISTEN_DOH_PLAIN",
    "serve DNS over plain HTTP (HTTP/1.1, HTTP/2 with prior knowledge) here, for a " +
      "TLS-terminating proxy in front; loopback or private addresses only unless --allow is " +
      "given (repeatable; env: comma-separated)",
  ),
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
    ...noneByDefault("list", (text, what) => splitList(text).map((item) => parseCidr(item, what))),
    help: "believe X-Forwarded-For on DoH requests from these peers only: the client is the " +
      "right-most address not in this list (repeatable; env: comma-separated)",
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
    // The flag is --upstream, and people write the variable the same way (issue 22): read it
    // too rather than start on the public defaults. Never both.
    alias: "DOTPROXY_UPSTREAM",
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
    // Not secret, but long, and what is trusted is better read from the source it came from.
    show: (pems) =>
      pems.length === 0
        ? ""
        : `<redacted: ${pems.length} PEM certificate${pems.length === 1 ? "" : "s"}>`,
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
    show: (codes) => codes.map((code) => RCODE_MNEMONICS[code] ?? String(code)).join(","),
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
  zones: {
    flag: "zone",
    env: "DOTPROXY_ZONES",
    arg: "ZONE[,ZONE...]=TARGET[,TARGET...]",
    group: "Routing",
    ...noneByDefault("entries", parseZoneRoutes),
    help: "send the questions in these zones (domains, or CIDRs for their reverse zones) to " +
      "these targets: IP[:PORT][#TLS_NAME] (DoT), dns://IP[:PORT] (plain DNS) or default " +
      "(the --upstream set); the longest zone wins (repeatable; env: entries separated by ;)",
  },
  specialUseNames: {
    flag: "special-use-names",
    env: "DOTPROXY_SPECIAL_USE_NAMES",
    group: "Routing",
    ...toggle(true),
    help: "answer here the names that must never reach a public resolver: localhost, " +
      "invalid, onion, local, home.arpa and private reverse zones (any --zone beats them)",
  },
  cacheSize: {
    flag: "cache-size",
    env: "DOTPROXY_CACHE_SIZE",
    arg: "N",
    group: "Cache",
    ...whole(10_000, 0, 10_000_000),
    help: "most answers kept in the cache; 0 turns the cache off",
  },
  cacheMaxBytes: {
    flag: "cache-max-bytes",
    env: "DOTPROXY_CACHE_MAX_BYTES",
    arg: "BYTES",
    group: "Cache",
    ...whole(DEFAULT_CACHE_MAX_BYTES, 1024 * 1024, 2 ** 40),
    help: "most memory the cached answers hold; the least recently used go first",
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
  container: {
    flag: "",
    env: "DOTPROXY_CONTAINER",
    group: "Container",
    ...toggle(false),
    // No flag: the variable takes true or false like any boolean, and there is no bare form.
    kind: "value",
    arg: "",
    range: "true or false (also yes/no, on/off, 1/0)",
    help: "set by the container image: --listen, --http and --allow must then be given as " +
      "DOTPROXY_* variables, not flags, because the image's HEALTHCHECK (dotproxy " +
      "healthcheck) sees only the environment",
  },
};

/**
 * The settings `dotproxy healthcheck` needs to find and ask the server. In the container
 * image (`DOTPROXY_CONTAINER=true`) they must come from the environment: Docker runs the
 * HEALTHCHECK command with the container's environment but without the arguments given after
 * the image name, so a flag would move the server where the check never looks (issue 22).
 */
const HEALTHCHECK_FIELDS: readonly SettingField[] = ["listen", "http", "allow"];

const FIELDS = Object.keys(TABLE) as SettingField[];

/** Every setting, in the order `--help` and the README list them. */
export const SETTINGS: readonly Setting[] = FIELDS.map((field) => {
  const { flag, env, arg, defaultText, range, help, group, kind } = TABLE[field];
  const alias = TABLE[field].alias ?? "";
  const secret = TABLE[field].secret ?? false;
  return { flag, env, alias, arg, defaultText, range, help, group, field, kind, secret };
});

/** Every environment variable dotproxy reads, in the order of {@linkcode SETTINGS}. */
export const KNOWN_VARIABLES: readonly string[] = SETTINGS.map((setting) => setting.env);

/** The variables accepted as other names of {@linkcode KNOWN_VARIABLES}, and what they mean. */
const ALIASES: ReadonlyMap<string, string> = new Map(
  SETTINGS.filter((s) => s.alias !== "").map((s) => [s.alias, s.env]),
);

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
    "                environment; exit 0 when this dotproxy answers on its first",
    "                --listen address (and, with --http, /readyz says ready),",
    "                1 otherwise",
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
    const env = setting.alias ? `${setting.env} (or ${setting.alias})` : setting.env;
    const facts = [`env: ${env}`, `default: ${setting.defaultText}`];
    if (setting.range) facts.push(`range: ${setting.range}`);
    const oneLine = `${HELP_INDENT}${facts.join("   ")}`;
    lines.push(...(oneLine.length <= HELP_WIDTH ? [oneLine] : facts.flatMap((fact) => wrap(fact))));
  }
  lines.push("", "Other:");
  lines.push("  -h, --help       print this help");
  lines.push("  -V, --version    print the version");
  lines.push("  --print-config   print the effective configuration (secrets redacted), exit");
  lines.push("  --check-config   check the configuration; exit 0 when valid, 2 when not");
  return lines.join("\n");
}

// ---------------------------------------------------------------------------------------------
// Addresses (the grammar is in net/ip.ts).

/**
 * Parses a network in CIDR notation (see `net/ip.ts`), naming `what` and the input in the
 * {@linkcode ConfigError} it throws.
 *
 * @example
 * ```ts
 * import { parseCidr } from "./config.ts";
 * parseCidr("fd00::/8", "--allow"); // { family: 6, prefix: 8, text: "fd00::/8", bytes: ... }
 * parseCidr("192.0.2.7", "--allow").text; // "192.0.2.7/32"
 * parseCidr("::ffff:10.0.0.0/104", "--allow").text; // "10.0.0.0/8" (IPv4-mapped: unwrapped)
 * ```
 */
export function parseCidr(text: string, what: string): Cidr {
  try {
    return parseNetwork(text);
  } catch (error) {
    if (!(error instanceof CidrError)) throw error;
    throw new ConfigError(`${what} "${text.trim()}": ${error.message}`);
  }
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
    const trimmed = text.trim();
    if (/^(\/|\.{1,2}\/|~\/|[A-Za-z]:\\)?[^\s"'$]*$/.test(trimmed) && /[/\\.]/.test(trimmed)) {
      // A path: the proxy reads no files (it runs with --allow-net --allow-env only).
      throw new ConfigError(
        `${what}: ${JSON.stringify(trimmed)} looks like a file path, but ${what} takes the ` +
          `PEM text itself (dotproxy reads no files): ${what}="$(cat ${trimmed})"`,
      );
    }
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

const IP_VALUE = /^(\d{1,3}(\.\d{1,3}){3}|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*)$/;
const PORT_VALUE = /^\d{1,5}$/;
/** `tcp://10.96.0.10:53`, `udp://[fd00::a]:53` */
const LINK_VALUE = /^(tcp|udp|sctp):\/\/(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$/;
/**
 * The names Kubernetes service links give a Service whose name starts with `dotproxy`
 * (`dotproxy`, or `dotproxy-x`: the optional group), each with the form of its value
 * (kubelet's envvars.FromServices): `_SERVICE_HOST`, `_SERVICE_PORT`, `_SERVICE_PORT_<NAME>`,
 * `_PORT`, `_PORT_<N>_<PROTO>` and its `_PROTO`, `_PORT`, `_ADDR`. A name may read several
 * ways (`DOTPROXY_PORT_53_UDP_PORT`), so each pattern is tried.
 */
const SERVICE_LINKS: readonly [RegExp, (value: string, m: RegExpExecArray) => boolean][] = [
  [/^DOTPROXY(?:_[A-Z0-9_]+)?_SERVICE_HOST$/, (value) => IP_VALUE.test(value)],
  [/^DOTPROXY(?:_[A-Z0-9_]+)?_SERVICE_PORT(?:_[A-Z0-9_]+)?$/, (value) => PORT_VALUE.test(value)],
  [/^DOTPROXY(?:_[A-Z0-9_]+)?_PORT$/, (value) => LINK_VALUE.test(value)],
  [/^DOTPROXY(?:_[A-Z0-9_]+)?_PORT_(\d{1,5})_(TCP|UDP|SCTP)$/, (value, [, port, proto]) => {
    const link = LINK_VALUE.exec(value);
    return link !== null && link[1] === proto.toLowerCase() && link[3] === port;
  }],
  [
    /^DOTPROXY(?:_[A-Z0-9_]+)?_PORT_\d{1,5}_(TCP|UDP|SCTP)_PROTO$/,
    (value, [, proto]) => value === proto.toLowerCase(),
  ],
  [
    /^DOTPROXY(?:_[A-Z0-9_]+)?_PORT_(\d{1,5})_(?:TCP|UDP|SCTP)_PORT$/,
    (value, [, port]) => value === port,
  ],
  [
    /^DOTPROXY(?:_[A-Z0-9_]+)?_PORT_\d{1,5}_(?:TCP|UDP|SCTP)_ADDR$/,
    (value) => IP_VALUE.test(value),
  ],
];

/**
 * True when `name=value` is a variable that Kubernetes service links inject for a Service
 * named `dotproxy` (or `dotproxy-...`) into every pod of the namespace, such as
 * `DOTPROXY_SERVICE_HOST=10.96.0.10` or `DOTPROXY_PORT_53_UDP=udp://10.96.0.10:53`. Both the
 * name and the form of the value must match, so a misspelt setting (`DOTPROXY_HTTP_PORT=5380`)
 * is not mistaken for one.
 *
 * @example
 * ```ts
 * import { isServiceLinkVariable } from "./config.ts";
 * isServiceLinkVariable("DOTPROXY_PORT_53_UDP_PROTO", "udp"); // true
 * isServiceLinkVariable("DOTPROXY_PORT", "5300"); // false
 * ```
 */
export function isServiceLinkVariable(name: string, value: string): boolean {
  return SERVICE_LINKS.some(([pattern, valid]) => {
    const m = pattern.exec(name);
    return m !== null && valid(value, m);
  });
}

/**
 * The `DOTPROXY_*` names among `names` that dotproxy does not read: neither a setting's
 * variable, nor an alias of one, nor a Kubernetes service link ({@linkcode isServiceLinkVariable},
 * judged by the value `env` gives). Sorted.
 *
 * @example
 * ```ts
 * import { unknownVariables } from "./config.ts";
 * unknownVariables(["PATH", "DOTPROXY_TIMEOUT", "DOTPROXY_LISTEN"]); // ["DOTPROXY_TIMEOUT"]
 * ```
 */
export function unknownVariables(
  names: readonly string[],
  env: EnvReader = () => undefined,
): string[] {
  const known = new Set(KNOWN_VARIABLES);
  return names.filter((name) =>
    name.startsWith("DOTPROXY_") && !known.has(name) && !ALIASES.has(name) &&
    !isServiceLinkVariable(name, env(name) ?? "")
  ).sort();
}

/** The known variable closest to a misspelt one, if any is close. */
function closestVariable(name: string): string | undefined {
  let best: string | undefined;
  let bestDistance = 4;
  for (const known of [...KNOWN_VARIABLES, ...ALIASES.keys()]) {
    // DOTPROXY_TIMEOUT for DOTPROXY_TIMEOUT_MS: a missing unit suffix is the usual slip.
    const distance = known.startsWith(`${name}_`) ? 1 : editDistance(name, known);
    if (distance < bestDistance) {
      best = ALIASES.get(known) ?? known;
      bestDistance = distance;
    }
  }
  return best;
}

/** The one-line error for unknown variables, each with its likely meaning. */
function unknownVariablesError(unknown: readonly string[]): ConfigError {
  const described = unknown.map((name) => {
    const near = closestVariable(name);
    return near === undefined ? name : `${name} (did you mean ${near}?)`;
  });
  const noun = unknown.length === 1 ? "variable" : "variables";
  return new ConfigError(
    `unknown environment ${noun} ${described.join(", ")}; ` +
      `dotproxy reads only the DOTPROXY_* variables --help lists`,
  );
}

/**
 * Warnings about a valid configuration that may not do what was meant, one line each: a
 * loopback listen address whose clients `--allow` does not include (every query from them
 * gets REFUSED, the health check's too).
 *
 * @example
 * ```ts
 * import { configWarnings, parseConfig } from "./config.ts";
 * const request = parseConfig(["--allow", "10.0.0.0/8"], () => undefined);
 * if (request.kind === "config") configWarnings(request.config); // ["--listen 127.0.0.1:5300: ..."]
 * ```
 */
export function configWarnings(config: Config): string[] {
  const warnings: string[] = [];
  for (const address of config.listen) {
    const bytes = parseIpAddress(address.hostname)!;
    const loopback = bytes.length === 4
      ? bytes[0] === 127
      : bytes.every((b, i) => b === (i === 15 ? 1 : 0));
    if (!loopback || config.allow.some((cidr) => cidrContains(cidr, bytes))) continue;
    const shown = formatHostPort(address.hostname, address.port);
    const cidr = bytes.length === 4 ? "127.0.0.0/8" : "::1/128";
    warnings.push(
      `--listen ${shown}: its clients are on this host, but --allow ` +
        `(${config.allow.map((c) => c.text).join(",")}) does not include them, so every ` +
        `query there is REFUSED (add ${cidr} to --allow)`,
    );
  }
  return warnings;
}

/** Reads one environment variable; injected so tests and the config never touch globals. */
export type EnvReader = (name: string) => string | undefined;

/** What the command line says, before any value is parsed. */
interface CommandLine {
  help: boolean;
  version: boolean;
  mode: ConfigMode | undefined;
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
  const line: CommandLine = {
    help: false,
    version: false,
    mode: undefined,
    flags: new Map(),
    positionals: [],
  };
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
    if (arg === "--print-config" || arg === "--check-config") {
      const mode = arg.slice(2) as ConfigMode;
      if (line.mode !== undefined && line.mode !== mode) {
        throw new ConfigError("--print-config and --check-config cannot be given together");
      }
      line.mode = mode;
      continue;
    }
    if (!arg.startsWith("-") || arg === "-") {
      line.positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf("=");
    const name = arg.startsWith("--") ? arg.slice(2, eq < 0 ? undefined : eq) : "";
    if (
      name === "help" || name === "version" || name === "print-config" || name === "check-config"
    ) {
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

const UNITS: Readonly<Record<string, { name: string; perSecond: number }>> = {
  MS: { name: "milliseconds", perSecond: 1000 },
  SECONDS: { name: "seconds", perSecond: 1 },
};
const SECONDS_PER: Readonly<Record<string, number>> = {
  ms: 0.001,
  s: 1,
  sec: 1,
  m: 60,
  min: 60,
  h: 3600,
};

/**
 * Parses with the declaration's parser; a number with a unit (`4s`) where the setting takes a
 * bare number of milliseconds or seconds gets an error that says the unit and the number meant.
 */
function parseWithUnit<K extends SettingField>(
  declaration: Declaration<K>,
  text: string,
  what: string,
): Config[K] {
  try {
    return declaration.parse(text, what);
  } catch (error) {
    const unit = UNITS[declaration.arg];
    const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|sec|m|min|h)\s*$/i.exec(text);
    if (!(error instanceof ConfigError) || unit === undefined || m === null) throw error;
    const meant = Number(m[1]) * SECONDS_PER[m[2].toLowerCase()] * unit.perSecond;
    const hint = Number.isInteger(meant) ? ` (${m[1]}${m[2]} is ${meant})` : "";
    throw new ConfigError(
      `${what}: "${text.trim()}" has a unit; the value is a whole number of ${unit.name}, ` +
        `without one${hint}`,
    );
  }
}

/** Parses one field into `config`, from its flag, its variable or its fallback. */
function fill<K extends SettingField>(
  config: Partial<Config>,
  sources: Sources,
  field: K,
  declaration: Declaration<K>,
  flags: Map<string, string[]>,
  env: EnvReader,
): void {
  const aliasValue = declaration.alias === undefined ? undefined : env(declaration.alias);
  if (aliasValue !== undefined && env(declaration.env) !== undefined) {
    throw new ConfigError(
      `${declaration.alias} and ${declaration.env} are both set; ${declaration.alias} is ` +
        `another name for ${declaration.env}: set one`,
    );
  }
  const given = declaration.flag === "" ? undefined : flags.get(declaration.flag);
  if (given !== undefined) {
    const what = `--${declaration.flag}`;
    // A list flag may be repeated; any other flag given twice counts as given last.
    const text = declaration.kind === "list"
      ? given.join(",")
      : declaration.kind === "entries"
      ? given.join(";")
      : given[given.length - 1];
    config[field] = parseWithUnit(declaration, text, what);
    sources.set(field, what);
    return;
  }
  const fromEnv = env(declaration.env);
  if (fromEnv !== undefined || aliasValue !== undefined) {
    const name = fromEnv !== undefined ? declaration.env : declaration.alias!;
    config[field] = parseWithUnit(declaration, fromEnv ?? aliasValue!, name);
    sources.set(field, name);
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

/**
 * Two listeners of different kinds on one TCP port of overlapping addresses (`--listen` and
 * `--listen-dot` on 127.0.0.1:5300, `--listen-doh` on [::]:443 and `--http` on 127.0.0.1:443):
 * every listener binds with SO_REUSEPORT (rotation), so both would bind, and the kernel would
 * hand each new connection to either: a DoT client to the DoH listener. Refused here.
 */
function checkSharedPorts(config: Config, sources: Sources): void {
  const fields = ["listen", "listenDot", "listenDoh", "listenDohPlain", "http"] as const;
  const bound: { field: SettingField; address: ListenAddress }[] = [];
  for (const field of fields) {
    const value = config[field];
    const addresses = value === null ? [] : Array.isArray(value) ? value : [value];
    for (const address of addresses) {
      if (address.port !== 0) bound.push({ field, address });
    }
  }
  const name = (field: SettingField) => sources.get(field) ?? `--${TABLE[field].flag}`;
  for (const [i, one] of bound.entries()) {
    for (const other of bound.slice(i + 1)) {
      if (one.field === other.field || one.address.port !== other.address.port) continue;
      const a = parseIpAddress(one.address.hostname);
      const b = parseIpAddress(other.address.hostname);
      const same = a !== null && b !== null && formatIp(a) === formatIp(b);
      if (
        !same && !coversAddress(one.address, other.address) &&
        !coversAddress(other.address, one.address)
      ) continue;
      throw new ConfigError(
        `${name(one.field)} ${formatListen(one.address)} and ${name(other.field)} ` +
          `${formatListen(other.address)} share a TCP port: give each listener a port of its own`,
      );
    }
  }
}

/** Checks between settings, once every field has its value. */
function checkTogether(config: Config, sources: Sources): void {
  checkServerCertificate(config);
  checkSharedPorts(config, sources);
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

function build(
  command: Config["command"],
  flags: Map<string, string[]>,
  env: EnvReader,
): { config: Config; sources: Sources } {
  const config: Partial<Config> = { command };
  const sources: Sources = new Map();
  for (const field of FIELDS) fill(config, sources, field, TABLE[field], flags, env);
  // Complete: TABLE's type has one declaration for every field but `command`, set above.
  const complete = config as Config;
  checkTogether(complete, sources);
  if (complete.container && command === "serve") {
    for (const field of HEALTHCHECK_FIELDS) {
      const { flag, env: name } = TABLE[field];
      const given = flags.get(flag);
      if (given === undefined) continue;
      const value = given.join(",");
      throw new ConfigError(
        `--${flag} is given as a flag, but in the container image (DOTPROXY_CONTAINER=true) ` +
          `it must be the variable ${name}, which the image's HEALTHCHECK reads too: ` +
          `docker run -e ${name}=${value} ... (not a flag after the image name)`,
      );
    }
  }
  return { config: complete, sources };
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
  return build("serve", new Map(), () => undefined).config;
}

/**
 * Builds the configuration from arguments and environment. With `variables`, the names of
 * every variable in the environment, a `DOTPROXY_*` name that nothing reads is an error
 * (a misspelt setting would otherwise leave its default in force); Kubernetes service links
 * are recognised and left alone.
 *
 * @example
 * ```ts
 * import { parseConfig } from "./config.ts";
 * const request = parseConfig(["--listen", "127.0.0.1:5353"], (name) => Deno.env.get(name));
 * if (request.kind === "config") console.log(request.config.listen);
 * ```
 */
export function parseConfig(
  args: string[],
  env: EnvReader,
  variables?: readonly string[],
): ConfigRequest {
  const line = readCommandLine(args);
  if (line.help) return { kind: "help" };
  if (line.version) return { kind: "version" };
  const unknown = variables === undefined ? [] : unknownVariables(variables, env);
  if (unknown.length > 0) throw unknownVariablesError(unknown);

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
  const { config, sources } = build(command, line.flags, env);
  return { kind: "config", config, mode: line.mode, sources };
}

/** One setting's value for `--print-config`, redacted where it must be. */
function showSetting<K extends SettingField>(
  declaration: Declaration<K>,
  value: Config[K],
): string {
  const text = declaration.show ? declaration.show(value) : showValue(value);
  if ((declaration.secret && text !== "") || /-----BEGIN [A-Z ]*PRIVATE KEY/.test(text)) {
    return "<redacted>";
  }
  return text;
}

/** A field's value as its variable would take it (generic: lists joined with commas). */
function showValue(value: unknown): string {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.map(showValue).join(",");
  if (typeof value === "object") {
    if ("label" in value) return String(value.label); // an upstream
    if ("text" in value) return String(value.text); // a network
    if ("hostname" in value && "port" in value) {
      return formatHostPort(String(value.hostname), Number(value.port));
    }
    return JSON.stringify(value);
  }
  return String(value);
}

/**
 * The effective configuration as `--print-config` prints it: one `DOTPROXY_NAME=value` line
 * per setting in the order of {@linkcode SETTINGS} (so the output works as an environment
 * file), each value that did not come from its default preceded by a comment naming the flag
 * or variable it came from. Secrets (settings declared secret, any PEM private key) and CA
 * certificates show as `<redacted...>`.
 *
 * @example
 * ```ts
 * import { formatConfig, parseConfig } from "./config.ts";
 * const request = parseConfig(["--listen", "127.0.0.1:5353"], () => undefined);
 * if (request.kind === "config") console.log(formatConfig(request.config, request.sources));
 * ```
 */
export function formatConfig(
  config: Config,
  sources: ReadonlyMap<SettingField, string> = new Map(),
): string {
  const lines = [
    `# dotproxy ${VERSION}: the effective configuration (flags, then DOTPROXY_* variables, ` +
    `then defaults), secrets redacted.`,
    "# A comment names where the next value came from; values without one are defaults.",
  ];
  for (const field of FIELDS) {
    const text = showSetting(TABLE[field], config[field]);
    const source = sources.get(field);
    if (source !== undefined) lines.push(`# ${source}`);
    lines.push(`${TABLE[field].env}=${text}`);
  }
  return lines.join("\n");
}
