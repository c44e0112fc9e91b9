/**
 * What the proxy believes about one upstream: whether it answers (up, down, not yet known),
 * how fast it answers, and when to look at it again. Decisions only; the upstream acts on
 * them (opening connections, sending probes).
 *
 * - **Up** after any valid answer (to a client's question or to a probe); a completed TLS
 *   handshake is not health.
 * - **Down** after a connection attempt fails, a connection stops answering, or the server
 *   keeps closing or garbling connections. A down upstream gets no client queries; it is
 *   probed (`. IN NS` over its own TLS connection) every 500 ms with jitter, so it is back
 *   in service within a second of answering again, however long it was down. A server that
 *   completes the handshake and then misbehaves is probed less and less often (each probe
 *   costs it a handshake), up to every 30 s.
 * - **Unknown** at start, until the first answer or failure: usable.
 *
 * @module
 */

import type { UpstreamError } from "./errors.ts";

/** Health states. */
export type HealthState = "unknown" | "up" | "down";

/** Probe interval while down. */
export const DOWN_PROBE_MS = 500;
/** Longest probe interval for a server that handshakes and then misbehaves. */
export const MAX_DOWN_PROBE_MS = 30_000;
/**
 * Shortest and longest time an answer may take before an attempt is judged slow (and the
 * question also goes to another upstream). The shortest applies to upstreams that answer 95%
 * of questions in under 25 ms: past 100 ms an answer from one of them is an outlier, and
 * asking elsewhere costs one query.
 */
export const ATTEMPT_TIMEOUT_MIN_MS = 100;
/** See {@linkcode ATTEMPT_TIMEOUT_MIN_MS}. */
export const ATTEMPT_TIMEOUT_MAX_MS = 1000;
/** Attempt timeout before any answer was timed. */
export const ATTEMPT_TIMEOUT_DEFAULT_MS = 500;

const RING = 128;
const RECOMPUTE_EVERY = 16;

/**
 * Recent answer times of one upstream: a smoothed RTT and variance (as TCP's RTO estimator,
 * RFC 6298) and the 95th percentile of the last 128 answers.
 *
 * @example
 * ```ts
 * import { LatencyTracker } from "./health.ts";
 * const latency = new LatencyTracker();
 * for (let i = 0; i < 100; i++) latency.record(i < 95 ? 1 : 50);
 * latency.p95; // 50
 * ```
 */
export class LatencyTracker {
  /** Smoothed RTT in milliseconds (0 before the first sample). */
  srtt = 0;
  /** Smoothed mean deviation in milliseconds. */
  rttvar = 0;
  /** Samples recorded. */
  samples = 0;
  readonly #ring = new Float64Array(RING);
  /** The largest samples, descending (see `#recompute`). */
  readonly #top = new Float64Array(RING);
  #next = 0;
  #sinceRecompute = 0;
  #p95 = 0;

  /** Records one answer time. */
  record(ms: number): void {
    if (this.samples === 0) {
      this.srtt = ms;
      this.rttvar = ms / 2;
    } else {
      this.rttvar = 0.75 * this.rttvar + 0.25 * Math.abs(this.srtt - ms);
      this.srtt = 0.875 * this.srtt + 0.125 * ms;
    }
    this.samples++;
    this.#ring[this.#next] = ms;
    this.#next = (this.#next + 1) % RING;
    if (++this.#sinceRecompute >= RECOMPUTE_EVERY || this.samples <= RECOMPUTE_EVERY) {
      this.#recompute();
    }
  }

  /** The 95th percentile of the recent answer times (0 before the first sample). */
  get p95(): number {
    return this.#p95;
  }

  /** Forgets everything (an upstream back from an outage is measured afresh). */
  reset(): void {
    this.srtt = 0;
    this.rttvar = 0;
    this.samples = 0;
    this.#next = 0;
    this.#sinceRecompute = 0;
    this.#p95 = 0;
  }

  /** How long an answer may take before the attempt is judged slow. */
  attemptTimeout(): number {
    if (this.samples === 0) return ATTEMPT_TIMEOUT_DEFAULT_MS;
    const expected = Math.max(4 * this.#p95, this.srtt + 4 * this.rttvar);
    return Math.min(ATTEMPT_TIMEOUT_MAX_MS, Math.max(ATTEMPT_TIMEOUT_MIN_MS, expected));
  }

  /**
   * The p95 is the `count - rank`-th largest sample (at most 8 of 128): kept in a small
   * descending list in one pass, not by sorting all 128 (a sort every 16 answers was 2% of a
   * query's CPU at saturation).
   */
  #recompute(): void {
    this.#sinceRecompute = 0;
    const count = Math.min(this.samples, RING);
    const rank = Math.min(count - 1, Math.ceil(count * 0.95) - 1);
    const keep = count - rank;
    const top = this.#top;
    let held = 0;
    for (let i = 0; i < count; i++) {
      const value = this.#ring[i];
      if (held === keep && value <= top[held - 1]) continue;
      let at = held < keep ? held++ : held - 1;
      while (at > 0 && top[at - 1] < value) {
        top[at] = top[at - 1];
        at--;
      }
      top[at] = value;
    }
    this.#p95 = top[keep - 1];
  }
}

/**
 * The health state machine of one upstream.
 *
 * @example
 * ```ts
 * import { UpstreamHealth } from "./health.ts";
 * const health = new UpstreamHealth();
 * health.answered(1000); // "up"
 * health.state; // "up"
 * ```
 */
export class UpstreamHealth {
  /** Current state. */
  state: HealthState = "unknown";
  /** Consecutive failures since the last answer. */
  failures = 0;
  /** Consecutive failures after a completed handshake (garbage, resets, silence). */
  misbehaviours = 0;
  /** The failure that put it down, for readiness reports. */
  lastError: UpstreamError | null = null;
  /** Clock time of the last valid answer, or -Infinity. */
  lastAnswerAt: number = -Infinity;
  /** True when the last valid answer was to a health probe. */
  lastAnswerWasProbe = false;
  /** Clock time it went down (valid while down). */
  downSince = 0;

  /** A valid answer arrived: up. Returns true when that is a change from down. */
  answered(now: number): boolean {
    const wasDown = this.state === "down";
    this.state = "up";
    this.failures = 0;
    this.misbehaviours = 0;
    this.lastAnswerAt = now;
    return wasDown;
  }

  /**
   * Something failed: down. `afterHandshake` says the TLS handshake had completed (the server
   * is reachable but misbehaves). Returns true when that is a change.
   */
  failed(error: UpstreamError, now: number, afterHandshake: boolean): boolean {
    const wasDown = this.state === "down";
    this.state = "down";
    this.failures++;
    if (afterHandshake) this.misbehaviours++;
    this.lastError = error;
    if (!wasDown) this.downSince = now;
    return !wasDown;
  }

  /** Milliseconds until the next probe while down, with ±20% jitter from `random` in [0, 1). */
  probeDelay(random: number): number {
    const base = this.misbehaviours <= 1
      ? DOWN_PROBE_MS
      : Math.min(MAX_DOWN_PROBE_MS, DOWN_PROBE_MS * 2 ** (this.misbehaviours - 1));
    return base * (0.8 + 0.4 * random);
  }
}
