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

/**
 * The health check's question: `. IN NS` without RD (see `dns/probe.ts`), padded to 128
 * octets when `padded`, unless the upstream set names another (a zone's plain target is
 * checked with `ZONE SOA`, not `. NS`, which a cluster DNS would forward out of the cluster).
 */
export function probeQuery(padded: boolean): Uint8Array {
  return buildProbeQuery(false, padded);
}

/** An in-flight health probe: its exchange and its deadline. */
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

  /**
   * Creates a probe of `upstream` asking `query` (one question, no compression, as
   * {@linkcode probeQuery} makes it; shared by every probe: nobody writes into it).
   */
  constructor(upstream: ProbeOwner, query: Uint8Array) {
    this.#upstream = upstream;
    const questionEnd = skipUncompressedName(query, HEADER_SIZE, query.length) + 4;
    this.exchange = new Exchange(query, questionEnd, this, "probe");
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
