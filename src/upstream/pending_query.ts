/**
 * One client query on its way through the upstream layer: its bytes, its deadline, where
 * it is in flight, and how its outcome is reported: to a subclass's `onComplete`/`onFail`
 * hooks (the resolver's hot path, no promise at all), or through `promise`, made on demand.
 *
 * @module
 */

import type { Answer, UpstreamError } from "./types.ts";

const EMPTY = new Uint8Array(0);

/** Where a query is in flight; implemented by a DoT connection. */
export interface QueryCarrier {
  /** Forgets the query (its deadline passed), freeing its ID. */
  detach(query: PendingQuery): void;
}

/**
 * A query waiting for its answer. Settles exactly once: with itself as the
 * {@linkcode Answer}, or with an error.
 */
export class PendingQuery implements Answer {
  /** The client's query, unmodified (client's ID inside). */
  readonly query: Uint8Array;
  /** Offset just past the question in `query`. */
  readonly questionEnd: number;
  /** `performance.now()` time after which the query fails with a timeout (set on submit). */
  deadline: number;
  /** The answer, once complete. */
  response: Uint8Array = EMPTY;
  /** The upstream it was last sent to; once complete, the one that answered. */
  upstream = "";
  /** True once settled. */
  done = false;
  /** How many times it was (re)sent. */
  attempts = 0;
  /** True once written a second time on its connection to nudge a Nagle-bound server. */
  nudged = false;
  /** Where it is in flight now, if anywhere. */
  carrier: QueryCarrier | null = null;
  /** The ID it carries on its current connection. */
  wireId: number = -1;
  /** When it was last written, for upstream latency. */
  sentAt = 0;
  /** The most recent failure, reported if the deadline passes. */
  lastError: UpstreamError | null = null;
  /** The failure, once failed. */
  error: UpstreamError | null = null;
  #promise: Promise<Answer> | undefined;
  #resolve: ((answer: Answer) => void) | undefined;
  #reject: ((error: UpstreamError) => void) | undefined;

  /** Creates a pending query. */
  constructor(query: Uint8Array, questionEnd: number, deadline = 0) {
    this.query = query;
    this.questionEnd = questionEnd;
    this.deadline = deadline;
  }

  /** Settles with this query (as the {@linkcode Answer}) or its error; made on first use. */
  get promise(): Promise<Answer> {
    if (this.#promise === undefined) {
      if (this.done) {
        this.#promise = this.error ? Promise.reject(this.error) : Promise.resolve(this);
      } else {
        this.#promise = new Promise<Answer>((resolve, reject) => {
          this.#resolve = resolve;
          this.#reject = reject;
        });
      }
    }
    return this.#promise;
  }

  /** Called once when answered; subclasses override it to avoid a promise per query. */
  protected onComplete(): void {}

  /** Called once when failed. */
  protected onFail(_error: UpstreamError): void {}

  /** Settles with `response` from `upstream`. Ignored when already settled. */
  complete(response: Uint8Array, upstream: string): void {
    if (this.done) return;
    this.done = true;
    this.carrier = null;
    this.response = response;
    this.upstream = upstream;
    this.onComplete();
    this.#resolve?.(this);
  }

  /** Settles with `error`. Ignored when already settled. */
  fail(error: UpstreamError): void {
    if (this.done) return;
    this.done = true;
    this.carrier?.detach(this);
    this.carrier = null;
    this.error = error;
    this.onFail(error);
    this.#reject?.(error);
  }
}
