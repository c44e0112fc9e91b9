/**
 * The transport-agnostic core: `resolve(query bytes) -> response bytes`. Validation, load
 * shedding, forwarding, error responses and UDP truncation all live here; listeners only
 * own sockets and framing.
 *
 * @module
 */

import { inspectQuery, QueryInfo, QueryVerdict } from "./dns/query.ts";
import { buildErrorResponse, clientUdpLimit, EdeCode, truncateResponse } from "./dns/response.ts";
import { getRcode, nameToString, Rcode, rcodeName, typeName } from "./dns/wire.ts";
import { type Logger, RateLimitedLog } from "./log.ts";
import { type Forwarder, UpstreamError } from "./upstream/types.ts";

/** The client transport a query arrived on. */
export type Transport = "udp" | "tcp";

/** Why a client message got no response at all. */
export type DropReason = "malformed" | "response" | "overload";

/** Statistics hooks of the resolver. */
export interface ResolverStats {
  /** A response went back to a client after `seconds`. */
  query(transport: Transport, rcode: number, seconds: number): void;
  /** A message was dropped without a response. */
  dropped(transport: Transport, reason: DropReason): void;
  /** A UDP answer was truncated to fit the client. */
  truncated(): void;
}

/** Statistics hooks that record nothing. */
export const NO_RESOLVER_STATS: ResolverStats = {
  query() {},
  dropped() {},
  truncated() {},
};

/** Options of {@linkcode Resolver}. */
export interface ResolverOptions {
  /** Largest UDP answer sent to any client. */
  udpMaxSize: number;
  /** Most queries in flight at once; beyond it new ones are dropped. */
  maxInflight: number;
  /** Log a line per query at info. */
  logQueries: boolean;
  /** Logger. */
  log: Logger;
  /** Statistics hooks. */
  stats?: ResolverStats;
}

/** Formats a client address for logs. */
export function formatAddr(addr: Deno.Addr | undefined): string | undefined {
  if (addr === undefined || !("hostname" in addr)) return undefined;
  return addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
}

/**
 * Resolves client queries through a {@linkcode Forwarder}.
 *
 * @example
 * ```ts ignore
 * const resolver = new Resolver(pool, { udpMaxSize: 1232, maxInflight: 10000,
 *   logQueries: false, log });
 * const response = await resolver.resolve(queryBytes, "udp"); // null: drop it
 * ```
 */
export class Resolver {
  readonly #forwarder: Forwarder;
  readonly #options: ResolverOptions;
  readonly #stats: ResolverStats;
  readonly #log: Logger;
  readonly #info = new QueryInfo();
  readonly #overloadLog: RateLimitedLog;
  readonly #failureLog: RateLimitedLog;
  #inflight = 0;

  /** Creates a resolver forwarding through `forwarder`. */
  constructor(forwarder: Forwarder, options: ResolverOptions) {
    this.#forwarder = forwarder;
    this.#options = options;
    this.#stats = options.stats ?? NO_RESOLVER_STATS;
    this.#log = options.log;
    this.#overloadLog = new RateLimitedLog(options.log, 10_000);
    this.#failureLog = new RateLimitedLog(options.log, 1_000);
  }

  /** Queries currently waiting for an upstream. */
  get inflight(): number {
    return this.#inflight;
  }

  /**
   * Answers one client message. Resolves with the response bytes, or `null` when the
   * message must be dropped (unreadable, a response, or the proxy is overloaded). Never
   * rejects. `query` must not be changed until the promise settles.
   */
  async resolve(
    query: Uint8Array,
    transport: Transport,
    client?: Deno.Addr,
  ): Promise<Uint8Array | null> {
    const started = performance.now();
    const info = this.#info;
    const verdict = inspectQuery(query, info);
    if (verdict === QueryVerdict.DROP) {
      this.#stats.dropped(
        transport,
        info.reason === "response from client" ? "response" : "malformed",
      );
      this.#log.debug("dropped message", {
        transport,
        client: formatAddr(client),
        reason: info.reason,
        bytes: query.length,
      });
      return null;
    }
    if (verdict !== QueryVerdict.FORWARD) {
      const rcode = verdict === QueryVerdict.NOTIMP ? Rcode.NOTIMP : Rcode.FORMERR;
      this.#log.debug("refused malformed or unsupported query", {
        transport,
        client: formatAddr(client),
        reason: info.reason,
        rcode: rcodeName(rcode),
      });
      const response = buildErrorResponse(query, info, rcode);
      this.#finish(query, info.nameEnd, response, transport, started, client, "", info.qtype);
      return response;
    }
    if (this.#inflight >= this.#options.maxInflight) {
      this.#stats.dropped(transport, "overload");
      this.#overloadLog.warn("too many queries in flight; dropping", {
        limit: this.#options.maxInflight,
      });
      return null;
    }
    const questionEnd = info.questionEnd;
    const nameEnd = info.nameEnd;
    const qtype = info.qtype;
    const limit = transport === "udp" ? clientUdpLimit(info, this.#options.udpMaxSize) : 65535;
    let response: Uint8Array;
    let upstream = "";
    this.#inflight++;
    try {
      const answer = await this.#forwarder.forward(query, questionEnd);
      response = answer.response;
      upstream = answer.upstream;
    } catch (error) {
      response = this.#servfail(query, error, transport, client);
      if (error instanceof UpstreamError && error.upstream) upstream = error.upstream;
    } finally {
      this.#inflight--;
    }
    if (response.length > limit) {
      response = truncateResponse(response, limit);
      this.#stats.truncated();
    }
    this.#finish(query, nameEnd, response, transport, started, client, upstream, qtype);
    return response;
  }

  #servfail(
    query: Uint8Array,
    error: unknown,
    transport: Transport,
    client: Deno.Addr | undefined,
  ): Uint8Array {
    const info = this.#info;
    inspectQuery(query, info);
    const reason = error instanceof UpstreamError ? error.reason : "internal";
    if (!(error instanceof UpstreamError)) {
      this.#log.error("unexpected error forwarding a query", {
        error: error instanceof Error ? error.stack ?? error.message : String(error),
      });
    } else {
      this.#failureLog.warn("query failed; answering SERVFAIL", {
        transport,
        client: formatAddr(client),
        upstream: error.upstream,
        reason,
        error: error.message,
      });
    }
    const ede = reason === "timeout"
      ? { code: EdeCode.NO_REACHABLE_AUTHORITY, text: "upstream timeout" }
      : reason === "unavailable"
      ? { code: EdeCode.NO_REACHABLE_AUTHORITY, text: "no upstream available" }
      : { code: EdeCode.NETWORK_ERROR, text: `upstream ${reason}` };
    return buildErrorResponse(query, info, Rcode.SERVFAIL, { ede });
  }

  #finish(
    query: Uint8Array,
    nameEnd: number,
    response: Uint8Array,
    transport: Transport,
    started: number,
    client: Deno.Addr | undefined,
    upstream: string,
    qtype: number,
  ): void {
    const seconds = (performance.now() - started) / 1000;
    const rcode = getRcode(response);
    this.#stats.query(transport, rcode, seconds);
    if (this.#options.logQueries) {
      this.#log.info("query", {
        client: formatAddr(client),
        transport,
        name: nameEnd > 0 ? nameToString(query, 12, nameEnd) : undefined,
        type: nameEnd > 0 ? typeName(qtype) : undefined,
        rcode: rcodeName(rcode),
        upstream: upstream || undefined,
        cache: "off",
        duration_ms: Math.round(seconds * 1e6) / 1e3,
      });
    }
  }
}
