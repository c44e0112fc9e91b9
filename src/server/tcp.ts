/**
 * The TCP listener (RFC 7766): two-byte length framing, many pipelined queries per
 * connection answered as they complete, idle and slow clients closed, and limits that hold
 * whatever a client does:
 *
 * - connections: `--max-tcp-connections` in all, `--max-tcp-connections-per-client` per
 *   client (IPv4 address, IPv6 /64); more are closed on accept. Clients outside `--allow`
 *   share {@linkcode MAX_OUTSIDER_CONNECTIONS} of their own, idle for at most
 *   {@linkcode OUTSIDER_IDLE_MS}, so they cannot take the slots of the clients served;
 * - queries in flight per connection: `--max-tcp-queries`, a hard limit (frames already read
 *   wait in the buffer until there is room); when the whole proxy is at `--max-inflight`,
 *   reading pauses too: a TCP query is never dropped. A new connection starts with a window
 *   of {@linkcode INITIAL_WINDOW} queries in flight, one more for each answer written to it
 *   (as TCP's slow start): a client that pipelines 128 queries for 64 KB answers and never
 *   reads cannot make the proxy build 8 MB of answers for it. And all connections together
 *   have at most {@linkcode TCP_ANSWER_BUDGET} bytes of answers in flight, by an estimate
 *   of the answer size that follows the largest recent answers (each connection may always
 *   have one): 1,000 such clients cannot make it build 1,000 x 16 x 64 KB at once;
 * - unsent answer bytes: reading pauses at 64 KiB per connection (at the first unsent byte
 *   while all connections together hold more than 16 MiB); a client that still does not read
 *   is disconnected at 128 KiB (32 KiB above 16 MiB in all; then also when its write has not
 *   moved for a second), and the buffers that held a burst are let go once it is written,
 *   so memory is bounded by limits, not by luck;
 * - query size: a frame longer than {@linkcode MAX_QUERY_FRAME} closes the connection (no
 *   query is that long; dotproxy forwards none over 512 octets), so a client cannot make a
 *   connection hold a 64 KiB read buffer;
 * - accept errors never stop the listener: only running out of descriptors pauses it, and
 *   then for a few milliseconds; both kinds are logged at most once in ten seconds.
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { clientKey } from "../resolver/admission.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { FrameBuffer } from "../frame_buffer.ts";
import { isDescriptorExhaustion } from "./http.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import type { Resolver, ResponseSink } from "../resolver.ts";
import { SlabCopier } from "../slab.ts";
import { SYSTEM_CLOCK } from "../timers.ts";

/** Limits of the TCP listener. */
export interface TcpServerOptions {
  /** Most client connections open at once; more are closed on accept. */
  maxConnections: number;
  /** Most connections open at once from one client (IPv4 address, IPv6 /64). */
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
/** Above it, a connection whose write has not moved for this long is closed. */
const STUCK_UNDER_PRESSURE_MS = 1000;
const INITIAL_BUFFER = 4096;
/**
 * Queries a new connection may have in flight before any answer was written to it; each
 * answer written allows one more, up to `--max-tcp-queries`. A client that reads its answers
 * reaches the full window within a few round trips.
 */
export const INITIAL_WINDOW = 16;
/**
 * Estimated bytes of answers to TCP queries in flight, all connections together: the number
 * of TCP queries in flight times the size of recent answers stays under this (a connection
 * with none in flight may always send one). With answers of a few hundred octets it never
 * binds (`--max-inflight` does first); with 60 KB answers it allows about 550.
 */
export const TCP_ANSWER_BUDGET = 32 * 1024 * 1024;
/** The answer size the estimate decays towards. */
const TYPICAL_ANSWER = 512;
/**
 * The estimate starts at the largest answer: until answers show they are small (a few
 * hundred of them), 512 TCP queries may be in flight. Starting low let 1,000 connections
 * opened at once have 10,000 queries for 60 KB answers in flight (measured: 270 MiB).
 */
const LARGEST_ANSWER = 65535;
/** TCP queries in flight, all connections of all listeners. */
let tcpInflight = 0;
/**
 * Size of recent TCP answers: jumps to any larger answer, and decays by 1 % per answer (a
 * few hundred small answers forget a big one).
 */
let answerEstimate = LARGEST_ANSWER;

/** One copier for all connections: they run on one thread, and queries are short-lived. */
const sharedCopier = new SlabCopier();
/**
 * The longest query frame read. Real queries are a few hundred octets (a 255-octet name,
 * an OPT, a client subnet, padding: 384), and anything whose upstream form exceeds 512 is
 * answered FORMERR anyway; a longer frame closes the connection.
 */
export const MAX_QUERY_FRAME = 4096;

/**
 * Connections open at once from clients outside `--allow` (they get REFUSED, then the close),
 * counted apart from `--max-tcp-connections`.
 */
export const MAX_OUTSIDER_CONNECTIONS = 16;
/** An outsider's connection with no complete query for this long is closed. */
export const OUTSIDER_IDLE_MS = 2000;

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
  /** Connections open from clients outside `--allow`. */
  #outsiders = 0;
  readonly #limitLog: RateLimitedLog;
  readonly #acceptLog: RateLimitedLog;
  /** Accept errors other than EMFILE since the last one logged, and when that was. */
  #acceptErrors = 0;
  #acceptErrorLoggedAt = Number.NEGATIVE_INFINITY;
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
          // A client that reset before accept() and the like: nothing to wait for, and
          // nothing worth more than a line now and then (such resets cost an attacker nothing).
          this.#acceptFailed(error);
        }
        continue;
      }
      pauseMs = 5;
      if (this.#closing) {
        conn.close();
        continue;
      }
      const remote = conn.remoteAddr;
      const outsider = !this.#resolver.isAllowed(remote);
      const source = clientKey(remote.hostname);
      const fromSource = this.#perClient.get(source) ?? 0;
      const perClient = this.#options.maxConnectionsPerClient ?? Infinity;
      const insiders = this.#clients.size - this.#outsiders;
      const full = outsider
        ? this.#outsiders >= MAX_OUTSIDER_CONNECTIONS
        : insiders >= this.#options.maxConnections || fromSource >= perClient;
      if (full) {
        this.#stats.rejected();
        this.#limitLog.warn("tcp connection limit reached; closing new connection", {
          limit: outsider
            ? MAX_OUTSIDER_CONNECTIONS
            : fromSource >= perClient
            ? perClient
            : this.#options.maxConnections,
          per: outsider ? "outside --allow" : fromSource >= perClient ? "client" : "proxy",
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
      let options = this.#options;
      if (outsider) {
        this.#outsiders++;
        options = { ...options, idleTimeoutMs: Math.min(options.idleTimeoutMs, OUTSIDER_IDLE_MS) };
      } else {
        this.#perClient.set(source, fromSource + 1);
      }
      const client = new TcpClient(conn, this.#resolver, this.#log, options, this.#stats);
      this.#clients.add(client);
      client.finished.then(() => {
        this.#clients.delete(client);
        if (outsider) {
          this.#outsiders--;
          return;
        }
        const left = (this.#perClient.get(source) ?? 1) - 1;
        if (left <= 0) this.#perClient.delete(source);
        else this.#perClient.set(source, left);
      });
      this.#ensureSweep();
    }
  }

  #acceptFailed(error: unknown): void {
    this.#acceptErrors++;
    const now = performance.now();
    if (now - this.#acceptErrorLoggedAt < 10_000) return;
    this.#acceptErrorLoggedAt = now;
    this.#log.debug("tcp accept failed", { error: String(error), errors: this.#acceptErrors });
    this.#acceptErrors = 0;
  }

  #ensureSweep(): void {
    if (this.#sweepTimer !== undefined) return;
    const every = Math.max(50, Math.min(250, this.#options.idleTimeoutMs / 4));
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
  #frames = new FrameBuffer(INITIAL_BUFFER);
  /** True once the answer buffers grew past their first size (they are renewed when empty). */
  #grown = false;
  /** True while reading waits for the resolver's capacity (not idle: queries are waiting). */
  #waitingForCapacity = false;
  /** Queries allowed in flight now (see {@linkcode INITIAL_WINDOW}). */
  #window = INITIAL_WINDOW;
  /** Answers queued and not yet handed to a write; answers in the write in progress. */
  #framesQueued = 0;
  #framesWriting = 0;
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
    // While all connections together hold much unsent, a write stuck for a second is a client
    // that does not read: its buffers are worth more to the others.
    const stuckAfter = globalUnsent > GLOBAL_UNSENT_SOFT_LIMIT ? STUCK_UNDER_PRESSURE_MS : timeout;
    if (this.#writing && now - this.#writeStartedAt > stuckAfter) {
      this.#log.debug("closing tcp connection: client not reading", {
        client: formatAddr(this.#remote),
      });
      this.#close();
    } else if (
      this.#inflight === 0 && !this.#writing && !this.#waitingForCapacity &&
      now - this.#lastActive > timeout
    ) {
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
    const pauseAt = globalUnsent > GLOBAL_UNSENT_SOFT_LIMIT ? 1 : PAUSE_UNSENT_BYTES;
    const budget = this.#inflight === 0 || tcpInflight * answerEstimate < TCP_ANSWER_BUDGET;
    return this.#inflight < this.#options.maxQueriesPerConnection &&
      this.#inflight < this.#window && this.#unsent < pauseAt && budget &&
      this.#resolver.hasCapacity;
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
        this.#waitingForCapacity = true;
        await this.#resolver.waitForCapacity();
        this.#waitingForCapacity = false;
        this.#lastActive = SYSTEM_CLOCK.now();
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
          // Refused by access control: the rest of what was sent goes unread.
          if (this.#readDone || this.#closed) break reading;
          const length = readU16(buffer, start);
          if (length < HEADER_SIZE || length > MAX_QUERY_FRAME) {
            // A zero or header-less frame cannot be answered or resynchronised; a longer one
            // than any query is not worth buffering.
            this.#stats.malformed();
            this.#log.debug(
              `closing tcp connection: frame too ${length > MAX_QUERY_FRAME ? "long" : "short"}`,
              {
                client: formatAddr(this.#remote),
                length,
              },
            );
            this.#readDone = true;
            break reading;
          }
          if (end - start < 2 + length) break;
          if (!this.#hasRoom()) {
            await this.#waitForRoom();
            if (this.#closed || this.#readDone) break reading;
          }
          // The clock read once per run of synchronous work: not an op per query.
          this.#lastActive = SYSTEM_CLOCK.now();
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
            const size = Math.min(Math.max(needed, buffer.length * 2), 2 + MAX_QUERY_FRAME);
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
    tcpInflight++;
    this.#resolver.resolveWith(query, "tcp", this.#remote, this);
  }

  /** Queues a response for the client (the {@linkcode ResponseSink} side). */
  deliver(response: Uint8Array | null, _client?: Deno.Addr, close?: boolean): void {
    this.#inflight--;
    tcpInflight--;
    if (response !== null) {
      const decayed = answerEstimate * 0.99;
      const size = response.length;
      answerEstimate = size > decayed ? size : decayed > TYPICAL_ANSWER ? decayed : TYPICAL_ANSWER;
    }
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
    if (this.#frames.length + response.length + 2 > INITIAL_BUFFER) this.#grown = true;
    this.#frames.append(response);
    this.#framesQueued++;
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
    this.#writeStartedAt = SYSTEM_CLOCK.now();
    try {
      while (this.#frames.length > 0 && !this.#closed) {
        const bytes = this.#frames.length;
        this.#writingBytes = bytes;
        this.#framesWriting = this.#framesQueued;
        this.#framesQueued = 0;
        await this.#frames.drainOnce(this.#conn);
        if (this.#closed) break; // #close() settled the accounting
        this.#writingBytes = 0;
        globalUnsent -= bytes;
        // The client takes its answers: it may have more in flight.
        this.#window = Math.min(
          this.#options.maxQueriesPerConnection,
          this.#window + this.#framesWriting,
        );
        this.#framesWriting = 0;
        this.#lastActive = SYSTEM_CLOCK.now();
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
      if (this.#grown && this.#frames.length === 0 && !this.#closed) {
        // A burst grew both answer buffers; idle connections must not keep that much.
        this.#frames = new FrameBuffer(INITIAL_BUFFER);
        this.#framesQueued = 0;
        this.#grown = false;
      }
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
