/**
 * One long-lived DNS-over-TLS connection (RFC 7858) carrying many queries at once
 * (RFC 7766 pipelining), each under an ID chosen here and unique on the connection.
 *
 * Writes are coalesced: every query queued in the same turn of the event loop goes out in
 * one TLS write. Reads land in one reusable buffer and are split into frames in place.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import { answersQuestion } from "../dns/response.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import type { Logger } from "../log.ts";
import { SlabCopier } from "../slab.ts";
import type { PendingQuery, QueryCarrier } from "./pending_query.ts";
import { UpstreamError, type UpstreamErrorReason, type UpstreamStats } from "./types.ts";

/**
 * How long (at least; four times the connection's fastest answer if more) a connection may
 * owe the server an ACK before it is nudged. A server that
 * holds small writes under Nagle's algorithm (Unbound's DoT does) holds every answer after
 * the first until the client acknowledges, and Linux delays that ACK by up to 40 ms when the
 * client has nothing to send. When queries are still in flight that long after the last
 * read with no write since, the oldest is written again under the same ID: the write
 * carries the ACK, the held answers come at once, and the echo of the duplicate is ignored.
 */
export const NUDGE_MS = 2;

/** How long a new connection rests before it takes queries (see `settled`). */
export const SETTLE_MS = 50;

/** Most queries in flight on one connection (IDs are 16 bits; keep plenty free). */
export const MAX_QUERIES_PER_CONNECTION = 16384;

const READ_BUFFER_SIZE = 256 * 1024;
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
  /** The handshake completed. */
  onOpen(connection: DotConnection): void;
  /** `query` was answered with `response` (client ID restored) after `seconds`. */
  onAnswer(
    connection: DotConnection,
    query: PendingQuery,
    response: Uint8Array,
    seconds: number,
  ): void;
  /**
   * The connection is gone. `orphans` were in flight and unanswered; `failure` is set when
   * it broke rather than closed normally.
   */
  onClosed(
    connection: DotConnection,
    orphans: PendingQuery[],
    failure: UpstreamError | null,
  ): void;
}

/** Connection lifecycle states. */
export type ConnectionState = "connecting" | "open" | "closed";

const copier = new SlabCopier();
const randomIds = new Uint16Array(2048);
let randomIndex = randomIds.length;

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
  if (
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.UnexpectedEof ||
    error instanceof Deno.errors.NotConnected
  ) return "reset";
  const message = error instanceof Error ? error.message : String(error);
  if (/certificate|tls|handshake|CertNotValid|UnknownIssuer|NotValidForName/i.test(message)) {
    return "tls";
  }
  if (/refused/i.test(message)) return "refused";
  return "reset";
}

/**
 * A pipelined DoT connection. Created by an upstream, which hands it queries with
 * {@linkcode DotConnection.send} and hears back through its {@linkcode ConnectionOwner}.
 *
 * @example
 * ```ts ignore
 * const connection = new DotConnection(owner);
 * connection.start();
 * connection.send(pendingQuery);
 * ```
 */
export class DotConnection implements QueryCarrier {
  /** Lifecycle state. */
  state: ConnectionState = "connecting";
  /** Queries in flight by wire ID. */
  readonly inflight = new Map<number, PendingQuery>();
  /** Answers delivered on this connection. */
  answered = 0;
  /** True once the TLS handshake completed. */
  opened = false;
  /** `performance.now()` when the handshake completed. */
  openedAt = 0;
  /** `performance.now()` of the last send or answer. */
  lastActive: number = performance.now();
  /** `performance.now()` of the last query handed to this connection. */
  lastWriteAt = 0;
  /** `performance.now()` of the last read that delivered an answer. */
  lastReadAt = 0;
  /** The fastest answer latency seen on this connection (drifting up), in milliseconds. */
  minRttMs = 0;
  #nudgeTimer: ReturnType<typeof setTimeout> | undefined;
  /** IDs of answered queries whose duplicate (see `NUDGE_MS`) may still be answered. */
  readonly #echoes = new Map<number, number>();
  readonly #nudge = () => this.#nudgeNow();
  /**
   * `performance.now()` since when queries have waited with no answer arriving: set when
   * the first query goes in flight, moved forward by every answer.
   */
  waitingSince = 0;
  readonly #owner: ConnectionOwner;
  #conn: Deno.TlsConn | null = null;
  #tcp: Deno.TcpConn | null = null;
  readonly #frames = new FrameBuffer(16 * 1024);
  #flushScheduled = false;
  #writing = false;
  #writeStartedAt = 0;
  #closeRequested = false;
  #done: Promise<void> = Promise.resolve();
  readonly #flush = () => this.#flushLoop();
  readonly #isOpen = () => this.state === "open";

  /** Creates an unconnected connection; call {@linkcode start}. */
  constructor(owner: ConnectionOwner) {
    this.#owner = owner;
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

  /** Number of queries in flight. */
  get load(): number {
    return this.inflight.size;
  }

  /** Puts `query` on the wire under a fresh ID (queued until the handshake completes). */
  send(query: PendingQuery): void {
    let id = nextRandomId();
    while (this.inflight.has(id) || this.#echoes.has(id)) id = nextRandomId();
    query.wireId = id;
    query.carrier = this;
    query.nudged = false;
    query.attempts++;
    if (this.inflight.size === 0) this.waitingSince = performance.now();
    this.inflight.set(id, query);
    this.#enqueue(query, id);
    const now = performance.now();
    query.sentAt = now;
    this.lastActive = now;
    this.lastWriteAt = now;
    if (this.state === "open" && !this.#flushScheduled && !this.#writing) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
  }

  /** Forgets `query` (its deadline passed), freeing its ID. */
  detach(query: PendingQuery): void {
    if (this.inflight.get(query.wireId) === query) this.inflight.delete(query.wireId);
  }

  /** Closes the connection; queries still in flight are handed back as orphans. */
  close(): void {
    this.#closeRequested = true;
    this.#shutdown(null);
  }

  /**
   * True when queries have waited `limitMs` with no answer at all, or a write has been stuck
   * that long: the upstream stopped answering or reading, though the connection is up.
   */
  stalled(now: number, limitMs: number): boolean {
    if (this.state !== "open") return false;
    if (this.#writing && now - this.#writeStartedAt > limitMs) return true;
    return this.inflight.size > 0 && now - this.waitingSince > limitMs;
  }

  /** Closes a stalled connection as a failure, handing its queries back. */
  abandon(reason: string): void {
    const label = this.#owner.spec.label;
    this.#owner.stats.error("timeout");
    this.#owner.log.warn("upstream connection stalled; closing it", {
      upstream: label,
      reason,
      inflight: this.inflight.size,
    });
    this.#closeRequested = true;
    this.#shutdown(new UpstreamError("timeout", `${label} stopped answering`, label));
  }

  /** Appends `query`'s frame under `id` to the write buffer. */
  #enqueue(query: PendingQuery, id: number): void {
    const at = this.#frames.append(query.query);
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
      const detail = error instanceof Error ? error.message : String(error);
      const failure = new UpstreamError(
        reason,
        `connecting to ${spec.label} failed: ${controller.signal.aborted ? "timed out" : detail}`,
        spec.label,
      );
      if (!this.#closeRequested) {
        log.error("upstream connection failed", {
          upstream: spec.label,
          reason,
          error: controller.signal.aborted ? `no handshake within ${connectTimeoutMs} ms` : detail,
        });
      }
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
    this.openedAt = performance.now();
    log.debug("upstream connection open", { upstream: spec.label });
    this.#owner.onOpen(this);
    if (this.#frames.length > 0) this.#flushLoop();
    await this.#readLoop(this.#conn);
  }

  async #flushLoop(): Promise<void> {
    this.#flushScheduled = false;
    const conn = this.#conn;
    if (this.#writing || this.state !== "open" || conn === null) return;
    this.#writing = true;
    this.#writeStartedAt = performance.now();
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
    const buffer = new Uint8Array(READ_BUFFER_SIZE);
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
          this.lastReadAt = performance.now();
          if (!this.#onMessage(buffer, start + 2, start + 2 + length)) {
            failure = new UpstreamError("bad_response", `${label} sent a malformed frame`, label);
            break;
          }
          start += 2 + length;
        }
        if (failure) break;
        if (start === end) start = end = 0;
        if (this.inflight.size > 0 && this.#nudgeTimer === undefined) {
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
    if (failure && !this.#closeRequested) {
      this.#owner.stats.error(failure.reason);
      this.#owner.log.warn("upstream connection broke", {
        upstream: label,
        reason: failure.reason,
        error: failure.message,
        inflight: this.inflight.size,
      });
    } else if (this.inflight.size > 0 && !this.#closeRequested) {
      this.#owner.log.debug("upstream closed the connection with queries in flight", {
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
    const query = this.inflight.get(id);
    if (query === undefined) {
      if (this.#echoes.delete(id)) return true; // the echo of a nudge

      // A late answer to a query whose deadline passed: harmless.
      this.#owner.log.debug("upstream answer for no query in flight", {
        upstream: this.#owner.spec.label,
        id,
      });
      return true;
    }
    const response = copier.copy(buffer, start, end);
    if (!answersQuestion(response, query.query, query.questionEnd)) {
      this.#owner.stats.error("bad_response");
      this.#owner.log.warn("upstream answer does not match the question; ignored", {
        upstream: this.#owner.spec.label,
        id,
      });
      return true;
    }
    this.inflight.delete(id);
    if (query.nudged) {
      if (this.#echoes.size > 1024) this.#echoes.clear();
      this.#echoes.set(id, 0);
    }
    response[0] = query.query[0];
    response[1] = query.query[1];
    const now = performance.now();
    const rtt = now - query.sentAt;
    // The fastest answer seen, drifting up slowly so a path that got slower is relearnt.
    this.minRttMs = this.minRttMs === 0 || rtt < this.minRttMs ? rtt : this.minRttMs * 1.01;
    this.answered++;
    this.lastActive = now;
    this.waitingSince = now;
    this.#owner.onAnswer(this, query, response, (now - query.sentAt) / 1000);
    return true;
  }

  /** True when answers arrived after the last write while queries are still in flight. */
  get owesAck(): boolean {
    return this.lastReadAt > this.lastWriteAt && this.inflight.size > 0;
  }

  #nudgeNow(): void {
    this.#nudgeTimer = undefined;
    if (this.state !== "open" || !this.owesAck) return;
    const now = performance.now();
    // Held answers inflate the average RTT; the fastest answer seen says what prompt is.
    const patience = Math.max(NUDGE_MS, 4 * this.minRttMs);
    for (const query of this.inflight.values()) {
      if (query.nudged) continue;
      if (now - query.sentAt < patience) break;
      query.nudged = true;
      this.#enqueue(query, query.wireId);
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
    const orphans = [...this.inflight.values()];
    this.inflight.clear();
    for (const query of orphans) query.carrier = null;
    this.#owner.onClosed(this, orphans, failure);
  }
}
