/**
 * The fake forwarder of the tests: stands where the upstream pool stands behind the
 * resolver, and answers when the test says so, with real DNS bytes.
 *
 * @module
 */

import { UpstreamError } from "../../src/upstream/errors.ts";
import type { Forwarder, UpstreamRequest } from "../../src/upstream/forwarder.ts";
import { answerFor, parseMessage } from "./dns.ts";

/** Options of {@linkcode FakeForwarder}. */
export interface FakeForwarderOptions<S> {
  /**
   * Which requests to hold, by question name; the others are answered a turn later (label
   * "instant"). Default: hold every request.
   */
  hold?: (name: string) => boolean;
  /**
   * Builds the answer to a query, shaped by what the test passes to `answer` (default: the
   * test upstream's answer, {@linkcode answerFor}).
   */
  respond?: (query: Uint8Array, shape?: S) => Uint8Array;
}

/**
 * Holds the requests it is given until the test answers or fails them: one by one by index
 * (`answer`, `fail`), or the oldest first (`release`). Closing it answers what is left.
 */
export class FakeForwarder<S = undefined> implements Forwarder {
  /** Every request held, in the order forwarded (answered or not). */
  readonly requests: UpstreamRequest[] = [];
  /** Requests held and not answered yet, oldest first. */
  readonly pending: UpstreamRequest[] = [];
  /** Requests forwarded in all (held or not). */
  forwarded = 0;
  readonly #hold: ((name: string) => boolean) | undefined;
  readonly #respond: (query: Uint8Array, shape?: S) => Uint8Array;

  /** A forwarder holding the requests `options.hold` picks (all by default). */
  constructor(options: FakeForwarderOptions<S> = {}) {
    this.#hold = options.hold;
    this.#respond = options.respond ?? answerFor;
  }

  /** Holds `request`, or answers it a turn later when `hold` does not pick it. */
  forward(request: UpstreamRequest): void {
    this.forwarded++;
    const hold = this.#hold;
    if (hold && !hold(parseMessage(request.query).question?.name ?? "")) {
      queueMicrotask(() => request.settleAnswer(answerFor(request.query), "instant", null));
      return;
    }
    this.requests.push(request);
    this.pending.push(request);
  }

  /** Answers request `i` with a response shaped by `shape`; returns the bytes sent. */
  answer(i: number, shape?: S): Uint8Array {
    const request = this.#take(i);
    const response = this.#respond(request.query, shape);
    request.settleAnswer(response.slice(), "fake", null);
    return response;
  }

  /** Fails request `i` as no upstream answering. */
  fail(i: number, reason: "timeout" | "unavailable" = "unavailable"): void {
    this.#take(i).settleFailure(new UpstreamError(reason, "no upstream answered", "fake"));
  }

  /** Answers the `count` oldest requests not answered yet (all by default). */
  release(count = this.pending.length): void {
    for (const request of this.pending.splice(0, count)) {
      request.settleAnswer(this.#respond(request.query), "held", null);
    }
  }

  /** Answers what is left. */
  close(): void {
    this.release();
  }

  #take(i: number): UpstreamRequest {
    const request = this.requests[i];
    const at = this.pending.indexOf(request);
    if (at >= 0) this.pending.splice(at, 1);
    return request;
  }
}

/** A forwarder that answers every request the way the test upstream does, a turn later. */
export class InstantForwarder extends FakeForwarder {
  /** Holds nothing. */
  constructor() {
    super({ hold: () => false });
  }
}
