/**
 * A health probe of an upstream: one `. IN NS` question without RD (see `dns/probe.ts`) on
 * the wire, with its deadline; the upstream that sent it judges what its answer, its
 * failure or its silence says (see `Upstream`).
 *
 * @module
 */

import { buildProbeQuery } from "../dns/probe.ts";
import { HEADER_SIZE, skipUncompressedName } from "../dns/wire.ts";
import type { Timed } from "../timers.ts";
import type { UpstreamError } from "./errors.ts";
import { Exchange, type ExchangeWaiter } from "./exchange.ts";

/** Who hears how a probe ended: the upstream it checks. */
export interface ProbeOwner {
  /** The probe was answered. */
  probeAnswered(probe: Probe): void;
  /** The probe failed before its deadline (its connection failed or closed). */
  probeFailed(probe: Probe, error: UpstreamError): void;
  /** The probe's deadline passed. */
  probeTimedOut(probe: Probe, now: number): void;
}

const PROBE_QUESTION_END = (() => {
  const probe = buildProbeQuery(false);
  return skipUncompressedName(probe, HEADER_SIZE, probe.length) + 4;
})();

/** An in-flight health probe (`. IN NS`): its exchange and its deadline. */
export class Probe implements Timed, ExchangeWaiter {
  /** See {@linkcode Timed}. */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** See {@linkcode Timed}. */
  timerSlot: number = -1;
  /** The probe on the wire. */
  readonly exchange: Exchange;
  /** True once its deadline was extended because its timer fired late (see probeTimedOut). */
  graced = false;
  /**
   * True for a check of an idle, up upstream sent on a connection opened earlier: left
   * unanswered, it is asked again on a new connection before the upstream is judged.
   */
  recheck = false;
  readonly #upstream: ProbeOwner;

  /** Creates a probe of `upstream`, padded like queries when `padded`. */
  constructor(upstream: ProbeOwner, padded: boolean) {
    this.#upstream = upstream;
    this.exchange = new Exchange(
      buildProbeQuery(false, padded),
      PROBE_QUESTION_END,
      this,
      "probe",
    );
  }

  /** The probe's deadline passed. */
  onTimer(now: number): void {
    this.#upstream.probeTimedOut(this, now);
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
