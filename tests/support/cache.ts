/**
 * Cache settings shared by the tests and benchmarks that build a {@linkcode Resolver} by hand:
 * a small cache with every feature on (serve-stale, prefetch), the TTL clamps out of the way.
 *
 * @module
 */

import type { ResolverOptions } from "../../src/resolver.ts";

/** 100 entries, no TTL clamps, a day of serve-stale, prefetch on, stale after 1.8 s. */
export const TEST_CACHE: Readonly<NonNullable<ResolverOptions["cache"]>> = {
  maxEntries: 100,
  minTtl: 0,
  maxTtl: 86_400,
  maxNegativeTtl: 3600,
  serveStaleSeconds: 86_400,
  prefetch: true,
  staleAnswerTimeoutMs: 1800,
};
