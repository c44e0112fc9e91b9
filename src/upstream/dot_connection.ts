/**
 * One long-lived DNS-over-TLS connection (RFC 7858) carrying many exchanges at once
 * (RFC 7766 pipelining), each under an ID chosen here and unique on the connection.
 *
 * Writes are coalesced: every exchange queued in the same turn of the event loop goes out in
 * one TLS write. Reads land in one reusable buffer and are split into frames in place. Every
 * answer is validated in full (every section parses, the question matches) before it is
 * handed on; the client's ID and question casing are not this layer's business.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../dns/message.ts";
import { buildProbeQuery } from "../dns/probe.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import type { Logger } from "../log.ts";
import { SlabCopier } from "../slab.ts";
import type { Clock, Timed, TimerQueue } from "../timers.ts";
import type { Exchange, ExchangeCarrier } from "./exchange.ts";
import { classifyError, UpstreamError, type UpstreamErrorReason } from "./errors.ts";
import type { UpstreamStats } from "./stats.ts";

/**
 * How long (at least; four times the connection's fastest answer if more) a connection may
 * owe the server an ACK before it is nudged. A server that holds small writes under Nagle's
 * algorithm (Unbound's DoT does) holds every answer after the first until the client
 * acknowledges, and Linux delays that ACK by up to 40 ms when the client has nothing to send.
 * When queries are still in flight that long after the last read with no write since, the
 * connection is nudged: the first octet of the next frame's length prefix goes out alone (the
 * segment carries the ACK, the held answers come at once, and the server waits for the rest
 * of the frame with nothing to answer); when that octet is out already, the oldest query is
 * written again under the same ID, and the echo of the duplicate is ignored.
 */
export const NUDGE_MS = 2;

/** How long a new connection rests before it takes queries (see `settled`). */
export const SETTLE_MS = 50;

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
 * An idle connection whose last write was a nudge's lone length octet gets the rest of that
 * frame this long after the write (see {@linkcode UpstreamConnection.completePendingFrame}).
 */
export const COMPLETE_FRAME_AFTER_MS = 100;

/**
 * Nudge at read time only while the upstream owes this few answers in all (light load): under
 * load, the stream of writes carries the ACKs, and a nudge would cost a query for nothing
 * (measured: saturation qps 14.3k with nudges at any load against 19.4k without).
 */
const NUDGE_ON_READ_MAX_OUTSTANDING = 4;
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
 * of the queries an upstream's connections carry; the budget is the upstream's, so a connection
 * no longer written to under load can still be nudged for its held answers (measured: 8-19% more
 * saturation qps than with a budget per connection). Measured: with every answer taking 400 ms the upstream
 * was asked 1.26 times per question (hedges included; 1.9-2.1 with no budget); a budget of a
 * twentieth let answers held after a burst wait out the 40 ms delayed ACK (p99 43 ms against
 * 2.6-5 ms at 2,000 qps).
 */
const NUDGE_SHARE = 0.2;
/** Most nudges a connection can save up (see {@linkcode NUDGE_SHARE}). */
export const NUDGE_BURST = 16;

/** Most exchanges in flight on one connection (IDs are 16 bits; keep plenty free). */
export const MAX_QUERIES_PER_CONNECTION = 16384;

const READ_BUFFER_SIZE = 64 * 1024;
const MAX_FRAME = 2 + 65535;

/** What a connection needs from the upstream that owns it. */
export interface ConnectionOwner {
  /** The upstream's address and TLS name. */
  readonly spec: UpstreamSpec;
  /** Extra trusted CA certificates (PEM). */
  readonly caCerts: string[];
  /** Logger. */
  readonly log: Logger;
  /** Statistics hooks. */
  readonly stats: UpstreamStats;
  /** Deadline for TCP connect plus TLS handshake. */
  readonly connectTimeoutMs: number;
  /** Whether to nudge Nagle-bound servers (see {@linkcode NUDGE_MS}). */
  readonly nudge: boolean;
  /** Pads the filler that completes a nudge's frame like a padded health probe. */
  readonly padProbes: boolean;
  /** Questions the upstream owes answers to, over all its connections (its load). */
  readonly outstanding: number;
  /** The clock. */
  readonly clock: Clock;
  /**
   * The timer queue the connection's nudge timer goes in: one platform timer for every
   * connection (a `setTimeout` per connection every few milliseconds under load cost about
   * 2 us per query).
   */
  readonly timers: TimerQueue;
  /**
   * Nudges its connections may still make, earned and spent by all of them (see
   * {@linkcode NUDGE_SHARE}): a connection no longer written to can still be nudged for the
   * answers held on it.
   */
  nudgeTokens: number;
  /** The handshake completed after `handshakeMs`. */
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

/** Connection lifecycle states. */
export type ConnectionState = "connecting" | "open" | "closed";

/**
 * What an upstream needs of a connection. {@linkcode DotConnection} is the real one; the pool's
 * unit tests use a fake.
 */
export interface UpstreamConnection extends ExchangeCarrier {
  /** Lifecycle state. */
  readonly state: ConnectionState;
  /** Exchanges in flight, ended ones awaiting their late answer included. */
  readonly load: number;
  /** Answers read on this connection. */
  readonly answered: number;
  /** True once the TLS handshake completed. */
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
   * progress, and no answer possibly held by the server (see {@linkcode REST_MS}).
   */
  cleanIdle(now: number): boolean;
  /** Clock time until which the server may hold an answer on it (see {@linkcode REST_MS}). */
  readonly dirtyUntil: number;
  /** Starts connecting. */
  start(): void;
  /** Puts `exchange` on the wire (queued until the handshake completes). */
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
   * On an idle connection (nothing in flight, no write for {@linkcode COMPLETE_FRAME_AFTER_MS})
   * whose last write was a nudge's lone length octet, writes the rest of that frame: a server
   * waits for a message it has begun to read, and one with a short read timeout (dnsdist
   * closes after 2 s by default) would drop the connection. True when it wrote.
   */
  completePendingFrame(now: number): boolean;
  /** Resolves once fully closed. */
  readonly finished: Promise<void>;
}

/** Creates a connection for an upstream. */
export type ConnectionFactory = (owner: ConnectionOwner) => UpstreamConnection;

const copier = new SlabCopier();
const randomIds = new Uint16Array(2048);
let randomIndex = randomIds.length;
/** Reused for every answer: connections run on one thread and hand answers on synchronously. */
const responseInfo = new ResponseInfo();

function closeQuietly(resource: { close(): void } | null): void {
  try {
    resource?.close();
  } catch {
    // Already closed (by the peer, or consumed by startTls).
  }
}

function nextRandomId(): number {
  if (randomIndex === randomIds.length) {
    crypto.getRandomValues(randomIds);
    randomIndex = 0;
  }
  return randomIds[randomIndex++];
}

/**
 * Makes Deno build its TLS client configuration (the built-in root store) now, with a
 * handshake against a throwaway loopback socket. The first TLS connection of a process
 * otherwise spends about 35 ms on it while queries wait.
 */
export async function primeTls(): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0, transport: "tcp" });
  try {
    const accepted = listener.accept();
    const tcp = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    const peer = await accepted;
    const tls = await Deno.startTls(tcp, { hostname: "prime.invalid" });
    const handshake = tls.handshake().catch(() => {});
    peer.close();
    await handshake;
    tls.close();
  } catch {
    // Priming is an optimisation; a failure here changes nothing else.
  } finally {
    listener.close();
  }
}

/**
 * A pipelined DoT connection. Created by an upstream, which hands it exchanges with
 * {@linkcode DotConnection.send} and hears back through its {@linkcode ConnectionOwner}.
 *
 * @example
 * ```ts ignore
 * const connection = new DotConnection(owner);
 * connection.start();
 * connection.send(exchange);
 * ```
 */
export class DotConnection implements UpstreamConnection {
  /** Lifecycle state. */
  state: ConnectionState = "connecting";
  /** Exchanges in flight by wire ID (ended ones stay until answered or purged). */
  readonly inflight = new Map<number, Exchange>();
  /** Answers delivered on this connection. */
  answered = 0;
  /** True once the TLS handshake completed. */
  opened = false;
  /** Clock time when the handshake completed. */
  openedAt = 0;
  /** Clock time the connection was created. */
  readonly createdAt: number;
  /** Clock time of the last send or answer. */
  lastActive: number;
  /** Clock time of the last exchange handed to this connection. */
  lastWriteAt = 0;
  /** Clock time of the last read that delivered a valid answer. */
  lastReadAt = 0;
  /** The fastest answer latency seen on this connection (drifting up), in milliseconds. */
  minRttMs = 0;
  /** See {@linkcode UpstreamConnection.stalledSince}. */
  stalledSince = 0;
  /** See {@linkcode UpstreamConnection.writesSinceAnswer}. */
  writesSinceAnswer = 0;
  /** See {@linkcode UpstreamConnection.dirtyUntil}. */
  dirtyUntil: number = Infinity;
  /** Clock time the latest write was issued: exchanges sent before it are on the wire. */
  #writeIssuedAt = 0;
  readonly #onWrite = () => {
    this.#writeIssuedAt = this.#clock.now();
  };
  /** The nudge timer, queued in the owner's timer queue while armed. */
  readonly #nudgeTimer: Timed = {
    timerAt: 0,
    timerIndex: -1,
    timerSlot: -1,
    onTimer: () => this.#nudgeNow(),
  };
  /** IDs of answered exchanges whose duplicate (see `NUDGE_MS`) may still be answered. */
  readonly #echoes = new Map<number, number>();
  /** Echoes read (see `#echoes`): reads that, like answers, may call for a nudge. */
  #echoesRead = 0;
  /** The last octet queued or written is the first of a length prefix, sent as a nudge. */
  #lengthHighSent = false;
  readonly #owner: ConnectionOwner;
  readonly #clock: Clock;
  #conn: Deno.TlsConn | null = null;
  #tcp: Deno.TcpConn | null = null;
  /** Aborts the TCP connect (connect timeout, or closed while connecting). */
  readonly #connecting = new AbortController();
  readonly #frames = new FrameBuffer(16 * 1024);
  #flushScheduled = false;
  #writing = false;
  #closeRequested = false;

  /** True once this side asked it to close. */
  get closeRequested(): boolean {
    return this.#closeRequested;
  }
  #done: Promise<void> = Promise.resolve();
  readonly #flush = () => this.#flushLoop();
  readonly #isOpen = () => this.state === "open";
  /** A method, so that type narrowing does not survive the awaits that change the state. */
  #isClosed(): boolean {
    return this.state === "closed";
  }

  /** Creates an unconnected connection; call {@linkcode start}. */
  constructor(owner: ConnectionOwner) {
    this.#owner = owner;
    this.#clock = owner.clock;
    this.createdAt = this.#clock.now();
    this.lastActive = this.createdAt;
  }

  /** Connects, handshakes and serves until closed. */
  start(): void {
    this.#done = this.#run();
  }

  /** Resolves once the connection is fully closed and its read loop has ended. */
  get finished(): Promise<void> {
    return this.#done;
  }

  /**
   * True once the connection has been open for {@linkcode SETTLE_MS}. A TLS 1.3 server sends
   * its session tickets right after the handshake; a server that holds small writes under
   * Nagle's algorithm (Unbound does) then holds the first answers until those tickets are
   * acknowledged, which Linux delays by up to 40 ms when the client has nothing to send. A
   * connection is therefore given queries only once that ACK has surely gone out, unless no
   * settled connection exists.
   */
  settled(now: number): boolean {
    return this.state === "open" && now - this.openedAt >= SETTLE_MS;
  }

  /** See {@linkcode UpstreamConnection.cleanIdle}. */
  cleanIdle(now: number): boolean {
    return this.state === "open" && this.inflight.size === 0 && now >= this.dirtyUntil &&
      !this.#writing;
  }

  /** Number of exchanges in flight. */
  get load(): number {
    return this.inflight.size;
  }

  /** Puts `exchange` on the wire under a fresh ID (queued until the handshake completes). */
  send(exchange: Exchange): void {
    let id = nextRandomId();
    while (this.inflight.has(id) || this.#echoes.has(id)) id = nextRandomId();
    exchange.wireId = id;
    exchange.carrier = this;
    exchange.nudged = false;
    exchange.nudges = 0;
    exchange.nudgedAt = 0;
    exchange.writes++;
    if (this.#owner.nudgeTokens < NUDGE_BURST) this.#owner.nudgeTokens += NUDGE_SHARE;
    const now = this.#clock.now();
    // Written beside another in flight (or soon after): an answer may now be held on it.
    if (this.inflight.size > 0 || now < this.dirtyUntil) this.dirtyUntil = now + REST_MS;
    if (this.stalledSince === 0) this.stalledSince = now;
    this.writesSinceAnswer++;
    this.inflight.set(id, exchange);
    this.#enqueue(exchange, id);
    exchange.sentAt = now;
    this.lastActive = now;
    this.lastWriteAt = now;
    if (this.state === "open") this.#scheduleFlush();
  }

  /**
   * Stops waiting for `exchange`. Its entry stays (the ID reserved, the connection still
   * owing an answer, which counts when judging whether the server stopped answering) until
   * the answer comes or {@linkcode purge} drops it.
   */
  forget(_exchange: Exchange): void {}

  /** Drops ended exchanges written before `before` that were never answered. */
  purge(before: number): void {
    for (const [id, exchange] of this.inflight) {
      if (exchange.ended && exchange.sentAt < before) this.inflight.delete(id);
    }
    if (this.inflight.size === 0) {
      this.stalledSince = 0;
      this.writesSinceAnswer = 0;
    }
  }

  /** See {@linkcode UpstreamConnection.completePendingFrame}. */
  completePendingFrame(now: number): boolean {
    if (
      !this.#lengthHighSent || this.state !== "open" || this.inflight.size > 0 ||
      now - this.lastWriteAt < COMPLETE_FRAME_AFTER_MS
    ) {
      return false;
    }
    // The filler's answer is an echo the server may hold like any other answer.
    this.#completeWithFiller();
    this.lastWriteAt = now;
    this.dirtyUntil = now + REST_MS;
    this.#scheduleFlush();
    return true;
  }

  /** Closes the connection; exchanges still in flight are handed back as orphans. */
  close(): void {
    this.#closeRequested = true;
    this.#shutdown(null);
  }

  /**
   * Closes a stalled or misbehaving connection as a failure, handing its exchanges back. The
   * owner decides what it says about the upstream (and logs it, rate limited).
   */
  abandon(reason: UpstreamErrorReason, message: string): void {
    if (this.state === "closed") return;
    const label = this.#owner.spec.label;
    this.#owner.stats.error(reason);
    this.#owner.log.debug("closing upstream connection", {
      upstream: label,
      reason,
      error: message,
      inflight: this.inflight.size,
    });
    this.#closeRequested = true;
    this.#shutdown(new UpstreamError(reason, `${label}: ${message}`, label));
  }

  /** Appends `exchange`'s frame under `id` to the write buffer. */
  #enqueue(exchange: Exchange, id: number): void {
    const message = exchange.message;
    // The octet a nudge sent says "shorter than 256": a longer message follows whole.
    if (this.#lengthHighSent && message.length > 0xff) this.#completeWithFiller();
    const at = this.#frames.append(message, this.#lengthHighSent);
    this.#lengthHighSent = false;
    const bytes = this.#frames.bytes;
    bytes[at] = id >> 8;
    bytes[at + 1] = id & 0xff;
  }

  /**
   * Completes the frame a nudge's octet began with a health probe (`. IN NS` without RD, 28
   * octets, or 128 padded: shorter than the 256 the octet said) under an ID free on this
   * connection. Any server answers it at once without recursing (a referral, or REFUSED), never
   * FORMERR; the answer is read and ignored as an echo.
   */
  #completeWithFiller(): void {
    let id = nextRandomId();
    while (this.inflight.has(id) || this.#echoes.has(id)) id = nextRandomId();
    const filler = buildProbeQuery(false, this.#owner.padProbes);
    filler[0] = id >> 8;
    filler[1] = id & 0xff;
    this.#frames.append(filler, true);
    this.#expectEcho(id, 1);
    this.#lengthHighSent = false;
  }

  /** Writes what is queued once the current task's other writes have joined it. */
  #scheduleFlush(): void {
    if (this.#flushScheduled || this.#writing) return;
    this.#flushScheduled = true;
    queueMicrotask(this.#flush);
  }

  /** `count` more answers under `id` are echoes, to be read and ignored. */
  #expectEcho(id: number, count: number): void {
    if (this.#echoes.size > 1024) this.#echoes.clear();
    this.#echoes.set(id, (this.#echoes.get(id) ?? 0) + count);
  }

  async #run(): Promise<void> {
    const { spec, caCerts, log, stats, connectTimeoutMs } = this.#owner;
    const controller = this.#connecting;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
      closeQuietly(this.#tcp);
      closeQuietly(this.#conn);
    }, connectTimeoutMs);
    const startedAt = this.#clock.now();
    try {
      const tcp = await Deno.connect({
        hostname: spec.address,
        port: spec.port,
        transport: "tcp",
        signal: controller.signal,
      });
      if (this.#isClosed()) {
        // Closed (or abandoned) while connecting: nothing more to do with it.
        closeQuietly(tcp);
        throw new UpstreamError("unavailable", "closed while connecting", spec.label);
      }
      this.#tcp = tcp;
      tcp.setNoDelay(true);
      tcp.setKeepAlive(true);
      this.#conn = await Deno.startTls(tcp, { hostname: spec.tlsName, caCerts });
      this.#tcp = null;
      await this.#conn.handshake();
    } catch (error) {
      clearTimeout(timer);
      if (this.#isClosed()) {
        // Whoever closed it has accounted for it; release what the attempt left open.
        closeQuietly(this.#conn);
        closeQuietly(this.#tcp);
        this.#conn = null;
        this.#tcp = null;
        return;
      }
      const reason = timedOut ? "timeout" : classifyError(error);
      stats.handshake(false);
      stats.error(reason);
      const detail = timedOut
        ? `no handshake within ${connectTimeoutMs} ms`
        : error instanceof Error
        ? error.message
        : String(error);
      const failure = new UpstreamError(
        reason,
        `connecting to ${spec.label} failed: ${detail}`,
        spec.label,
      );
      this.#shutdown(failure);
      return;
    }
    clearTimeout(timer);
    if (this.#isClosed()) {
      // Closed while the handshake ran: #shutdown could not close what did not exist yet.
      closeQuietly(this.#conn);
      this.#conn = null;
      return;
    }
    stats.handshake(true);
    this.state = "open";
    this.opened = true;
    this.openedAt = this.#clock.now();
    // The session tickets sent after the handshake are unacknowledged for a while: like an
    // answer just read, they may hold the next answers (the nudge timer covers it).
    this.dirtyUntil = this.openedAt + Math.max(SETTLE_MS, REST_MS);
    this.lastReadAt = this.openedAt;
    // Queued exchanges go on the wire now: time their answers from here, not from the queue.
    for (const exchange of this.inflight.values()) exchange.sentAt = this.openedAt;
    if (this.inflight.size > 0) this.stalledSince = this.openedAt;
    log.debug("upstream connection open", { upstream: spec.label });
    this.#owner.onOpen(this, this.openedAt - startedAt);
    if (this.#frames.length > 0 && this.state === "open") this.#flushLoop();
    if (this.state === "open") await this.#readLoop(this.#conn);
  }

  async #flushLoop(): Promise<void> {
    this.#flushScheduled = false;
    const conn = this.#conn;
    if (this.#writing || this.state !== "open" || conn === null) return;
    this.#writing = true;
    try {
      // drainTo settles a microtask or more after its last look at the queue: frames queued
      // in between found #writing still set and scheduled no flush, so look again here, in
      // the same synchronous step that clears it (else they wait for the next send, which
      // may never come: a query lost, its client's deadline spent).
      do {
        await this.#frames.drainTo(conn, this.#isOpen, this.#onWrite);
      } while (this.#frames.length > 0 && this.#isOpen());
    } catch (error) {
      if (this.state === "open") {
        const reason = classifyError(error);
        this.#shutdown(
          new UpstreamError(
            reason,
            `writing to ${this.#owner.spec.label} failed`,
            this.#owner.spec.label,
          ),
        );
      }
    } finally {
      this.#writing = false;
    }
  }

  async #readLoop(conn: Deno.TlsConn): Promise<void> {
    const buffer = new Uint8Array(READ_BUFFER_SIZE + MAX_FRAME);
    let start = 0;
    let end = 0;
    let failure: UpstreamError | null = null;
    const label = this.#owner.spec.label;
    try {
      for (;;) {
        if (buffer.length - end < MAX_FRAME && start > 0) {
          buffer.copyWithin(0, start, end);
          end -= start;
          start = 0;
        }
        const n = await conn.read(buffer.subarray(end));
        if (n === null) {
          if (end > start) {
            failure = new UpstreamError("reset", `${label} closed mid-message`, label);
          }
          break;
        }
        end += n;
        const readAt = this.#clock.now();
        const heardBefore = this.answered + this.#echoesRead;
        while (end - start >= 2) {
          const length = readU16(buffer, start);
          if (end - start < 2 + length) break;
          if (!this.#onMessage(buffer, start + 2, start + 2 + length)) {
            failure = new UpstreamError("bad_response", `${label} sent a malformed frame`, label);
            break;
          }
          start += 2 + length;
        }
        if (failure || this.state !== "open") break;
        if (start === end) start = end = 0;
        if (this.#owner.nudge && this.inflight.size > 0) {
          if (
            this.answered + this.#echoesRead > heardBefore &&
            this.#owner.outstanding <= NUDGE_ON_READ_MAX_OUTSTANDING && !this.#flushScheduled
          ) {
            this.#nudgeOnRead(readAt);
          }
          if (this.#nudgeTimer.timerIndex < 0) this.#armNudge(readAt);
        }
      }
    } catch (error) {
      if (this.state === "open" && !this.#closeRequested) {
        const reason = classifyError(error);
        const detail = error instanceof Error ? error.message : String(error);
        failure = new UpstreamError(reason, `reading from ${label} failed: ${detail}`, label);
      }
    }
    if (this.state !== "open") return;
    if (failure && !this.#closeRequested) {
      // The owner logs it (rate limited) when it hears of it in onClosed.
      this.#owner.stats.error(failure.reason);
    } else if (!this.#closeRequested) {
      // RFC 7766 lets a server close an idle connection (or one it wants to shed) at any time.
      this.#owner.log.debug("upstream closed the connection", {
        upstream: label,
        inflight: this.inflight.size,
        answered: this.answered,
      });
    }
    this.#shutdown(failure);
  }

  /** Handles one response frame; false when the frame is not even a DNS header. */
  #onMessage(buffer: Uint8Array, start: number, end: number): boolean {
    if (end - start < HEADER_SIZE) return false;
    const id = readU16(buffer, start);
    const exchange = this.inflight.get(id);
    if (exchange === undefined) {
      const echoes = this.#echoes.get(id);
      if (echoes !== undefined) {
        // The echo of a nudge (or the answer to a frame-completing filler): ours, and like an
        // answer it may hold the next ones behind it until acknowledged.
        if (echoes <= 1) this.#echoes.delete(id);
        else this.#echoes.set(id, echoes - 1);
        this.#echoesRead++;
        this.lastReadAt = this.#clock.now();
        return true;
      }
      // A late answer to something no longer tracked: harmless.
      this.#owner.log.debug("upstream answer for no query in flight", {
        upstream: this.#owner.spec.label,
        id,
      });
      return true;
    }
    const response = copier.copy(buffer, start, end);
    const info = responseInfo;
    const valid = analyzeResponse(response, info) &&
      responseAnswersQuery(response, info, exchange.message, exchange.questionEnd);
    this.inflight.delete(id);
    const now = this.#clock.now();
    this.lastActive = now;
    // Any frame for a query in flight is progress: the server reads and answers.
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    if (!valid) {
      this.#owner.onBadAnswer(
        this,
        exchange,
        info.reason || "the answer is for another question",
      );
      return true;
    }
    // Only a valid answer counts as the server having written: a frame that answers nothing
    // (garbage, another question) is not a reason to nudge (see NUDGE_MS).
    this.lastReadAt = now;
    // The fastest answer seen, drifting up slowly so a path that got slower is relearnt. Not
    // from a query written before the connection settled: the server may have held its answer
    // behind the session tickets for a delayed ACK (40 ms), and a patience of four times that
    // would outlast NUDGE_MAX_AGE_MS: no timer nudge at all on this connection.
    if (this.settled(exchange.sentAt)) {
      const rtt = now - exchange.sentAt;
      this.minRttMs = this.minRttMs === 0 || rtt < this.minRttMs ? rtt : this.minRttMs * 1.01;
    }
    this.answered++;
    this.#owner.onAnswer(this, exchange, response, info);
    return true;
  }

  /** See {@linkcode UpstreamConnection.owesAck}. */
  get owesAck(): boolean {
    return this.lastReadAt > this.lastWriteAt && this.inflight.size > 0;
  }

  /**
   * Answers were just read while exchanges written before this read are still in flight: a
   * server under Nagle's algorithm holds their answers until this side's next segment, and
   * Linux delays a bare ACK by up to 40 ms. Writing the oldest again now carries the ACK; its
   * echo is ignored. Only at light load: with more in flight, the stream of writes carries
   * the ACKs anyway.
   */
  #nudgeOnRead(readAt: number): void {
    if (!this.#mayNudge()) return;
    const onWire = Math.min(readAt, this.#writeIssuedAt);
    const now = this.#clock.now();
    for (const exchange of this.inflight.values()) {
      if (exchange.sentAt > onWire) break;
      if (
        exchange.ended || exchange.nudges >= MAX_NUDGES || exchange.nudgedAt > onWire ||
        now - exchange.sentAt >= NUDGE_MAX_AGE_MS
      ) continue;
      this.#nudgeExchange(exchange, now);
      return;
    }
  }

  /**
   * True when a nudge can be sent: one that costs the server nothing (bytes already queued, or
   * the lone length octet) always; a duplicate query only within the budget.
   */
  #mayNudge(): boolean {
    return this.#frames.length > 0 || !this.#lengthHighSent || this.#owner.nudgeTokens >= 1;
  }

  /**
   * Sends the server a segment, whose ACK releases what it holds for `exchange`. Bytes already
   * queued carry it; else the first octet of the next frame's length prefix alone (the server
   * reads it and waits for the rest: nothing to answer, nothing held after it); else, when
   * that octet went out already, `exchange` again under the same ID, whose answer is an echo.
   */
  #nudgeExchange(exchange: Exchange, now: number): void {
    exchange.nudged = true;
    exchange.nudges++;
    exchange.nudgedAt = now;
    this.lastWriteAt = now;
    if (this.#frames.length > 0) return;
    if (!this.#lengthHighSent) {
      this.#frames.appendLengthHigh();
      this.#lengthHighSent = true;
    } else {
      this.#owner.nudgeTokens--;
      // Whichever of the two answers comes second is the echo.
      this.#expectEcho(exchange.wireId, 1);
      this.#enqueue(exchange, exchange.wireId);
      // Its echo will be held behind the answer, as one more answer on the connection.
      this.dirtyUntil = now + REST_MS;
    }
    this.#scheduleFlush();
  }

  #armNudge(now: number): void {
    this.#owner.timers.schedule(this.#nudgeTimer, now + NUDGE_MS);
  }

  #nudgeNow(): void {
    // Out of budget: the next query written earns some back, and the next read re-arms.
    if (this.state !== "open" || !this.owesAck || !this.#mayNudge()) return;
    const now = this.#clock.now();
    // Held answers inflate the average RTT; the fastest answer seen says what prompt is.
    const patience = Math.max(NUDGE_MS, 4 * this.minRttMs);
    // Checked again while some query is young enough to be worth a nudge.
    let young = false;
    for (const exchange of this.inflight.values()) {
      if (exchange.ended || exchange.nudges >= MAX_NUDGES) continue;
      if (now - exchange.sentAt >= NUDGE_MAX_AGE_MS) continue;
      young = true;
      if (now - Math.max(exchange.sentAt, exchange.nudgedAt) < patience) {
        if (exchange.nudgedAt === 0) break;
        continue;
      }
      this.#nudgeExchange(exchange, now);
      return;
    }
    if (young) this.#armNudge(now);
  }

  #shutdown(failure: UpstreamError | null): void {
    this.#owner.timers.cancel(this.#nudgeTimer);
    if (this.state === "closed") return;
    const wasConnecting = this.state === "connecting";
    this.state = "closed";
    // A connect still under way stops now rather than at the connect timeout.
    if (wasConnecting) this.#connecting.abort();
    closeQuietly(this.#conn);
    closeQuietly(this.#tcp);
    this.#conn = null;
    this.#tcp = null;
    this.#frames.clear();
    const orphans: Exchange[] = [];
    for (const exchange of this.inflight.values()) {
      if (exchange.ended) continue;
      exchange.carrier = null;
      orphans.push(exchange);
    }
    this.inflight.clear();
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    this.#owner.onClosed(this, orphans, failure);
  }
}
