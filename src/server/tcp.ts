/**
 * The TCP listener (RFC 7766): two-byte length framing, many pipelined queries per
 * connection answered as they complete, idle and slow clients closed, and limits on open
 * connections, queries in flight per connection and unsent answer bytes.
 *
 * @module
 */

import type { ListenAddress } from "../config.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import { formatAddr, type Resolver, type ResponseSink } from "../resolver.ts";
import { SlabCopier } from "../slab.ts";

/** Limits of the TCP listener. */
export interface TcpServerOptions {
  /** Most client connections open at once; more are closed on accept. */
  maxConnections: number;
  /** Most queries in flight per connection; reading pauses at the limit. */
  maxQueriesPerConnection: number;
  /** A connection with nothing in flight and no complete query for this long is closed. */
  idleTimeoutMs: number;
}

/** Statistics hooks of the TCP listener. */
export interface TcpStats {
  /** A client connection was accepted. */
  accepted(): void;
  /** A client connection was refused at the connection limit. */
  rejected(): void;
  /** A client sent something that is not DNS over TCP; its connection was closed. */
  malformed(): void;
}

const NO_TCP_STATS: TcpStats = { accepted() {}, rejected() {}, malformed() {} };

/** Unsent answer bytes per connection before reading pauses (a client that does not read). */
const MAX_UNSENT_BYTES = 512 * 1024;
const INITIAL_BUFFER = 4096;
/** One copier for all connections: they run on one thread, and queries are short-lived. */
const sharedCopier = new SlabCopier();
const MAX_FRAME = 2 + 65535;

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
  readonly #limitLog: RateLimitedLog;
  readonly #done: Promise<void>;
  #sweepTimer: ReturnType<typeof setInterval> | undefined;
  #closing = false;

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
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing || error instanceof Deno.errors.BadResource) break;
        this.#log.warn("tcp accept failed", { error: String(error) });
        // Out of file descriptors and the like: pause rather than spin.
        await new Promise((resolve) => setTimeout(resolve, 50));
        continue;
      }
      if (this.#closing) {
        conn.close();
        continue;
      }
      if (this.#clients.size >= this.#options.maxConnections) {
        this.#stats.rejected();
        this.#limitLog.warn("tcp connection limit reached; closing new connection", {
          limit: this.#options.maxConnections,
          client: formatAddr(conn.remoteAddr),
        });
        conn.close();
        continue;
      }
      try {
        conn.setNoDelay(true);
      } catch {
        // The client may already be gone.
      }
      this.#stats.accepted();
      const client = new TcpClient(conn, this.#resolver, this.#log, this.#options, this.#stats);
      this.#clients.add(client);
      client.finished.then(() => this.#clients.delete(client));
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

  /** Stops accepting, lets in-flight answers go out, and closes every connection. */
  async close(): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    this.#listener.close();
    await this.#done;
    const clients = [...this.#clients];
    for (const client of clients) client.shutdown();
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
  readonly #isOpen = () => !this.#closed;
  #writing = false;
  #flushScheduled = false;
  #readDone = false;
  #closed = false;
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
    if (this.#inflight === 0 && !this.#writing) this.#close();
    else this.#wake?.();
  }

  #hasRoom(): boolean {
    return this.#inflight < this.#options.maxQueriesPerConnection &&
      this.#frames.length < MAX_UNSENT_BYTES;
  }

  #notify(): void {
    if (this.#readDone && this.#inflight === 0 && !this.#writing && this.#frames.length === 0) {
      this.#close();
      return;
    }
    const wake = this.#wake;
    if (wake !== undefined && (this.#hasRoom() || this.#closed || this.#readDone)) {
      this.#wake = undefined;
      wake();
    }
  }

  async #readLoop(): Promise<void> {
    let buffer = new Uint8Array(INITIAL_BUFFER);
    const copier = sharedCopier;
    let start = 0;
    let end = 0;
    try {
      while (!this.#readDone && !this.#closed) {
        if (!this.#hasRoom()) {
          await new Promise<void>((resolve) => this.#wake = resolve);
          continue;
        }
        if (end === buffer.length) {
          if (start > 0) {
            buffer.copyWithin(0, start, end);
            end -= start;
            start = 0;
          } else {
            const bigger = new Uint8Array(Math.min(buffer.length * 2, MAX_FRAME * 2));
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
            break;
          }
          if (end - start < 2 + length) {
            if (buffer.length < 2 + length) {
              const bigger = new Uint8Array(Math.max(2 + length, buffer.length));
              bigger.set(buffer.subarray(start, end));
              end -= start;
              start = 0;
              buffer = bigger;
            }
            break;
          }
          this.#lastActive = performance.now();
          this.#handle(copier.copy(buffer, start + 2, start + 2 + length));
          start += 2 + length;
        }
        if (start === end) start = end = 0;
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
  deliver(response: Uint8Array | null): void {
    this.#inflight--;
    if (response !== null && !this.#closed) this.#enqueue(response);
    this.#notify();
  }

  #enqueue(response: Uint8Array): void {
    this.#frames.append(response);
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
      await this.#frames.drainTo(this.#conn, this.#isOpen);
      this.#lastActive = performance.now();
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
      this.#notify();
    }
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
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
