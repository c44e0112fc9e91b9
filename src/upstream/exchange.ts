/**
 * One query on the wire to one upstream: the unit the connections carry. It owns the wire ID,
 * the connection carrying it, when it was written, how often, and whether it was nudged; it
 * knows no client. Its outcome goes to one {@linkcode ExchangeWaiter}: the pool's record of
 * the question it is an attempt at (`PoolRequest`), or an upstream's health check (a probe).
 *
 * @module
 */

import type { ResponseInfo } from "../dns/message.ts";
import type { UpstreamError, UpstreamErrorReason } from "./errors.ts";

/** Hears how an exchange ended. Called at most once per exchange. */
export interface ExchangeWaiter {
  /** A valid answer to the question (`info` describes it; valid during the call only). */
  exchangeAnswered(exchange: Exchange, response: Uint8Array, info: ResponseInfo): void;
  /** The exchange failed; it is off every connection. */
  exchangeFailed(exchange: Exchange, error: UpstreamError): void;
}

/**
 * The connection an exchange is in flight on, as those who hold the exchange see it: whether
 * it is still connecting (an attempt waits on a handshake), whether it has answered since,
 * and closing it. `UpstreamConnection` is the whole of it.
 */
export interface ExchangeCarrier {
  /** Lifecycle state. */
  readonly state: "connecting" | "open" | "closed";
  /** Clock time the connection was created. */
  readonly createdAt: number;
  /** Clock time of the last valid answer (0: none yet). */
  readonly lastReadAt: number;
  /** See `UpstreamConnection.stalledSince`. */
  readonly stalledSince: number;
  /** Exchanges in flight on it. */
  readonly load: number;
  /** Closes it; what it carries is handed back. */
  close(): void;
  /** Closes it as a failure, which judges the upstream. */
  abandon(reason: UpstreamErrorReason, message: string): void;
  /**
   * One of the exchanges it carries ended (answered, failed or cancelled). For a carrier
   * that holds something per exchange: a plain-UDP exchange closes its socket at once.
   */
  release?(exchange: Exchange): void;
}

/** Counts the exchanges an upstream is carrying. */
export interface ExchangeHolder {
  /** One of its exchanges ended. */
  ended(): void;
}

/** What an exchange is for: a client question (first try, retry, hedge) or a health probe. */
export type ExchangeKind = "query" | "hedge" | "probe";

/**
 * A query on the wire.
 *
 * @example
 * ```ts ignore
 * const exchange = new Exchange(message, questionEnd, waiter, "query");
 * upstream.send(exchange);
 * ```
 */
export class Exchange {
  /** The message (its ID is replaced by `wireId` on the wire). */
  readonly message: Uint8Array;
  /** Offset just past the question in `message`. */
  readonly questionEnd: number;
  /** What it is for. */
  readonly kind: ExchangeKind;
  /** Who hears the outcome; null once it ended or was cancelled. */
  waiter: ExchangeWaiter | null;
  /** Index of the upstream it went to (set by the upstream). */
  upstreamIndex: number = -1;
  /** The upstream counting it as outstanding, once sent. */
  holder: ExchangeHolder | null = null;
  /** True when it failed because its connection went away under it. */
  orphaned = false;
  /** True when it was the oldest unanswered exchange on the connection that went away. */
  firstOrphan = false;
  /** True when it was the newest unanswered exchange on the connection that went away. */
  lastOrphan = false;
  /** True when it re-sends a question a connection that went away left unanswered. */
  resent = false;
  /** True when it was alone on its connection and the connection died before answering. */
  poisoned = false;
  /** True once judged slow (its attempt deadline passed). */
  judged = false;
  /** The connection carrying it now, if any. */
  carrier: ExchangeCarrier | null = null;
  /** The ID it carries on its current connection. */
  wireId: number = -1;
  /** Clock time of the last write. */
  sentAt = 0;
  /** Clock time it was handed to the upstream. */
  startedAt = 0;
  /** Times nudged on its connection (see `nudge.ts`). */
  nudges = 0;
  /** Clock time of the last nudge (0: none). */
  nudgedAt = 0;
  /** True once it ended (answered, failed or cancelled). */
  ended = false;

  /** Creates an exchange for `message`, reporting to `waiter`. */
  constructor(
    message: Uint8Array,
    questionEnd: number,
    waiter: ExchangeWaiter | null,
    kind: ExchangeKind,
  ) {
    this.message = message;
    this.questionEnd = questionEnd;
    this.waiter = waiter;
    this.kind = kind;
  }

  /** Ends it with an answer; ignored once ended. */
  answer(response: Uint8Array, info: ResponseInfo): void {
    if (this.ended) return;
    this.#end();
    this.carrier = null;
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.exchangeAnswered(this, response, info);
  }

  /** Ends it with `error`; ignored once ended. */
  fail(error: UpstreamError): void {
    if (this.ended) return;
    this.#end();
    // Its connection keeps its entry (the ID reserved, the answer owed) until answered or
    // purged: see `StreamConnection.purge`.
    this.carrier = null;
    const waiter = this.waiter;
    this.waiter = null;
    waiter?.exchangeFailed(this, error);
  }

  /** Ends it silently (another exchange answered first, or the question gave up). */
  cancel(): void {
    if (this.ended) return;
    this.#end();
    this.waiter = null;
    this.carrier = null;
  }

  #end(): void {
    this.ended = true;
    this.carrier?.release?.(this);
    const holder = this.holder;
    this.holder = null;
    holder?.ended();
  }
}
