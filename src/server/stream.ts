/**
 * The stream listener: DNS over TCP (RFC 7766) and, on a TLS connection, DNS over TLS (RFC
 * 7858), which is the same framing. One connection handler serves any `Deno.Conn`: two-byte
 * length framing, many pipelined queries per connection answered as they complete, idle and
 * slow clients closed, and limits that hold whatever a client does:
 *
 * - connections: `--max-tcp-connections` in all, `--max-tcp-connections-per-client` per
 *   client (IPv4 address, IPv6 /64). A client at its cap that opens one more loses its
 *   longest-idle connection (nothing in flight) instead, so a client that leaks idle
 *   connections is not locked out; only when none is idle is the new one closed. Clients
 *   outside `--allow` share {@linkcode MAX_OUTSIDER_CONNECTIONS} of their own, idle for at
 *   most {@linkcode OUTSIDER_IDLE_MS}, so they cannot take the slots of the clients served;
 * - queries in flight per connection: `--max-tcp-queries`, a hard limit (frames already read
 *   wait in the buffer until there is room); when the whole proxy is at `--max-inflight`,
 *   reading pauses too: a TCP query is never dropped. A new connection starts with a window
 *   of {@linkcode INITIAL_WINDOW} queries in flight, one more for each answer written to it
 *   (as TCP's slow start): a client that pipelines 128 queries for 64 KB answers and never
 *   reads cannot make the proxy build 8 MB of answers for it. And all connections share one
 *   {@linkcode AnswerBudget} of answer bytes in flight and unsent, shared per client before
 *   per connection (a connection with nothing in flight and nothing unsent may always have
 *   one): 1,000 such clients cannot make it build 1,000 x 16 x 64 KB at once, and one client
 *   cannot hold it against the others;
 * - unsent answer bytes: reading pauses at 64 KiB per connection (at the first unsent byte
 *   while all connections together hold a whole budget unsent); a client is judged not to read by
 *   time, never by how much is queued: its connection is closed when its write has not moved
 *   for {@linkcode SEND_TIMEOUT_MS} (a second while the whole budget is unsent). The buffers that
 *   held a burst are let go once it is written, so memory is bounded by limits, not by luck;
 * - draining (`close`): nothing more is read, every frame already read is answered;
 * - query size: a frame longer than {@linkcode MAX_QUERY_FRAME} closes the connection (no
 *   query is that long; dotproxy forwards none over 512 octets), so a client cannot make a
 *   connection hold a 64 KiB read buffer;
 * - accept errors never stop the listener: only running out of descriptors pauses it, and
 *   then for a few milliseconds ({@linkcode AcceptLoop}).
 *
 * The listener is given its acceptor (a `Deno.Listener` for TCP, a `Deno.TlsListener` for
 * DoT), its transport label, and the {@linkcode AnswerBudget} every stream listener shares.
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import type { Logger } from "../log.ts";
import {
  type AcceptedClient,
  AcceptLoop,
  type Acceptor,
  type AcceptStats,
  type Served,
} from "../net/accept_loop.ts";
import type { Resolver, ResponseSink, Transport } from "../resolver.ts";
import { SlabCopier } from "../slab.ts";
import { AnswerBudget, type ClientShare } from "./answer_budget.ts";
import { AnswerQueue } from "./answer_queue.ts";
import { SYSTEM_CLOCK } from "../timers.ts";

/** Limits of a stream listener. */
export interface StreamServerOptions {
  /** Most client connections open at once; more are closed on accept. */
  maxConnections: number;
  /** Most connections open at once from one client (IPv4 address, IPv6 /64). */
  maxConnectionsPerClient?: number;
  /** Most queries in flight per connection; reading pauses at the limit. */
  maxQueriesPerConnection: number;
  /** A connection with nothing in flight and no complete query for this long is closed. */
  idleTimeoutMs: number;
}

/** Statistics hooks of a stream listener. */
export interface StreamStats extends AcceptStats {
  /** A client connection was accepted. */
  accepted(): void;
  /** A client connection was refused at a connection limit. */
  rejected(): void;
  /** A client sent something that is not DNS over TCP; its connection was closed. */
  malformed(): void;
  /** A TLS handshake ended (DoT): `ok`, `failed` or `timeout`. */
  handshake?(result: "ok" | "failed" | "timeout"): void;
}

const NO_STREAM_STATS: StreamStats = { accepted() {}, rejected() {}, malformed() {} };

/** Unsent answer bytes per connection at which reading pauses. */
const PAUSE_UNSENT_BYTES = 64 * 1024;

/**
 * A connection whose write has not moved for this long is closed: its client does not read.
 * dnsdist's send timeout is the same 2 s; a client that reads, however slowly, moves the
 * write every time it reads, and one that pipelined 1,000 queries before it reads is not
 * judged by how much is queued for it (issue 21: closing at 128 KiB queued lost up to 997 of
 * 1,000 answers to clients that read).
 */
export const SEND_TIMEOUT_MS = 2000;
/** While all connections together hold the whole budget unsent, a second is enough. */
const SEND_TIMEOUT_PRESSED_MS = 1000;
const INITIAL_BUFFER = 4096;
/**
 * Queries a new connection may have in flight before any answer was written to it; each
 * answer written allows one more, up to `--max-tcp-queries`. A client that reads its answers
 * reaches the full window within a few round trips.
 */
export const INITIAL_WINDOW = 16;

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

/** What a stream listener serves with, besides its limits. */
export interface StreamContext {
  /** The core. */
  resolver: Resolver;
  /** The logger. */
  log: Logger;
  /** The answer budget every stream listener of the process shares. */
  budget: AnswerBudget;
  /** Statistics hooks (default: none). */
  stats?: StreamStats;
  /** The transport label of its queries (default "tcp"). */
  transport?: Transport;
}

/**
 * Serves DNS over a stream transport on one listener.
 *
 * @example
 * ```ts ignore
 * const budget = new AnswerBudget();
 * const server = StreamServer.listenTcp({ hostname: "127.0.0.1", port: 5300 },
 *   { resolver, log, budget },
 *   { maxConnections: 1000, maxQueriesPerConnection: 128, idleTimeoutMs: 10000 });
 * await server.close();
 * ```
 */
export class StreamServer {
  readonly #loop: AcceptLoop;
  readonly #options: StreamServerOptions;
  #sweepTimer: ReturnType<typeof setInterval> | undefined;

  /**
   * Starts serving on an already bound listener (which it then owns). `prepare` runs first on
   * each admitted connection, with the connection counted against the caps: a TLS listener
   * does its handshake there, under a deadline, and returns false to give the slot back.
   */
  constructor(
    listener: Acceptor,
    context: StreamContext,
    options: StreamServerOptions,
    prepare?: (conn: Deno.Conn, client: AcceptedClient) => Promise<boolean>,
  ) {
    this.#options = options;
    const stats = context.stats ?? NO_STREAM_STATS;
    const transport = context.transport ?? "tcp";
    const resolver = context.resolver;
    const outsiderOptions = {
      ...options,
      idleTimeoutMs: Math.min(options.idleTimeoutMs, OUTSIDER_IDLE_MS),
    };
    this.#loop = new AcceptLoop(listener, {
      name: transport,
      maxConnections: options.maxConnections,
      maxConnectionsPerClient: options.maxConnectionsPerClient,
      outsiders: { test: (remote) => !resolver.isAllowed(remote), max: MAX_OUTSIDER_CONNECTIONS },
      log: context.log,
      stats,
      serve: (conn, client) => {
        try {
          // Answers go out as soon as written (a TLS connection may not offer this).
          (conn as Partial<Pick<Deno.TcpConn, "setNoDelay">>).setNoDelay?.(true);
        } catch {
          // The client may already be gone.
        }
        const connection = new StreamConnection(
          conn,
          context,
          client.outsider ? outsiderOptions : options,
          stats,
          transport,
          context.budget.share(client.key),
          prepare === undefined ? undefined : prepare(conn, client),
        );
        connection.finished.then(() => context.budget.release(connection.share));
        this.#ensureSweep();
        return connection;
      },
    });
  }

  /**
   * Binds `address` for DNS over TCP and starts serving; throws the OS error. The socket has
   * `SO_REUSEPORT`, so that a new process can take over the address while this one drains.
   */
  static listenTcp(
    address: ListenAddress,
    context: StreamContext,
    options: StreamServerOptions,
  ): StreamServer {
    const listener = Deno.listen({
      transport: "tcp",
      hostname: address.hostname,
      port: address.port,
      reusePort: true,
    });
    return new StreamServer(listener, { ...context, transport: "tcp" }, options);
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#loop.addr as Deno.NetAddr;
  }

  /** Client connections open now. */
  get openConnections(): number {
    return this.#loop.open;
  }

  #ensureSweep(): void {
    if (this.#sweepTimer !== undefined) return;
    const every = Math.max(50, Math.min(250, this.#options.idleTimeoutMs / 4));
    this.#sweepTimer = setInterval(() => {
      const now = performance.now();
      for (const connection of this.#loop.connections()) {
        (connection as StreamConnection).checkIdle(now);
      }
      if (this.#loop.open === 0) {
        clearInterval(this.#sweepTimer);
        this.#sweepTimer = undefined;
      }
    }, every);
  }

  /**
   * Stops accepting and reading new queries; resolves once every query already read is
   * answered and written and every connection closed, or after `timeoutMs`, when whatever is
   * left is closed.
   */
  async close(timeoutMs = 10_000): Promise<void> {
    const connections = await this.#loop.drain(timeoutMs);
    await Promise.all(connections.map((c) => c.finished));
    if (this.#sweepTimer !== undefined) {
      clearInterval(this.#sweepTimer);
      this.#sweepTimer = undefined;
    }
  }
}

/** One client connection, over any `Deno.Conn` (TCP, TLS). */
class StreamConnection implements ResponseSink, Served {
  readonly #conn: Deno.Conn;
  readonly #resolver: Resolver;
  readonly #log: Logger;
  readonly #options: StreamServerOptions;
  readonly #stats: StreamStats;
  readonly #transport: Transport;
  /** Settles true once the connection may carry queries (a TLS handshake done). */
  readonly #prepared: Promise<boolean> | undefined;
  /** True until `#prepared` settled. */
  #preparing: boolean;
  readonly #budget: AnswerBudget;
  /** This client's (address's) part of the answer budget. */
  readonly share: ClientShare;
  readonly #remote: Deno.Addr | undefined;
  readonly finished: Promise<void>;
  #inflight = 0;
  #lastActive = performance.now();
  /** When the write in progress last moved (a write call returned). */
  #lastProgress = 0;
  readonly #frames = new AnswerQueue();
  /** True while reading waits for the resolver's capacity (not idle: queries are waiting). */
  #waitingForCapacity = false;
  /** True while complete frames wait in the read buffer for room. */
  #waitingForRoom = false;
  /** True while the read loop waits in `read()` (then no complete frame is buffered). */
  #inRead = false;
  /** Queries allowed in flight now (see {@linkcode INITIAL_WINDOW}). */
  #window = INITIAL_WINDOW;
  /** Bytes handed to the write in progress. */
  #writingBytes = 0;
  #writing = false;
  #flushScheduled = false;
  /** Draining: read nothing more, answer every frame already read. */
  #stopReading = false;
  /** Refused by access control: the rest of what was sent goes unread. */
  #refused = false;
  #readDone = false;
  #closed = false;
  #closeAfterWrite = false;
  #wake: (() => void) | undefined;
  readonly #flush = () => this.#flushLoop();
  /** The connection as the frame buffer writes to it: each write that returns is progress. */
  readonly #writer = {
    write: async (bytes: Uint8Array): Promise<number> => {
      const n = await this.#conn.write(bytes);
      this.#lastProgress = SYSTEM_CLOCK.now();
      return n;
    },
  };

  constructor(
    conn: Deno.Conn,
    context: StreamContext,
    options: StreamServerOptions,
    stats: StreamStats,
    transport: Transport,
    share: ClientShare,
    prepared: Promise<boolean> | undefined,
  ) {
    this.#conn = conn;
    this.#resolver = context.resolver;
    this.#log = context.log;
    this.#options = options;
    this.#stats = stats;
    this.#budget = context.budget;
    this.#transport = transport;
    this.share = share;
    this.#prepared = prepared;
    this.#preparing = prepared !== undefined;
    let remote: Deno.Addr | undefined;
    try {
      remote = conn.remoteAddr;
    } catch {
      // Gone already: reading will find out.
    }
    this.#remote = remote;
    this.finished = this.#readLoop();
  }

  /** Bytes of answers not yet written to the client. */
  get #unsent(): number {
    return this.#frames.length + this.#writingBytes;
  }

  /** True when nothing is in flight, queued, buffered or being written. */
  get idle(): boolean {
    return this.#inflight === 0 && !this.#writing && this.#frames.length === 0 &&
      !this.#waitingForCapacity && !this.#waitingForRoom && !this.#closed;
  }

  /** When the connection last read a query or wrote an answer. */
  get lastActive(): number {
    return this.#lastActive;
  }

  /** Closes the connection when idle too long or stuck writing to a client that won't read. */
  checkIdle(now: number): void {
    // A TLS handshake has a deadline of its own.
    if (this.#preparing) return;
    const stuckAfter = this.#budget.pressed ? SEND_TIMEOUT_PRESSED_MS : SEND_TIMEOUT_MS;
    if (this.#writing && now - this.#lastProgress > stuckAfter) {
      this.#log.debug(`closing ${this.#transport} connection: client not reading its answers`, {
        client: formatAddr(this.#remote),
        unsent: this.#unsent,
        stalled_ms: Math.round(now - this.#lastProgress),
      });
      this.#close();
    } else if (this.idle && now - this.#lastActive > this.#options.idleTimeoutMs) {
      this.#log.debug(`closing idle ${this.#transport} connection`, {
        client: formatAddr(this.#remote),
      });
      this.#close();
    }
  }

  /** Stops reading; closes once every query already read is answered and written. */
  shutdown(): void {
    this.#stopReading = true;
    this.#notify();
  }

  /** Closes now, whatever is in flight. */
  abort(): void {
    this.#close();
  }

  #hasRoom(): boolean {
    const unsent = this.#unsent;
    const pauseAt = this.#budget.pressed ? 1 : PAUSE_UNSENT_BYTES;
    // A connection with nothing in flight and nothing unsent may always have one query.
    const budget = (this.#inflight === 0 && unsent === 0) || this.#budget.mayAdmit(this.share);
    return this.#inflight < this.#options.maxQueriesPerConnection &&
      this.#inflight < this.#window && unsent < pauseAt && budget && this.#resolver.hasCapacity;
  }

  #notify(): void {
    if (
      (this.#readDone || (this.#stopReading && this.#inRead)) && this.#inflight === 0 &&
      !this.#writing && this.#frames.length === 0
    ) {
      this.#close();
      return;
    }
    const wake = this.#wake;
    if (
      wake !== undefined &&
      (this.#hasRoom() || this.#closed || this.#refused || this.#readDone)
    ) {
      this.#wake = undefined;
      wake();
    }
  }

  /** Waits until there is room for another query (or the connection is done). */
  async #waitForRoom(): Promise<void> {
    this.#waitingForRoom = true;
    while (!this.#hasRoom() && !this.#closed && !this.#refused) {
      if (!this.#resolver.hasCapacity) {
        this.#waitingForCapacity = true;
        await this.#resolver.waitForCapacity();
        this.#waitingForCapacity = false;
        this.#lastActive = SYSTEM_CLOCK.now();
      } else {
        await new Promise<void>((resolve) => this.#wake = resolve);
      }
    }
    this.#waitingForRoom = false;
  }

  async #readLoop(): Promise<void> {
    let buffer = new Uint8Array(INITIAL_BUFFER);
    const copier = sharedCopier;
    let start = 0;
    let end = 0;
    try {
      if (this.#prepared !== undefined) {
        const ready = await this.#prepared;
        this.#preparing = false;
        this.#lastActive = SYSTEM_CLOCK.now();
        if (!ready) {
          this.#close();
          return;
        }
      }
      reading: for (;;) {
        // Handle the complete frames already buffered, one at a time, within the limits.
        // Draining does not stop this: a frame read is a query received, and is answered.
        while (end - start >= 2) {
          if (this.#refused || this.#closed) break reading;
          const length = readU16(buffer, start);
          if (length < HEADER_SIZE || length > MAX_QUERY_FRAME) {
            // A zero or header-less frame cannot be answered or resynchronised; a longer one
            // than any query is not worth buffering.
            this.#stats.malformed();
            this.#log.debug(
              `closing ${this.#transport} connection: frame too ${
                length > MAX_QUERY_FRAME ? "long" : "short"
              }`,
              {
                client: formatAddr(this.#remote),
                length,
              },
            );
            break reading;
          }
          if (end - start < 2 + length) break;
          if (!this.#hasRoom()) {
            await this.#waitForRoom();
            if (this.#closed || this.#refused) break reading;
          }
          // The clock read once per run of synchronous work: not an op per query.
          this.#lastActive = SYSTEM_CLOCK.now();
          this.#handle(copier.copy(buffer, start + 2, start + 2 + length));
          start += 2 + length;
        }
        if (this.#stopReading || this.#closed) break;
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
        this.#inRead = true;
        let n: number | null;
        try {
          n = await this.#conn.read(buffer.subarray(end));
        } finally {
          this.#inRead = false;
        }
        if (n === null) {
          if (end > start) {
            this.#log.debug(`${this.#transport} client closed mid-frame`, {
              client: formatAddr(this.#remote),
            });
          }
          break;
        }
        end += n;
      }
    } catch (error) {
      if (!this.#closed) {
        this.#log.debug(`${this.#transport} read failed`, {
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
    this.#budget.started(this.share);
    this.#resolver.resolveWith(query, this.#transport, this.#remote, this);
  }

  /** Queues a response for the client (the {@linkcode ResponseSink} side). */
  deliver(response: Uint8Array | null, _client?: Deno.Addr, close?: boolean): void {
    this.#inflight--;
    this.#budget.answered(this.share, response === null ? null : response.length);
    if (close) {
      // Refused by access control: answer, then close.
      this.#refused = true;
      this.#closeAfterWrite = true;
    }
    if (response !== null && !this.#closed) this.#enqueue(response);
    else if (close && !this.#writing && this.#frames.length === 0) this.#close();
    this.#notify();
  }

  #enqueue(response: Uint8Array): void {
    // No limit here: what is queued is bounded by the window, the pause and the budget, and
    // a client that does not take it is found by time (`checkIdle`).
    this.#frames.append(response);
    this.#budget.queued(this.share, response.length + 2);
    if (!this.#writing && !this.#flushScheduled) {
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
  }

  async #flushLoop(): Promise<void> {
    this.#flushScheduled = false;
    if (this.#writing || this.#closed) return;
    this.#writing = true;
    this.#lastProgress = SYSTEM_CLOCK.now();
    try {
      while (this.#frames.length > 0 && !this.#closed) {
        const before = this.#frames.length;
        const writing = this.#frames.writeOnce(this.#writer);
        const bytes = before - this.#frames.length;
        this.#writingBytes = bytes;
        const frames = await writing;
        if (this.#closed) break; // #close() settled the accounting
        this.#writingBytes = 0;
        this.#budget.sent(this.share, bytes);
        // The client takes its answers: it may have more in flight.
        this.#window = Math.min(this.#options.maxQueriesPerConnection, this.#window + frames);
        this.#lastActive = this.#lastProgress;
      }
    } catch (error) {
      if (!this.#closed) {
        this.#log.debug(`${this.#transport} write failed`, {
          client: formatAddr(this.#remote),
          error: String(error),
        });
        this.#close();
      }
    } finally {
      this.#writing = false;
      // A burst grew the answer buffers; idle connections must not keep that much.
      if (!this.#closed) this.#frames.shrink();
      if (this.#closeAfterWrite && this.#frames.length === 0) this.#close();
      this.#notify();
    }
  }

  #close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#budget.sent(this.share, this.#unsent);
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
