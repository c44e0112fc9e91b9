/**
 * Which upstream a question goes to next (`--strategy`). Every policy first narrows the
 * choice to the upstreams worth asking: not down, not excluded (tried already for this
 * question), and, when any other is left, neither slow (an attempt recently passed its
 * timeout there) nor still connecting (no open connection, a handshake under way: a tarpit or
 * a black hole looks like that until its connect timeout). Only then does the strategy pick.
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
  /** True when it has no open connection and is opening one. */
  readonly connecting: boolean;
  /**
   * Queries on its connections still owed an answer, those whose question was answered
   * elsewhere first included: what the server has not answered yet, whoever still waits.
   */
  readonly load: number;
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

/**
 * Candidates in a reused array: the worth-asking tier; slow or still-connecting ones only if
 * nothing else is left.
 */
function candidates<C extends Candidate>(
  upstreams: readonly C[],
  exclude: number,
  out: C[],
): C[] {
  out.length = 0;
  let doubtful = 0;
  for (const upstream of upstreams) {
    if (!upstream.usable || (exclude & (1 << upstream.index)) !== 0) continue;
    if (upstream.slow || upstream.connecting) {
      doubtful++;
      continue;
    }
    out.push(upstream);
  }
  if (out.length === 0 && doubtful > 0) {
    for (const upstream of upstreams) {
      if (upstream.usable && (exclude & (1 << upstream.index)) === 0) out.push(upstream);
    }
  }
  return out;
}

/**
 * True when `a`'s smoothed answer time is below `b`'s by more than a quarter of `b`'s and a
 * millisecond: a difference that is not noise. Between upstreams that are about as fast, the
 * order given decides, so traffic does not flip between them with every sample (which would
 * spread it over more connections, each then carrying writes too rarely to keep a
 * Nagle-bound server's answers moving; see `SPREAD_THRESHOLD` in upstream.ts).
 */
export function clearlyFaster(a: Candidate, b: Candidate): boolean {
  if (a.latency.samples === 0 || b.latency.samples === 0) return false;
  return a.latency.srtt + Math.max(1, 0.25 * b.latency.srtt) < b.latency.srtt;
}

/**
 * Creates the policy for `strategy`.
 *
 * - `least-outstanding`: the fewest queries owed an answer; among equals, one never timed yet
 *   (that is how it gets timed), then the clearly faster (see {@linkcode clearlyFaster}),
 *   else the first in the list. Traffic stays on one upstream while it keeps up, moves the
 *   moment it owes answers (a frozen or slow one does at once), and goes to the nearer of
 *   two when they are idle.
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
  const pick = PICKERS[strategy](random);
  return {
    name: strategy,
    choose(upstreams, exclude, now) {
      if (upstreams.length === 1) {
        // Every strategy picks the only one worth asking (slow or connecting included).
        const only = upstreams[0];
        if (!only.usable || (exclude & (1 << only.index)) !== 0) return null;
        only.lastChosenAt = now;
        return only;
      }
      const list = candidates(upstreams, exclude, scratch as typeof upstreams[number][]);
      if (list.length === 0) return null;
      const chosen = pick(list);
      chosen.lastChosenAt = now;
      return chosen;
    },
  };
}

/** A strategy's choice among candidates (never none); its state lives in its closure. */
type Pick = <C extends Candidate>(list: readonly C[]) => C;

/** Each strategy, as the maker of its {@linkcode Pick} (once per policy). */
const PICKERS: Record<Strategy, (random: Random) => Pick> = {
  "least-outstanding": () => leastOutstanding,
  fastest: () => {
    let choices = 0;
    // Now and then the least recently chosen, so a recovered or faster-again one is noticed.
    return (list) =>
      list.length > 1 && ++choices % EXPLORE_EVERY === 0 ? stalest(list) : fastest(list);
  },
  "round-robin": () => {
    let cursor = 0;
    return (list) => {
      cursor = (cursor + 1) % 1_000_000;
      return list[cursor % list.length];
    };
  },
  failover: () => (list) => list[0],
  random: (random) => (list) => list[Math.min(list.length - 1, Math.floor(random() * list.length))],
};

/**
 * The fewest queries owed an answer; among equals one never timed yet, then the clearly
 * faster, else the first.
 */
function leastOutstanding<C extends Candidate>(list: readonly C[]): C {
  let best = list[0];
  for (const upstream of list) {
    if (
      upstream.load < best.load ||
      (upstream.load === best.load &&
        ((upstream.latency.samples === 0 && best.latency.samples > 0) ||
          clearlyFaster(upstream, best)))
    ) best = upstream;
  }
  return best;
}

/** The lowest smoothed answer time; an upstream never timed yet goes first. */
function fastest<C extends Candidate>(list: readonly C[]): C {
  let best = list[0];
  for (const upstream of list) {
    // An upstream never timed yet goes first: that is how it gets timed.
    const time = upstream.latency.samples === 0 ? -1 : upstream.latency.srtt;
    const bestTime = best.latency.samples === 0 ? -1 : best.latency.srtt;
    if (time < bestTime) best = upstream;
  }
  return best;
}

/** The one chosen least recently. */
function stalest<C extends Candidate>(list: readonly C[]): C {
  let best = list[0];
  for (const upstream of list) {
    if (upstream.lastChosenAt < best.lastChosenAt) best = upstream;
  }
  return best;
}
