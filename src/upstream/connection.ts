/**
 * What an upstream and its connections know of each other: the {@linkcode UpstreamConnection}
 * interface an upstream drives (a pipelined stream connection with or without TLS, a test's
 * fake, a plain-UDP exchange), the four events a connection reports to its
 * {@linkcode ConnectionOwner}, and the {@linkcode ConnectionContext} an upstream shares with
 * all its connections.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import type { ResponseInfo } from "../dns/message.ts";
import type { Logger } from "../log.ts";
import type { Clock, TimerQueue } from "../timers.ts";
import type { Dialer } from "./dial.ts";
import { UpstreamError, type UpstreamErrorReason } from "./errors.ts";
import type { Exchange, ExchangeCarrier } from "./exchange.ts";
import type { Nudging } from "./nudge.ts";
import type { UpstreamStats } from "./stats.ts";

/** How long a new connection rests before it takes queries (see `settled`). */
export const SETTLE_MS = 50;

/** Most exchanges in flight on one connection (IDs are 16 bits; keep plenty free). */
export const MAX_QUERIES_PER_CONNECTION = 16384;

/** What a connection tells the upstream that owns it. */
export interface ConnectionOwner {
  /** The connection is open (TCP connect, and the TLS handshake if any, took `handshakeMs`). */
  onOpen(connection: UpstreamConnection, handshakeMs: number): void;
  /**
   * An answer (valid, matching) arrived for `exchange`, at `connection.lastReadAt`;
   * `exchange` may be ended. `info` is one object reused for every answer: read it during
   * the call only.
   */
  onAnswer(
    connection: UpstreamConnection,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
  ): void;
  /** An answer arrived that is malformed or answers another question. */
  onBadAnswer(connection: UpstreamConnection, exchange: Exchange, reason: string): void;
  /**
   * The connection is gone. `orphans` were in flight and unanswered; `failure` is set when
   * it broke rather than closed normally.
   */
  onClosed(
    connection: UpstreamConnection,
    orphans: Exchange[],
    failure: UpstreamError | null,
  ): void;
}

/** What an upstream shares with every connection it opens; fixed for the upstream's life. */
export interface ConnectionContext {
  /** The upstream's address (and TLS name). */
  readonly spec: UpstreamSpec;
  /** Opens the byte stream: TCP, then TLS for DoT (see `tls_dial.ts`). */
  readonly dial: Dialer;
  /** Deadline for the dial (TCP connect plus TLS handshake). */
  readonly connectTimeoutMs: number;
  /** The nudge against Nagle holds (DoT to Unbound), or null for none. */
  readonly nudging: Nudging | null;
  /** Logger. */
  readonly log: Logger;
  /** Statistics hooks. */
  readonly stats: UpstreamStats;
  /** The clock. */
  readonly clock: Clock;
  /**
   * The timer queue the connection's timers go in: one platform timer for every connection
   * (a `setTimeout` per connection every few milliseconds under load cost about 2 us per
   * query).
   */
  readonly timers: TimerQueue;
}

/**
 * A connection failing as a whole (stalled, misbehaving): counts `reason` in the upstream's
 * statistics and returns the error its exchanges are handed back with, named after the
 * upstream. Both connection kinds (TLS or plain stream, plain DNS) abandon through it.
 */
export function connectionFailure(
  context: ConnectionContext,
  reason: UpstreamErrorReason,
  message: string,
): UpstreamError {
  const label = context.spec.label;
  context.stats.error(reason);
  return new UpstreamError(reason, `${label}: ${message}`, label);
}

/** Connection lifecycle states. */
export type ConnectionState = ExchangeCarrier["state"];

/**
 * What an upstream needs of a connection. `StreamConnection` is the real one (DoT, or plain
 * DNS over TCP); the pool's unit tests use a fake.
 */
export interface UpstreamConnection extends ExchangeCarrier {
  /** Lifecycle state. */
  readonly state: ConnectionState;
  /** Exchanges in flight, ended ones awaiting their late answer included. */
  readonly load: number;
  /** Answers read on this connection. */
  readonly answered: number;
  /** True once the connection opened (TCP connect, and the TLS handshake if any). */
  readonly opened: boolean;
  /** Clock time the connection was created. */
  readonly createdAt: number;
  /** Clock time of the last exchange handed to it. */
  readonly lastWriteAt: number;
  /** Clock time of the last send or answer. */
  readonly lastActive: number;
  /** Clock time of the last valid answer, or echo of a nudge (0: none yet). */
  readonly lastReadAt: number;
  /**
   * True when answers arrived after the last write while more are owed: a server under
   * Nagle's algorithm holds those until this side's next segment carries the ACK.
   */
  readonly owesAck: boolean;
  /**
   * Clock time of the first write since the last answer (0 when an answer came after the
   * last write, or nothing was written): when it is set and old, the server has answered
   * nothing written to it for that long, which is how a connection that stopped answering
   * looks. Queries written before an answer that are still unanswered are stragglers, not a
   * stall: the server was alive after them.
   */
  readonly stalledSince: number;
  /** Exchanges written since the last answer (see `stalledSince`). */
  readonly writesSinceAnswer: number;
  /** True once this side asked it to close (idle, abandoned, shutting down). */
  readonly closeRequested: boolean;
  /** True once open long enough to take queries (see {@linkcode SETTLE_MS}). */
  settled(now: number): boolean;
  /**
   * True when a query written now is answered at once: open, nothing in flight, no write in
   * progress, and no answer possibly held by the server (see `REST_MS` in `nudge.ts`).
   */
  cleanIdle(now: number): boolean;
  /** Starts connecting. */
  start(): void;
  /** Puts `exchange` on the wire (queued until the connection is open). */
  send(exchange: Exchange): void;
  /** Closes; exchanges in flight are handed back as orphans. */
  close(): void;
  /**
   * Closes as a failure (stalled or misbehaving); exchanges in flight are handed back and the
   * owner hears of it through `onClosed` with the failure.
   */
  abandon(reason: UpstreamErrorReason, message: string): void;
  /** Forgets ended exchanges written before `before` whose answers never came. */
  purge(before: number): void;
  /**
   * Tidies an idle connection (see `StreamConnection.completePendingFrame`: a nudge's frame
   * left half-written is completed); true when it wrote.
   */
  completePendingFrame(now: number): boolean;
  /** Resolves once fully closed. */
  readonly finished: Promise<void>;
}

/** Creates a connection of an upstream: `owner` hears its events, `context` is shared. */
export type ConnectionFactory = (
  owner: ConnectionOwner,
  context: ConnectionContext,
) => UpstreamConnection;
