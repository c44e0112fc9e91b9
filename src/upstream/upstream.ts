/**
 * One upstream (DoT, or plain DNS over TCP): its pipelined connections, its health and
 * latency, and its probes.
 * The pool decides which upstream a question goes to; the upstream decides which of its
 * connections carries it, when to open another, and when it is up or down.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import type { ResponseInfo } from "../dns/message.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import type { Clock, TimerQueue } from "../timers.ts";
import {
  type ConnectionContext,
  type ConnectionFactory,
  type ConnectionOwner,
  MAX_QUERIES_PER_CONNECTION,
  type UpstreamConnection,
} from "./connection.ts";
import { ConnectionSet } from "./connection_set.ts";
import { tcpDialer } from "./dial.ts";
import { UpstreamError } from "./errors.ts";
import type { Exchange, ExchangeCarrier } from "./exchange.ts";
import { LatencyTracker, UpstreamHealth } from "./health.ts";
import { HealthChecks } from "./health_checks.ts";
import { probeQuery } from "./health_probe.ts";
import { NudgeBudget } from "./nudge.ts";
import type { UpstreamStats } from "./stats.ts";
import { StreamConnection } from "./stream_connection.ts";
import { tlsDialer } from "./tls_dial.ts";

/**
 * A connection with this many queries written since its last answer, the first of them
 * written more than four times the upstream's p95 answer time ago (at least
 * {@linkcode STALL_BURST_MIN_MS}), has stalled: a server answering in milliseconds does
 * not sit on eight questions for 50 ms.
 */
const STALL_BURST_WRITES = 8;
/** See {@linkcode STALL_BURST_WRITES}. */
const STALL_BURST_MIN_MS = 50;

/** Least time a question waits on a handshake before it also goes elsewhere. */
const HANDSHAKE_ALLOWANCE_MIN_MS = 100;
/** Time a question waits on a handshake when no handshake time is known at all. */
const HANDSHAKE_ALLOWANCE_DEFAULT_MS = 500;

/** How an upstream's connections carry DNS: over TLS (DoT, RFC 7858) or plain TCP. */
export type UpstreamTransport = "tls" | "tcp";

/** Settings of an upstream shared by all upstreams of a pool. */
export interface UpstreamSettings {
  /** DNS over TLS (`"tls"`), or plain DNS over TCP (`"tcp"`). */
  transport: UpstreamTransport;
  /** Extra trusted CA certificates (PEM). */
  caCerts: string[];
  /** Most connections to this upstream. */
  maxConnections: number;
  /** TCP connect (plus TLS handshake) deadline. */
  connectTimeoutMs: number;
  /** Idle upstreams are probed this often (0: never). */
  healthCheckIntervalMs: number;
  /** Whether to nudge Nagle-bound servers (DoT only, see `nudge.ts`). */
  nudge: boolean;
  /** Pad health probes (and frame fillers) to 128 octets, as `--padding` pads queries. */
  padProbes: boolean;
  /** The health check's question, when not `. IN NS` (see `probeQuery`). */
  probeQuery?: Uint8Array;
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
  /**
   * The fastest recent TLS handshake to any upstream of the pool (0: none yet): how long a
   * handshake to one that never completed one may take before a question on it moves on.
   */
  referenceHandshakeMs?: () => number;
  /**
   * The shortest attempt timeout among the upstreams that have answered (0: none has): the
   * attempt timeout of one that has not answered yet. Next to an upstream answering in a
   * millisecond, one that has answered nothing in 100 ms is not worth waiting on.
   */
  referenceAttemptMs?: () => number;
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
export class Upstream implements ConnectionOwner {
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
  /** Its connections, and which one a query goes on. */
  readonly #connections: ConnectionSet;
  /** Exchanges handed to it and not ended. */
  outstanding = 0;
  /** Clock time from which it counts as slow (an attempt passed its timeout), 0 if not. */
  slowSince = 0;
  /** When {@linkcode noticeStall} last looked (it looks once per clock reading). */
  #stallCheckedAt = -1;
  /** Clock time it was last chosen by the policy. */
  lastChosenAt = 0;
  /** Last TLS handshake time in milliseconds (0: none yet). */
  handshakeMs = 0;
  /** What its connections share (see {@linkcode ConnectionContext}). */
  readonly #context: ConnectionContext;
  readonly #log: Logger;
  readonly #clock: Clock;
  /** TCP connect (plus TLS handshake) deadline. */
  readonly #connectTimeoutMs: number;
  readonly #settings: UpstreamSettings;
  /** Its health checks: the probe schedule, probes and verdicts. */
  readonly #checks: HealthChecks;
  readonly #warnings: RateLimitedLog;
  readonly #connectErrors: RateLimitedLog;
  #badAnswers = 0;
  /** The message of the last rejected answer's question (see `onBadAnswer`). */
  #lastBadMessage: Uint8Array | null = null;
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
    this.#log = settings.log;
    this.#connectTimeoutMs = settings.connectTimeoutMs;
    this.#clock = settings.clock;
    this.#settings = settings;
    const tls = settings.transport === "tls";
    this.#context = {
      spec,
      dial: tls ? tlsDialer(spec, settings.caCerts) : tcpDialer(spec),
      connectTimeoutMs: settings.connectTimeoutMs,
      nudging: tls && settings.nudge
        ? {
          budget: new NudgeBudget(),
          outstanding: () => this.outstanding,
          padFiller: settings.padProbes,
        }
        : null,
      log: settings.log,
      stats,
      clock: settings.clock,
      timers: settings.timers,
    };
    const connect: ConnectionFactory = settings.connect ??
      ((owner, context) => new StreamConnection(owner, context));
    this.#connections = new ConnectionSet(
      () => connect(this, this.#context),
      settings.maxConnections,
    );
    this.#checks = new HealthChecks({
      label: spec.label,
      index,
      health: this.health,
      latency: this.latency,
      connections: this.#connections,
      stats,
      log: settings.log,
      clock: settings.clock,
      timers: settings.timers,
      random: settings.random ?? Math.random,
      intervalMs: settings.healthCheckIntervalMs,
      connectTimeoutMs: settings.connectTimeoutMs,
      probeQuery: settings.probeQuery ?? probeQuery(settings.padProbes),
      attemptTimeout: () => this.attemptTimeout(),
      onUp: () => this.slowSince = 0,
      onHealthChange: () => settings.onHealthChange?.(),
    });
    this.#warnings = new RateLimitedLog(settings.log, 5_000, () => this.#clock.now());
    this.#connectErrors = new RateLimitedLog(settings.log, 10_000, () => this.#clock.now());
  }

  /** True unless down. */
  get usable(): boolean {
    return this.health.state !== "down";
  }

  /** True when an attempt on it recently passed its timeout with no answer since. */
  get slow(): boolean {
    return this.slowSince !== 0;
  }

  /** Open or opening shared connections (for the metrics and tests). */
  get connections(): readonly UpstreamConnection[] {
    return this.#connections.shared;
  }

  /**
   * True when no connection is open and one is being opened: a question sent now waits for
   * a handshake that may never complete (a tarpit, a black hole, a frozen server).
   */
  get connecting(): boolean {
    return this.#connections.connecting;
  }

  /**
   * True when a hedge on this upstream could go on a connection other than `busy`: another
   * open or opening connection exists, or there is room to open one.
   */
  hasRoomBeside(busy: ExchangeCarrier | null): boolean {
    return this.#connections.hasRoomBeside(busy);
  }

  /** Exchanges in flight on its connections (late ones included). */
  get load(): number {
    return this.#connections.load;
  }

  /**
   * Sends `exchange` on the connection where it is likely answered soonest (not simply the
   * least loaded: see `connection_set.ts`), opening one when warranted; `avoid` is a
   * connection it must not go on (a hedge's first attempt).
   */
  send(exchange: Exchange, avoid: ExchangeCarrier | null = null): void {
    if (this.#closed) {
      exchange.upstreamIndex = this.index;
      exchange.fail(
        new UpstreamError("unavailable", "the proxy is shutting down", this.spec.label),
      );
      return;
    }
    const now = this.#clock.now();
    const best = this.#connections.choose(this.outstanding, avoid, now);
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
   * Sends `exchange` alone on a connection of its own, closed after the answer. A suspect
   * of a connection that died (see `onClosed`), or a question on a second connection that
   * died, is retried this way: if that connection dies too before answering, the question is
   * the query of death (for example something the server drops the connection for) and is
   * not sent again, and no other client's question went down with it.
   */
  sendIsolated(exchange: Exchange): void {
    if (this.#closed) {
      this.send(exchange);
      return;
    }
    const connection = this.#connections.openIsolated();
    exchange.upstreamIndex = this.index;
    if (exchange.startedAt === 0) exchange.startedAt = this.#clock.now();
    exchange.holder = this;
    this.outstanding++;
    connection.send(exchange);
  }

  /** True when one more connection of one question may open. */
  get mayIsolate(): boolean {
    return this.#connections.mayIsolate;
  }

  /** An exchange it carried ended (answered, failed or cancelled). */
  ended(): void {
    if (this.outstanding > 0) this.outstanding--;
  }

  /** Opens one more connection. */
  open(): UpstreamConnection {
    return this.#connections.open();
  }

  /**
   * When an attempt `exchange` should be judged slow: the upstream's usual answer time after
   * it was written, or, while its connection is still connecting, four times its last
   * handshake time (at least 100 ms). An upstream that never completed a handshake is given
   * four times the fastest handshake to any upstream, or 500 ms when none completed yet. The
   * connect timeout bounds all of these: past it the connection itself gives up.
   */
  attemptDeadline(exchange: Exchange): number {
    const connection = exchange.carrier;
    if (connection !== null && connection.state === "connecting") {
      const reference = this.handshakeMs > 0
        ? this.handshakeMs
        : this.#settings.referenceHandshakeMs?.() ?? 0;
      const allowance = reference > 0
        ? Math.max(HANDSHAKE_ALLOWANCE_MIN_MS, 4 * reference)
        : HANDSHAKE_ALLOWANCE_DEFAULT_MS;
      return connection.createdAt + Math.min(this.#connectTimeoutMs, allowance);
    }
    return exchange.sentAt + this.attemptTimeout();
  }

  /**
   * How long an answer on an open connection may take before the attempt is judged slow:
   * from its own answer times once it has some, otherwise from the other upstreams'.
   */
  attemptTimeout(): number {
    if (this.latency.samples > 0) return this.latency.attemptTimeout();
    const reference = this.#settings.referenceAttemptMs?.() ?? 0;
    return reference > 0 ? reference : this.latency.attemptTimeout();
  }

  /**
   * An attempt passed its deadline: the upstream counts as slow until it answers again,
   * and when nothing came back on its connection since it was written, that connection
   * gets a probe: a straggler is not a dead upstream, a connection that answers nothing is.
   */
  suspect(exchange: Exchange, now: number): void {
    if (this.slowSince === 0) this.slowSince = now;
    // Its carrier, as one of this upstream's connections.
    const connection = this.#connections.find(exchange.carrier);
    if (connection === undefined || connection.state !== "open") return;
    if (connection.stalledSince !== 0 && connection.stalledSince <= exchange.sentAt) {
      this.#checks.probe(connection);
    }
  }

  /**
   * Looks for a connection that has answered nothing written to it for longer than an
   * attempt may take (or, after a burst of writes, for four times the usual answer time), and
   * when there is one, counts the upstream as slow and probes that connection: the probe's
   * answer tells a straggler (up again at once) from a stall (down). This catches a stall
   * that no question is left waiting on (questions whose hedge answered first are no longer
   * judged, and `least-outstanding` sends nothing more to an upstream that owes answers, but
   * what is left unanswered still says the server stopped answering), and a burst sooner than
   * any one question's attempt deadline. Cheap: a look at each connection.
   */
  noticeStall(now: number): void {
    // Once per clock reading: a burst of queries handled in one go reads the same time.
    if (now === this.#stallCheckedAt || this.slowSince !== 0 || this.health.state === "down") {
      return;
    }
    this.#stallCheckedAt = now;
    const timeout = this.attemptTimeout();
    const burstTimeout = Math.min(timeout, Math.max(STALL_BURST_MIN_MS, 4 * this.latency.p95));
    for (const connection of this.#connections.shared) {
      const since = connection.stalledSince;
      if (connection.state !== "open" || since === 0) continue;
      const writes = connection.writesSinceAnswer;
      if (
        now - since >= timeout || (writes >= STALL_BURST_WRITES && now - since >= burstTimeout)
      ) {
        this.slowSince = now;
        this.#checks.probe(connection);
        return;
      }
    }
  }

  /** Closes idle connections and forgets late answers that never came. */
  maintain(now: number, idleSince: number, lateBefore: number): void {
    this.#connections.maintain(now, idleSince, lateBefore, () => {
      this.#log.debug("closing idle upstream connection", { upstream: this.spec.label });
    });
    if (this.slowSince !== 0 && now - this.slowSince > 5_000 && this.outstanding === 0) {
      this.slowSince = 0;
    }
  }

  /** Starts health checking: a probe now (start-up), then on schedule. */
  startProbing(): void {
    this.#checks.start();
  }

  /** Closes every connection and stops probing. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#checks.close();
    await this.#connections.close();
  }

  // ---- connection events ----------------------------------------------------------------

  /** See {@linkcode ConnectionOwner.onOpen}. */
  onOpen(connection: UpstreamConnection, handshakeMs: number): void {
    this.handshakeMs = handshakeMs;
    // A probe that waited for this handshake is owed an answer from now on, as any other.
    this.#checks.connectionOpened(connection);
  }

  /** See {@linkcode ConnectionOwner.onAnswer}. */
  onAnswer(
    connection: UpstreamConnection,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
  ): void {
    const now = connection.lastReadAt;
    const ms = now - exchange.sentAt;
    // An answer to what was written before the connection settled measures the connection's
    // warm-up (a server holding answers behind its session tickets, see SETTLE_MS), not the
    // upstream: one such sample of 40 ms would keep `fastest` off an upstream for long.
    if (connection.settled(exchange.sentAt)) this.latency.record(ms);
    // Client questions only: health checks have their own counter.
    if (exchange.kind !== "probe") this.stats.answered(ms / 1000);
    this.#badAnswers = 0;
    this.#lastBadMessage = null;
    this.#silentCloses = 0;
    this.health.lastAnswerWasProbe = exchange.kind === "probe";
    if (this.health.state !== "up" || this.slowSince !== 0) this.#checks.markUp(now);
    else this.health.lastAnswerAt = now;
    exchange.answer(response, info);
    if (this.#connections.isIsolated(connection) && connection.load === 0) connection.close();
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
    // A rejected probe answer judges the upstream itself (see probeFailed).
    const probe = exchange.kind === "probe";
    exchange.fail(error);
    // One bad answer may be a poisoned question; a run of them is a broken server. The
    // retries of one question (every exchange of it carries the same message) count once: a
    // question whose answers always fail validation (a zone's odd records) is not a broken
    // server, and with one upstream it would take every other client's answers down with it.
    if (probe || exchange.message === this.#lastBadMessage) return;
    this.#lastBadMessage = exchange.message;
    if (++this.#badAnswers >= 3) {
      this.#badAnswers = 0;
      this.#checks.markDown(error, true);
    }
  }

  /** See {@linkcode ConnectionOwner.onClosed}. */
  onClosed(
    connection: UpstreamConnection,
    orphans: Exchange[],
    failure: UpstreamError | null,
  ): void {
    if (this.#connections.remove(connection) && !this.#closed) {
      // A connection of one question: its death says something about the question, not
      // about the upstream, unless it never got through the handshake.
      const error = failure ??
        new UpstreamError("reset", `${this.spec.label} closed the connection`, this.spec.label);
      if (!connection.opened) this.#checks.markDown(error, false);
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
    const error = failure ??
      (connection.opened
        ? new UpstreamError("reset", `${label} closed the connection`, label)
        : new UpstreamError("reset", `${label} closed during the handshake`, label));
    // The probe in flight on it, if any: while down, that is all a connection carries.
    const probed = this.#checks.probeAmong(orphans);
    if (!connection.opened) {
      // Never got through the handshake: the upstream is unreachable as far as we can tell.
      this.#connectErrors.error("upstream connection failed", {
        upstream: label,
        reason: error.reason,
        error: error.message,
      });
      this.#checks.markDown(error, false);
    } else if (failure !== null || (orphans.length > 0 && !connection.closeRequested)) {
      // It opened, then went away with questions unanswered or broke: a restart, a server
      // shedding connections (RFC 7766 allows it), or a broken one. Several in a row without
      // an answer in between mean broken.
      if (failure !== null && !connection.closeRequested) {
        this.#warnings.warn("upstream connection broke", {
          upstream: label,
          reason: failure.reason,
          error: failure.message,
          inflight: orphans.length,
        });
      }
      // A close whose every unanswered question was on a connection that closed before is
      // the work of one of those questions (a query of death being looked for, see
      // `sendIsolated`), not one more failure of the upstream in a row.
      const fresh = orphans.length === 0 || orphans.some((exchange) => !exchange.resent);
      if (fresh && (connection.answered === 0 || failure !== null)) this.#silentCloses++;
      if (
        failure?.reason === "bad_response" || failure?.reason === "timeout" ||
        (probed && this.health.state === "down")
      ) {
        // Broken frames, silence, or (while down) a health check the server hung up on after
        // the handshake: it is reachable but misbehaves, and each look costs it a handshake,
        // so it is looked at less and less often (see UpstreamHealth.probeDelay). A server
        // that closes connections while up (a restart) is judged by the run of them below.
        this.#silentCloses = 0;
        this.#checks.markDown(error, true);
      } else if (this.#silentCloses >= 3) {
        this.#silentCloses = 0;
        this.#checks.markDown(error, true);
      } else if (orphans.length > 0) {
        this.stats.reconnect();
      }
    }
    // A query of death is the last question the server read before it dropped the
    // connection: the newest unanswered one when the server reads as fast as questions come
    // (with pipelining and slow answers, the oldest is merely the slowest), the oldest when
    // the server stopped reading at it. Both are suspects (see `sendIsolated`); a question
    // between them is caught when it closes a second connection. (Not when this side closed
    // it.)
    if (orphans.length > 0 && !connection.closeRequested) {
      orphans[0].firstOrphan = true;
      orphans[orphans.length - 1].lastOrphan = true;
    }
    for (const exchange of orphans) {
      exchange.orphaned = true;
      exchange.fail(error);
    }
    if (
      connection.opened && !connection.closeRequested && this.health.state !== "down" &&
      !this.#connections.anyOpen
    ) {
      // The server closed our last connection: find out now whether it is still there.
      this.#checks.lastConnectionClosed(orphans.length > 0);
    }
  }
}
