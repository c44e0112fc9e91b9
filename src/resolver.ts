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
import { PendingQuery } from "./upstream/pending_query.ts";
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

/** Where a listener wants a query's outcome: the response bytes, or `null` to drop it. */
export interface ResponseSink {
  /** Called exactly once per query, possibly before `resolveWith` returns. */
  deliver(response: Uint8Array | null, client: Deno.Addr | undefined): void;
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
  resolve(query: Uint8Array, transport: Transport, client?: Deno.Addr): Promise<Uint8Array | null> {
    return new Promise((resolve) => {
      this.resolveWith(query, transport, client, { deliver: (response) => resolve(response) });
    });
  }

  /**
   * The listeners' entry point: like {@linkcode resolve}, but the outcome goes to `sink`,
   * which costs no promise per query. `query` must not be changed until it is delivered.
   */
  resolveWith(
    query: Uint8Array,
    transport: Transport,
    client: Deno.Addr | undefined,
    sink: ResponseSink,
  ): void {
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
      sink.deliver(null, client);
      return;
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
      sink.deliver(response, client);
      return;
    }
    if (this.#inflight >= this.#options.maxInflight) {
      this.#stats.dropped(transport, "overload");
      this.#overloadLog.warn("too many queries in flight; dropping", {
        limit: this.#options.maxInflight,
      });
      sink.deliver(null, client);
      return;
    }
    const limit = transport === "udp" ? clientUdpLimit(info, this.#options.udpMaxSize) : 65535;
    const job = new ResolveJob(this, query, info, transport, client, sink, started, limit);
    this.#inflight++;
    if (this.#forwarder.submit) {
      this.#forwarder.submit(job);
    } else {
      this.#forwarder.forward(query, info.questionEnd).then(
        (answer) => job.complete(answer.response, answer.upstream),
        (error) => job.failWith(error),
      );
    }
  }

  /** Finishes a forwarded query: truncation for UDP, stats, query log, delivery. */
  settle(job: ResolveJob, answer: Uint8Array | null, error: unknown): void {
    this.#inflight--;
    let response: Uint8Array;
    let upstream = job.upstream;
    if (answer !== null) {
      response = answer;
    } else {
      response = this.#servfail(job.query, error, job.transport, job.client);
      upstream = error instanceof UpstreamError && error.upstream ? error.upstream : "";
    }
    if (response.length > job.limit) {
      response = truncateResponse(response, job.limit);
      this.#stats.truncated();
    }
    this.#finish(
      job.query,
      job.nameEnd,
      response,
      job.transport,
      job.started,
      job.client,
      upstream,
      job.qtype,
    );
    job.sink.deliver(response, job.client);
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

/** A forwarded query with what the resolver needs to finish it; reports through hooks. */
export class ResolveJob extends PendingQuery {
  /** Client transport. */
  readonly transport: Transport;
  /** Client address, for logs. */
  readonly client: Deno.Addr | undefined;
  /** Where the response goes. */
  readonly sink: ResponseSink;
  /** `performance.now()` when the query arrived. */
  readonly started: number;
  /** End of the question's name in `query`. */
  readonly nameEnd: number;
  /** QTYPE, for the query log. */
  readonly qtype: number;
  /** Largest response the client can take. */
  readonly limit: number;
  readonly #resolver: Resolver;

  /** Creates a job for `query`, described by `info` (read now, before it is reused). */
  constructor(
    resolver: Resolver,
    query: Uint8Array,
    info: QueryInfo,
    transport: Transport,
    client: Deno.Addr | undefined,
    sink: ResponseSink,
    started: number,
    limit: number,
  ) {
    super(query, info.questionEnd);
    this.#resolver = resolver;
    this.transport = transport;
    this.client = client;
    this.sink = sink;
    this.started = started;
    this.nameEnd = info.nameEnd;
    this.qtype = info.qtype;
    this.limit = limit;
  }

  /** Fails with any error (a forwarder without `submit` may reject with anything). */
  failWith(error: unknown): void {
    if (this.done) return;
    if (error instanceof UpstreamError) {
      this.fail(error);
      return;
    }
    this.done = true;
    this.#resolver.settle(this, null, error);
  }

  /** Delivers the answer. */
  protected override onComplete(): void {
    this.#resolver.settle(this, this.response, null);
  }

  /** Delivers SERVFAIL. */
  protected override onFail(error: UpstreamError): void {
    this.#resolver.settle(this, null, error);
  }
}
