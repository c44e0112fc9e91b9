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
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import type { Logger } from "../log.ts";
import { SlabCopier } from "../slab.ts";
import type { Clock } from "../timers.ts";
import type { Exchange, ExchangeCarrier } from "./exchange.ts";
import { UpstreamError, type UpstreamErrorReason, type UpstreamStats } from "./types.ts";

/**
 * How long (at least; four times the connection's fastest answer if more) a connection may
 * owe the server an ACK before it is nudged. A server that holds small writes under Nagle's
 * algorithm (Unbound's DoT does) holds every answer after the first until the client
 * acknowledges, and Linux delays that ACK by up to 40 ms when the client has nothing to send.
 * When queries are still in flight that long after the last read with no write since, the
 * oldest is written again under the same ID: the write carries the ACK, the held answers
 * come at once, and the echo of the duplicate is ignored.
 */
export const NUDGE_MS = 2;

/** How long a new connection rests before it takes queries (see `settled`). */
export const SETTLE_MS = 50;

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
  /** The clock. */
  readonly clock: Clock;
  /** The handshake completed after `handshakeMs`. */
  onOpen(connection: UpstreamConnection, handshakeMs: number): void;
  /** An answer (valid, matching) arrived for `exchange` after `ms`; `exchange` may be ended. */
  onAnswer(
    connection: UpstreamConnection,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
    ms: number,
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
  /**
   * Clock time since when exchanges have waited with no answer arriving (0 when nothing
   * waits): the measure of a connection that stopped answering.
   */
  readonly waitingSince: number;
  /** True once this side asked it to close (idle, abandoned, shutting down). */
  readonly closeRequested: boolean;
  /** True once open long enough to take queries (see {@linkcode SETTLE_MS}). */
  settled(now: number): boolean;
  /** Starts connecting. */
  start(): void;
  /** Puts `exchange` on the wire (queued until the handshake completes). */
  send(exchange: Exchange): void;
  /** Closes; exchanges in flight are handed back as orphans. */
  close(): void;
  /** Closes as a failure (stalled or misbehaving); exchanges in flight are handed back. */
  abandon(reason: UpstreamErrorReason, message: string): void;
  /** Forgets ended exchanges written before `before` whose answers never came. */
  purge(before: number): void;
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

/** Classifies a connect, handshake or I/O error into a metrics reason. */
export function classifyError(error: unknown): UpstreamErrorReason {
  if (error instanceof UpstreamError) return error.reason;
  if (error instanceof Deno.errors.ConnectionRefused) return "refused";
  if (error instanceof Deno.errors.TimedOut) return "timeout";
  const message = error instanceof Error ? error.message : String(error);
  // ENETUNREACH (101) and EHOSTUNREACH (113): no route, not a reset.
  if (
    /unreachable|os error 101|os error 113|os error 51|os error 65/i.test(message) ||
    (error instanceof Error && error.name === "NetworkUnreachable")
  ) return "unreachable";
  if (
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.UnexpectedEof ||
    error instanceof Deno.errors.NotConnected
  ) return "reset";
  if (/certificate|tls|handshake|CertNotValid|UnknownIssuer|NotValidForName/i.test(message)) {
    return "tls";
  }
  if (/refused/i.test(message)) return "refused";
  return "reset";
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
  /** Clock time of the last read that delivered an answer. */
  lastReadAt = 0;
  /** The fastest answer latency seen on this connection (drifting up), in milliseconds. */
  minRttMs = 0;
  /** See {@linkcode UpstreamConnection.waitingSince}. */
  waitingSince = 0;
  #nudgeTimer: ReturnType<typeof setTimeout> | undefined;
  /** IDs of answered exchanges whose duplicate (see `NUDGE_MS`) may still be answered. */
  readonly #echoes = new Map<number, number>();
  readonly #nudge = () => this.#nudgeNow();
  readonly #owner: ConnectionOwner;
  readonly #clock: Clock;
  #conn: Deno.TlsConn | null = null;
  #tcp: Deno.TcpConn | null = null;
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
    exchange.writes++;
    const now = this.#clock.now();
    if (this.waitingSince === 0) this.waitingSince = now;
    this.inflight.set(id, exchange);
    this.#enqueue(exchange, id);
    exchange.sentAt = now;
    this.lastActive = now;
    this.lastWriteAt = now;
    if (this.state === "open" && !this.#flushScheduled && !this.#writing) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
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
    if (this.inflight.size === 0) this.waitingSince = 0;
  }

  /** Closes the connection; exchanges still in flight are handed back as orphans. */
  close(): void {
    this.#closeRequested = true;
    this.#shutdown(null);
  }

  /** Closes a stalled or misbehaving connection as a failure, handing its exchanges back. */
  abandon(reason: UpstreamErrorReason, message: string): void {
    const label = this.#owner.spec.label;
    this.#owner.stats.error(reason);
    this.#owner.log.warn("closing upstream connection", {
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
    const at = this.#frames.append(exchange.message);
    const bytes = this.#frames.bytes;
    bytes[at] = id >> 8;
    bytes[at + 1] = id & 0xff;
  }

  async #run(): Promise<void> {
    const { spec, caCerts, log, stats, connectTimeoutMs } = this.#owner;
    const controller = new AbortController();
    const timer = setTimeout(() => {
      controller.abort();
      this.#tcp?.close();
      this.#conn?.close();
    }, connectTimeoutMs);
    const startedAt = this.#clock.now();
    try {
      this.#tcp = await Deno.connect({
        hostname: spec.address,
        port: spec.port,
        transport: "tcp",
        signal: controller.signal,
      });
      this.#tcp.setNoDelay(true);
      this.#tcp.setKeepAlive(true);
      const tcp = this.#tcp;
      this.#tcp = null;
      this.#conn = await Deno.startTls(tcp, { hostname: spec.tlsName, caCerts });
      await this.#conn.handshake();
    } catch (error) {
      clearTimeout(timer);
      const reason = controller.signal.aborted ? "timeout" : classifyError(error);
      stats.handshake(false);
      stats.error(reason);
      const detail = controller.signal.aborted
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
    if (this.#closeRequested) {
      this.#shutdown(null);
      return;
    }
    stats.handshake(true);
    this.state = "open";
    this.opened = true;
    this.openedAt = this.#clock.now();
    // Queued exchanges go on the wire now: time their answers from here, not from the queue.
    for (const exchange of this.inflight.values()) exchange.sentAt = this.openedAt;
    if (this.inflight.size > 0) this.waitingSince = this.openedAt;
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
      await this.#frames.drainTo(conn, this.#isOpen);
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
        while (end - start >= 2) {
          const length = readU16(buffer, start);
          if (end - start < 2 + length) break;
          this.lastReadAt = this.#clock.now();
          if (!this.#onMessage(buffer, start + 2, start + 2 + length)) {
            failure = new UpstreamError("bad_response", `${label} sent a malformed frame`, label);
            break;
          }
          start += 2 + length;
        }
        if (failure || this.state !== "open") break;
        if (start === end) start = end = 0;
        if (this.#owner.nudge && this.inflight.size > 0 && this.#nudgeTimer === undefined) {
          this.#nudgeTimer = setTimeout(this.#nudge, NUDGE_MS);
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
      this.#owner.stats.error(failure.reason);
      this.#owner.log.warn("upstream connection broke", {
        upstream: label,
        reason: failure.reason,
        error: failure.message,
        inflight: this.inflight.size,
      });
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
      if (this.#echoes.delete(id)) return true; // the echo of a nudge
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
    if (exchange.nudged) {
      if (this.#echoes.size > 1024) this.#echoes.clear();
      this.#echoes.set(id, 0);
    }
    const now = this.#clock.now();
    this.lastActive = now;
    // Any frame for a query in flight is progress: the server reads and answers.
    this.waitingSince = this.inflight.size > 0 ? now : 0;
    if (!valid) {
      this.#owner.onBadAnswer(
        this,
        exchange,
        info.reason || "the answer is for another question",
      );
      return true;
    }
    const rtt = now - exchange.sentAt;
    // The fastest answer seen, drifting up slowly so a path that got slower is relearnt.
    this.minRttMs = this.minRttMs === 0 || rtt < this.minRttMs ? rtt : this.minRttMs * 1.01;
    this.answered++;
    this.#owner.onAnswer(this, exchange, response, info, rtt);
    return true;
  }

  /** True when answers arrived after the last write while exchanges are still in flight. */
  get owesAck(): boolean {
    return this.lastReadAt > this.lastWriteAt && this.inflight.size > 0;
  }

  #nudgeNow(): void {
    this.#nudgeTimer = undefined;
    if (this.state !== "open" || !this.owesAck) return;
    const now = this.#clock.now();
    // Held answers inflate the average RTT; the fastest answer seen says what prompt is.
    const patience = Math.max(NUDGE_MS, 4 * this.minRttMs);
    for (const exchange of this.inflight.values()) {
      if (exchange.nudged || exchange.ended) continue;
      if (now - exchange.sentAt < patience) break;
      exchange.nudged = true;
      this.#enqueue(exchange, exchange.wireId);
      this.lastWriteAt = now;
      if (!this.#flushScheduled && !this.#writing) {
        this.#flushScheduled = true;
        queueMicrotask(this.#flush);
      }
      return;
    }
    if (this.inflight.size > 0) this.#nudgeTimer = setTimeout(this.#nudge, NUDGE_MS);
  }

  #shutdown(failure: UpstreamError | null): void {
    if (this.#nudgeTimer !== undefined) {
      clearTimeout(this.#nudgeTimer);
      this.#nudgeTimer = undefined;
    }
    if (this.state === "closed") return;
    this.state = "closed";
    try {
      this.#conn?.close();
    } catch {
      // Already closed by the peer.
    }
    try {
      this.#tcp?.close();
    } catch {
      // Already consumed or closed.
    }
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
    this.waitingSince = 0;
    this.#owner.onClosed(this, orphans, failure);
  }
}
