/**
 * DNS over HTTPS (RFC 8484): maps an HTTP request to a DNS query for the resolver and its
 * answer to an HTTP response. Protocol-neutral: the HTTP/1.1 and HTTP/2 connections of
 * `server/doh_listener.ts` hand it whole requests ({@linkcode HttpService}).
 *
 * - `GET PATH?dns=BASE64URL` (padding tolerated), `HEAD` alike without a body, and
 *   `POST PATH` with `Content-Type: application/dns-message`;
 * - every DNS answer is `200`, `application/dns-message`, with `Cache-Control: max-age=N` as
 *   the cache computes the answer's lifetime (`cacheableTtl`: the smallest TTL, or for a
 *   negative answer the SOA's TTL capped by its MINIMUM; RFC 8484 section 5.1), and
 *   `no-store` for SERVFAIL and for what must not be cached (REFUSED, FORMERR, NOTIMP...);
 * - what a client gets wrong is a 4xx that never reaches the resolver: 400 (no or bad
 *   `dns` parameter, a body that is not a DNS query), 404 (other paths), 405 with `Allow`
 *   (other methods), 415 (POST of another type); 413, 414 and 431 come from the
 *   connections' limits through {@linkcode DohService.reject};
 * - answers are never truncated; a query that carried EDNS padding gets its answer padded
 *   to 468-octet blocks (RFC 8467: the resolver does it for `doh` as for `dot`);
 * - the client is the connection's peer, or with `--trusted-proxy`, the right-most address
 *   of `X-Forwarded-For` that is not a trusted proxy; ACL and rate limit apply to it.
 *
 * @module
 */

import { cacheableTtl, type CacheSettings } from "../cache/answer_cache.ts";
import { type Cidr, cidrContains, parseIpAddress } from "../config.ts";
import { analyzeResponse, ResponseInfo } from "../dns/message.ts";
import { inspectQuery, QueryInfo, QueryVerdict } from "../dns/query.ts";
import type { HttpPeer, HttpRequest, HttpResponse, HttpService } from "../http/types.ts";
import type { Logger } from "../log.ts";
import type { Counter, Registry } from "../metrics.ts";
import type { Resolver } from "../resolver.ts";

/** The media type of DNS messages over HTTP (RFC 8484 section 6). */
export const DNS_MESSAGE = "application/dns-message";

/** Statistics hooks of the DoH service. */
export interface DohStats {
  /** One HTTP response with `status` went out. */
  response(status: number): void;
}

/** Hooks that count nothing. */
export const NO_DOH_STATS: DohStats = { response() {} };

/** Statuses shown at zero before any is sent. */
const KNOWN_STATUSES = [200, 400, 404, 405, 413, 414, 415, 431, 503];

/**
 * Registers `dotproxy_doh_responses_total{status}` in `registry` and returns its hooks.
 *
 * @example
 * ```ts ignore
 * const stats = registerDohMetrics(metrics.registry);
 * ```
 */
export function registerDohMetrics(registry: Registry): DohStats {
  const counter: Counter = registry.counter(
    "dotproxy_doh_responses_total",
    "HTTP responses of the DoH listeners, by status code: 200 for every DNS answer " +
      "(SERVFAIL and NXDOMAIN included), 4xx for requests a client got wrong (they never " +
      "reach the resolver), 503 when the proxy could not answer.",
    ["status"],
  );
  const children = new Map<number, ReturnType<Counter["labels"]>>();
  for (const status of KNOWN_STATUSES) children.set(status, counter.labels(String(status)));
  return {
    response(status: number) {
      let child = children.get(status);
      if (child === undefined) {
        child = counter.labels(String(status));
        children.set(status, child);
      }
      child.inc();
    },
  };
}

/** What {@linkcode DohService} needs. */
export interface DohServiceOptions {
  /** The core. */
  resolver: Resolver;
  /** The path served (`/dns-query`). */
  path: string;
  /** Peers whose `X-Forwarded-For` is believed. */
  trustedProxies: readonly Cidr[];
  /** The cache's TTL settings, for `Cache-Control: max-age`. */
  cache: Pick<CacheSettings, "minTtl" | "maxTtl" | "maxNegativeTtl">;
  /** Logger. */
  log: Logger;
  /** Statistics hooks. */
  stats?: DohStats;
}

const TEXT = "text/plain; charset=utf-8";
const encoder = new TextEncoder();
/** The value of each base64url character (RFC 4648 section 5), -1 for the others. */
const BASE64URL_VALUES: Int8Array = (() => {
  const values = new Int8Array(128).fill(-1);
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  for (let i = 0; i < alphabet.length; i++) values[alphabet.charCodeAt(i)] = i;
  return values;
})();

/**
 * Decodes base64url (RFC 4648 section 5) without or with padding; null when `text` is not
 * base64url. One pass over the characters into the result: the `dns` parameter of every GET
 * goes through it (with `atob`, a regular expression and replacements it was 8% of the CPU
 * of a cached DoH GET, V8 profile at 112k requests/s).
 *
 * @example
 * ```ts
 * import { decodeBase64Url } from "./doh.ts";
 * decodeBase64Url("AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB")?.length; // 33
 * decodeBase64Url("not base64!"); // null
 * ```
 */
export function decodeBase64Url(text: string): Uint8Array | null {
  let length = text.length;
  // Padding tolerated: at most two `=`, and only where padding can be.
  let pad = 0;
  while (length > 0 && text.charCodeAt(length - 1) === 0x3d && pad < 2) {
    length--;
    pad++;
  }
  if (length % 4 === 1 || (pad > 0 && (length + pad) % 4 !== 0)) return null;
  const out = new Uint8Array((length * 3) >> 2);
  let at = 0;
  let i = 0;
  for (; i + 4 <= length; i += 4) {
    const a = value(text, i),
      b = value(text, i + 1),
      c = value(text, i + 2),
      d = value(text, i + 3);
    if ((a | b | c | d) < 0) return null;
    out[at++] = (a << 2) | (b >> 4);
    out[at++] = ((b & 15) << 4) | (c >> 2);
    out[at++] = ((c & 3) << 6) | d;
  }
  const rest = length - i;
  if (rest >= 2) {
    const a = value(text, i), b = value(text, i + 1);
    const c = rest === 3 ? value(text, i + 2) : 0;
    if ((a | b | c) < 0) return null;
    out[at++] = (a << 2) | (b >> 4);
    if (rest === 3) out[at++] = ((b & 15) << 4) | (c >> 2);
  }
  return out;
}

function value(text: string, at: number): number {
  const code = text.charCodeAt(at);
  return code < 128 ? BASE64URL_VALUES[code] : -1;
}

/**
 * The client of a request: `peer`, or when `peer` is a trusted proxy, the right-most
 * address of `X-Forwarded-For` that is not one (RFC 7239 section 5.2's reasoning for the
 * de facto header: only the hops our trusted proxies appended are facts). An entry that is
 * not an address stops the walk at the last trusted hop.
 *
 * @example
 * ```ts
 * import { forwardedClient } from "./doh.ts";
 * import { parseCidr } from "../config.ts";
 * const peer = { transport: "tcp" as const, hostname: "10.0.0.5", port: 40000 };
 * forwardedClient(peer, "198.51.100.7, 10.0.0.9", [parseCidr("10.0.0.0/8", "x")]).hostname;
 * // "198.51.100.7"
 * ```
 */
export function forwardedClient(
  peer: Deno.NetAddr,
  forwardedFor: string | undefined,
  trusted: readonly Cidr[],
): Deno.NetAddr {
  const isTrusted = (bytes: Uint8Array) => trusted.some((cidr) => cidrContains(cidr, bytes));
  if (forwardedFor === undefined || trusted.length === 0) return peer;
  const peerBytes = parseIpAddress(peer.hostname);
  if (peerBytes === null || !isTrusted(peerBytes)) return peer;
  let client = peer;
  const hops = forwardedFor.split(",");
  for (let i = hops.length - 1; i >= 0; i--) {
    const hostname = hopAddress(hops[i].trim());
    const bytes = hostname === null ? null : parseIpAddress(hostname);
    if (hostname === null || bytes === null) return client;
    client = { transport: "tcp", hostname, port: 0 };
    if (!isTrusted(bytes)) return client;
  }
  return client;
}

/** The address of one X-Forwarded-For entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`. */
function hopAddress(entry: string): string | null {
  if (entry.startsWith("[")) {
    const close = entry.indexOf("]");
    return close < 0 ? null : entry.slice(1, close);
  }
  const colons = entry.split(":").length - 1;
  if (colons === 1) return entry.slice(0, entry.indexOf(":"));
  return entry === "" ? null : entry;
}

/**
 * The DoH service: requests in, resolver, responses out.
 *
 * @example
 * ```ts ignore
 * const service = new DohService({ resolver, path: "/dns-query", trustedProxies: [],
 *   cache: config, log });
 * ```
 */
export class DohService implements HttpService {
  readonly #options: DohServiceOptions;
  readonly #stats: DohStats;
  readonly #queryInfo = new QueryInfo();
  readonly #responseInfo = new ResponseInfo();
  readonly #settings: CacheSettings;

  /** Creates the service. */
  constructor(options: DohServiceOptions) {
    this.#options = options;
    this.#stats = options.stats ?? NO_DOH_STATS;
    this.#settings = { maxEntries: 1, serveStaleSeconds: 0, ...options.cache };
  }

  /** See {@linkcode HttpService.reject}. */
  reject(status: number, reason: string): HttpResponse {
    this.#stats.response(status);
    const fields: [string, string][] = [["content-type", TEXT], ["cache-control", "no-store"]];
    if (status === 405) fields.push(["allow", "GET, HEAD, POST"]);
    return { status, fields, body: encoder.encode(`${reason}\n`) };
  }

  /** See {@linkcode HttpService.handle}. */
  handle(request: HttpRequest, peer: HttpPeer): Promise<HttpResponse> {
    const { method, target } = request;
    const queryAt = target.indexOf("?");
    const path = queryAt < 0 ? target : target.slice(0, queryAt);
    if (path !== this.#options.path) {
      return Promise.resolve(
        this.reject(404, `not found; DNS queries go to ${this.#options.path}`),
      );
    }
    let query: Uint8Array | null;
    if (method === "GET" || method === "HEAD") {
      const parameter = dnsParameter(queryAt < 0 ? "" : target.slice(queryAt + 1));
      if (parameter === null) {
        return Promise.resolve(this.reject(400, "missing dns parameter (?dns=BASE64URL)"));
      }
      query = decodeBase64Url(parameter);
      if (query === null) {
        return Promise.resolve(this.reject(400, "the dns parameter is not base64url"));
      }
    } else if (method === "POST") {
      const type = (request.fields.get("content-type") ?? "").split(";")[0].trim().toLowerCase();
      if (type !== DNS_MESSAGE) {
        return Promise.resolve(this.reject(415, `POST needs Content-Type: ${DNS_MESSAGE}`));
      }
      query = request.body;
    } else {
      return Promise.resolve(this.reject(405, `method ${method} not allowed`));
    }
    const info = this.#queryInfo;
    if (inspectQuery(query, info) === QueryVerdict.DROP) {
      return Promise.resolve(this.reject(400, `not a DNS query (${info.reason})`));
    }
    const client = forwardedClient(
      peer.address,
      request.fields.get("x-forwarded-for"),
      this.#options.trustedProxies,
    );
    return this.#options.resolver.resolve(query, "doh", client).then((answer) =>
      this.#answer(answer)
    );
  }

  #answer(answer: Uint8Array | null): HttpResponse {
    if (answer === null) {
      // Dropped by the resolver (rate limit over a stream is REFUSED, not a drop: this is
      // overload or a bug): the client may retry.
      const refused = this.reject(503, "no answer");
      refused.fields.push(["retry-after", "1"]);
      return refused;
    }
    const info = this.#responseInfo;
    let cacheControl = "no-store";
    if (analyzeResponse(answer, info)) {
      const decision = cacheableTtl(info, answer.length, this.#settings);
      if (decision !== null && decision.kind !== "servfail") {
        cacheControl = `max-age=${decision.ttl}`;
      }
    }
    this.#stats.response(200);
    return {
      status: 200,
      fields: [["content-type", DNS_MESSAGE], ["cache-control", cacheControl]],
      body: answer,
    };
  }
}

/** The value of the first `dns` parameter of a query string, or null. */
function dnsParameter(search: string): string | null {
  for (const pair of search.split("&")) {
    if (pair !== "dns" && !pair.startsWith("dns=")) continue;
    const value = pair.slice(4);
    if (!value.includes("%")) return value;
    // A client that percent-encoded the padding (`%3D`).
    try {
      return decodeURIComponent(value);
    } catch {
      return value;
    }
  }
  return null;
}
