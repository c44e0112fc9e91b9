/**
 * The transport-agnostic core: `resolve(query bytes) -> response bytes`. A
 * {@linkcode ClientJob} travels through the stages, each with one job:
 *
 * 1. **admit**: access list and per-client rate limit (`resolver/admission.ts`);
 * 2. **validate**: what is not a query, or must never go upstream, is answered or dropped
 *    here (`dns/query.ts`), and ANY over UDP gets an empty TC=1 answer (RFC 8482);
 * 3. **cache**: a fresh entry answers at once; an expired one may be served stale later
 *    (`cache/answer_cache.ts`);
 * 4. **forward**: at `--max-inflight` a UDP query is shed here (after the cache, so hits
 *    are still answered); otherwise the question joins a flight already out for the same
 *    key, or starts one (`resolver/flight.ts`), through the {@linkcode Forwarder};
 * 5. **finish**: the client's own ID, question casing and EDNS shape, truncation for UDP,
 *    statistics, the query log, and delivery to the listener's sink.
 *
 * Listeners only own sockets and framing.
 *
 * @module
 */

import { formatAddr } from "./address.ts";
import {
  AnswerCache,
  type CacheEntry,
  type CacheSettings,
  type CacheStats,
  STALE_RECHECK_MS,
} from "./cache/answer_cache.ts";
import { cacheKeyFlags, cacheKeyHash, KEY_RECURSION_DESIRED } from "./dns/cache_key.ts";
import { buildUpstreamQuery, stripResponseOpt, trimResponseOpt } from "./dns/edns.ts";
import {
  buildIdentityAnswer,
  CLASS_CH,
  isIdentityQuery,
  isLoopbackClient,
} from "./dns/identity.ts";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "./dns/message.ts";
import { inspectQuery, QueryInfo, QueryVerdict, verdictRcode } from "./dns/query.ts";
import { buildErrorResponse, clientUdpLimit, EdeCode, truncateResponse } from "./dns/response.ts";
import { zeroHighTtls } from "./dns/ttl.ts";
import { getRcode, nameToString, Rcode, rcodeName, RRType, typeName } from "./dns/wire.ts";
import { type Logger, RateLimitedLog } from "./log.ts";
import { Admission, Admit } from "./resolver/admission.ts";
import { Flight, type FlightOwner, FlightTable, MAX_WAITERS } from "./resolver/flight.ts";
import {
  type CacheStatus,
  ClientJob,
  type JobOwner,
  type ResponseSink,
  type Transport,
  TRANSPORTS,
} from "./resolver/job.ts";
import { addStreamOptions } from "./dns/stream_options.ts";
import { SlabCopier } from "./slab.ts";
import { type Clock, SYSTEM_CLOCK, type Timed, TimerQueue } from "./timers.ts";
import { VERSION } from "./version.ts";
import { UpstreamError } from "./upstream/errors.ts";
import type { Forwarder } from "./upstream/forwarder.ts";

export { formatAddr };
export type { CacheStatus, ResponseSink, Transport };

/** Why a client message got no response at all. */
export type DropReason = "malformed" | "response" | "overload" | "rate_limit";

/** Why a client got REFUSED by policy. */
export type RefusedReason = "acl" | "rate_limit";

/** Statistics hooks of the resolver. */
export interface ResolverStats {
  /** A response went back to a client after `seconds`. */
  query(transport: Transport, rcode: number, seconds: number): void;
  /** A message was dropped without a response. */
  dropped(transport: Transport, reason: DropReason): void;
  /** A UDP answer was truncated to fit the client. */
  truncated(): void;
  /** A client was refused by policy. */
  refused(reason: RefusedReason): void;
  /** A rate-limited UDP query got an empty TC=1 answer. */
  slipped(): void;
  /** How the cache took part in an answer (not called with the cache off). */
  cacheLookup(result: Exclude<CacheStatus, "off">): void;
  /** A prefetch started. */
  prefetched(): void;
}

/** Statistics hooks that record nothing. */
export const NO_RESOLVER_STATS: ResolverStats = {
  query() {},
  dropped() {},
  truncated() {},
  refused() {},
  slipped() {},
  cacheLookup() {},
  prefetched() {},
};

/** Options of {@linkcode Resolver}. */
export interface ResolverOptions {
  /** Largest UDP answer sent to any client. */
  udpMaxSize: number;
  /**
   * Most queries waiting on upstreams at once; beyond it UDP queries that would have to wait
   * too are dropped (cache hits are still answered, expired entries served stale).
   */
  maxInflight: number;
  /** Deadline for an upstream answer, milliseconds. */
  timeoutMs: number;
  /** Log a line per query at info. */
  logQueries: boolean;
  /** Logger. */
  log: Logger;
  /** Statistics hooks. */
  stats?: ResolverStats;
  /** Answer cache settings; `maxEntries` 0 turns the cache (and coalescing) off. */
  cache?: CacheSettings & {
    /** Refresh entries asked for in the last tenth of their TTL. */
    prefetch: boolean;
    /** Serve stale if no fresh answer comes within this many ms. */
    staleAnswerTimeoutMs: number;
  };
  /** Cache statistics hooks. */
  cacheStats?: CacheStats;
  /** Access control and rate limiting; none: everyone, unlimited. */
  admission?: Admission;
  /** Answer ANY over UDP with an empty TC=1 response (RFC 8482). */
  refuseAny?: boolean;
  /**
   * The idle timeout of stream connections, announced to a stream client that asks with
   * edns-tcp-keepalive (RFC 7828); default 10 s.
   */
  streamIdleTimeoutMs?: number;
  /**
   * Names answered here and never forwarded (`resolver.arpa`, RFC 9462): asked after
   * admission and validation, before the cache; null for a name it does not own.
   */
  local?: LocalAnswers;
  /** The clock. */
  clock?: Clock;
  /** Timers (shared with the pool). */
  timers?: TimerQueue;
}

/** Answers for names the proxy owns (see `dns/ddr.ts`). */
export interface LocalAnswers {
  /** The response to a forwardable query inspected into `info`, or null to go on. */
  answer(query: Uint8Array, info: QueryInfo): Uint8Array | null;
}

/** Carves upstream messages and per-client answer copies out of shared slabs. */
const copier = new SlabCopier();

/**
 * An answer on its way to the waiters of a flight and of its followers, one flight per turn
 * of the event loop (a timer due at once).
 */
class WaiterBatch implements Timed {
  timerAt = 0;
  timerIndex = -1;
  timerSlot = -1;

  constructor(
    readonly deliver: (batch: WaiterBatch) => void,
    public flight: Flight,
    readonly canonical: Uint8Array,
    readonly upstream: string,
    readonly optStart: number,
    readonly optEnd: number,
    readonly questionEnd: number,
  ) {}

  onTimer(): void {
    this.deliver(this);
  }
}

/**
 * Resolves client queries through a {@linkcode Forwarder}.
 *
 * @example
 * ```ts ignore
 * const resolver = new Resolver(pool, { udpMaxSize: 1232, maxInflight: 10000,
 *   timeoutMs: 4000, logQueries: false, log });
 * const response = await resolver.resolve(queryBytes, "udp"); // null: drop it
 * ```
 */
export class Resolver implements JobOwner, FlightOwner {
  /** The answer cache, when on. */
  readonly cache: AnswerCache | null;
  readonly #forwarder: Forwarder;
  readonly #options: ResolverOptions;
  readonly #stats: ResolverStats;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #timers: TimerQueue;
  readonly #ownsTimers: boolean;
  readonly #info = new QueryInfo();
  readonly #responseInfo = new ResponseInfo();
  /** Scratch for stripping OPT records (never the info an answer is analysed into). */
  readonly #stripInfo = new ResponseInfo();
  /** Scratch for SERVFAIL responses (never the info of the query being admitted). */
  readonly #failInfo = new QueryInfo();
  readonly #flights = new FlightTable();
  readonly #admission: Admission | null;
  readonly #refuseAny: boolean;
  readonly #local: LocalAnswers | null;
  readonly #prefetch: boolean;
  readonly #staleTimeoutMs: number;
  readonly #overloadLog: RateLimitedLog;
  readonly #failureLog: RateLimitedLog;
  readonly #refusedLog: RateLimitedLog;
  readonly #refusedSources = new Set<string>();
  readonly #capacityWaiters: (() => void)[] = [];
  readonly #answerBatchNow = (batch: WaiterBatch) => this.#answerBatch(batch);
  #inflight = 0;

  /** Creates a resolver forwarding through `forwarder`. */
  constructor(forwarder: Forwarder, options: ResolverOptions) {
    this.#forwarder = forwarder;
    this.#options = options;
    this.#stats = options.stats ?? NO_RESOLVER_STATS;
    this.#log = options.log;
    this.#clock = options.clock ?? SYSTEM_CLOCK;
    this.#ownsTimers = options.timers === undefined;
    this.#timers = options.timers ?? new TimerQueue(this.#clock);
    const cache = options.cache;
    this.cache = cache !== undefined && cache.maxEntries > 0
      ? new AnswerCache(cache, options.cacheStats ?? null)
      : null;
    this.#prefetch = cache?.prefetch ?? false;
    this.#staleTimeoutMs = cache?.staleAnswerTimeoutMs ?? 0;
    this.#admission = options.admission ?? null;
    this.#refuseAny = options.refuseAny ?? false;
    this.#local = options.local ?? null;
    const now = () => this.#clock.now();
    this.#overloadLog = new RateLimitedLog(options.log, 10_000, now);
    this.#failureLog = new RateLimitedLog(options.log, 1_000, now);
    this.#refusedLog = new RateLimitedLog(options.log, 10_000, now);
  }

  /** Queries waiting for an upstream. */
  get inflight(): number {
    return this.#inflight;
  }

  /** Flights out to upstreams (coalesced questions count once). */
  get flights(): number {
    return this.#flights.size;
  }

  /** True while more queries can be taken without shedding. */
  get hasCapacity(): boolean {
    return this.#inflight < this.#options.maxInflight;
  }

  /** Resolves once the resolver has capacity again (TCP reading pauses on it). */
  waitForCapacity(): Promise<void> {
    if (this.hasCapacity) return Promise.resolve();
    return new Promise((resolve) => this.#capacityWaiters.push(resolve));
  }

  /**
   * Answers one client message. Resolves with the response bytes, or `null` when the
   * message must be dropped. Never rejects. `query` must not change until it settles.
   */
  resolve(query: Uint8Array, transport: Transport, client?: Deno.Addr): Promise<Uint8Array | null> {
    return new Promise((resolve) => {
      this.resolveWith(query, transport, client, { deliver: (response) => resolve(response) });
    });
  }

  /**
   * The listeners' entry point: like {@linkcode resolve}, but the outcome goes to `sink`,
   * which costs no promise per query. `query` must not change until it is delivered.
   */
  resolveWith(
    query: Uint8Array,
    transport: Transport,
    client: Deno.Addr | undefined,
    sink: ResponseSink,
  ): void {
    const job = new ClientJob(this, query, transport, client, sink, this.#clock.now());
    if (!this.#admitAndValidate(job)) return;
    if (this.cache !== null && this.#answerFromCache(job)) return;
    this.#forward(job);
  }

  // ---- admit + validate -------------------------------------------------------------------

  /**
   * True when `client` is inside `--allow` (the TCP listener asks on accept: connections from
   * outside get a small budget of their own and only their REFUSED).
   */
  isAllowed(client: Deno.Addr): boolean {
    return this.#admission === null || this.#admission.allowed(client);
  }

  /** Runs the admit and validate stages; false when the job was finished there. */
  #admitAndValidate(job: ClientJob): boolean {
    const query = job.query;
    const info = this.#info;
    const admission = this.#admission;
    const admit = admission === null ? Admit.ALLOW : admission.admit(job.client, job.transport);
    const verdict = inspectQuery(query, info);
    if (admit === Admit.DENY) {
      this.#refuse(job, info, verdict);
      return false;
    }
    if (verdict === QueryVerdict.DROP) {
      const reason = info.reason === "response from client" ? "response" : "malformed";
      this.#stats.dropped(job.transport, reason);
      this.#log.debug("dropped message", {
        transport: job.transport,
        client: formatAddr(job.client),
        reason: info.reason,
        bytes: query.length,
      });
      this.#drop(job);
      return false;
    }
    this.#describe(job, info);
    if (admit !== Admit.ALLOW) {
      // Before local answers too: a flood of meta-type queries is limited like any other.
      this.#rateLimited(job, info, admit);
      return false;
    }
    if (verdict !== QueryVerdict.FORWARD) {
      const rcode = verdictRcode(verdict);
      this.#log.debug("answered locally", {
        transport: job.transport,
        client: formatAddr(job.client),
        reason: info.reason,
        rcode: rcodeName(rcode),
      });
      this.#finish(job, buildErrorResponse(query, info, rcode));
      return false;
    }
    if (info.qclass === CLASS_CH && isIdentityQuery(query, info) && isLoopbackClient(job.client)) {
      // `dotproxy healthcheck` asks this to know it reached this proxy (src/dns/identity.ts).
      this.#finish(job, buildIdentityAnswer(query, info, `dotproxy ${VERSION}`));
      return false;
    }
    if (this.#local !== null) {
      const local = this.#local.answer(query, info);
      if (local !== null) {
        this.#finish(job, local);
        return false;
      }
    }
    if (info.qtype === RRType.ANY && job.datagram && this.#refuseAny) {
      // RFC 8482: no amplification through ANY; a real client asks again over TCP.
      this.#finish(job, buildErrorResponse(query, info, Rcode.NOERROR, { truncated: true }));
      return false;
    }
    return true;
  }

  /** Copies what later stages need from the reused `info` into the job. */
  #describe(job: ClientJob, info: QueryInfo): void {
    job.nameEnd = info.nameEnd;
    job.questionEnd = info.questionEnd;
    job.qtype = info.qtype;
    job.hasEdns = info.hasEdns;
    job.asksKeepalive = info.asksKeepalive;
    job.asksPadding = info.asksPadding;
    job.limit = job.datagram ? clientUdpLimit(info, this.#options.udpMaxSize) : 65535;
    // The cache key and the flight table (coalescing) need them; both come with the cache.
    if (this.cache !== null) job.keyFlags = cacheKeyFlags(job.query, info.dnssecOk, info.cd);
  }

  #refuse(job: ClientJob, info: QueryInfo, verdict: QueryVerdict): void {
    this.#stats.refused("acl");
    const source = job.client !== undefined && "hostname" in job.client ? job.client.hostname : "?";
    if (!this.#refusedSources.has(source)) {
      if (this.#refusedSources.size >= 1024) this.#refusedSources.clear();
      this.#refusedSources.add(source);
      this.#refusedLog.warn("refused a client outside --allow", {
        client: source,
        transport: job.transport,
      });
    }
    job.closeAfter = !job.datagram;
    if (verdict === QueryVerdict.DROP || !this.#admission!.answerRefusal(job.transport)) {
      // Nothing readable to answer, or (UDP) so many refusals that the sources may be spoofed.
      this.#drop(job);
      return;
    }
    this.#describe(job, info);
    // Never larger than the query: no EDE, at most a minimal OPT.
    this.#finish(job, buildErrorResponse(job.query, info, Rcode.REFUSED));
  }

  #rateLimited(job: ClientJob, info: QueryInfo, admit: Admit): void {
    if (admit === Admit.REFUSE) {
      this.#stats.refused("rate_limit");
      this.#finish(job, buildErrorResponse(job.query, info, Rcode.REFUSED));
    } else if (admit === Admit.SLIP) {
      this.#stats.slipped();
      this.#finish(job, buildErrorResponse(job.query, info, Rcode.NOERROR, { truncated: true }));
    } else {
      this.#stats.dropped(job.transport, "rate_limit");
      this.#drop(job);
    }
  }

  // ---- cache ------------------------------------------------------------------------------

  /** Answers from the cache when it can; false when the job must go upstream. */
  #answerFromCache(job: ClientJob): boolean {
    const info = this.#info;
    if (info.hasClientSubnet || info.ednsVersion !== 0) return false;
    const cache = this.cache!;
    // The job was stamped a moment ago; one clock read per hit is enough.
    const now = job.started;
    const hash = cacheKeyHash(job.query, job.questionEnd, job.keyFlags);
    job.hash = hash;
    const entry = cache.lookup(job.query, job.questionEnd, job.keyFlags, now, hash);
    if (entry === null) return false;
    if (now < entry.expiresAt) {
      job.cache = "hit";
      const response = cache.render(entry, job.query, now, false, job.hasEdns);
      this.#maybePrefetch(job, entry, now);
      this.#finish(job, response);
      return true;
    }
    // Expired. RFC 8767 section 5: a query without RD gets no stale data; a SERVFAIL is
    // never served stale. Otherwise stale right away when a refresh failed within the
    // failure recheck window, else only if no fresh answer comes within the stale answer
    // timeout.
    if ((job.keyFlags & KEY_RECURSION_DESIRED) === 0 || entry.kind === "servfail") return false;
    if (entry.refreshFailedAt >= 0 && now - entry.refreshFailedAt < STALE_RECHECK_MS) {
      this.#serveStale(job, entry, now);
      return true;
    }
    job.stale = entry;
    return false;
  }

  #serveStale(job: ClientJob, entry: CacheEntry, now: number): void {
    job.cache = "stale";
    this.#finish(job, this.cache!.render(entry, job.query, now, true, job.hasEdns));
  }

  /**
   * The entry a waiting job may fall back on now: its key's entry as the cache holds it at
   * this moment (entries are recycled, so `job.stale` only marks that there was one), if it
   * can still be served stale. Null when it was evicted or flushed meanwhile.
   */
  #fallbackFor(job: ClientJob, now: number): CacheEntry | null {
    if (job.stale === null || job.done || this.cache === null) return null;
    const entry = this.cache.lookup(job.query, job.questionEnd, job.keyFlags, now);
    return entry === null || entry.kind === "servfail" ? null : entry;
  }

  /** Answers a waiting job from `entry`: fresh if another answer refreshed it, else stale. */
  #serveFallback(job: ClientJob, entry: CacheEntry, now: number): void {
    if (now < entry.expiresAt) {
      job.cache = "hit";
      this.#finish(job, this.cache!.render(entry, job.query, now, false, job.hasEdns));
    } else {
      this.#serveStale(job, entry, now);
    }
  }

  #maybePrefetch(job: ClientJob, entry: CacheEntry, now: number): void {
    if (!this.#prefetch || entry.prefetched || entry.ttl < 10) return;
    if (entry.expiresAt - now > entry.ttl * 100) return; // not yet in the last tenth
    // At --max-inflight no optional work goes upstream; a later hit may still prefetch.
    if (!this.hasCapacity) return;
    entry.prefetched = true;
    const hash = entry.hash;
    if (this.#flights.find(job.query, job.questionEnd, hash, job.keyFlags) !== null) return;
    this.#stats.prefetched();
    const flight = this.#newFlight(job, hash, true, now);
    this.#flights.add(flight);
    this.#forwarder.forward(flight);
  }

  // ---- forward ----------------------------------------------------------------------------

  /** A flight for `job`'s question: `job` waits on it, unless it is a prefetch. */
  #newFlight(job: ClientJob, hash: number, prefetch: boolean, now: number): Flight {
    const query = job.query;
    const info = this.#info;
    // Room for the OPT: at most 11 bytes more (the options kept are the client's own). Not
    // padded: padding is the upstream set's option (see `PoolOptions.padding`).
    const room = copier.reserve(query.length + 11);
    const message = buildUpstreamQuery(query, info, false, room);
    const flight = new Flight(
      this,
      message,
      info.questionEnd,
      now + this.#options.timeoutMs,
      query,
      hash,
      job.keyFlags,
      prefetch ? null : job,
    );
    flight.cacheable = this.cache !== null && !info.hasClientSubnet && info.ednsVersion === 0;
    return flight;
  }

  #forward(job: ClientJob): void {
    // Overload sheds only what would wait on an upstream: cache hits were answered above,
    // and a query with an expired entry gets it stale rather than nothing. TCP is never
    // shed here; its listener stops reading instead.
    if (!this.hasCapacity && job.datagram) {
      this.#shed(job);
      return;
    }
    const now = this.#clock.now();
    const info = this.#info;
    const coalesce = this.cache !== null && !info.hasClientSubnet && info.ednsVersion === 0;
    // The cache stage computed the key's hash (it ran: `coalesce` implies a cache).
    const hash = coalesce ? job.hash : 0;
    const out = coalesce
      ? this.#flights.find(job.query, job.questionEnd, hash, job.keyFlags)
      : null;
    this.#inflight++;
    if (out !== null && !out.done) {
      job.cache = "coalesced";
      if (out.waiters.length < MAX_WAITERS) {
        job.flight = out;
        out.waiters.push(job);
      } else {
        // Full: the job starts a follower, which later clients join and which settles with
        // `out` (never a question of its own upstream).
        const follower = this.#newFlight(job, hash, false, now);
        job.flight = follower;
        this.#flights.follow(out, follower);
      }
      this.#armStale(job, now);
      return;
    }
    if (this.cache !== null) job.cache = "miss";
    const flight = this.#newFlight(job, hash, false, now);
    job.flight = flight;
    if (coalesce && out === null) this.#flights.add(flight);
    this.#armStale(job, now);
    this.#forwarder.forward(flight);
  }

  /** At `--max-inflight`: serves a stale entry if the job has one, else drops the UDP query. */
  #shed(job: ClientJob): void {
    const now = this.#clock.now();
    const entry = this.#fallbackFor(job, now);
    if (entry !== null) {
      this.#serveFallback(job, entry, now);
      return;
    }
    this.#stats.dropped(job.transport, "overload");
    this.#overloadLog.warn("too many queries in flight; dropping UDP queries", {
      limit: this.#options.maxInflight,
    });
    this.#drop(job);
  }

  #armStale(job: ClientJob, now: number): void {
    if (job.stale === null || job.done) return;
    if (this.#staleTimeoutMs <= 0) {
      // Serve stale at once; the flight refreshes the entry in the background.
      this.staleTimerDue(job);
      return;
    }
    this.#timers.schedule(job, now + this.#staleTimeoutMs);
  }

  /** A job waited the stale answer timeout: it gets the stale answer; the refresh goes on. */
  staleTimerDue(job: ClientJob): void {
    const now = this.#clock.now();
    const entry = this.#fallbackFor(job, now);
    // An entry evicted or flushed meanwhile has nothing left to serve: wait for the flight.
    if (entry === null) return;
    this.#detach(job);
    this.#serveFallback(job, entry, now);
  }

  /** Takes `job` off its flight (it is answered some other way). */
  #detach(job: ClientJob): void {
    const flight = job.flight;
    if (flight === null) return;
    job.flight = null;
    const index = flight.waiters.indexOf(job);
    if (index >= 0) flight.waiters.splice(index, 1);
    this.#inflight--;
    this.#wakeCapacity();
  }

  /** See {@linkcode FlightOwner}. */
  flightAnswered(
    flight: Flight,
    response: Uint8Array,
    upstream: string,
    given: ResponseInfo | null,
  ): void {
    this.#settleChain(flight);
    let info = given;
    if (info === null) {
      // From a test forwarder, or an answer kept for failover: check it here.
      info = this.#responseInfo;
      const valid = analyzeResponse(response, info) &&
        responseAnswersQuery(response, info, flight.query, flight.questionEnd);
      if (!valid) {
        this.flightFailed(
          flight,
          new UpstreamError("bad_response", `invalid answer: ${info.reason}`, upstream),
        );
        return;
      }
    }
    // Hop-by-hop EDNS options (padding, cookies) do not go to clients or into the cache:
    // cut off the end of the answer (ours to change) where servers put them, else left out
    // of a copy (a slab buffer: a fresh array would cost a microsecond per answer).
    let canonical = response;
    if (info.optEnd - info.optStart > 11) {
      const trimmed = trimResponseOpt(response, info);
      if (trimmed !== null) {
        canonical = trimmed;
      } else {
        canonical = stripResponseOpt(response, info, true, copier.reserve(response.length));
        if (canonical !== response) {
          info = this.#responseInfo;
          analyzeResponse(canonical, info);
        }
      }
    }
    // RFC 2181 section 8: a TTL with its top bit set is zero, for the clients and the cache.
    zeroHighTtls(canonical, info.ttlOffsets, info.ttlCount);
    const now = this.#clock.now();
    const rcode = info.extendedRcode;
    if (rcode === Rcode.SERVFAIL) {
      // RFC 8767: a SERVFAIL refresh is a failure: stale beats it for the waiters that have
      // an expired entry, and the entry remembers it (failure recheck window).
      this.#refreshFailed(flight, now);
    }
    if (this.cache !== null && flight.cacheable) {
      // Clamps the TTLs of `canonical` too (--cache-min-ttl, --cache-max-ttl), as Unbound
      // does: the first clients get the TTLs the next ones get.
      this.cache.store(
        flight.keyQuery,
        flight.questionEnd,
        flight.keyFlags,
        canonical,
        info,
        now,
        flight.hash,
        flight.keepTtls,
      );
    }
    // An error answer may come without a question (RFC 1035 allows it for FORMERR and the
    // like): then there is no question to write the client's casing into.
    const batch = new WaiterBatch(
      this.#answerBatchNow,
      flight,
      canonical,
      upstream,
      info.optStart,
      info.optEnd,
      info.qdcount === 1 ? info.questionEnd : 0,
    );
    this.#answerBatch(batch);
  }

  /**
   * Answers the waiters of `batch.flight`, then schedules its follower's for the next turn
   * of the event loop: a copy of the answer per waiter, for every waiter of a popular slow
   * question at once (thousands), made the process peak about 60 MiB higher with 1,000 TCP
   * clients of one 60 KB answer than flights of at most 256 answered one per turn did.
   */
  #answerBatch(batch: WaiterBatch): void {
    const flight = batch.flight;
    const waiters = flight.waiters;
    const count = waiters.length;
    // The last waiter of the last batch may take the answer's bytes themselves.
    const final = flight.follower === null;
    for (let i = 0; i < count; i++) {
      const job = waiters[i];
      if (job.done) continue;
      this.#answerWaiter(
        job,
        batch.canonical,
        batch.upstream,
        batch.optStart,
        batch.optEnd,
        batch.questionEnd,
        final && i === count - 1,
      );
    }
    waiters.length = 0;
    if (count > 0) this.#wakeCapacity();
    if (!final) {
      batch.flight = flight.follower!;
      this.#timers.schedule(batch, this.#clock.now());
    }
  }

  /**
   * Marks the followers of `flight` settled with it, and takes the chain out of the table
   * (nobody may join a settled flight).
   */
  #settleChain(flight: Flight): void {
    this.#flights.remove(flight);
    for (let f = flight.follower; f !== null; f = f.follower) {
      f.done = true;
      this.#flights.remove(f);
    }
  }

  /**
   * Finishes one waiter of an answered flight with `canonical` in its own ID, casing and
   * EDNS shape; the `last` waiter may take the bytes themselves.
   */
  #answerWaiter(
    job: ClientJob,
    canonical: Uint8Array,
    upstream: string,
    optStart: number,
    optEnd: number,
    questionEnd: number,
    last: boolean,
  ): void {
    job.flight = null;
    this.#timers.cancel(job);
    let out: Uint8Array;
    const optLength = optStart >= 0 ? optEnd - optStart : 0;
    if ((job.hasEdns ? canonical.length : canonical.length - optLength) > job.limit) {
      // A UDP client that gets TC=1: cut from the shared answer, not copied whole first. One
      // flight may have thousands of waiters (followers), and a copy of a 60 KB answer for
      // each, in one turn of the event loop, is hundreds of megabytes of garbage at once.
      out = truncateResponse(canonical, job.limit);
      if (!job.hasEdns && optLength > 0 && out[11] === 1) {
        // The OPT record it kept ends the cut answer: a client that sent none gets none.
        out = out.subarray(0, out.length - optLength);
        out[11] = 0;
      }
      this.#stats.truncated();
    } else if (!job.hasEdns && optStart >= 0 && last && optEnd === canonical.length) {
      // The OPT ends the message (where servers put it): the last waiter's answer is the
      // bytes before it, no copy.
      out = canonical.subarray(0, optStart);
      const arcount = ((out[10] << 8) | out[11]) - 1;
      out[10] = arcount >> 8;
      out[11] = arcount & 0xff;
    } else if (!job.hasEdns && optStart >= 0) {
      // One copy, without the OPT record, for a client that sent none.
      const scratch = this.#stripInfo;
      scratch.optStart = optStart;
      scratch.optEnd = optEnd;
      out = stripResponseOpt(
        canonical,
        scratch,
        false,
        copier.reserve(canonical.length - (optEnd - optStart)),
      );
    } else {
      // The last waiter may take the bytes themselves (the cache copied what it keeps).
      out = last ? canonical : copier.copy(canonical, 0, canonical.length);
    }
    const query = job.query;
    out[0] = query[0];
    out[1] = query[1];
    if (questionEnd === job.questionEnd) {
      for (let at = 12; at < questionEnd; at++) out[at] = query[at];
    }
    job.upstream = upstream;
    this.#inflight--;
    this.#finish(job, out);
  }

  /** Serves stale to the waiters that can have it, remembering the failure on the entry. */
  #refreshFailed(flight: Flight, now: number): void {
    for (let f: Flight | null = flight; f !== null; f = f.follower) {
      const waiters = f.waiters;
      for (let i = waiters.length - 1; i >= 0; i--) {
        const job = waiters[i];
        const entry = this.#fallbackFor(job, now);
        if (entry === null) continue;
        if (now >= entry.expiresAt) entry.refreshFailedAt = now;
        waiters.splice(i, 1);
        job.flight = null;
        this.#timers.cancel(job);
        this.#inflight--;
        this.#serveFallback(job, entry, now);
      }
    }
    // A prefetch or a refresh with no stale waiter left: remember the failure on the entry.
    if (this.cache !== null && flight.cacheable) {
      const entry = this.cache.lookup(
        flight.keyQuery,
        flight.questionEnd,
        flight.keyFlags,
        now,
        flight.hash,
      );
      if (entry !== null && now >= entry.expiresAt) entry.refreshFailedAt = now;
    }
  }

  /** See {@linkcode FlightOwner}. */
  flightFailed(flight: Flight, error: UpstreamError): void {
    this.#settleChain(flight);
    const now = this.#clock.now();
    this.#refreshFailed(flight, now);
    let count = 0;
    for (let f: Flight | null = flight; f !== null; f = f.follower) count += f.waiters.length;
    if (count > 0) {
      this.#failureLog.warn("query failed; answering SERVFAIL", {
        upstream: error.upstream,
        reason: error.reason,
        error: error.message,
        clients: count,
      });
    }
    const info = this.#failInfo;
    const ede = error.reason === "timeout"
      ? { code: EdeCode.NO_REACHABLE_AUTHORITY, text: "upstream timeout" }
      : error.reason === "unavailable"
      ? { code: EdeCode.NO_REACHABLE_AUTHORITY, text: "no upstream available" }
      : { code: EdeCode.NETWORK_ERROR, text: `upstream ${error.reason}` };
    for (let f: Flight | null = flight; f !== null; f = f.follower) {
      const waiters = f.waiters;
      for (let i = 0; i < waiters.length; i++) {
        const job = waiters[i];
        if (job.done) continue;
        job.flight = null;
        this.#timers.cancel(job);
        this.#inflight--;
        inspectQuery(job.query, info);
        this.#finish(job, buildErrorResponse(job.query, info, Rcode.SERVFAIL, { ede }));
      }
      waiters.length = 0;
    }
    this.#wakeCapacity();
  }

  #wakeCapacity(): void {
    if (this.#capacityWaiters.length > 0 && this.hasCapacity) {
      for (const waiter of this.#capacityWaiters.splice(0)) waiter();
    }
  }

  // ---- finish -----------------------------------------------------------------------------

  #drop(job: ClientJob): void {
    job.done = true;
    job.sink.deliver(null, job.client, job.closeAfter);
  }

  /** Truncation for UDP, statistics, the query log, delivery. */
  #finish(job: ClientJob, answer: Uint8Array): void {
    job.done = true;
    let response = answer;
    if (response.length > job.limit) {
      response = truncateResponse(response, job.limit);
      this.#stats.truncated();
    }
    if (job.asksKeepalive || job.asksPadding) {
      const transport = TRANSPORTS[job.transport];
      const keepalive = job.asksKeepalive && transport.keepalive;
      const pad = job.asksPadding && transport.padsAnswers;
      if (keepalive || pad) {
        response = addStreamOptions(response, {
          keepaliveMs: keepalive ? this.#options.streamIdleTimeoutMs ?? 10_000 : -1,
          pad,
        });
      }
    }
    const seconds = (this.#clock.now() - job.started) / 1000;
    const rcode = getRcode(response);
    this.#stats.query(job.transport, rcode, seconds);
    if (job.cache !== "off") this.#stats.cacheLookup(job.cache);
    if (this.#options.logQueries) {
      this.#log.info("query", {
        client: formatAddr(job.client),
        transport: job.transport,
        name: job.nameEnd > 0 ? nameToString(job.query, 12, job.nameEnd) : undefined,
        type: job.nameEnd > 0 ? typeName(job.qtype) : undefined,
        rcode: rcodeName(rcode),
        upstream: job.upstream || undefined,
        cache: this.cache === null ? "off" : job.cache === "off" ? undefined : job.cache,
        duration_ms: Math.round(seconds * 1e6) / 1e3,
      });
    }
    job.sink.deliver(response, job.client, job.closeAfter);
  }

  /** Drops every cached answer; returns how many there were. */
  flushCache(): number {
    return this.cache?.flush() ?? 0;
  }

  /** Stops the resolver's own timers (the forwarder is closed by its owner). */
  close(): void {
    if (this.#ownsTimers) this.#timers.close();
  }
}
