/**
 * One long-lived length-framed DNS connection carrying many exchanges at once (RFC 7766
 * pipelining), each under an ID chosen here and unique on the connection: DNS over TLS (RFC
 * 7858) when its context dials TLS (`tls_dial.ts`), plain DNS over TCP when it dials TCP
 * (`dial.ts`). The same class either way; the nudge against Nagle holds (`nudge.ts`) runs
 * when the context gives it the upstream's budget.
 *
 * Writes are coalesced: every exchange queued in the same turn of the event loop goes out in
 * one write. Reads land in one reusable buffer and are split into frames in place. Every
 * answer is validated in full (every section parses, the question matches) before it is
 * handed on; the client's ID and question casing are not this layer's business.
 *
 * @module
 */

import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../dns/message.ts";
import { buildProbeQuery } from "../dns/probe.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import { SlabCopier } from "../slab.ts";
import type { Clock, Timed } from "../timers.ts";
import {
  type ConnectionContext,
  connectionFailure,
  type ConnectionOwner,
  type ConnectionState,
  SETTLE_MS,
  type UpstreamConnection,
} from "./connection.ts";
import { closeQuietly } from "./dial.ts";
import { classifyError, UpstreamError, type UpstreamErrorReason } from "./errors.ts";
import type { Exchange } from "./exchange.ts";
import {
  COMPLETE_FRAME_AFTER_MS,
  Echoes,
  NUDGE_MS,
  NUDGE_ON_READ_MAX_OUTSTANDING,
  nudgeOnRead,
  nudgeOnTimer,
  type Nudging,
  REST_MS,
} from "./nudge.ts";

const READ_BUFFER_SIZE = 64 * 1024;
const MAX_FRAME = 2 + 65535;

const copier = new SlabCopier();
const randomIds = new Uint16Array(2048);
let randomIndex = randomIds.length;
/** Reused for every answer: connections run on one thread and hand answers on synchronously. */
const responseInfo = new ResponseInfo();

function nextRandomId(): number {
  if (randomIndex === randomIds.length) {
    crypto.getRandomValues(randomIds);
    randomIndex = 0;
  }
  return randomIds[randomIndex++];
}

/**
 * A pipelined stream connection (DoT, or plain DNS over TCP). Created by an upstream, which
 * hands it exchanges with {@linkcode StreamConnection.send} and hears back through its
 * {@linkcode ConnectionOwner}.
 *
 * @example
 * ```ts ignore
 * const connection = new StreamConnection(owner, { ...context, dial: tlsDialer(spec, caCerts) });
 * connection.start();
 * connection.send(exchange);
 * ```
 */
export class StreamConnection implements UpstreamConnection {
  /** Lifecycle state. */
  state: ConnectionState = "connecting";
  /** Exchanges in flight by wire ID (ended ones stay until answered or purged). */
  readonly inflight = new Map<number, Exchange>();
  /** Answers delivered on this connection. */
  answered = 0;
  /** True once the connection opened (the TLS handshake too, for DoT). */
  opened = false;
  /** Clock time when it opened. */
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
  /** Clock time until which the server may hold an answer on it (see {@linkcode REST_MS}). */
  #dirtyUntil: number = Infinity;
  /** Clock time the latest write was issued: exchanges sent before it are on the wire. */
  #writeIssuedAt = 0;
  readonly #onWrite = () => {
    this.#writeIssuedAt = this.#clock.now();
  };
  /** The nudge timer, queued in the context's timer queue while armed. */
  readonly #nudgeTimer: Timed = {
    timerAt: 0,
    timerIndex: -1,
    timerSlot: -1,
    onTimer: () => this.#nudgeNow(),
  };
  /** IDs of answered exchanges whose duplicate (see `NUDGE_MS`) may still be answered. */
  readonly #echoes = new Echoes();
  /** The last octet queued or written is the first of a length prefix, sent as a nudge. */
  #lengthHighSent = false;
  readonly #owner: ConnectionOwner;
  readonly #context: ConnectionContext;
  /** The context's nudging, or null: no nudge on this connection. */
  readonly #nudging: Nudging | null;
  readonly #clock: Clock;
  #conn: Deno.Conn | null = null;
  /** Aborts the dial (connect timeout, or closed while connecting). */
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
  constructor(owner: ConnectionOwner, context: ConnectionContext) {
    this.#owner = owner;
    this.#context = context;
    this.#nudging = context.nudging;
    this.#clock = context.clock;
    this.createdAt = this.#clock.now();
    this.lastActive = this.createdAt;
  }

  /** Dials (and for DoT handshakes) and serves until closed. */
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
    return this.state === "open" && this.inflight.size === 0 && now >= this.#dirtyUntil &&
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
    exchange.nudges = 0;
    exchange.nudgedAt = 0;
    this.#nudging?.budget.earn();
    const now = this.#clock.now();
    // Written beside another in flight (or soon after): an answer may now be held on it.
    if (this.inflight.size > 0 || now < this.#dirtyUntil) this.#dirtyUntil = now + REST_MS;
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
   * Drops ended exchanges written before `before` that were never answered. Until then an
   * ended exchange's entry stays: its ID reserved, the connection still owing an answer,
   * which counts when judging whether the server stopped answering.
   */
  purge(before: number): void {
    for (const [id, exchange] of this.inflight) {
      if (exchange.ended && exchange.sentAt < before) this.inflight.delete(id);
    }
    if (this.inflight.size === 0) {
      this.stalledSince = 0;
      this.writesSinceAnswer = 0;
    }
  }

  /**
   * On an idle connection (nothing in flight, no write for {@linkcode COMPLETE_FRAME_AFTER_MS})
   * whose last write was a nudge's lone length octet, writes the rest of that frame: a server
   * waits for a message it has begun to read, and one with a short read timeout (dnsdist
   * closes after 2 s by default) would drop the connection. True when it wrote.
   */
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
    this.#dirtyUntil = now + REST_MS;
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
    const failure = connectionFailure(this.#context, reason, message);
    this.#context.log.debug("closing upstream connection", {
      upstream: this.#context.spec.label,
      reason,
      error: message,
      inflight: this.inflight.size,
    });
    this.#closeRequested = true;
    this.#shutdown(failure);
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
    const filler = buildProbeQuery(false, this.#nudging?.padFiller ?? false);
    filler[0] = id >> 8;
    filler[1] = id & 0xff;
    this.#frames.append(filler, true);
    this.#echoes.expect(id);
    this.#lengthHighSent = false;
  }

  /** Writes what is queued once the current task's other writes have joined it. */
  #scheduleFlush(): void {
    if (this.#flushScheduled || this.#writing) return;
    this.#flushScheduled = true;
    queueMicrotask(this.#flush);
  }

  async #run(): Promise<void> {
    const { spec, log, stats, connectTimeoutMs } = this.#context;
    const controller = this.#connecting;
    let timedOut = false;
    // The dialer closes what it opened when the signal aborts.
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, connectTimeoutMs);
    const startedAt = this.#clock.now();
    let conn: Deno.Conn;
    try {
      conn = await this.#context.dial(controller.signal);
    } catch (error) {
      clearTimeout(timer);
      // Closed (or abandoned) while connecting: whoever closed it has accounted for it.
      if (this.#isClosed()) return;
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
      // Closed as the dial completed: #shutdown could not close what did not exist yet.
      closeQuietly(conn);
      return;
    }
    this.#conn = conn;
    stats.handshake(true);
    this.state = "open";
    this.opened = true;
    this.openedAt = this.#clock.now();
    // The session tickets sent after the handshake are unacknowledged for a while: like an
    // answer just read, they may hold the next answers (the nudge timer covers it).
    this.#dirtyUntil = this.openedAt + Math.max(SETTLE_MS, REST_MS);
    this.lastReadAt = this.openedAt;
    // Queued exchanges go on the wire now: time their answers from here, not from the queue.
    for (const exchange of this.inflight.values()) exchange.sentAt = this.openedAt;
    if (this.inflight.size > 0) this.stalledSince = this.openedAt;
    log.debug("upstream connection open", { upstream: spec.label });
    this.#owner.onOpen(this, this.openedAt - startedAt);
    if (this.#frames.length > 0 && this.state === "open") this.#flushLoop();
    if (this.state === "open") await this.#readLoop(conn);
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
            `writing to ${this.#context.spec.label} failed`,
            this.#context.spec.label,
          ),
        );
      }
    } finally {
      this.#writing = false;
    }
  }

  async #readLoop(conn: Deno.Conn): Promise<void> {
    const buffer = new Uint8Array(READ_BUFFER_SIZE + MAX_FRAME);
    let start = 0;
    let end = 0;
    let failure: UpstreamError | null = null;
    const label = this.#context.spec.label;
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
        const heardBefore = this.answered + this.#echoes.read;
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
        const nudging = this.#nudging;
        if (nudging !== null && this.inflight.size > 0) {
          if (
            this.answered + this.#echoes.read > heardBefore &&
            nudging.outstanding() <= NUDGE_ON_READ_MAX_OUTSTANDING && !this.#flushScheduled
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
      this.#context.stats.error(failure.reason);
    } else if (!this.#closeRequested) {
      // RFC 7766 lets a server close an idle connection (or one it wants to shed) at any time.
      this.#context.log.debug("upstream closed the connection", {
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
      if (this.#echoes.take(id)) {
        // The echo of a nudge (or the answer to a frame-completing filler): ours, and like an
        // answer it may hold the next ones behind it until acknowledged.
        this.lastReadAt = this.#clock.now();
        return true;
      }
      // A late answer to something no longer tracked: harmless.
      this.#context.log.debug("upstream answer for no query in flight", {
        upstream: this.#context.spec.label,
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
    // would outlast the nudge's age limit (`nudge.ts`): no timer nudge at all on this connection.
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
    const exchange = nudgeOnRead(this.inflight.values(), onWire, now);
    if (exchange !== null) this.#nudgeExchange(exchange, now);
  }

  /**
   * True when a nudge can be sent: one that costs the server nothing (bytes already queued, or
   * the lone length octet) always; a duplicate query only within the budget.
   */
  #mayNudge(): boolean {
    return this.#frames.length > 0 || !this.#lengthHighSent ||
      this.#nudging?.budget.available === true;
  }

  /**
   * Sends the server a segment, whose ACK releases what it holds for `exchange`. Bytes already
   * queued carry it; else the first octet of the next frame's length prefix alone (the server
   * reads it and waits for the rest: nothing to answer, nothing held after it); else, when
   * that octet went out already, `exchange` again under the same ID, whose answer is an echo.
   */
  #nudgeExchange(exchange: Exchange, now: number): void {
    exchange.nudges++;
    exchange.nudgedAt = now;
    this.lastWriteAt = now;
    if (this.#frames.length > 0) return;
    if (!this.#lengthHighSent) {
      this.#frames.appendLengthHigh();
      this.#lengthHighSent = true;
    } else {
      this.#nudging?.budget.spend();
      // Whichever of the two answers comes second is the echo.
      this.#echoes.expect(exchange.wireId);
      this.#enqueue(exchange, exchange.wireId);
      // Its echo will be held behind the answer, as one more answer on the connection.
      this.#dirtyUntil = now + REST_MS;
    }
    this.#scheduleFlush();
  }

  #armNudge(now: number): void {
    this.#context.timers.schedule(this.#nudgeTimer, now + NUDGE_MS);
  }

  #nudgeNow(): void {
    // Out of budget: the next query written earns some back, and the next read re-arms.
    if (this.state !== "open" || !this.owesAck || !this.#mayNudge()) return;
    const now = this.#clock.now();
    const due = nudgeOnTimer(this.inflight.values(), now, this.minRttMs);
    // Checked again while some query is young enough to be worth a nudge.
    if (due === "later") this.#armNudge(now);
    else if (due !== null) this.#nudgeExchange(due, now);
  }

  #shutdown(failure: UpstreamError | null): void {
    this.#context.timers.cancel(this.#nudgeTimer);
    if (this.state === "closed") return;
    const wasConnecting = this.state === "connecting";
    this.state = "closed";
    // A connect still under way stops now rather than at the connect timeout.
    if (wasConnecting) this.#connecting.abort();
    closeQuietly(this.#conn);
    this.#conn = null;
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
