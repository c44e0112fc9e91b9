/**
 * The seam between the resolver and whatever gets its questions answered upstream.
 *
 * The resolver hands a {@linkcode Forwarder} one {@linkcode UpstreamRequest} per question
 * (its own object, a `Flight`); the forwarder settles it exactly once, by its deadline at the
 * latest, through {@linkcode UpstreamRequest.settleAnswer} or
 * {@linkcode UpstreamRequest.settleFailure}. An upstream set (`UpstreamPool`) is a
 * forwarder; so is a router that hands each question to the set of its zone (it reads the
 * question from `query` at offset 12 up to `questionEnd`), and so is a test's fake.
 *
 * The request carries no upstream state: a forwarder keeps what it needs (attempts, timers,
 * the padded copy of the message) in objects of its own.
 *
 * @example
 * ```ts
 * import type { Forwarder, UpstreamRequest } from "./forwarder.ts";
 * // A fake upstream for tests: answer every question with the query itself as a response.
 * const echo: Forwarder = {
 *   forward(request: UpstreamRequest) {
 *     const response = request.query.slice();
 *     response[2] |= 0x80;
 *     request.settleAnswer(response, "echo", null);
 *   },
 *   close() {},
 * };
 * ```
 *
 * @module
 */

import type { ResponseInfo } from "../dns/message.ts";
import type { UpstreamError } from "./errors.ts";

/**
 * One question to be answered upstream, as the resolver hands it over. Settled exactly once
 * by the forwarder it was given to; calls after the first are the request's own to ignore.
 */
export interface UpstreamRequest {
  /**
   * The message to send upstream: the client's header and question, and one OPT record
   * right after the question as its only additional record (`buildUpstreamQuery`), not
   * padded (padding is the upstream set's option). Each exchange writes its own ID over its
   * copy on the wire; nobody writes into this array.
   */
  readonly query: Uint8Array;
  /** Offset just past the question in `query`. */
  readonly questionEnd: number;
  /** Clock time by which the request must be settled (a timeout at the latest). */
  readonly deadline: number;
  /**
   * Set by a router for a question of a zone (`--zone`): its answer keeps the TTLs it came
   * with, not raised to `--cache-min-ttl`.
   */
  keepTtls?: boolean;
  /**
   * An answer, as the upstream sent it (any ID). `info` describes `response` when the
   * forwarder validated it (every section parses, the question matches); null when it did
   * not (a test's fake, an answer kept for failover), and then the receiver checks it.
   */
  settleAnswer(response: Uint8Array, upstream: string, info: ResponseInfo | null): void;
  /** No answer by the deadline, or no upstream could take it. */
  settleFailure(error: UpstreamError): void;
}

/** Gets questions answered upstream; see the module documentation. */
export interface Forwarder {
  /** Starts getting `request` answered; the outcome arrives through its settle methods. */
  forward(request: UpstreamRequest): void;
  /** Stops everything and releases every connection and timer. */
  close(): void | Promise<void>;
}
