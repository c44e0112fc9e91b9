/**
 * A question in flight to the upstreams on behalf of clients: the resolver's
 * {@linkcode UpstreamRequest}, which a forwarder settles once. Several client jobs can wait on one flight (concurrent misses
 * for the same key are coalesced), and a flight may have none at all (a prefetch). The
 * {@linkcode FlightTable} finds the flight already out for a key.
 *
 * @module
 */

import { HashChains, MAX_CHAIN } from "../cache/hash_chains.ts";
import type { ResponseInfo } from "../dns/message.ts";
import type { UpstreamError } from "../upstream/errors.ts";
import type { UpstreamRequest } from "../upstream/forwarder.ts";
import { sameQuestion } from "../dns/wire.ts";
import type { ClientJob } from "./job.ts";

/** Where a flight's outcome goes (the resolver). */
export interface FlightOwner {
  /** An answer arrived. */
  flightAnswered(
    flight: Flight,
    response: Uint8Array,
    upstream: string,
    info: ResponseInfo | null,
  ): void;
  /** No answer. */
  flightFailed(flight: Flight, error: UpstreamError): void;
}

/**
 * Most clients waiting on one flight. Later clients of the same key wait on a follower
 * ({@linkcode Flight.follower}), which is never sent upstream and settles when its leader
 * does: every client of a key shares one upstream question, however many there are. The
 * bound keeps the per-flight work linear (a waiter leaving for a stale answer is an
 * `indexOf` and a `splice` over the list): 1,000 clients of one slow name made 758 upstream
 * queries when the clients past the bound went upstream on their own (issue 23).
 */
export const MAX_WAITERS = 256;

/**
 * One question out to the upstreams.
 *
 * @example
 * ```ts ignore
 * const flight = new Flight(owner, upstreamMessage, questionEnd, deadline, keyQuery, hash, flags, job);
 * pool.forward(flight);
 * ```
 */
export class Flight implements UpstreamRequest {
  /** See {@linkcode UpstreamRequest}. */
  readonly query: Uint8Array;
  /** See {@linkcode UpstreamRequest}. */
  readonly questionEnd: number;
  /** See {@linkcode UpstreamRequest}. */
  readonly deadline: number;
  /** See {@linkcode UpstreamRequest.keepTtls}. */
  keepTtls = false;
  /** True once settled. */
  done = false;
  /** Clients waiting for it. */
  readonly waiters: ClientJob[];
  /** A message carrying the key's question (the first client's query). */
  readonly keyQuery: Uint8Array;
  /** The key's hash (`cacheKeyHash` of `dns/cache_key.ts`). */
  readonly hash: number;
  /** The key's flags. */
  readonly keyFlags: number;
  /** The next flight in the same bucket of the table. */
  chain: Flight | null = null;
  /** True while in the table. */
  registered = false;
  /** True when its answer may be cached (no client subnet, EDNS version 0, cache on). */
  cacheable = false;
  /**
   * A flight for the clients past {@linkcode MAX_WAITERS}: not sent upstream, registered in
   * this one's place, settled with this one's outcome.
   */
  follower: Flight | null = null;
  readonly #owner: FlightOwner;

  /** Creates a flight for the upstream-bound `message`, with `firstWaiter` waiting on it. */
  constructor(
    owner: FlightOwner,
    message: Uint8Array,
    questionEnd: number,
    deadline: number,
    keyQuery: Uint8Array,
    hash: number,
    keyFlags: number,
    firstWaiter: ClientJob | null = null,
  ) {
    this.query = message;
    this.questionEnd = questionEnd;
    this.deadline = deadline;
    // Sized for the one waiter most flights ever have: a push onto an empty array reserves
    // 17 slots, garbage for every question.
    this.waiters = firstWaiter === null ? [] : [firstWaiter];
    this.#owner = owner;
    this.keyQuery = keyQuery;
    this.hash = hash;
    this.keyFlags = keyFlags;
  }

  /** Hands the answer to the owner, once. */
  settleAnswer(response: Uint8Array, upstream: string, info: ResponseInfo | null): void {
    if (this.done) return;
    this.done = true;
    this.#owner.flightAnswered(this, response, upstream, info);
  }

  /** Hands the failure to the owner, once. */
  settleFailure(error: UpstreamError): void {
    if (this.done) return;
    this.done = true;
    this.#owner.flightFailed(this, error);
  }
}

/**
 * Flights out now, by key, for coalescing.
 *
 * @example
 * ```ts ignore
 * const flight = table.find(query, questionEnd, hash, flags);
 * ```
 */
export class FlightTable {
  readonly #table = new HashChains<Flight>(64);

  /** Flights registered. */
  get size(): number {
    return this.#table.size;
  }

  /** The flight out for the key of `query`, if any. */
  find(query: Uint8Array, questionEnd: number, hash: number, flags: number): Flight | null {
    let flight = this.#table.first(hash);
    while (flight !== null) {
      if (
        flight.hash === hash && flight.keyFlags === flags &&
        sameQuestion(flight.keyQuery, flight.questionEnd, query, questionEnd)
      ) return flight;
      flight = flight.chain;
    }
    return null;
  }

  /**
   * Registers `flight` under its key; false (not registered, so not joined by others) when
   * {@linkcode MAX_CHAIN} flights already share its hash, which bounds the cost of `find`.
   */
  add(flight: Flight): boolean {
    if (this.#table.countHash(flight.hash) >= MAX_CHAIN) return false;
    this.#table.add(flight);
    flight.registered = true;
    return true;
  }

  /**
   * Registers `follower` in the place of the full `leader` (clients past
   * {@linkcode MAX_WAITERS} join it), to settle when `leader` does.
   */
  follow(leader: Flight, follower: Flight): void {
    this.remove(leader);
    leader.follower = follower;
    this.#table.add(follower);
    follower.registered = true;
  }

  /** Unregisters `flight`. */
  remove(flight: Flight): void {
    if (!flight.registered) return;
    flight.registered = false;
    this.#table.remove(flight);
  }
}
