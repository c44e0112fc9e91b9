/**
 * An upstream set (the pool): gets each question answered by its upstreams within its
 * deadline, so that no client waits on a dead upstream while another could answer.
 *
 * ## As a value
 *
 * A pool is built from {@linkcode PoolOptions} alone (its upstreams, strategy, hedging,
 * retry, failover rcodes, health checks, padding, how connections are made) and owns
 * everything it runs on except the clock and the timer queue, which it may share with the
 * resolver and with other pools. `app.ts` builds one for `--upstream`; a router builds one
 * per route, each with its own upstreams and options, and hands every question to the set
 * of its zone:
 *
 * - {@linkcode UpstreamPool.forward} takes the resolver's {@linkcode UpstreamRequest}
 *   (the {@linkcode Forwarder} seam) and settles it exactly once, by its deadline at the
 *   latest. The pool keeps its own record of the question (a `PoolRequest`) and, when
 *   `padding` is on, its own padded copy of the message: nothing of the request changes.
 * - {@linkcode UpstreamPool.start} connects to and probes every upstream;
 *   {@linkcode UpstreamPool.close} stops it.
 * - {@linkcode UpstreamPool.readiness} says whether the set can answer now (`/readyz`);
 *   {@linkcode UpstreamPool.snapshot} gives each upstream's state for the metrics;
 *   {@linkcode UpstreamPool.healthChange} resolves at its next change of health.
 * - Statistics go through `stats` (one `UpstreamStats` per upstream label).
 * - `connect` makes the connections: DoT by default; anything implementing
 *   `UpstreamConnection` (plain TCP, a UDP exchange, a test's fake) otherwise.
 *
 * ## A question's way
 *
 * A question goes to the upstream the policy picks, as one {@linkcode Exchange}. From there:
 *
 * - **Retry**: when the exchange fails (refused, TLS error, reset, invalid answer) or passes
 *   its attempt deadline (the upstream's usual answer time; a multiple of its handshake time
 *   while still connecting), the question also goes to another upstream. The first exchange
 *   stays out: whichever answers first wins.
 * - **Hedge**: when the first exchange has not answered within the hedge delay, the same
 *   question goes to a second upstream (or a second connection when there is one upstream),
 *   within a budget of hedges per question. The automatic delay is the recent p95 answer time
 *   of the fastest usable upstream, this one included (see {@linkcode UpstreamPool.hedgeDelay}).
 * - **Failover on answers**: an answer whose rcode is in `--failover-rcodes` is kept while one
 *   other upstream is asked; the client gets the other's answer or, when that one gives such
 *   an rcode too or none at all, the last such answer.
 * - **Query of death**: the oldest question on a connection that died (and the newest, when
 *   no other upstream is left to move it to, and any question on a second connection that
 *   died) goes again alone, on a connection of its own; if that one dies too, the question
 *   goes to no other connection of that upstream (another upstream may still be asked,
 *   once). Its own retries are not the upstream's failures in a row.
 *
 * Health (up/down, probes) and latency live with each {@linkcode Upstream}; which upstream
 * goes next is the {@linkcode Policy}'s business.
 *
 * @module
 */

import type { Strategy, UpstreamSpec } from "../config.ts";
import { padUpstreamQuery } from "../dns/edns.ts";
import type { ResponseInfo } from "../dns/message.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import { SlabCopier } from "../slab.ts";
import { type Clock, SYSTEM_CLOCK, type Timed, TimerQueue } from "../timers.ts";
import type { ConnectionFactory } from "./connection.ts";
import { UpstreamError } from "./errors.ts";
import { Exchange, type ExchangeCarrier } from "./exchange.ts";
import type { Forwarder, UpstreamRequest } from "./forwarder.ts";
import { HedgeBudget } from "./hedge_budget.ts";
import { createPolicy, type Policy, type Random } from "./policy.ts";
import { PoolRequest, type PoolRequestDriver } from "./pool_request.ts";
import { NO_UPSTREAM_STATS, type UpstreamStatsFactory } from "./stats.ts";
import { Upstream, type UpstreamTransport } from "./upstream.ts";

/** Whether an upstream set can answer now, and why (what `/readyz` shows). */
export interface PoolReadiness {
  /** True when one of its upstreams answered recently or answers a probe now. */
  ready: boolean;
  /** Why, in a few words. */
  reason: string;
}

/** What the metrics show of one upstream of a set, read when they are rendered. */
export interface UpstreamSnapshot {
  /** The upstream's label (`--upstream` as written, normalised). */
  label: string;
  /** True unless it is down. */
  healthy: boolean;
  /** Questions it owes answers to. */
  inflight: number;
  /** Connections open or opening. */
  connections: number;
}

/** Options of {@linkcode UpstreamPool}. */
export interface PoolOptions {
  /** The upstreams, in configured order (at most 31). */
  upstreams: UpstreamSpec[];
  /** Extra trusted CA certificates (PEM). */
  caCerts: string[];
  /** Most TLS connections per upstream. */
  connectionsPerUpstream: number;
  /** Idle connections close after this many milliseconds. */
  idleTimeoutMs: number;
  /** TCP connect plus TLS handshake deadline per attempt. */
  connectTimeoutMs: number;
  /**
   * `"auto"` (the recent p95 answer time of the fastest usable upstream, within 10..1000 ms;
   * see {@linkcode UpstreamPool.hedgeDelay}), a delay in ms, or 0 (off).
   */
  hedgeDelay: "auto" | number;
  /** Most hedged questions, in percent of all questions. */
  hedgeBudgetPercent: number;
  /** Idle upstreams are probed this often (0: never). */
  healthCheckIntervalMs: number;
  /** Answer rcodes that make a question try one other upstream. */
  failoverRcodes: readonly number[];
  /** Which upstream goes next. */
  strategy: Strategy;
  /**
   * How the upstreams' connections carry DNS: `"tls"` (DoT, the default; `caCerts` and
   * `nudge` apply) or `"tcp"` (plain DNS over TCP, only where the user named it). A plain
   * UDP exchange is a `connect` of its own.
   */
  transport?: UpstreamTransport;
  /**
   * The health check's question (a whole query message; its ID is replaced on the wire),
   * when not `. IN NS` without RD (padded with `padding`). A zone's plain-DNS targets are
   * checked with `ZONE SOA`.
   */
  probeQuery?: Uint8Array;
  /** Whether to nudge Nagle-bound servers. */
  nudge: boolean;
  /**
   * Pad queries and health probes to multiples of 128 octets with EDNS(0) padding (RFC
   * 8467; default false). The resolver's messages come unpadded: padding is a property of
   * the path to the upstreams (encrypted or not), not of the question.
   */
  padding?: boolean;
  /** Logger. */
  log: Logger;
  /** Statistics hooks per upstream. */
  stats?: UpstreamStatsFactory;
  /** The clock (tests pass a manual one). */
  clock?: Clock;
  /** Creates connections (tests pass fakes). */
  connect?: ConnectionFactory;
  /** Randomness in [0, 1) (tests pass a fixed one). */
  random?: Random;
}

/**
 * The automatic hedge delay (`--hedge-delay auto`), milliseconds: the shortest and the
 * longest, and the one used before any upstream's answer time is known.
 */
const AUTO_HEDGE_MS = { min: 10, max: 1000, unknown: 100 } as const;
/** How long {@linkcode UpstreamPool.readiness} waits for the first health checks at start. */
const STARTUP_READY_WAIT_MS = 3000;
/** Most exchanges for one question (first try, retries, hedge, failover). */
const MAX_EXCHANGES = 6;
/** How often idle connections and late answers are tidied. */
const MAINTAIN_EVERY_MS = 1000;
/** Most octets padding adds to a message: the option's 4 and up to a block less one. */
const QUERY_PADDING_ROOM = 4 + 127;

const copier = new SlabCopier();

/** The pool's periodic tidy-up, as a timer entry. */
class Maintenance implements Timed {
  timerAt = 0;
  timerIndex = -1;
  timerSlot = -1;
  constructor(readonly run: (now: number) => void) {}
  onTimer(now: number): void {
    this.run(now);
  }
}

/**
 * Adds `exchange` to `request`'s list. The first goes into an array of one: a push onto an
 * empty array reserves 17 slots, garbage for every question.
 */
function addExchange(request: PoolRequest, exchange: Exchange): void {
  if (request.exchanges.length === 0) request.exchanges = [exchange];
  else request.exchanges.push(exchange);
}

/**
 * Forwards questions to a set of DoT upstreams.
 *
 * @example
 * ```ts
 * import { Logger } from "../log.ts";
 * import type { UpstreamRequest } from "./forwarder.ts";
 * import { UpstreamPool } from "./pool.ts";
 *
 * const pool = new UpstreamPool({
 *   upstreams: [
 *     { address: "192.0.2.1", port: 853, tlsName: "dns.example", label: "192.0.2.1:853#dns.example" },
 *   ],
 *   caCerts: [],
 *   connectionsPerUpstream: 2,
 *   idleTimeoutMs: 30_000,
 *   connectTimeoutMs: 2000,
 *   hedgeDelay: "auto",
 *   hedgeBudgetPercent: 5,
 *   healthCheckIntervalMs: 0,
 *   failoverRcodes: [2, 5],
 *   strategy: "fastest",
 *   nudge: true,
 *   padding: true,
 *   log: new Logger({ level: "error", sink: () => {} }),
 * });
 * pool.start(); // connect and probe
 * // The resolver hands each question over; it is settled once, through
 * // flight.settleAnswer or flight.settleFailure.
 * const ask = (flight: UpstreamRequest) => pool.forward(flight);
 * console.log((await pool.readiness()).reason);
 * await pool.close();
 * ```
 */
export class UpstreamPool implements Forwarder, PoolRequestDriver {
  /** The upstreams, in configured order. */
  readonly upstreams: Upstream[];
  /** The timer queue (shared with the resolver when given, else the pool's own). */
  readonly timers: TimerQueue;
  /** True when {@linkcode timers} is the pool's own, closed with it. */
  readonly #ownTimers: boolean;
  readonly #clock: Clock;
  readonly #policy: Policy;
  readonly #log: Logger;
  readonly #hedgeDelay: "auto" | number;
  readonly #budget: HedgeBudget;
  readonly #failover = new Uint8Array(16);
  readonly #idleTimeoutMs: number;
  readonly #maintenance: Maintenance;
  readonly #healthWaiters: (() => void)[] = [];
  readonly #poisonLog: RateLimitedLog;
  readonly #padding: boolean;
  /**
   * Clock time the pool was made, then {@linkcode start} was called (the first health checks
   * went out): readiness waits for them from then.
   */
  #startedAt: number;
  #closed = false;

  /** Creates a pool; call {@linkcode start} to connect and probe. */
  constructor(options: PoolOptions, timers?: TimerQueue) {
    if (options.upstreams.length > 31) throw new RangeError("at most 31 upstreams");
    this.#clock = options.clock ?? SYSTEM_CLOCK;
    this.timers = timers ?? new TimerQueue(this.#clock);
    this.#ownTimers = timers === undefined;
    this.#startedAt = this.#clock.now();
    this.#log = options.log;
    this.#poisonLog = new RateLimitedLog(options.log, 10_000, () => this.#clock.now());
    this.#policy = createPolicy(options.strategy, options.random);
    this.#hedgeDelay = options.hedgeDelay;
    this.#budget = new HedgeBudget(options.hedgeBudgetPercent);
    for (const rcode of options.failoverRcodes) this.#failover[rcode & 0xf] = 1;
    this.#idleTimeoutMs = options.idleTimeoutMs;
    this.#padding = options.padding ?? false;
    const stats = options.stats ?? NO_UPSTREAM_STATS;
    const settings = {
      transport: options.transport ?? "tls",
      probeQuery: options.probeQuery,
      caCerts: options.caCerts,
      maxConnections: options.connectionsPerUpstream,
      connectTimeoutMs: options.connectTimeoutMs,
      healthCheckIntervalMs: options.healthCheckIntervalMs,
      nudge: options.nudge,
      padProbes: options.padding ?? false,
      log: options.log,
      clock: this.#clock,
      timers: this.timers,
      connect: options.connect,
      random: options.random,
      onHealthChange: () => this.#healthChanged(),
      referenceHandshakeMs: () => this.#referenceHandshakeMs(),
      referenceAttemptMs: () => this.#referenceAttemptMs(),
    };
    this.upstreams = options.upstreams.map((spec, index) =>
      new Upstream(index, spec, settings, stats(spec.label))
    );
    this.#maintenance = new Maintenance((now) => this.#maintain(now));
  }

  /** The strategy in use. */
  get strategy(): Strategy {
    return this.#policy.name;
  }

  /**
   * The hedge delay in milliseconds for a question on `upstream` now (0: hedging off). With
   * `--hedge-delay auto`: the recent p95 answer time of the fastest usable upstream that has
   * answered (within 10..1000 ms), 100 ms before any has. Not the p95 of `upstream` alone:
   * an upstream slow for one answer in ten has a p95 as slow as those answers, and hedging
   * after that long would cut nothing; what matters is how soon the hedge itself would
   * likely be answered. The budget bounds the cost.
   */
  hedgeDelay(upstream: Upstream): number {
    if (this.#hedgeDelay !== "auto") return this.#hedgeDelay;
    let best = upstream.latency.samples > 0 ? upstream.latency.p95 : Infinity;
    for (const other of this.upstreams) {
      if (other.usable && other.latency.samples > 0 && other.latency.p95 < best) {
        best = other.latency.p95;
      }
    }
    if (best === Infinity) return AUTO_HEDGE_MS.unknown;
    return Math.min(AUTO_HEDGE_MS.max, Math.max(AUTO_HEDGE_MS.min, best));
  }

  /** The shortest attempt timeout among upstreams that answered (0: none did). */
  #referenceAttemptMs(): number {
    let best = 0;
    for (const upstream of this.upstreams) {
      if (upstream.latency.samples === 0) continue;
      const ms = upstream.latency.attemptTimeout();
      if (best === 0 || ms < best) best = ms;
    }
    return best;
  }

  /** The fastest last handshake among the upstreams (0: none completed one). */
  #referenceHandshakeMs(): number {
    let best = 0;
    for (const upstream of this.upstreams) {
      const ms = upstream.handshakeMs;
      if (ms > 0 && (best === 0 || ms < best)) best = ms;
    }
    return best;
  }

  /**
   * Connects to and probes every upstream now, so the first questions find a connection open
   * and a broken upstream shows in the log at start rather than at the first question.
   */
  start(): void {
    this.#startedAt = this.#clock.now();
    for (const upstream of this.upstreams) upstream.startProbing();
    this.timers.schedule(this.#maintenance, this.#clock.now() + MAINTAIN_EVERY_MS);
  }

  /**
   * Whether the set can answer now: ready when one of its upstreams is up (it answered a
   * question or a probe lately). Just after {@linkcode start}, while the first health checks
   * are on their way, waits for them (up to 3 s from the start) rather than saying no.
   */
  async readiness(): Promise<PoolReadiness> {
    for (let round = 0; round < 2; round++) {
      const up = this.upstreams.find((u) => u.health.state === "up");
      if (up) {
        const how = up.health.lastAnswerWasProbe ? "answered a probe" : "answered";
        return { ready: true, reason: `${up.spec.label} ${how}` };
      }
      const unknown = this.upstreams.some((u) => u.health.state === "unknown");
      const waited = this.#clock.now() - this.#startedAt;
      if (!unknown || waited >= STARTUP_READY_WAIT_MS || round > 0 || this.#closed) break;
      // Just started: the first health checks are on their way.
      await this.healthChange(STARTUP_READY_WAIT_MS - waited);
    }
    const reasons = this.upstreams.map((u) => {
      const why = u.health.lastError?.message ??
        (u.health.state === "unknown" ? "not checked yet" : "down");
      // Most upstream errors name the upstream already.
      return why.includes(u.spec.label) ? why : `${u.spec.label}: ${why}`;
    });
    return { ready: false, reason: `no upstream answers: ${reasons.join("; ")}` };
  }

  /** Each upstream's state for the metrics, in configured order. */
  snapshot(): UpstreamSnapshot[] {
    return this.upstreams.map((u) => ({
      label: u.spec.label,
      healthy: u.usable,
      inflight: u.outstanding,
      connections: u.connections.length,
    }));
  }

  /** Resolves at the next change of any upstream's health, or after `timeoutMs`. */
  healthChange(timeoutMs: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, timeoutMs);
      const waiters = this.#healthWaiters;
      function done() {
        clearTimeout(timer);
        const at = waiters.indexOf(done);
        if (at >= 0) waiters.splice(at, 1);
        resolve();
      }
      waiters.push(done);
    });
  }

  #healthChanged(): void {
    for (const waiter of this.#healthWaiters.splice(0)) waiter();
  }

  /** See {@linkcode Forwarder}. */
  forward(given: UpstreamRequest): void {
    if (this.#closed) {
      given.settleFailure(new UpstreamError("unavailable", "the proxy is shutting down"));
      return;
    }
    // The padded copy goes into a slab: a fresh array per question would be garbage.
    const message = this.#padding
      ? padUpstreamQuery(
        given.query,
        given.questionEnd,
        copier.reserve(given.query.length + QUERY_PADDING_ROOM),
      )
      : given.query;
    const request = new PoolRequest(given, message, this);
    this.#budget.earn();
    const now = this.#clock.now();
    if (!this.#start(request, now, false, null)) {
      this.#fail(request, this.#unavailable(request));
      return;
    }
    if (!request.done) this.#arm(request, now);
  }

  /**
   * Starts one more exchange for `request` on the upstream the policy picks among those not
   * tried yet (or, with `again`, any worth asking). False when there is none.
   */
  #start(
    request: PoolRequest,
    now: number,
    again: boolean,
    hedgeOf: Exchange | null,
  ): boolean {
    if (request.started >= MAX_EXCHANGES || this.#closed) return false;
    for (const candidate of this.upstreams) candidate.noticeStall(now);
    let upstream = this.#policy.choose(this.upstreams, request.tried, now);
    let avoid: ExchangeCarrier | null = null;
    if (hedgeOf !== null && upstream !== null && (upstream.slow || upstream.connecting)) {
      // A hedge is worth sending only where an answer is likely soon: not to an upstream
      // still connecting (a black hole looks like that) or already slow.
      upstream = null;
    }
    if (upstream === null && hedgeOf !== null) {
      // No other upstream to ask (one configured, or the others down): hedge on another
      // connection to the same one, when it may have one.
      const same = this.upstreams[hedgeOf.upstreamIndex];
      avoid = hedgeOf.carrier;
      upstream = same !== undefined && same.usable && same.hasRoomBeside(avoid) ? same : null;
    }
    if (upstream === null && again) upstream = this.#policy.choose(this.upstreams, 0, now);
    if (upstream === null) return false;
    const exchange = new Exchange(
      request.message,
      request.questionEnd,
      request,
      hedgeOf !== null ? "hedge" : "query",
    );
    exchange.startedAt = now;
    exchange.resent = request.orphaned > 0;
    addExchange(request, exchange);
    request.tried |= 1 << upstream.index;
    request.started++;
    if (hedgeOf !== null) request.hedge = exchange;
    upstream.send(exchange, avoid);
    return true;
  }

  /** Arms the request's timer for its next event: hedge, attempt deadline or deadline. */
  #arm(request: PoolRequest, now: number): void {
    let next = request.deadline;
    const exchanges = request.exchanges;
    if (!request.hedged && exchanges.length === 1 && request.started === 1) {
      const delay = this.#hedgeDelayFor(exchanges[0]);
      if (delay > 0) next = Math.min(next, exchanges[0].startedAt + delay);
      else request.hedged = true; // hedging is off
    }
    for (const exchange of exchanges) {
      if (exchange.judged) continue;
      const upstream = this.upstreams[exchange.upstreamIndex];
      if (upstream !== undefined) next = Math.min(next, upstream.attemptDeadline(exchange));
    }
    this.timers.schedule(request, Math.max(next, now));
  }

  #hedgeDelayFor(exchange: Exchange): number {
    const upstream = this.upstreams[exchange.upstreamIndex];
    if (upstream === undefined) return this.#hedgeDelay === "auto" ? AUTO_HEDGE_MS.unknown : 0;
    return this.hedgeDelay(upstream);
  }

  /** See {@linkcode PoolRequestDriver}. */
  requestTimer(request: PoolRequest, now: number): void {
    if (now >= request.deadline) {
      this.#fail(request, this.#timeoutError(request));
      return;
    }
    // Attempts past their deadline: the upstream is suspected, the question moves on.
    for (const exchange of [...request.exchanges]) {
      if (exchange.judged || exchange.ended) continue;
      const upstream = this.upstreams[exchange.upstreamIndex];
      if (upstream === undefined || now < upstream.attemptDeadline(exchange)) continue;
      exchange.judged = true;
      upstream.suspect(exchange, now);
      if (this.#start(request, now, false, null)) upstream.stats.retry("slow");
      if (request.done) return;
    }
    // The hedge.
    const first = request.exchanges[0];
    if (
      !request.hedged && request.started === 1 && request.exchanges.length === 1 &&
      first !== undefined && now >= first.startedAt + this.#hedgeDelayFor(first)
    ) {
      request.hedged = true;
      if (this.#budget.take()) this.#start(request, now, false, first);
      if (request.done) return;
    }
    this.#arm(request, now);
  }

  /** See {@linkcode PoolRequestDriver}. */
  attemptAnswered(
    request: PoolRequest,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
  ): void {
    this.#remove(request, exchange);
    const upstream = this.upstreams[exchange.upstreamIndex];
    // TC=1 over a stream: the upstream has no whole answer to give (a TCP client cannot ask
    // again over TCP, a UDP client would, only to get TC=1 again); another may.
    if (this.#failover[info.rcode] === 1 || info.truncated) {
      // Kept (the latest such answer wins: if every upstream gives it, the client gets the
      // last one) while another upstream is asked, once.
      request.heldAnswer = response;
      request.heldUpstream = upstream.spec.label;
      request.heldFrom = exchange;
      if (!request.failedOver) {
        request.failedOver = true;
        const now = this.#clock.now();
        if (this.#start(request, now, false, null)) {
          upstream.stats.retry(info.truncated ? "truncated" : "rcode");
          if (!request.done) this.#arm(request, now);
          return;
        }
      }
      if (request.exchanges.length > 0) return; // another attempt may still do better
      this.#settleHeld(request);
      return;
    }
    this.#finish(request, exchange);
    request.settleAnswer(response, upstream.spec.label, info);
  }

  /** See {@linkcode PoolRequestDriver}. */
  attemptFailed(request: PoolRequest, exchange: Exchange, error: UpstreamError): void {
    this.#remove(request, exchange);
    request.lastError = error;
    const upstream = this.upstreams[exchange.upstreamIndex];
    const now = this.#clock.now();
    if (exchange.orphaned) {
      // Re-sending what a closed connection left unanswered is not a new attempt (RFC 7766
      // lets servers close at any time); the deadline bounds it.
      request.started--;
      if (exchange.poisoned) {
        // Alone on its own connection, and that died too: a query of death for this
        // upstream. It goes to no other connection of it, so it takes no other client's
        // question down again there; an upstream not tried yet may still answer it.
        request.deaths++;
        request.started++;
        this.#poisonLog.warn(
          "a question closed two upstream connections; not sending it there again",
          {
            upstream: upstream?.spec.label,
          },
        );
      } else if (
        ++request.orphaned > 1 || exchange.firstOrphan ||
        (exchange.lastOrphan && !this.#hasUntried(request))
      ) {
        if (request.deaths === 0) {
          // A suspect of the connection that died (see `Upstream.onClosed`), or a question
          // on a second one that died: it goes again alone, on a connection of its own, to
          // an upstream it was not on when there is one (the client is answered sooner if
          // the first upstream is the broken party), else to the same one. With another
          // upstream to go to, the newest moves at once with the rest.
          const target = this.#policy.choose(this.upstreams, request.tried, now) ??
            (upstream !== undefined && upstream.usable ? upstream : null);
          if (target !== null && target.mayIsolate) {
            request.deaths++;
            const retry = new Exchange(request.message, request.questionEnd, request, "query");
            retry.startedAt = now;
            retry.resent = true;
            addExchange(request, retry);
            request.tried |= 1 << target.index;
            if (target !== upstream) upstream?.stats.retry(error.reason);
            target.sendIsolated(retry);
            if (!request.done) this.#arm(request, now);
            return;
          }
          // None usable: only an upstream it was not on may still take it. Isolation at its
          // limit: it goes again as any other.
          if (target === null) request.deaths++;
        } else if (exchange.firstOrphan) {
          // A suspect for the second time: not sent again to an upstream it was on.
          request.deaths++;
        }
      }
    }
    if (request.heldAnswer !== null && request.exchanges.length === 0) {
      // An answer is at hand; this was the attempt to better it.
      this.#settleHeld(request);
      return;
    }
    // A question that killed connections goes only to upstreams it was not on.
    const again = request.exchanges.length === 0 && request.deaths === 0;
    if (this.#start(request, now, again, null)) {
      upstream?.stats.retry(error.reason);
    } else if (request.exchanges.length === 0) {
      this.#fail(request, error);
      return;
    }
    if (!request.done) this.#arm(request, now);
  }

  /** True when a usable upstream has not been tried for `request` yet. */
  #hasUntried(request: PoolRequest): boolean {
    for (const upstream of this.upstreams) {
      if (upstream.usable && (request.tried & (1 << upstream.index)) === 0) return true;
    }
    return false;
  }

  #remove(request: PoolRequest, exchange: Exchange): void {
    // In place: `splice` returns a new array of what it removed.
    const exchanges = request.exchanges;
    const index = exchanges.indexOf(exchange);
    if (index < 0) return;
    for (let i = index + 1; i < exchanges.length; i++) exchanges[i - 1] = exchanges[i];
    exchanges.pop();
  }

  /**
   * Stops the request's timer, cancels its remaining exchanges, and counts its hedge as won
   * (it gave the answer: `winner`) or lost (anything else: beaten, failed, or no answer).
   */
  #finish(request: PoolRequest, winner: Exchange | null): void {
    this.timers.cancel(request);
    const exchanges = request.exchanges;
    if (exchanges.length === 1) {
      // The common case, without a new array: emptied before the cancel can call back.
      const only = exchanges[0];
      exchanges.length = 0;
      only.cancel();
    } else if (exchanges.length > 1) {
      request.exchanges = [];
      for (const exchange of exchanges) exchange.cancel();
    }
    const hedge = request.hedge;
    if (hedge !== null) {
      request.hedge = null;
      this.upstreams[hedge.upstreamIndex]?.stats.hedge(hedge === winner);
    }
  }

  /** Settles with the answer kept for its rcode. */
  #settleHeld(request: PoolRequest): void {
    this.#finish(request, request.heldFrom);
    request.settleAnswer(request.heldAnswer!, request.heldUpstream, null);
  }

  #fail(request: PoolRequest, error: UpstreamError): void {
    if (request.heldAnswer !== null) {
      this.#settleHeld(request);
      return;
    }
    this.#finish(request, null);
    if (error.reason === "timeout" || error.reason === "unavailable") {
      const label = error.upstream;
      const upstream = label ? this.upstreams.find((u) => u.spec.label === label) : undefined;
      upstream?.stats.error(error.reason);
    }
    request.settleFailure(error);
  }

  #unavailable(request: PoolRequest): UpstreamError {
    const last = request.lastError ??
      this.upstreams.map((u) => u.health.lastError).find((e) => e !== null) ?? null;
    return new UpstreamError(
      "unavailable",
      `no upstream available (all down${last ? ": " + last.message : ""})`,
      last?.upstream ?? this.upstreams[0]?.spec.label,
    );
  }

  #timeoutError(request: PoolRequest): UpstreamError {
    const last = request.lastError;
    const first = request.exchanges[0];
    const label = first !== undefined
      ? this.upstreams[first.upstreamIndex]?.spec.label
      : last?.upstream;
    return new UpstreamError(
      "timeout",
      `no answer in time${last ? " (" + last.message + ")" : ""}`,
      label,
    );
  }

  #maintain(now: number): void {
    if (this.#closed) return;
    // Answers to exchanges that lost or gave up may still come; after a while they will not.
    const lateBefore = now - 10_000;
    for (const upstream of this.upstreams) {
      upstream.maintain(now, now - this.#idleTimeoutMs, lateBefore);
    }
    this.timers.schedule(this.#maintenance, now + MAINTAIN_EVERY_MS);
  }

  /** Stops probing, closes every connection; questions in flight fail. */
  async close(): Promise<void> {
    this.#closed = true;
    this.timers.cancel(this.#maintenance);
    await Promise.all(this.upstreams.map((u) => u.close()));
    this.#healthChanged();
    if (this.#ownTimers) this.timers.close();
  }
}
