/**
 * Which upstream a question goes to next (`--strategy`). Every policy first narrows the
 * choice to the upstreams worth asking: not down, not excluded (tried already for this
 * question), and, when any other is left, not slow (an attempt recently passed its timeout
 * there). Only then does the strategy pick.
 *
 * @module
 */

import type { Strategy } from "../config.ts";

/** What a policy reads of an upstream. */
export interface Candidate {
  /** Position in the configured list (bit `1 << index` in an exclusion mask). */
  readonly index: number;
  /** False when down. */
  readonly usable: boolean;
  /** True when an attempt on it recently passed its timeout. */
  readonly slow: boolean;
  /** Exchanges in flight on it. */
  readonly outstanding: number;
  /** Clock time it was last chosen. */
  lastChosenAt: number;
  /** Its recent answer times. */
  readonly latency: { readonly srtt: number; readonly samples: number };
}

/** Picks an upstream. */
export interface Policy {
  /** The strategy's name. */
  readonly name: Strategy;
  /**
   * The upstream for the next attempt, skipping those whose bit is set in `exclude`;
   * null when none is worth asking.
   */
  choose<C extends Candidate>(upstreams: readonly C[], exclude: number, now: number): C | null;
}

/** Randomness in [0, 1); tests pass a fixed sequence. */
export type Random = () => number;

/** One choice in this many, `fastest` asks another upstream to keep its latency known. */
const EXPLORE_EVERY = 32;

/** Candidates in a reused array: the worth-asking tier, slow ones only if nothing else. */
function candidates<C extends Candidate>(
  upstreams: readonly C[],
  exclude: number,
  out: C[],
): C[] {
  out.length = 0;
  let slow = 0;
  for (const upstream of upstreams) {
    if (!upstream.usable || (exclude & (1 << upstream.index)) !== 0) continue;
    if (upstream.slow) {
      slow++;
      continue;
    }
    out.push(upstream);
  }
  if (out.length === 0 && slow > 0) {
    for (const upstream of upstreams) {
      if (upstream.usable && upstream.slow && (exclude & (1 << upstream.index)) === 0) {
        out.push(upstream);
      }
    }
  }
  return out;
}

/**
 * Creates the policy for `strategy`.
 *
 * - `least-outstanding`: the fewest exchanges in flight; ties to the first in the list.
 * - `fastest`: the lowest smoothed answer time; one choice in 32 goes to the upstream chosen
 *   least recently, so a recovered or faster-again upstream is noticed.
 * - `round-robin`: each in turn (spreads what each upstream learns about you).
 * - `failover`: the first worth asking in the order given; back to it as soon as it answers.
 * - `random`: uniformly at random.
 *
 * @example
 * ```ts ignore
 * const policy = createPolicy("fastest");
 * const upstream = policy.choose(pool.upstreams, 0, clock.now());
 * ```
 */
export function createPolicy(strategy: Strategy, random: Random = Math.random): Policy {
  const scratch: Candidate[] = [];
  let cursor = 0;
  let choices = 0;
  const pick = <C extends Candidate>(chosen: C | null, now: number): C | null => {
    if (chosen !== null) chosen.lastChosenAt = now;
    return chosen;
  };
  switch (strategy) {
    case "least-outstanding":
      return {
        name: strategy,
        choose(upstreams, exclude, now) {
          const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
          let best = null;
          for (const upstream of list) {
            if (best === null || upstream.outstanding < best.outstanding) best = upstream;
          }
          return pick(best, now);
        },
      };
    case "fastest":
      return {
        name: strategy,
        choose(upstreams, exclude, now) {
          const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
          if (list.length === 0) return null;
          if (list.length > 1 && ++choices % EXPLORE_EVERY === 0) {
            let stalest = list[0];
            for (const upstream of list) {
              if (upstream.lastChosenAt < stalest.lastChosenAt) stalest = upstream;
            }
            return pick(stalest, now);
          }
          let best = list[0];
          for (const upstream of list) {
            // An upstream never timed yet goes first: that is how it gets timed.
            const time = upstream.latency.samples === 0 ? -1 : upstream.latency.srtt;
            const bestTime = best.latency.samples === 0 ? -1 : best.latency.srtt;
            if (time < bestTime) best = upstream;
          }
          return pick(best, now);
        },
      };
    case "round-robin":
      return {
        name: strategy,
        choose(upstreams, exclude, now) {
          const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
          if (list.length === 0) return null;
          cursor = (cursor + 1) % 1_000_000;
          return pick(list[cursor % list.length], now);
        },
      };
    case "failover":
      return {
        name: strategy,
        choose(upstreams, exclude, now) {
          const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
          return pick(list[0] ?? null, now);
        },
      };
    case "random":
      return {
        name: strategy,
        choose(upstreams, exclude, now) {
          const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
          if (list.length === 0) return null;
          return pick(list[Math.min(list.length - 1, Math.floor(random() * list.length))], now);
        },
      };
  }
}
