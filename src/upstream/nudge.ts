/**
 * The nudge against Nagle holds, DoT's own: when to send a server a segment whose ACK
 * releases the answers it holds back, and which exchange it is for. The connection
 * (`stream_connection.ts`) writes the nudge; this module decides, keeps the ledger of the
 * answers expected to nudges ({@linkcode Echoes}), and keeps the upstream's budget for nudges
 * that cost the server a query.
 *
 * A server that holds small writes under Nagle's algorithm (Unbound's DoT does) holds every
 * answer after the first until the client acknowledges, and Linux delays that ACK by up to
 * 40 ms when the client has nothing to send. A nudge is the first octet of the next frame's
 * length prefix alone (the segment carries the ACK, the held answers come at once, and the
 * server waits for the rest of the frame with nothing to answer); when that octet is out
 * already, the oldest query is written again under the same ID, and the echo of the
 * duplicate is ignored.
 *
 * @module
 */

import type { Exchange } from "./exchange.ts";

/**
 * How long after its last write a connection may still have an answer held on it. A server
 * under Nagle's algorithm holds an answer while an earlier one is unacknowledged; the client's
 * ACK for it leaves at the latest after Linux's 40 ms delayed-ACK timer, so 50 ms after a write
 * made with answers pending (or a nudge, or the handshake's session tickets) the connection is
 * clean again: a query written on it then is answered at once (measured: p50 1.2 ms with two
 * busy connections, 0.33 ms with one query per clean connection; bench/README.md).
 */
export const REST_MS = 50;

/**
 * How long (at least; four times the connection's fastest answer if more) a connection may
 * owe the server an ACK before it is nudged: when queries are still in flight that long
 * after the last read with no write since.
 */
export const NUDGE_MS = 2;

/**
 * An idle connection whose last write was a nudge's lone length octet gets the rest of that
 * frame this long after the write (see `StreamConnection.completePendingFrame`).
 */
export const COMPLETE_FRAME_AFTER_MS = 100;

/**
 * Nudge at read time only while the upstream owes this few answers in all (light load): under
 * load, the stream of writes carries the ACKs, and a nudge would cost a query for nothing
 * (measured: saturation qps 14.3k with nudges at any load against 19.4k without).
 */
export const NUDGE_ON_READ_MAX_OUTSTANDING = 4;
/**
 * Most nudges per exchange: a second and a third cover a server that left a query unread in
 * its buffer until more bytes came (seen once in a capture of Unbound).
 */
const MAX_NUDGES = 3;
/**
 * Only a query younger than this is nudged. A held answer is released by this side's delayed
 * ACK within 40 ms anyway, and a query still unanswered after that is most likely one the
 * upstream is still resolving (a cache miss at a recursive resolver takes 10-500 ms), where a
 * duplicate would only add load: measured with answers taking 400 ms, nudging at any age
 * asked the upstreams 1.9-2.1 times per question.
 */
const NUDGE_MAX_AGE_MS = REST_MS;
/**
 * Nudges that write a query again are paid for from a budget (the lone length octet costs the
 * server nothing and needs none): each query written earns this share of one, and at most
 * {@linkcode NUDGE_BURST} can be saved up. Whatever the traffic, duplicates stay under a fifth
 * of the queries an upstream's connections carry. The budget is the upstream's, shared by its
 * connections, so a connection no longer written to under load can still be nudged for its
 * held answers (measured: 8-19% more saturation qps than with a budget per connection).
 * Measured: with every answer taking 400 ms the upstream was asked 1.26 times per question
 * (hedges included; 1.9-2.1 with no budget); a share of a twentieth was too small (answers
 * held after a burst waited out the 40 ms delayed ACK: p99 43 ms, against 2.6-5 ms with a
 * fifth, at 2,000 qps).
 */
const NUDGE_SHARE = 0.2;
/** Most nudges an upstream's connections can save up between them (see {@linkcode NUDGE_SHARE}). */
export const NUDGE_BURST = 16;

/**
 * The nudges an upstream's connections may still make, earned and spent by all of them (see
 * {@linkcode NUDGE_SHARE}).
 *
 * @example
 * ```ts
 * import { NudgeBudget } from "./nudge.ts";
 * const budget = new NudgeBudget();
 * budget.spend();
 * budget.earn(); // every query written earns a fifth of a nudge
 * budget.available; // true
 * ```
 */
export class NudgeBudget {
  /** Nudges left; starts full. */
  tokens: number;

  /** Creates a budget with `tokens` to spend (default {@linkcode NUDGE_BURST}). */
  constructor(tokens: number = NUDGE_BURST) {
    this.tokens = tokens;
  }

  /** A query was written: earns a share of a nudge. */
  earn(): void {
    if (this.tokens < NUDGE_BURST) this.tokens += NUDGE_SHARE;
  }

  /** True when a duplicate query can be paid for. */
  get available(): boolean {
    return this.tokens >= 1;
  }

  /** A duplicate query was written. */
  spend(): void {
    this.tokens--;
  }
}

/**
 * The answers a connection expects to its own nudges (a duplicate query's second answer, a
 * frame-completing filler's answer), by wire ID: read and ignored, and their IDs not given to
 * new queries meanwhile. Bounded: past 1,024 IDs it forgets them all (an echo then reads as a
 * late answer, which is harmless).
 *
 * @example
 * ```ts
 * import { Echoes } from "./nudge.ts";
 * const echoes = new Echoes();
 * echoes.expect(0x1234);
 * echoes.take(0x1234); // true: ours, ignore it
 * echoes.take(0x1234); // false
 * ```
 */
export class Echoes {
  readonly #pending = new Map<number, number>();
  /** Echoes read so far: reads that, like answers, may call for a nudge. */
  read = 0;

  /** One more answer under `id` is an echo. */
  expect(id: number): void {
    if (this.#pending.size > 1024) this.#pending.clear();
    this.#pending.set(id, (this.#pending.get(id) ?? 0) + 1);
  }

  /** True when an answer under `id` is still expected (the ID is not free). */
  has(id: number): boolean {
    return this.#pending.has(id);
  }

  /** True (and counted read) when an answer under `id` is an expected echo. */
  take(id: number): boolean {
    const left = this.#pending.get(id);
    if (left === undefined) return false;
    if (left <= 1) this.#pending.delete(id);
    else this.#pending.set(id, left - 1);
    this.read++;
    return true;
  }
}

/** What a connection needs to nudge: the upstream's budget and load; null when it does not. */
export interface Nudging {
  /** The upstream's budget, shared by its connections. */
  readonly budget: NudgeBudget;
  /** Questions the upstream owes answers to, over all its connections (its load). */
  outstanding(): number;
  /** Pads the filler that completes a nudge's frame like a padded health probe. */
  readonly padFiller: boolean;
}

/**
 * The exchange to nudge right after a read, or null: the oldest still young, written before
 * `onWire` (the read, or the last write issued, whichever came first: its answer may be held)
 * and not nudged since.
 */
export function nudgeOnRead(
  inflight: Iterable<Exchange>,
  onWire: number,
  now: number,
): Exchange | null {
  for (const exchange of inflight) {
    if (exchange.sentAt > onWire) break;
    if (
      exchange.ended || exchange.nudges >= MAX_NUDGES || exchange.nudgedAt > onWire ||
      now - exchange.sentAt >= NUDGE_MAX_AGE_MS
    ) continue;
    return exchange;
  }
  return null;
}

/**
 * At the nudge timer: the exchange to nudge now (the oldest young one whose answer is later
 * than `patience` allows), `"later"` when some young exchange may need one later (re-arm),
 * or null when none will.
 */
export function nudgeOnTimer(
  inflight: Iterable<Exchange>,
  now: number,
  minRttMs: number,
): Exchange | "later" | null {
  // Held answers inflate the average RTT; the fastest answer seen says what prompt is.
  const patience = Math.max(NUDGE_MS, 4 * minRttMs);
  let young = false;
  for (const exchange of inflight) {
    if (exchange.ended || exchange.nudges >= MAX_NUDGES) continue;
    if (now - exchange.sentAt >= NUDGE_MAX_AGE_MS) continue;
    young = true;
    if (now - Math.max(exchange.sentAt, exchange.nudgedAt) < patience) {
      if (exchange.nudgedAt === 0) break;
      continue;
    }
    return exchange;
  }
  return young ? "later" : null;
}
