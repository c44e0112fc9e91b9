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

/**
 * The client transports and what the resolver needs to know of each; no stage names one, so
 * adding a transport is one row here.
 *
 * - `datagram`: one message per datagram. Answers are cut to the client's size (TC=1), ANY
 *   gets TC=1, refusals are rate-limited (the sources can be spoofed), and queries are shed at
 *   `--max-inflight`; otherwise none of that, and the connection closes after a refusal by
 *   access control.
 * - `keepalive`: a query's edns-tcp-keepalive option (RFC 7828) is answered with the stream
 *   idle timeout (TCP and DoT; never UDP, and DoH has HTTP's own).
 * - `padsAnswers`: a query's Padding option gets its answer padded to 468-octet blocks (RFC
 *   8467), over TLS and HTTPS.
 */
export const TRANSPORTS = {
  udp: { datagram: true, keepalive: false, padsAnswers: false },
  tcp: { datagram: false, keepalive: true, padsAnswers: false },
  dot: { datagram: false, keepalive: true, padsAnswers: true },
  doh: { datagram: false, keepalive: false, padsAnswers: true },
} as const satisfies Record<
  string,
  { datagram: boolean; keepalive: boolean; padsAnswers: boolean }
>;

/** The client transport a query arrived on (the `transport` label of metrics). */
export type Transport = keyof typeof TRANSPORTS;

/** Every client transport, in the order metrics list them. */
export const TRANSPORT_NAMES: readonly Transport[] = Object.keys(TRANSPORTS) as Transport[];

/**
 * True for a transport that carries one message per datagram (see {@linkcode TRANSPORTS}).
 *
 * @example
 * ```ts
 * import { isDatagram } from "./job.ts";
 * isDatagram("udp"); // true
 * isDatagram("tcp"); // false
 * ```
 */
export function isDatagram(transport: Transport): boolean {
  return TRANSPORTS[transport].datagram;
}

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

/**
 * What a job waits on upstream, as the job sees it: the list of jobs waiting with it (a
 * `Flight`, which knows its waiters; the job knows no more of it).
 */
export interface AwaitedFlight {
  /** The jobs waiting on it. */
  readonly waiters: ClientJob[];
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
  /** True when the transport carries one message per datagram (see `isDatagram`). */
  readonly datagram: boolean;
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
  /** True when its OPT asked for edns-tcp-keepalive (RFC 7828). */
  asksKeepalive = false;
  /** True when its OPT carried padding (RFC 7830). */
  asksPadding = false;
  /** Largest response the client takes (datagram: 512 or its EDNS size, capped). */
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
  flight: AwaitedFlight | null = null;
  /** An expired entry to serve if no fresh answer comes in time. */
  stale: CacheEntry | null = null;
  /** True once answered or dropped. */
  done = false;
  /** Close the stream connection after the response (refused by access control). */
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
    this.datagram = TRANSPORTS[transport].datagram;
    this.client = client;
    this.sink = sink;
    this.started = started;
  }

  /** The stale-answer timer is due. */
  onTimer(): void {
    this.#owner.staleTimerDue(this);
  }
}
