/**
 * A pool's own record of one question it is getting answered: the resolver's
 * {@linkcode UpstreamRequest} plus what the pool keeps about it (the exchanges out, which
 * upstreams were tried, the hedge, the answer held for failover, the timer). The pool may
 * put the question on the wire several times at once or in turn (an {@linkcode Exchange}
 * each: retry, hedge, failover); the first good answer settles it.
 *
 * @module
 */

import type { ResponseInfo } from "../dns/message.ts";
import type { Timed } from "../timers.ts";
import type { UpstreamError } from "./errors.ts";
import type { Exchange, ExchangeWaiter } from "./exchange.ts";
import type { UpstreamRequest } from "./forwarder.ts";

/** What drives a pool request: hears its timer and how its exchanges ended (the pool). */
export interface PoolRequestDriver {
  /** The request's timer is due. */
  requestTimer(request: PoolRequest, now: number): void;
  /** `exchange`, an attempt at `request`, got a valid answer (`info` valid during the call). */
  attemptAnswered(
    request: PoolRequest,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
  ): void;
  /** `exchange`, an attempt at `request`, failed. */
  attemptFailed(request: PoolRequest, exchange: Exchange, error: UpstreamError): void;
}

/**
 * One question in a pool. Settles its {@linkcode UpstreamRequest} exactly once.
 *
 * @example
 * ```ts ignore
 * const pending = new PoolRequest(request, message, pool);
 * const exchange = new Exchange(pending.message, pending.questionEnd, pending, "query");
 * ```
 */
export class PoolRequest implements Timed, ExchangeWaiter {
  /** The resolver's request. */
  readonly request: UpstreamRequest;
  /** The message each exchange sends (the request's query, padded when the pool pads). */
  readonly message: Uint8Array;
  /** Offset just past the question in `message`. */
  readonly questionEnd: number;
  /** Clock time after which the request fails with a timeout. */
  readonly deadline: number;
  /** True once settled. */
  done = false;
  /** Exchanges started and not finished. */
  exchanges: Exchange[] = [];
  /** Bit i set: upstream i was tried. */
  tried = 0;
  /** Exchanges started in all. */
  started = 0;
  /** True once the hedge was decided on (sent, or refused by the budget). */
  hedged = false;
  /** The hedge, once sent (counted won or lost when the request settles). */
  hedge: Exchange | null = null;
  /** True once an answer's rcode made it try another upstream. */
  failedOver = false;
  /** Connections that died while it was alone on them, or suspected of it. */
  deaths = 0;
  /** Shared connections that closed under it, leaving it unanswered. */
  orphaned = 0;
  /** The last failure, reported when nothing better comes. */
  lastError: UpstreamError | null = null;
  /** An answer kept while another upstream is asked (failover on its rcode). */
  heldAnswer: Uint8Array | null = null;
  /** Who gave `heldAnswer`. */
  heldUpstream = "";
  /** The exchange that gave `heldAnswer`. */
  heldFrom: Exchange | null = null;
  /** See {@linkcode Timed}. */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** See {@linkcode Timed}. */
  timerSlot: number = -1;
  readonly #driver: PoolRequestDriver;

  /** Creates the pool's record of `request`, whose exchanges send `message`. */
  constructor(request: UpstreamRequest, message: Uint8Array, driver: PoolRequestDriver) {
    this.request = request;
    this.message = message;
    this.questionEnd = request.questionEnd;
    this.deadline = request.deadline;
    this.#driver = driver;
  }

  /** Called by the pool's timer queue. */
  onTimer(now: number): void {
    if (!this.done) this.#driver.requestTimer(this, now);
  }

  /** See {@linkcode ExchangeWaiter}. */
  exchangeAnswered(exchange: Exchange, response: Uint8Array, info: ResponseInfo): void {
    if (!this.done) this.#driver.attemptAnswered(this, exchange, response, info);
  }

  /** See {@linkcode ExchangeWaiter}. */
  exchangeFailed(exchange: Exchange, error: UpstreamError): void {
    if (!this.done) this.#driver.attemptFailed(this, exchange, error);
  }

  /** Settles with an answer; ignored once settled. */
  settleAnswer(response: Uint8Array, upstream: string, info: ResponseInfo | null): void {
    if (this.done) return;
    this.done = true;
    this.request.settleAnswer(response, upstream, info);
  }

  /** Settles with a failure; ignored once settled. */
  settleFailure(error: UpstreamError): void {
    if (this.done) return;
    this.done = true;
    this.request.settleFailure(error);
  }
}
