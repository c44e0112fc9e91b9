/**
 * The health checks of one upstream: when to probe it (`--health-check-interval` while up,
 * backing off while down), what a probe's answer, failure or silence says about it, and the
 * verdicts (up, down) that answers and failures elsewhere bring (see {@linkcode UpstreamHealth}
 * for the state itself).
 *
 * @module
 */

import type { Logger } from "../log.ts";
import type { Clock, Timed, TimerQueue } from "../timers.ts";
import type { UpstreamConnection } from "./connection.ts";
import type { ConnectionSet } from "./connection_set.ts";
import { UpstreamError } from "./errors.ts";
import type { Exchange } from "./exchange.ts";
import type { LatencyTracker, UpstreamHealth } from "./health.ts";
import { Probe, type ProbeOwner } from "./health_probe.ts";
import type { UpstreamStats } from "./stats.ts";

/** Least time a probe on an open connection is given to be answered. */
const PROBE_ANSWER_MS = 500;
/**
 * With health checks off, the least time between two probes sent because the server closed
 * the last connection (see {@linkcode HealthChecks.lastConnectionClosed}).
 */
const CLOSE_PROBE_SPACING_MS = 10_000;

/** A timer this late says the process was stalled, not the upstream (see probeTimedOut). */
const LATE_TIMER_MS = 50;

/** What {@linkcode HealthChecks} works with: the upstream's parts and settings. */
export interface HealthCheckOptions {
  /** The upstream's label, for logs. */
  label: string;
  /** The upstream's position in its set (probes carry it like any exchange). */
  index: number;
  /** Its health state. */
  health: UpstreamHealth;
  /** Its answer times (forgotten when it comes back up). */
  latency: LatencyTracker;
  /** Its connections: probes go on them. */
  connections: ConnectionSet;
  /** Its statistics hooks. */
  stats: UpstreamStats;
  /** Logger. */
  log: Logger;
  /** The clock. */
  clock: Clock;
  /** The timer queue the schedule and the probes' deadlines go in. */
  timers: TimerQueue;
  /** Randomness in [0, 1) for jitter. */
  random: () => number;
  /** Idle upstreams are probed this often (0: never). */
  intervalMs: number;
  /** TCP connect (plus TLS handshake) deadline: a probe waiting on one gets it as well. */
  connectTimeoutMs: number;
  /** The probes' question (see `probeQuery` in `health_probe.ts`). */
  probeQuery: Uint8Array;
  /** How long an answer on an open connection may take (see `Upstream.attemptTimeout`). */
  attemptTimeout: () => number;
  /** The upstream answered: it is no longer slow. */
  onUp: () => void;
  /** Its health changed (up or down). */
  onHealthChange: () => void;
}

/**
 * The health checks of one upstream.
 *
 * @example
 * ```ts ignore
 * const checks = new HealthChecks({ label, index, health, latency, connections, ... });
 * checks.start(); // a probe now, then on schedule
 * ```
 */
export class HealthChecks implements Timed, ProbeOwner {
  /** See {@linkcode Timed} (the probe schedule). */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** See {@linkcode Timed}. */
  timerSlot: number = -1;
  readonly #label: string;
  readonly #index: number;
  readonly #health: UpstreamHealth;
  readonly #latency: LatencyTracker;
  readonly #connections: ConnectionSet;
  readonly #stats: UpstreamStats;
  readonly #log: Logger;
  readonly #clock: Clock;
  readonly #timers: TimerQueue;
  readonly #random: () => number;
  readonly #intervalMs: number;
  readonly #connectTimeoutMs: number;
  readonly #probeQuery: Uint8Array;
  readonly #attemptTimeout: () => number;
  readonly #onUp: () => void;
  readonly #onHealthChange: () => void;
  /** The probe out, if any (one at a time). */
  #probe: Probe | null = null;
  /** When the last probe went out because the server closed the last connection. */
  #closeProbeAt = -Infinity;
  #closed = false;

  /** Creates the checks; {@linkcode start} sends the first probe. */
  constructor(options: HealthCheckOptions) {
    this.#label = options.label;
    this.#index = options.index;
    this.#health = options.health;
    this.#latency = options.latency;
    this.#connections = options.connections;
    this.#stats = options.stats;
    this.#log = options.log;
    this.#clock = options.clock;
    this.#timers = options.timers;
    this.#random = options.random;
    this.#intervalMs = options.intervalMs;
    this.#connectTimeoutMs = options.connectTimeoutMs;
    this.#probeQuery = options.probeQuery;
    this.#attemptTimeout = options.attemptTimeout;
    this.#onUp = options.onUp;
    this.#onHealthChange = options.onHealthChange;
  }

  /** Starts health checking: a probe now (start-up), then on schedule. */
  start(): void {
    this.probe(null);
  }

  /** Stops: no more probes; the one out is cancelled. */
  close(): void {
    this.#closed = true;
    this.#timers.cancel(this);
    if (this.#probe) this.#timers.cancel(this.#probe);
    this.#probe?.exchange.cancel();
    this.#probe = null;
  }

  /** True when the probe out is among `exchanges` (a connection that closed under it). */
  probeAmong(exchanges: readonly Exchange[]): boolean {
    return this.#probe !== null && exchanges.includes(this.#probe.exchange);
  }

  /** `connection` opened: a probe that waited for its handshake is owed an answer now. */
  connectionOpened(connection: UpstreamConnection): void {
    const probe = this.#probe;
    if (probe !== null && probe.exchange.carrier === connection) {
      this.#timers.schedule(probe, this.#clock.now() + this.#probeAnswerMs());
    }
  }

  /**
   * The server closed the upstream's last open connection (`owed`: with questions on it).
   * Finds out now whether it is still there, rather than when a client asks. Servers also
   * close idle connections (dnsdist after 2 s by default): the connection the probe opens
   * would be closed again, so an idle close is followed by at most one such probe per
   * health-check interval, not a handshake every few seconds for as long as no client asks
   * anything.
   */
  lastConnectionClosed(owed: boolean): void {
    const now = this.#clock.now();
    const spacing = this.#intervalMs > 0 ? this.#intervalMs : CLOSE_PROBE_SPACING_MS;
    if (owed || now - this.#closeProbeAt >= spacing) {
      this.#closeProbeAt = now;
      this.probe(null);
    }
  }

  /** The upstream answered (a question or a probe) at `now`. */
  markUp(now: number): void {
    this.#onUp();
    const before = this.#health.state;
    this.#health.answered(now);
    if (before !== "up") {
      if (before === "down") {
        this.#log.info("upstream answering again", { upstream: this.#label });
        this.#latency.reset();
      }
      this.#onHealthChange();
    }
    this.#scheduleProbe(now);
  }

  /**
   * The upstream failed (`afterHandshake`: it was reachable, then misbehaved): down once
   * {@linkcode UpstreamHealth} says so, probed on its schedule.
   */
  markDown(error: UpstreamError, afterHandshake: boolean): void {
    const now = this.#clock.now();
    if (this.#health.failed(error, now, afterHandshake)) {
      this.#log.warn("upstream down; probing until it answers", {
        upstream: this.#label,
        reason: error.reason,
        error: error.message,
      });
      this.#onHealthChange();
    } else if (this.#health.failures % 20 === 0) {
      this.#log.warn("upstream still down", {
        upstream: this.#label,
        reason: error.reason,
        failures: this.#health.failures,
        down_s: Math.round((now - this.#health.downSince) / 1000),
      });
    }
    this.#scheduleProbe(now);
  }

  #scheduleProbe(now: number): void {
    if (this.#closed || this.#probe !== null) return;
    if (this.#health.state === "down") {
      this.#timers.schedule(this, now + this.#health.probeDelay(this.#random()));
      return;
    }
    const interval = this.#intervalMs;
    if (interval <= 0) {
      this.#timers.cancel(this);
      return;
    }
    const last = Math.max(this.#health.lastAnswerAt, now - interval);
    this.#timers.schedule(this, last + interval * (0.9 + 0.2 * this.#random()));
  }

  /** The probe schedule is due (see {@linkcode Timed}). */
  onTimer(now: number): void {
    if (this.#closed) return;
    const interval = this.#intervalMs;
    if (
      this.#health.state !== "down" && interval > 0 && now - this.#health.lastAnswerAt < interval
    ) {
      // Answers kept coming: nothing to check yet.
      this.#scheduleProbe(now);
      return;
    }
    this.probe(null, this.#health.state !== "down");
  }

  /**
   * Sends a probe now, on `on` or else the least busy open connection (a new one when none
   * is open); not while one is out. `idleCheck`: a check of an idle, up upstream (see
   * {@linkcode Probe.recheck}).
   */
  probe(on: UpstreamConnection | null, idleCheck = false): void {
    if (this.#closed || this.#probe !== null) return;
    const probe = new Probe(this, this.#probeQuery);
    this.#probe = probe;
    this.#timers.cancel(this);
    const now = this.#clock.now();
    let connection = on ?? this.#connections.leastBusyOpen();
    if (connection === null) connection = this.#connections.open();
    else probe.recheck = idleCheck;
    probe.exchange.upstreamIndex = this.#index;
    probe.exchange.startedAt = now;
    connection.send(probe.exchange);
    const answerWithin = this.#probeAnswerMs();
    const allowance = connection.state === "open"
      ? answerWithin
      : this.#connectTimeoutMs + answerWithin;
    this.#timers.schedule(probe, now + allowance);
  }

  /** How long an open connection has to answer a probe. */
  #probeAnswerMs(): number {
    return Math.max(PROBE_ANSWER_MS, this.#attemptTimeout());
  }

  /** See {@linkcode ProbeOwner}. */
  probeAnswered(probe: Probe): void {
    if (probe !== this.#probe) return;
    this.#timers.cancel(probe);
    this.#probe = null;
    this.#stats.healthCheck(true);
    this.markUp(this.#clock.now());
  }

  /** See {@linkcode ProbeOwner}: its connection failed or closed. */
  probeFailed(probe: Probe, error: UpstreamError): void {
    if (probe !== this.#probe) return;
    this.#timers.cancel(probe);
    this.#probe = null;
    this.#stats.healthCheck(false);
    if (this.#closed) return;
    if (probe.exchange.orphaned) {
      // Its connection went away; `Upstream.onClosed` judged the upstream already.
      this.#scheduleProbe(this.#clock.now());
      return;
    }
    const connectLevel = error.reason === "refused" || error.reason === "unreachable" ||
      error.reason === "tls" || error.reason === "timeout";
    this.markDown(error, !connectLevel);
  }

  /** See {@linkcode ProbeOwner}: its connection has stopped answering. */
  probeTimedOut(probe: Probe, now: number): void {
    if (probe !== this.#probe) return;
    if (now - probe.timerAt > LATE_TIMER_MS && !probe.graced) {
      // The timer fired late: this process was stalled (CPU starved, a long GC), and an
      // answer that came meanwhile may be waiting unread behind this very timer. Judge
      // after the reads have had a turn, not before.
      probe.graced = true;
      this.#timers.schedule(probe, now + LATE_TIMER_MS);
      return;
    }
    this.#probe = null;
    const connection = probe.exchange.carrier;
    probe.exchange.cancel();
    this.#stats.healthCheck(false);
    if (this.#closed) return;
    const lastAnswer = this.#health.lastAnswerAt;
    if (
      this.#health.state !== "down" && lastAnswer > probe.exchange.startedAt &&
      now - lastAnswer < this.#attemptTimeout()
    ) {
      // Questions were answered since the probe went out, and lately: the server is alive
      // and the probe is a straggler (a resolver that cannot reach the root servers answers
      // `. NS` late).
      this.#log.debug("health check unanswered, but the upstream answers questions", {
        upstream: this.#label,
      });
      if (
        connection !== null && connection.state === "open" &&
        connection.lastReadAt < probe.exchange.startedAt
      ) {
        // Unless the probe's connection itself has read nothing since: then it is that
        // connection that went silent while others answer (a middlebox that lost its state
        // drops what crosses it). Closed, not judged: what it still owes goes elsewhere now,
        // and no later health check waits on it and takes the upstream down for it.
        this.#log.info("closing an upstream connection that stopped answering", {
          upstream: this.#label,
          owed: connection.load,
        });
        connection.close();
      }
      this.#scheduleProbe(now);
      return;
    }
    const message = "a health check got no answer in time";
    if (probe.recheck && connection !== null && connection.state === "open") {
      // An idle check on a connection opened earlier: the silence may be that connection's
      // (a NAT or firewall that forgot an idle flow drops what crosses it), not the
      // upstream's, and nobody is waiting on it. Its connections that read nothing since
      // are closed, not judged, and the check is asked again at once on a new connection,
      // whose silence or failed handshake does judge.
      this.#log.info("idle health check unanswered; checking again on a new connection", {
        upstream: this.#label,
      });
      this.#connections.closeSilentSince(probe.exchange.startedAt);
      this.probe(null);
      return;
    }
    // Closing the connection as failed judges the upstream (`Upstream.onClosed`); questions still on
    // it go elsewhere at once.
    if (connection !== null && connection.state === "open") {
      connection.abandon("timeout", message);
      // Other connections that answered nothing since the probe went out are as stalled (a
      // frozen server answers on none): close them too, so their questions move now and the
      // next probe does not wait on one of them again.
      this.#connections.closeSilentSince(probe.exchange.startedAt);
    } else if (connection !== null && connection.state === "connecting") {
      connection.abandon("timeout", `no handshake within ${this.#connectTimeoutMs} ms`);
    } else {
      this.markDown(new UpstreamError("timeout", message, this.#label), false);
    }
  }
}
