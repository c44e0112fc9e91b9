/**
 * The small interface between the resolver and whatever forwards its queries, plus the
 * typed errors and the statistics hooks of the upstream layer.
 *
 * @module
 */

import type { PendingQuery } from "./pending_query.ts";

/** Why a query could not be answered by an upstream. */
export type UpstreamErrorReason =
  | "timeout"
  | "tls"
  | "refused"
  | "reset"
  | "bad_response"
  | "unavailable";

/** Every {@linkcode UpstreamErrorReason}, for metrics that want all series present. */
export const UPSTREAM_ERROR_REASONS: readonly UpstreamErrorReason[] = [
  "timeout",
  "tls",
  "refused",
  "reset",
  "bad_response",
  "unavailable",
];

/** A failure to get an answer from the upstreams, with the reason and where. */
export class UpstreamError extends Error {
  /** The failure class, as used in metrics. */
  readonly reason: UpstreamErrorReason;
  /** The upstream involved, when there was one. */
  readonly upstream: string | undefined;

  /** Creates an error for `reason` at `upstream`. */
  constructor(reason: UpstreamErrorReason, message: string, upstream?: string) {
    super(message);
    this.name = "UpstreamError";
    this.reason = reason;
    this.upstream = upstream;
  }
}

/** An upstream's answer: the response bytes (client's ID restored) and who answered. */
export interface Answer {
  /** The response, byte for byte as the upstream sent it apart from the ID. */
  readonly response: Uint8Array;
  /** The label of the upstream that answered. */
  readonly upstream: string;
}

/**
 * Forwards one query and resolves with its answer, or rejects with an
 * {@linkcode UpstreamError} once the query's deadline has passed or no upstream can take it.
 *
 * @example
 * ```ts
 * import type { Forwarder } from "./types.ts";
 * // A fake upstream for tests: echo the query back as a response.
 * const echo: Forwarder = {
 *   forward(query) {
 *     const response = query.slice();
 *     response[2] |= 0x80;
 *     return Promise.resolve({ response, upstream: "echo" });
 *   },
 *   close() {},
 * };
 * ```
 */
export interface Forwarder {
  /**
   * Sends `query` (whose question ends at `questionEnd`) upstream. The bytes are not
   * modified; the caller may reuse them once the promise settles.
   */
  forward(query: Uint8Array, questionEnd: number): Promise<Answer>;
  /**
   * Optional fast path: sends a caller-made pending query that reports through its own
   * `onComplete`/`onFail` hooks, so no promise is made per query.
   */
  submit?(pending: PendingQuery): void;
  /** Stops everything and releases every connection and timer. */
  close(): void | Promise<void>;
}

/** Statistics hooks for one upstream, bound once so the hot path only bumps numbers. */
export interface UpstreamStats {
  /** A query was answered after `seconds` on the wire. */
  answered(seconds: number): void;
  /** A query or connection failed for `reason`. */
  error(reason: UpstreamErrorReason): void;
  /** A TLS handshake completed (`ok`) or failed. */
  handshake(ok: boolean): void;
  /** A connection was opened to replace one that closed or broke. */
  reconnect(): void;
}

/** Creates the statistics hooks of one upstream. */
export type UpstreamStatsFactory = (upstream: string) => UpstreamStats;

/** Statistics hooks that record nothing. */
export const NO_UPSTREAM_STATS: UpstreamStatsFactory = (): UpstreamStats => ({
  answered() {},
  error() {},
  handshake() {},
  reconnect() {},
});
