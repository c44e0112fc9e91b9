/**
 * One question to be answered by some upstream before a deadline: what the resolver hands
 * the upstream layer. The pool may put it on the wire several times at once or in turn
 * (an {@linkcode Exchange} each: retry, hedge, failover); the first good answer settles it.
 *
 * The resolver subclasses it (one object per question, no promise), and so can a test.
 *
 * @module
 */

import type { ResponseInfo } from "../dns/message.ts";
import type { Timed } from "../timers.ts";
import type { Exchange } from "./exchange.ts";
import type { AnswerSink, UpstreamError } from "./types.ts";

/** What drives a request's timer (the pool). */
export interface RequestDriver {
  /** The request's timer is due. */
  requestTimer(request: UpstreamRequest, now: number): void;
}

/**
 * A question on its way through the upstream layer. Settles exactly once, through
 * {@linkcode UpstreamRequest.onAnswer} or {@linkcode UpstreamRequest.onFailure}.
 *
 * @example
 * ```ts ignore
 * class Question extends UpstreamRequest {
 *   protected onAnswer(response: Uint8Array, upstream: string) { ... }
 *   protected onFailure(error: UpstreamError) { ... }
 * }
 * pool.forward(new Question(message, questionEnd, clock.now() + 4000));
 * ```
 */
export abstract class UpstreamRequest implements AnswerSink, Timed {
  /** The message to send upstream; each exchange writes its own ID over its copy on the wire. */
  readonly query: Uint8Array;
  /** Offset just past the question in `query`. */
  readonly questionEnd: number;
  /** Clock time after which the request fails with a timeout. */
  deadline: number;
  /** True once settled. */
  done = false;

  // State of the driver (the pool); nothing else touches it.
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
  /** Connections that died while it was on them (a query of death kills every one). */
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
  /** The driver, while in flight. */
  driver: RequestDriver | null = null;
  /** See {@linkcode Timed}. */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** See {@linkcode Timed}. */
  timerSlot: number = -1;

  /** Creates a request for `query` (question ending at `questionEnd`) due by `deadline`. */
  constructor(query: Uint8Array, questionEnd: number, deadline: number) {
    this.query = query;
    this.questionEnd = questionEnd;
    this.deadline = deadline;
  }

  /** Called by the driver's timer queue. */
  onTimer(now: number): void {
    this.driver?.requestTimer(this, now);
  }

  /** Settles with an answer; ignored once settled. */
  settleAnswer(response: Uint8Array, upstream: string, info: ResponseInfo | null): void {
    if (this.done) return;
    this.done = true;
    this.driver = null;
    this.onAnswer(response, upstream, info);
  }

  /** Settles with a failure; ignored once settled. */
  settleFailure(error: UpstreamError): void {
    if (this.done) return;
    this.done = true;
    this.driver = null;
    this.onFailure(error);
  }

  /** The answer, as the upstream sent it (any ID); `info` describes it when not null. */
  protected abstract onAnswer(
    response: Uint8Array,
    upstream: string,
    info: ResponseInfo | null,
  ): void;

  /** No answer. */
  protected abstract onFailure(error: UpstreamError): void;
}
