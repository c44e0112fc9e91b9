/**
 * The statistics hooks of the upstream layer, bound once per upstream so that the hot path
 * only bumps numbers, and a null object that records nothing.
 *
 * @module
 */

import { UPSTREAM_ERROR_REASONS, type UpstreamErrorReason } from "./errors.ts";

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
  /** A connection attempt completed its handshake (`ok`) or failed. */
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

/**
 * Statistics hooks that record nothing.
 *
 * @example
 * ```ts
 * import { NO_UPSTREAM_STATS } from "./stats.ts";
 * NO_UPSTREAM_STATS("192.0.2.1:853").answered(0.01); // recorded nowhere
 * ```
 */
export const NO_UPSTREAM_STATS: UpstreamStatsFactory = (): UpstreamStats => ({
  answered() {},
  error() {},
  handshake() {},
  reconnect() {},
  hedge() {},
  retry() {},
  healthCheck() {},
});
