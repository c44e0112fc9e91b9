/**
 * The small interface between the resolver and whatever forwards its questions upstream,
 * plus the typed errors and the statistics hooks of the upstream layer.
 *
 * @module
 */

import type { ResponseInfo } from "../dns/message.ts";
import type { UpstreamRequest } from "./request.ts";

/** Why an upstream attempt or question failed. */
export type UpstreamErrorReason =
  | "timeout"
  | "tls"
  | "refused"
  | "unreachable"
  | "reset"
  | "bad_response"
  | "unavailable";

/** Every {@linkcode UpstreamErrorReason}, for metrics that want all series present. */
export const UPSTREAM_ERROR_REASONS: readonly UpstreamErrorReason[] = [
  "timeout",
  "tls",
  "refused",
  "unreachable",
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

/**
 * Gets questions answered by upstreams. The resolver hands it {@linkcode UpstreamRequest}s;
 * each is settled exactly once through its own hooks, by its deadline at the latest. Tests
 * inject fakes through this interface.
 *
 * @example
 * ```ts ignore
 * // A fake upstream for tests: answer every question with the query itself as a response.
 * const echo: Forwarder = {
 *   forward(request) {
 *     const response = request.query.slice();
 *     response[2] |= 0x80;
 *     request.settleAnswer(response, "echo", null);
 *   },
 *   close() {},
 * };
 * ```
 */
export interface Forwarder {
  /** Starts getting `request` answered; the outcome arrives through its hooks. */
  forward(request: UpstreamRequest): void;
  /** Stops everything and releases every connection and timer. */
  close(): void | Promise<void>;
}

/** Why a question was sent to another upstream while it was being answered. */
export type RetryReason = UpstreamErrorReason | "slow" | "rcode" | "truncated";

/** Every {@linkcode RetryReason}. */
export const RETRY_REASONS: readonly RetryReason[] = [
  ...UPSTREAM_ERROR_REASONS,
  "slow",
  "rcode",
  "truncated",
];

/** Statistics hooks for one upstream, bound once so the hot path only bumps numbers. */
export interface UpstreamStats {
  /** An answer arrived after `seconds` on the wire. */
  answered(seconds: number): void;
  /** An attempt or connection failed for `reason`. */
  error(reason: UpstreamErrorReason): void;
  /** A connection attempt completed its TLS handshake (`ok`) or failed. */
  handshake(ok: boolean): void;
  /** A connection was opened to replace one that closed or broke with queries in flight. */
  reconnect(): void;
  /** A hedged attempt on this upstream answered first (`won`) or was beaten. */
  hedge(won: boolean): void;
  /** A question was moved away from this upstream for `reason`. */
  retry(reason: RetryReason): void;
  /** A health check of this upstream succeeded or failed. */
  healthCheck(ok: boolean): void;
}

/** Creates the statistics hooks of one upstream. */
export type UpstreamStatsFactory = (upstream: string) => UpstreamStats;

/** Statistics hooks that record nothing. */
export const NO_UPSTREAM_STATS: UpstreamStatsFactory = (): UpstreamStats => ({
  answered() {},
  error() {},
  handshake() {},
  reconnect() {},
  hedge() {},
  retry() {},
  healthCheck() {},
});

/** Receives the outcome of an {@linkcode UpstreamRequest}; see there. */
export interface AnswerSink {
  /** A valid answer: `info` describes `response` when the upstream layer analysed it. */
  settleAnswer(response: Uint8Array, upstream: string, info: ResponseInfo | null): void;
  /** No answer by the deadline, or no upstream could take it. */
  settleFailure(error: UpstreamError): void;
}
