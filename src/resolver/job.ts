/**
 * The client's side of a query: one {@linkcode ClientJob} per message a client sent, from
 * the listener through the resolver's stages to the response. It owns what is the client's
 * (its bytes, ID and question casing, transport, UDP size limit, start time) and travels
 * through the stages; the upstream layer never sees it.
 *
 * @module
 */

import type { CacheEntry } from "../cache/answer_cache.ts";
import { MAX_MESSAGE_SIZE } from "../dns/wire.ts";
import type { Timed } from "../timers.ts";
import type { Flight } from "./flight.ts";

/** The client transport a query arrived on. */
export type Transport = "udp" | "tcp" | "doh";

/** How the cache took part in an answer (the query log's `cache=` field). */
export type CacheStatus = "off" | "hit" | "miss" | "stale" | "coalesced";

/** Where a listener wants a query's outcome. */
export interface ResponseSink {
  /**
   * Called exactly once per query, possibly before `resolveWith` returns: the response, or
   * `null` to drop it. `close` asks a TCP listener to close the connection after writing.
   */
  deliver(response: Uint8Array | null, client: Deno.Addr | undefined, close?: boolean): void;
}

/** Something that finishes jobs (the resolver). */
export interface JobOwner {
  /** A job's stale-answer timer is due. */
  staleTimerDue(job: ClientJob): void;
}

/**
 * One client query.
 *
 * @example
 * ```ts ignore
 * const job = new ClientJob(owner, query, "udp", addr, sink, clock.now());
 * ```
 */
export class ClientJob implements Timed {
  /** The client's message (a private copy the listener made). */
  readonly query: Uint8Array;
  /** Client transport. */
  readonly transport: Transport;
  /** Client address. */
  readonly client: Deno.Addr | undefined;
  /** Where the response goes. */
  readonly sink: ResponseSink;
  /** Clock time the query arrived. */
  readonly started: number;
  /** Offset just past the question's name (0 when unreadable). */
  nameEnd = 0;
  /** Offset just past the question (0 when unreadable). */
  questionEnd = 0;
  /** QTYPE. */
  qtype = 0;
  /** True when the client sent an OPT record. */
  hasEdns = false;
  /** Largest response the client takes (UDP: 512 or its EDNS size, capped). */
  limit: number = MAX_MESSAGE_SIZE;
  /** Cache key flags (DO, CD, AD, RD). */
  keyFlags = 0;
  /** The cache key's hash (see `cacheKeyHash`), once the cache stage looked it up. */
  hash = 0;
  /** How the cache took part. */
  cache: CacheStatus = "off";
  /** Who answered (upstream label), empty when the proxy did. */
  upstream = "";
  /** The upstream question it waits on, if any. */
  flight: Flight | null = null;
  /** An expired entry to serve if no fresh answer comes in time. */
  stale: CacheEntry | null = null;
  /** True once answered or dropped. */
  done = false;
  /** Close the TCP connection after the response (refused by access control). */
  closeAfter = false;
  /** See {@linkcode Timed} (the stale-answer timer). */
  timerAt = 0;
  /** See {@linkcode Timed}. */
  timerIndex: number = -1;
  /** See {@linkcode Timed}. */
  timerSlot: number = -1;
  readonly #owner: JobOwner;

  /** Creates a job for `query`. */
  constructor(
    owner: JobOwner,
    query: Uint8Array,
    transport: Transport,
    client: Deno.Addr | undefined,
    sink: ResponseSink,
    started: number,
  ) {
    this.#owner = owner;
    this.query = query;
    this.transport = transport;
    this.client = client;
    this.sink = sink;
    this.started = started;
  }

  /** The stale-answer timer is due. */
  onTimer(): void {
    this.#owner.staleTimerDue(this);
  }
}
