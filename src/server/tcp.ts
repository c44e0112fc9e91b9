/**
 * The TCP listener (RFC 7766): two-byte length framing, many pipelined queries per
 * connection answered as they complete, idle and slow clients closed, and limits that hold
 * whatever a client does:
 *
 * - connections: `--max-tcp-connections` in all, `--max-tcp-connections-per-client` per
 *   client address; more are closed on accept;
 * - queries in flight per connection: `--max-tcp-queries`, a hard limit (frames already read
 *   wait in the buffer until there is room); when the whole proxy is at `--max-inflight`,
 *   reading pauses too: a TCP query is never dropped;
 * - unsent answer bytes: reading pauses at 64 KiB per connection; a client that still does
 *   not read is disconnected at 128 KiB (32 KiB while all connections together hold more
 *   than 16 MiB), so memory is bounded by limits, not by luck;
 * - accept errors never stop the listener: only running out of descriptors pauses it, and
 *   then for a few milliseconds.
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import type { Resolver, ResponseSink } from "../resolver.ts";
import { SlabCopier } from "../slab.ts";

/** Limits of the TCP listener. */
export interface TcpServerOptions {
  /** Most client connections open at once; more are closed on accept. */
  maxConnections: number;
  /** Most connections open at once from one client address. */
  maxConnectionsPerClient?: number;
  /** Most queries in flight per connection; reading pauses at the limit. */
  maxQueriesPerConnection: number;
  /** A connection with nothing in flight and no complete query for this long is closed. */
  idleTimeoutMs: number;
}

/** Statistics hooks of the TCP listener. */
export interface TcpStats {
  /** A client connection was accepted. */
  accepted(): void;
  /** A client connection was refused at a connection limit. */
  rejected(): void;
  /** A client sent something that is not DNS over TCP; its connection was closed. */
  malformed(): void;
}

const NO_TCP_STATS: TcpStats = { accepted() {}, rejected() {}, malformed() {} };

/** Unsent answer bytes per connection at which reading pauses. */
const PAUSE_UNSENT_BYTES = 64 * 1024;
/** Unsent answer bytes per connection at which a client that does not read is dropped. */
const MAX_UNSENT_BYTES = 128 * 1024;
/** ...and the lower bound used while all connections together hold more than this. */
const TIGHT_UNSENT_BYTES = 32 * 1024;
const GLOBAL_UNSENT_SOFT_LIMIT = 16 * 1024 * 1024;
const INITIAL_BUFFER = 4096;
/** One copier for all connections: they run on one thread, and queries are short-lived. */
const sharedCopier = new SlabCopier();
const MAX_FRAME = 2 + 65535;

/** True for "out of file descriptors" (EMFILE, ENFILE): the one accept error worth a pause. */
export function isDescriptorExhaustion(error: unknown): boolean {
  const message = error instanceof Error ? error.message : String(error);
  return /too many open files|os error 2[34]\b/i.test(message);
}

/** Unsent bytes across every connection of every listener (they share one process). */
let globalUnsent = 0;

/**
 * Serves DNS over TCP on one address.
 *
 * @example
 * ```ts ignore
 * const server = TcpServer.listen({ hostname: "127.0.0.1", port: 5300 }, resolver, log, {
 *   maxConnections: 1000, maxQueriesPerConnection: 128, idleTimeoutMs: 10000 });
 * await server.close();
 * ```
 */
export class TcpServer {
  readonly #listener: Deno.TcpListener;
  readonly #resolver: Resolver;
  readonly #log: Logger;
  readonly #options: TcpServerOptions;
  readonly #stats: TcpStats;
  readonly #clients = new Set<TcpClient>();
  readonly #perClient = new Map<string, number>();
  readonly #limitLog: RateLimitedLog;
  readonly #acceptLog: RateLimitedLog;
  readonly #done: Promise<void>;
  #sweepTimer: ReturnType<typeof setInterval> | undefined;
  #closing = false;
  #listenerClosed = false;

  /** Starts serving on an already bound listener. */
  constructor(
    listener: Deno.TcpListener,
    resolver: Resolver,
    log: Logger,
    options: TcpServerOptions,
    stats: TcpStats = NO_TCP_STATS,
  ) {
    this.#listener = listener;
    this.#resolver = resolver;
    this.#log = log;
    this.#options = options;
    this.#stats = stats;
    this.#limitLog = new RateLimitedLog(log, 10_000);
    this.#acceptLog = new RateLimitedLog(log, 10_000);
    this.#done = this.#accept();
  }

  /** Binds `address` and starts serving; throws the OS error when it cannot bind. */
  static listen(
    address: ListenAddress,
    resolver: Resolver,
    log: Logger,
    options: TcpServerOptions,
    stats?: TcpStats,
  ): TcpServer {
    const listener = Deno.listen({
      transport: "tcp",
      hostname: address.hostname,
      port: address.port,
    });
    return new TcpServer(listener, resolver, log, options, stats);
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#listener.addr;
  }

  /** Client connections open now. */
  get openConnections(): number {
    return this.#clients.size;
  }

  async #accept(): Promise<void> {
    let pauseMs = 5;
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#listenerClosed || error instanceof Deno.errors.BadResource) break;
        if (isDescriptorExhaustion(error)) {
          // Out of descriptors: give the process a moment to close some, then try again.
          this.#acceptLog.warn("tcp accept failed: out of file descriptors; pausing", {
            pause_ms: pauseMs,
            open: this.#clients.size,
          });
          await new Promise((resolve) => setTimeout(resolve, pauseMs));
          pauseMs = Math.min(100, pauseMs * 2);
        } else {
          // A client that reset before accept() and the like: nothing to wait for.
          this.#log.debug("tcp accept failed", { error: String(error) });
        }
        continue;
      }
      pauseMs = 5;
      if (this.#closing) {
        conn.close();
        continue;
      }
      const remote = conn.remoteAddr;
      const source = remote.hostname;
      const fromSource = this.#perClient.get(source) ?? 0;
      const perClient = this.#options.maxConnectionsPerClient ?? Infinity;
      if (this.#clients.size >= this.#options.maxConnections || fromSource >= perClient) {
        this.#stats.rejected();
        this.#limitLog.warn("tcp connection limit reached; closing new connection", {
          limit: fromSource >= perClient ? perClient : this.#options.maxConnections,
          per: fromSource >= perClient ? "client" : "proxy",
          client: formatAddr(remote),
        });
        try {
          conn.close();
        } catch {
          // Already gone.
        }
        continue;
      }
      try {
        conn.setNoDelay(true);
      } catch {
        // The client may already be gone.
      }
      this.#stats.accepted();
      this.#perClient.set(source, fromSource + 1);
      const client = new TcpClient(conn, this.#resolver, this.#log, this.#options, this.#stats);
      this.#clients.add(client);
      client.finished.then(() => {
        this.#clients.delete(client);
        const left = (this.#perClient.get(source) ?? 1) - 1;
        if (left <= 0) this.#perClient.delete(source);
        else this.#perClient.set(source, left);
      });
      this.#ensureSweep();
    }
  }

  #ensureSweep(): void {
    if (this.#sweepTimer !== undefined) return;
    const every = Math.max(50, Math.min(1000, this.#options.idleTimeoutMs / 4));
    this.#sweepTimer = setInterval(() => {
      const now = performance.now();
      for (const client of this.#clients) client.checkIdle(now);
      if (this.#clients.size === 0) {
        clearInterval(this.#sweepTimer);
        this.#sweepTimer = undefined;
      }
    }, every);
  }

  /**
   * Stops accepting and reading new queries; resolves once every in-flight answer is written
   * and every connection closed, or after `timeoutMs`, when whatever is left is closed.
   */
  async close(timeoutMs = 10_000): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      this.#listenerClosed = true;
      try {
        this.#listener.close();
      } catch {
        // Already closed.
      }
    }
    await this.#done;
    const clients = [...this.#clients];
    for (const client of clients) client.shutdown();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const forced = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        for (const client of this.#clients) client.abort();
        resolve();
      }, timeoutMs);
    });
    await Promise.race([Promise.all(clients.map((c) => c.finished)), forced]);
    clearTimeout(timer);
    await Promise.all(clients.map((c) => c.finished));
    if (this.#sweepTimer !== undefined) {
      clearInterval(this.#sweepTimer);
      this.#sweepTimer = undefined;
    }
  }
}

/** One client connection. */
class TcpClient implements ResponseSink {
  readonly #conn: Deno.TcpConn;
  readonly #resolver: Resolver;
  readonly #log: Logger;
  readonly #options: TcpServerOptions;
  readonly #stats: TcpStats;
  readonly #remote: Deno.Addr;
  readonly finished: Promise<void>;
  #inflight = 0;
  #lastActive = performance.now();
  #writeStartedAt = 0;
  readonly #frames = new FrameBuffer(INITIAL_BUFFER);
  /** Bytes handed to the write in progress. */
  #writingBytes = 0;
  #writing = false;
  #flushScheduled = false;
  #readDone = false;
  #closed = false;
  #closeAfterWrite = false;
  #wake: (() => void) | undefined;
  readonly #flush = () => this.#flushLoop();

  constructor(
    conn: Deno.TcpConn,
    resolver: Resolver,
    log: Logger,
    options: TcpServerOptions,
    stats: TcpStats,
  ) {
    this.#conn = conn;
    this.#resolver = resolver;
    this.#log = log;
    this.#options = options;
    this.#stats = stats;
    this.#remote = conn.remoteAddr;
    this.finished = this.#readLoop();
  }

  /** Bytes of answers not yet written to the client. */
  get #unsent(): number {
    return this.#frames.length + this.#writingBytes;
  }

  /** Closes the connection when idle too long or stuck writing to a client that won't read. */
  checkIdle(now: number): void {
    const timeout = this.#options.idleTimeoutMs;
    if (this.#writing && now - this.#writeStartedAt > timeout) {
      this.#log.debug("closing tcp connection: client not reading", {
        client: formatAddr(this.#remote),
      });
      this.#close();
    } else if (this.#inflight === 0 && !this.#writing && now - this.#lastActive > timeout) {
      this.#log.debug("closing idle tcp connection", { client: formatAddr(this.#remote) });
      this.#close();
    }
  }

  /** Stops reading; closes once in-flight answers are written. */
  shutdown(): void {
    this.#readDone = true;
    this.#notify();
  }

  /** Closes now, whatever is in flight. */
  abort(): void {
    this.#close();
  }

  #hasRoom(): boolean {
    return this.#inflight < this.#options.maxQueriesPerConnection &&
      this.#unsent < PAUSE_UNSENT_BYTES && this.#resolver.hasCapacity;
  }

  #notify(): void {
    if (
      this.#readDone && this.#inflight === 0 && !this.#writing && this.#frames.length === 0
    ) {
      this.#close();
      return;
    }
    const wake = this.#wake;
    if (wake !== undefined && (this.#hasRoom() || this.#closed || this.#readDone)) {
      this.#wake = undefined;
      wake();
    }
  }

  /** Waits until there is room for another query (or the connection is done). */
  async #waitForRoom(): Promise<void> {
    while (!this.#hasRoom() && !this.#closed && !this.#readDone) {
      if (!this.#resolver.hasCapacity) {
        await this.#resolver.waitForCapacity();
      } else {
        await new Promise<void>((resolve) => this.#wake = resolve);
      }
    }
  }

  async #readLoop(): Promise<void> {
    let buffer = new Uint8Array(INITIAL_BUFFER);
    const copier = sharedCopier;
    let start = 0;
    let end = 0;
    try {
      reading: while (!this.#readDone && !this.#closed) {
        // Handle the complete frames already buffered, one at a time, within the limits.
        while (end - start >= 2) {
          const length = readU16(buffer, start);
          if (length < HEADER_SIZE) {
            // A zero or header-less frame cannot be answered or resynchronised.
            this.#stats.malformed();
            this.#log.debug("closing tcp connection: frame too short", {
              client: formatAddr(this.#remote),
              length,
            });
            this.#readDone = true;
            break reading;
          }
          if (end - start < 2 + length) break;
          if (!this.#hasRoom()) {
            await this.#waitForRoom();
            if (this.#closed || this.#readDone) break reading;
          }
          this.#lastActive = performance.now();
          this.#handle(copier.copy(buffer, start + 2, start + 2 + length));
          start += 2 + length;
        }
        if (start === end) start = end = 0;
        // Make room for the rest of the frame being read (or for more frames).
        const needed = end - start >= 2 ? 2 + readU16(buffer, start) : 0;
        if (end === buffer.length || buffer.length - start < needed) {
          if (start > 0) {
            buffer.copyWithin(0, start, end);
            end -= start;
            start = 0;
          }
          if (end === buffer.length || buffer.length < needed) {
            const size = Math.min(Math.max(needed, buffer.length * 2), 2 * MAX_FRAME);
            const bigger = new Uint8Array(size);
            bigger.set(buffer.subarray(0, end));
            buffer = bigger;
          }
        }
        const n = await this.#conn.read(buffer.subarray(end));
        if (n === null) {
          if (end > start) {
            this.#log.debug("tcp client closed mid-frame", { client: formatAddr(this.#remote) });
          }
          break;
        }
        end += n;
      }
    } catch (error) {
      if (!this.#closed) {
        this.#log.debug("tcp read failed", {
          client: formatAddr(this.#remote),
          error: String(error),
        });
      }
    }
    this.#readDone = true;
    while (!this.#closed && (this.#inflight > 0 || this.#writing || this.#frames.length > 0)) {
      await new Promise<void>((resolve) => this.#wake = resolve);
    }
    this.#close();
  }

  #handle(query: Uint8Array): void {
    this.#inflight++;
    this.#resolver.resolveWith(query, "tcp", this.#remote, this);
  }

  /** Queues a response for the client (the {@linkcode ResponseSink} side). */
  deliver(response: Uint8Array | null, _client?: Deno.Addr, close?: boolean): void {
    this.#inflight--;
    if (close) {
      // Refused by access control: answer, then close.
      this.#readDone = true;
      this.#closeAfterWrite = true;
    }
    if (response !== null && !this.#closed) this.#enqueue(response);
    else if (close && !this.#writing && this.#frames.length === 0) this.#close();
    this.#notify();
  }

  #enqueue(response: Uint8Array): void {
    const limit = globalUnsent > GLOBAL_UNSENT_SOFT_LIMIT ? TIGHT_UNSENT_BYTES : MAX_UNSENT_BYTES;
    if (this.#unsent + response.length + 2 > limit && this.#unsent > 0) {
      this.#log.debug("closing tcp connection: client not reading its answers", {
        client: formatAddr(this.#remote),
        unsent: this.#unsent,
      });
      this.#close();
      return;
    }
    this.#frames.append(response);
    globalUnsent += response.length + 2;
    if (!this.#writing && !this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
  }

  async #flushLoop(): Promise<void> {
    this.#flushScheduled = false;
    if (this.#writing || this.#closed) return;
    this.#writing = true;
    this.#writeStartedAt = performance.now();
    try {
      while (this.#frames.length > 0 && !this.#closed) {
        const bytes = this.#frames.length;
        this.#writingBytes = bytes;
        await this.#frames.drainOnce(this.#conn);
        if (this.#closed) break; // #close() settled the accounting
        this.#writingBytes = 0;
        globalUnsent -= bytes;
        this.#lastActive = performance.now();
        this.#writeStartedAt = this.#lastActive;
      }
    } catch (error) {
      if (!this.#closed) {
        this.#log.debug("tcp write failed", {
          client: formatAddr(this.#remote),
          error: String(error),
        });
        this.#close();
      }
    } finally {
      this.#writing = false;
      if (this.#closeAfterWrite && this.#frames.length === 0) this.#close();
      this.#notify();
    }
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    globalUnsent -= this.#unsent;
    this.#writingBytes = 0;
    this.#frames.clear();
    try {
      this.#conn.close();
    } catch {
      // Already closed.
    }
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }
}
