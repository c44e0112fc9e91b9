/**
 * One DoT upstream: its pipelined connections, its health and latency, and its probes.
 * The pool decides which upstream a question goes to; the upstream decides which of its
 * connections carries it, when to open another, and when it is up or down.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import type { ResponseInfo } from "../dns/message.ts";
import { buildProbeQuery } from "../dns/probe.ts";
import { HEADER_SIZE, skipUncompressedName } from "../dns/wire.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import type { Clock, Timed, TimerQueue } from "../timers.ts";
import {
  type ConnectionFactory,
  type ConnectionOwner,
  DotConnection,
  MAX_QUERIES_PER_CONNECTION,
  type UpstreamConnection,
} from "./dot_connection.ts";
import { Exchange, type ExchangeWaiter } from "./exchange.ts";
import { LatencyTracker, UpstreamHealth } from "./health.ts";
import { UpstreamError, type UpstreamStats } from "./types.ts";

/**
 * Queries in flight on every connection before another is opened beside them. One: a
 * server that holds small answers back under Nagle's algorithm until it sees an ACK (Unbound
 * does) stalls a connection with two queries in flight and nothing more to send for up to
 * the peer's delayed-ACK time (40 ms on Linux); spreading concurrent queries over
 * connections avoids that at low load, and at high load every connection carries writes
 * that acknowledge promptly.
 */
const SPREAD_THRESHOLD = 1;

/** Settings of an upstream shared by all upstreams of a pool. */
export interface UpstreamSettings {
  /** Extra trusted CA certificates (PEM). */
  caCerts: string[];
  /** Most TLS connections to this upstream. */
  maxConnections: number;
  /** TCP connect plus TLS handshake deadline. */
  connectTimeoutMs: number;
  /** Idle upstreams are probed this often (0: never). */
  healthCheckIntervalMs: number;
  /** Whether to nudge Nagle-bound servers. */
  nudge: boolean;
  /** Logger. */
  log: Logger;
  /** The clock. */
  clock: Clock;
  /** The pool's timers. */
  timers: TimerQueue;
  /** Creates connections (tests pass fakes). */
  connect?: ConnectionFactory;
  /** Randomness in [0, 1) for jitter (tests pass a fixed one). */
  random?: () => number;
  /** Told whenever an upstream goes up or down. */
  onHealthChange?: () => void;
}

function lessBusy(a: UpstreamConnection, b: UpstreamConnection): boolean {
  const loadA = a.load;
  const loadB = b.load;
  return loadA < loadB || (loadA === loadB && a.lastWriteAt < b.lastWriteAt);
}

const PROBE_QUESTION_END = (() => {
  const probe = buildProbeQuery();
  return skipUncompressedName(probe, HEADER_SIZE, probe.length) + 4;
})();

/** An in-flight health probe (`. IN NS`): its exchange and its deadline. */
export class Probe implements Timed, ExchangeWaiter {
  /** See {@linkcode Timed}. */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** The probe on the wire. */
  readonly exchange: Exchange;
  readonly #upstream: Upstream;

  /** Creates a probe of `upstream`. */
  constructor(upstream: Upstream) {
    this.#upstream = upstream;
    this.exchange = new Exchange(buildProbeQuery(), PROBE_QUESTION_END, this, "probe");
  }

  /** The probe's deadline passed. */
  onTimer(): void {
    this.#upstream.probeTimedOut(this);
  }

  /** See {@linkcode ExchangeWaiter}. */
  exchangeAnswered(): void {
    this.#upstream.probeAnswered(this);
  }

  /** See {@linkcode ExchangeWaiter}. */
  exchangeFailed(_exchange: Exchange, error: UpstreamError): void {
    this.#upstream.probeFailed(this, error);
  }
}

/**
 * One upstream and its connections.
 *
 * @example
 * ```ts ignore
 * const upstream = new Upstream(0, spec, settings, stats);
 * upstream.send(exchange);
 * ```
 */
export class Upstream implements ConnectionOwner, Timed {
  /** Position in the configured list. */
  readonly index: number;
  /** Address and TLS name. */
  readonly spec: UpstreamSpec;
  /** Statistics hooks. */
  readonly stats: UpstreamStats;
  /** Health state. */
  readonly health = new UpstreamHealth();
  /** Answer times. */
  readonly latency = new LatencyTracker();
  /** Open or opening connections. */
  readonly connections: UpstreamConnection[] = [];
  /** Exchanges handed to it and not ended. */
  outstanding = 0;
  /** Clock time from which it counts as slow (an attempt passed its timeout), 0 if not. */
  slowSince = 0;
  /** Clock time it was last chosen by the policy. */
  lastChosenAt = 0;
  /** Last TLS handshake time in milliseconds (0: none yet). */
  handshakeMs = 0;
  /** See {@linkcode ConnectionOwner}. */
  readonly caCerts: string[];
  /** See {@linkcode ConnectionOwner}. */
  readonly log: Logger;
  /** See {@linkcode ConnectionOwner}. */
  readonly connectTimeoutMs: number;
  /** See {@linkcode ConnectionOwner}. */
  readonly nudge: boolean;
  /** See {@linkcode ConnectionOwner}. */
  readonly clock: Clock;
  /** See {@linkcode Timed} (the probe schedule). */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  readonly #settings: UpstreamSettings;
  readonly #timers: TimerQueue;
  readonly #connect: ConnectionFactory;
  readonly #random: () => number;
  readonly #warnings: RateLimitedLog;
  readonly #connectErrors: RateLimitedLog;
  #probe: Probe | null = null;
  readonly #isolated = new Set<UpstreamConnection>();
  #badAnswers = 0;
  #silentCloses = 0;
  #closed = false;

  /** Creates upstream number `index`. */
  constructor(
    index: number,
    spec: UpstreamSpec,
    settings: UpstreamSettings,
    stats: UpstreamStats,
  ) {
    this.index = index;
    this.spec = spec;
    this.stats = stats;
    this.caCerts = settings.caCerts;
    this.log = settings.log;
    this.connectTimeoutMs = settings.connectTimeoutMs;
    this.nudge = settings.nudge;
    this.clock = settings.clock;
    this.#settings = settings;
    this.#timers = settings.timers;
    this.#connect = settings.connect ?? ((owner) => new DotConnection(owner));
    this.#random = settings.random ?? Math.random;
    this.#warnings = new RateLimitedLog(settings.log, 5_000, () => this.clock.now());
    this.#connectErrors = new RateLimitedLog(settings.log, 10_000, () => this.clock.now());
  }

  /** True unless down. */
  get usable(): boolean {
    return this.health.state !== "down";
  }

  /** True when an attempt on it recently passed its timeout with no answer since. */
  get slow(): boolean {
    return this.slowSince !== 0;
  }

  /** Exchanges in flight on its connections (late ones included). */
  get load(): number {
    let total = 0;
    for (const connection of this.connections) total += connection.load;
    return total;
  }

  /** Sends `exchange` on the least loaded connection, opening one when warranted. */
  send(exchange: Exchange, avoid: UpstreamConnection | null = null): void {
    const now = this.clock.now();
    // The least loaded settled connection; failing that, the least loaded of any. Ties go
    // to the connection written least recently, so under steady traffic every connection
    // carries writes, and each write acknowledges what a Nagle-bound server sent before on
    // it; a connection still left owing an ACK is nudged (see DotConnection).
    let best: UpstreamConnection | null = null;
    let bestSettled: UpstreamConnection | null = null;
    for (const connection of this.connections) {
      if (connection === avoid) continue;
      if (best === null || lessBusy(connection, best)) best = connection;
      if (connection.settled(now) && (bestSettled === null || lessBusy(connection, bestSettled))) {
        bestSettled = connection;
      }
    }
    if (bestSettled !== null) best = bestSettled;
    // A health probe in flight does not make a connection busy.
    const probeOn = this.#probe?.exchange.carrier ?? null;
    const busy = best === null ||
      best.load - (best === probeOn ? 1 : 0) >= SPREAD_THRESHOLD;
    if (
      busy && this.connections.length < this.#settings.maxConnections &&
      !this.#anyConnecting(avoid)
    ) {
      // Open another connection beside the busy ones; it takes queries once settled.
      const fresh = this.open();
      if (best === null) best = fresh;
    }
    if (best === null || best.state === "closed") {
      exchange.upstreamIndex = this.index;
      exchange.fail(
        new UpstreamError("unavailable", "no connection could be opened", this.spec.label),
      );
      return;
    }
    if (best.load >= MAX_QUERIES_PER_CONNECTION) {
      exchange.upstreamIndex = this.index;
      exchange.fail(
        new UpstreamError("unavailable", "too many queries in flight", this.spec.label),
      );
      return;
    }
    exchange.upstreamIndex = this.index;
    if (exchange.startedAt === 0) exchange.startedAt = now;
    if (exchange.holder === null && exchange.kind !== "probe") {
      exchange.holder = this;
      this.outstanding++;
    }
    best.send(exchange);
  }

  /**
   * Sends `exchange` alone on a connection of its own, closed after the answer. A question
   * that was the oldest unanswered on a connection that died is retried this way: if that
   * connection dies too before answering, the question is the query of death (for example
   * something the server drops the connection for) and is not sent again, and no other
   * client's question went down with it.
   */
  sendIsolated(exchange: Exchange): void {
    const connection = this.#connect(this);
    this.#isolated.add(connection);
    connection.start();
    exchange.upstreamIndex = this.index;
    exchange.isolated = true;
    if (exchange.startedAt === 0) exchange.startedAt = this.clock.now();
    exchange.holder = this;
    this.outstanding++;
    connection.send(exchange);
  }

  /** True while a connection (other than `except`) is still being opened. */
  #anyConnecting(except: UpstreamConnection | null): boolean {
    for (const connection of this.connections) {
      if (connection !== except && connection.state === "connecting") return true;
    }
    return false;
  }

  /** An exchange it carried ended (answered, failed or cancelled). */
  ended(): void {
    if (this.outstanding > 0) this.outstanding--;
  }

  /** Opens one more connection. */
  open(): UpstreamConnection {
    const fresh = this.#connect(this);
    this.connections.push(fresh);
    fresh.start();
    return fresh;
  }

  /**
   * When an attempt `exchange` should be judged slow: the upstream's usual answer time after
   * it was written, or, while its connection is still connecting, a multiple of the last
   * handshake time.
   */
  attemptDeadline(exchange: Exchange): number {
    const connection = exchange.carrier as UpstreamConnection | null;
    if (connection !== null && connection.state === "connecting") {
      const allowance = this.handshakeMs > 0
        ? Math.min(this.connectTimeoutMs, Math.max(100, 4 * this.handshakeMs))
        : Math.min(this.connectTimeoutMs, 500);
      return connection.createdAt + allowance;
    }
    return exchange.sentAt + this.latency.attemptTimeout();
  }

  /**
   * An attempt passed its deadline: the upstream counts as slow until it answers again,
   * and when nothing came back on its connection since it was written, that connection
   * gets a probe: a straggler is not a dead upstream, a connection that answers nothing is.
   */
  suspect(exchange: Exchange, now: number): void {
    if (this.slowSince === 0) this.slowSince = now;
    const connection = exchange.carrier as UpstreamConnection | null;
    if (connection === null || connection.state !== "open") return;
    if (connection.waitingSince !== 0 && connection.waitingSince <= exchange.sentAt) {
      this.#sendProbe(connection);
    }
  }

  /** Closes idle connections and forgets late answers that never came. */
  maintain(now: number, idleSince: number, lateBefore: number): void {
    for (const connection of [...this.connections]) {
      connection.purge(lateBefore);
      if (
        connection.state === "open" && connection.load === 0 && connection.lastActive < idleSince
      ) {
        this.log.debug("closing idle upstream connection", { upstream: this.spec.label });
        connection.close();
      }
    }
    if (this.slowSince !== 0 && now - this.slowSince > 5_000 && this.outstanding === 0) {
      this.slowSince = 0;
    }
  }

  /** Starts health checking: a probe now (start-up), then on schedule. */
  startProbing(): void {
    this.#sendProbe(null);
  }

  /** Closes every connection and stops probing. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#timers.cancel(this);
    if (this.#probe) this.#timers.cancel(this.#probe);
    this.#probe?.exchange.cancel();
    this.#probe = null;
    const connections = [...this.connections, ...this.#isolated];
    for (const connection of connections) connection.close();
    await Promise.all(connections.map((c) => c.finished));
  }

  // ---- health ---------------------------------------------------------------------------

  #markUp(now: number): void {
    this.slowSince = 0;
    const before = this.health.state;
    this.health.answered(now);
    if (before !== "up") {
      if (before === "down") {
        this.log.info("upstream answering again", { upstream: this.spec.label });
        this.latency.reset();
      }
      this.#settings.onHealthChange?.();
    }
    this.#scheduleProbe(now);
  }

  #markDown(error: UpstreamError, afterHandshake: boolean): void {
    const now = this.clock.now();
    if (this.health.failed(error, now, afterHandshake)) {
      this.log.warn("upstream down; probing until it answers", {
        upstream: this.spec.label,
        reason: error.reason,
        error: error.message,
      });
      this.#settings.onHealthChange?.();
    } else if (this.health.failures % 20 === 0) {
      this.log.warn("upstream still down", {
        upstream: this.spec.label,
        reason: error.reason,
        failures: this.health.failures,
        down_s: Math.round((now - this.health.downSince) / 1000),
      });
    }
    this.#scheduleProbe(now);
  }

  #scheduleProbe(now: number): void {
    if (this.#closed || this.#probe !== null) return;
    if (this.health.state === "down") {
      this.#timers.schedule(this, now + this.health.probeDelay(this.#random()));
      return;
    }
    const interval = this.#settings.healthCheckIntervalMs;
    if (interval <= 0) {
      this.#timers.cancel(this);
      return;
    }
    const last = Math.max(this.health.lastAnswerAt, now - interval);
    this.#timers.schedule(this, last + interval * (0.9 + 0.2 * this.#random()));
  }

  /** The probe schedule is due. */
  onTimer(now: number): void {
    if (this.#closed) return;
    const interval = this.#settings.healthCheckIntervalMs;
    if (
      this.health.state !== "down" && interval > 0 && now - this.health.lastAnswerAt < interval
    ) {
      // Answers kept coming: nothing to check yet.
      this.#scheduleProbe(now);
      return;
    }
    this.#sendProbe(null);
  }

  #sendProbe(on: UpstreamConnection | null): void {
    if (this.#closed || this.#probe !== null) return;
    const probe = new Probe(this);
    this.#probe = probe;
    this.#timers.cancel(this);
    const now = this.clock.now();
    let connection = on;
    if (connection === null) {
      for (const candidate of this.connections) {
        if (
          candidate.state === "open" && (connection === null || lessBusy(candidate, connection))
        ) {
          connection = candidate;
        }
      }
    }
    if (connection === null) connection = this.open();
    probe.exchange.upstreamIndex = this.index;
    probe.exchange.startedAt = now;
    connection.send(probe.exchange);
    const answerWithin = Math.max(500, this.latency.attemptTimeout());
    const allowance = connection.state === "open"
      ? answerWithin
      : this.connectTimeoutMs + answerWithin;
    this.#timers.schedule(probe, now + allowance);
  }

  /** The probe was answered. */
  probeAnswered(probe: Probe): void {
    if (probe !== this.#probe) return;
    this.#timers.cancel(probe);
    this.#probe = null;
    this.stats.healthCheck(true);
    this.#markUp(this.clock.now());
  }

  /** The probe failed before its deadline (its connection failed or closed). */
  probeFailed(probe: Probe, error: UpstreamError): void {
    if (probe !== this.#probe) return;
    this.#timers.cancel(probe);
    this.#probe = null;
    this.stats.healthCheck(false);
    if (this.#closed) return;
    if (probe.exchange.orphaned) {
      // Its connection went away; onClosed judged the upstream already.
      this.#scheduleProbe(this.clock.now());
      return;
    }
    const connectLevel = error.reason === "refused" || error.reason === "unreachable" ||
      error.reason === "tls" || error.reason === "timeout";
    this.#markDown(error, !connectLevel);
  }

  /** The probe got no answer in time: its connection has stopped answering. */
  probeTimedOut(probe: Probe): void {
    if (probe !== this.#probe) return;
    this.#probe = null;
    const connection = probe.exchange.carrier as UpstreamConnection | null;
    probe.exchange.cancel();
    this.stats.healthCheck(false);
    if (this.#closed) return;
    const message = "a health check got no answer in time";
    const afterHandshake = connection !== null && connection.state === "open";
    if (connection !== null && connection.state === "open") {
      connection.abandon("timeout", message);
    } else if (connection !== null && connection.state === "connecting") {
      connection.abandon("timeout", `no handshake within ${this.connectTimeoutMs} ms`);
    }
    this.#markDown(new UpstreamError("timeout", message, this.spec.label), afterHandshake);
  }

  // ---- connection events ----------------------------------------------------------------

  /** See {@linkcode ConnectionOwner.onOpen}. */
  onOpen(_connection: UpstreamConnection, handshakeMs: number): void {
    this.handshakeMs = handshakeMs;
  }

  /** See {@linkcode ConnectionOwner.onAnswer}. */
  onAnswer(
    connection: UpstreamConnection,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
    ms: number,
  ): void {
    this.latency.record(ms);
    // Client questions only: health checks have their own counter.
    if (exchange.kind !== "probe") this.stats.answered(ms / 1000);
    this.#badAnswers = 0;
    this.#silentCloses = 0;
    this.health.lastAnswerWasProbe = exchange.kind === "probe";
    const now = this.clock.now();
    if (this.health.state !== "up" || this.slowSince !== 0) this.#markUp(now);
    else this.health.lastAnswerAt = now;
    exchange.answer(response, info);
    if (this.#isolated.has(connection) && connection.load === 0) connection.close();
  }

  /** See {@linkcode ConnectionOwner.onBadAnswer}. */
  onBadAnswer(_connection: UpstreamConnection, exchange: Exchange, reason: string): void {
    this.stats.error("bad_response");
    this.#warnings.warn("upstream answer rejected", { upstream: this.spec.label, reason });
    const error = new UpstreamError(
      "bad_response",
      `${this.spec.label} sent an invalid answer (${reason})`,
      this.spec.label,
    );
    exchange.fail(error);
    // One bad answer may be a poisoned question; a run of them is a broken server.
    if (++this.#badAnswers >= 3) this.#markDown(error, true);
  }

  /** See {@linkcode ConnectionOwner.onClosed}. */
  onClosed(
    connection: UpstreamConnection,
    orphans: Exchange[],
    failure: UpstreamError | null,
  ): void {
    const index = this.connections.indexOf(connection);
    if (index >= 0) this.connections.splice(index, 1);
    if (this.#isolated.delete(connection) && !this.#closed) {
      // A connection of one question: its death says something about the question, not
      // about the upstream, unless it never got through the handshake.
      const error = failure ??
        new UpstreamError("reset", `${this.spec.label} closed the connection`, this.spec.label);
      if (!connection.opened) this.#markDown(error, false);
      for (const exchange of orphans) {
        exchange.orphaned = true;
        exchange.poisoned = connection.opened;
        exchange.fail(error);
      }
      return;
    }
    if (this.#closed) {
      for (const exchange of orphans) {
        exchange.fail(new UpstreamError("unavailable", "the proxy is shutting down"));
      }
      return;
    }
    const label = this.spec.label;
    let error = failure;
    if (!connection.opened) {
      // Never got through the handshake: the upstream is unreachable as far as we can tell.
      error ??= new UpstreamError("reset", `${label} closed during the handshake`, label);
      this.#connectErrors.error("upstream connection failed", {
        upstream: label,
        reason: error.reason,
        error: error.message,
      });
      this.#markDown(error, false);
    } else if (orphans.length > 0) {
      // It opened, then went away with questions unanswered: a restart, a server shedding
      // connections (RFC 7766 allows it), or a broken one. Several in a row without an
      // answer in between mean broken.
      error ??= new UpstreamError("reset", `${label} closed the connection`, label);
      if (connection.answered === 0 || failure !== null) this.#silentCloses++;
      if (failure?.reason === "bad_response" || failure?.reason === "timeout") {
        this.#markDown(error, true);
      } else if (this.#silentCloses >= 3) {
        this.#silentCloses = 0;
        this.#markDown(error, true);
      } else {
        this.stats.reconnect();
      }
    }
    // The first of them in write order is the one a query of death would be: a server that
    // drops the connection on reading it leaves it first among the unanswered.
    if (orphans.length > 0) orphans[0].firstOrphan = true;
    for (const exchange of orphans) {
      exchange.orphaned = true;
      exchange.fail(error!);
    }
    if (
      connection.opened && !connection.closeRequested && this.health.state !== "down" &&
      !this.connections.some((c) => c.state === "open")
    ) {
      // The server closed our last connection: find out now whether it is still there,
      // rather than when a client asks.
      this.#sendProbe(null);
    }
  }
}
