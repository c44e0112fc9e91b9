/**
 * The DoH listener: accepts TCP (`--listen-doh-plain`) or TLS (`--listen-doh`, ALPN `h2`,
 * `http/1.1`) connections within its limits, then serves each with HTTP/2
 * ({@linkcode H2Connection}: ALPN `h2`, or the client preface on a plain listener, "prior
 * knowledge") or HTTP/1.1 ({@linkcode H1Connection}), both handing requests to one
 * {@linkcode HttpService} (the DoH mapping of `server/doh.ts`).
 *
 * Accepting is the shared {@linkcode AcceptLoop} (EMFILE pause, caps). Limits, each logged
 * rate-limited when it acts:
 * - connections per listen address (`--max-tcp-connections`) and per client (IPv4 address,
 *   IPv6 /64: `--max-tcp-connections-per-client`); at the per-client cap the client's
 *   longest-idle connection makes room, else the new one is closed at once; a connection
 *   counts from accept, TLS handshake included;
 * - the TLS handshake must finish within {@linkcode HANDSHAKE_TIMEOUT_MS}: a client that
 *   connects and sends nothing, half a ClientHello or garbage holds its slot no longer;
 * - per connection, the {@linkcode HttpLimits} (request deadline, idle timeout, body size,
 *   streams, and the stream listeners' 2 s send timeout);
 * - HTTP/2 answers: the answer budget of the stream listeners (`budget`), shared per client
 *   before per connection, as TCP and DoT share it ({@linkcode ResponseBudget});
 * - out of descriptors (EMFILE), accepting pauses 5-100 ms and resumes: the kernel keeps
 *   new connections in the backlog meanwhile.
 *
 * @module
 */

import { formatHostPort } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { H1Connection } from "../http/h1.ts";
import { H2Connection, PREFACE, type ResponseBudget } from "../http/h2.ts";
import type { HttpLimits, HttpService } from "../http/types.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import { AcceptLoop, type Served as AcceptedServed } from "../net/accept_loop.ts";
import { TimerQueue } from "../timers.ts";
import type { AnswerBudget } from "./answer_budget.ts";
import { SEND_TIMEOUT_MS } from "./stream.ts";

/** A TLS handshake not done within this long closes the connection (as the DoT listener). */
export const HANDSHAKE_TIMEOUT_MS = 5_000;

/** The limits of the DoH listener's connections (the body limit is RFC 8484's 65,535). */
export const DOH_LIMITS: Readonly<HttpLimits> = Object.freeze({
  maxBodyBytes: 65_535,
  // A GET of a 6 KiB query, base64url, fits; longer queries go by POST.
  maxTargetBytes: 8_192,
  maxHeadBytes: 16_384,
  requestTimeoutMs: 5_000,
  idleTimeoutMs: 10_000,
  // The stream listeners' send timeout (dnsdist's is the same 2 s): a client that reads moves
  // the write each time it reads. With 10 s, 1,000 HTTP/2 connections that read nothing held
  // their answers five times longer than the same attack over DoT.
  writeTimeoutMs: SEND_TIMEOUT_MS,
  maxStreams: 100,
  maxRequestsPerConnection: 10_000,
});

/** Statistics hooks of the listener (the client connection families). */
export interface DohListenerStats {
  /** A TLS handshake ended: `ok`, `failed` or `timeout`. */
  handshake(result: "ok" | "failed" | "timeout"): void;
  /** A connection was closed on accept at a connection limit. */
  rejected(): void;
}

/** Hooks that count nothing. */
export const NO_DOH_LISTENER_STATS: DohListenerStats = { handshake() {}, rejected() {} };

/** What {@linkcode DohListener.listen} needs beyond the address. */
export interface DohListenerOptions {
  /** The certificate and key (PEM); null for a plain listener. */
  tls: { cert: string; key: string } | null;
  /** Most connections open at once on this listen address. */
  maxConnections: number;
  /** Most connections open at once from one client address. */
  maxConnectionsPerClient: number;
  /** The HTTP limits; {@linkcode DOH_LIMITS} where not given. */
  limits?: Partial<HttpLimits>;
  /** The TLS handshake deadline; {@linkcode HANDSHAKE_TIMEOUT_MS} when not given. */
  handshakeTimeoutMs?: number;
  /** Statistics hooks. */
  stats?: DohListenerStats;
  /** The proxy's timers, for the connections' deadlines; the listener's own when not given. */
  timers?: TimerQueue;
  /**
   * The answer budget of the stream listeners, which HTTP/2 connections share per client
   * (see {@linkcode ResponseBudget}); none when not given.
   */
  budget?: AnswerBudget;
}

const LOG_INTERVAL_MS = 10_000;

type Served = H1Connection | H2Connection;

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * One accepted connection, as the accept loop counts it: its TLS handshake (under the
 * deadline), the choice of HTTP/2 or HTTP/1.1, then the connection that serves it.
 */
class DohConnection implements AcceptedServed {
  readonly finished: Promise<void>;
  served: Served | null = null;
  #closing = false;
  readonly #conn: Deno.Conn;

  constructor(conn: Deno.Conn, run: (connection: DohConnection) => Promise<void>) {
    this.#conn = conn;
    this.finished = run(this).catch(() => {}).finally(() => {
      try {
        conn.close();
      } catch {
        // Closed by the connection already.
      }
    });
  }

  /** Before a protocol is chosen (a handshake, the first bytes) nothing is lost closing it. */
  get idle(): boolean {
    return this.served?.idle ?? true;
  }

  get lastActive(): number {
    return this.served?.lastActive ?? 0;
  }

  get closing(): boolean {
    return this.#closing;
  }

  abort(): void {
    this.#closing = true;
    if (this.served !== null) this.served.abort("closed");
    else {
      try {
        this.#conn.close();
      } catch {
        // Gone.
      }
    }
  }

  shutdown(): void {
    this.#closing = true;
    if (this.served !== null) this.served.shutdown();
    else this.abort();
  }
}

/**
 * One DoH listen address, on the shared {@linkcode AcceptLoop}.
 *
 * @example
 * ```ts ignore
 * const doh = DohListener.listen({ hostname: "127.0.0.1", port: 443 }, service, log, {
 *   tls: { cert, key }, maxConnections: 1000, maxConnectionsPerClient: 64 });
 * await doh.close(2000);
 * ```
 */
export class DohListener {
  readonly #loop: AcceptLoop;
  readonly #service: HttpService;
  readonly #log: Logger;
  readonly #options: DohListenerOptions;
  readonly #limits: HttpLimits;
  readonly #stats: DohListenerStats;
  readonly #tls: boolean;
  readonly #timers: TimerQueue;
  /** True when the timers are the listener's own (closed with it). */
  readonly #ownsTimers: boolean;
  readonly #handshakeLog: RateLimitedLog;
  #closing = false;
  #closed: Promise<void> | null = null;

  private constructor(
    listener: Deno.Listener,
    service: HttpService,
    log: Logger,
    options: DohListenerOptions,
  ) {
    this.#service = service;
    this.#log = log;
    this.#options = options;
    this.#limits = { ...DOH_LIMITS, ...options.limits };
    this.#stats = options.stats ?? NO_DOH_LISTENER_STATS;
    this.#tls = options.tls !== null;
    this.#ownsTimers = options.timers === undefined;
    this.#timers = options.timers ?? new TimerQueue();
    this.#handshakeLog = new RateLimitedLog(log, LOG_INTERVAL_MS);
    this.#loop = new AcceptLoop(listener, {
      name: this.#tls ? "doh" : "doh-plain",
      maxConnections: options.maxConnections,
      maxConnectionsPerClient: options.maxConnectionsPerClient,
      log,
      stats: { accepted() {}, rejected: () => this.#stats.rejected() },
      serve: (conn, client) => {
        // Nagle's algorithm off: an answer written behind a small unacknowledged segment would
        // wait for the client's delayed ACK (40 ms on Linux). `Deno.TlsConn` has no
        // `setNoDelay`: over TLS, H2Connection's coalescing of writes is the remedy.
        if (this.#tls === false) {
          try {
            (conn as Deno.TcpConn).setNoDelay(true);
          } catch {
            // The client may already be gone; reading will tell.
          }
        }
        return new DohConnection(
          conn,
          (connection) => this.#serve(connection, conn, client.remote, client.key),
        );
      },
    });
  }

  /** Binds `address` and serves; throws the OS error when it cannot bind. */
  static listen(
    address: ListenAddress,
    service: HttpService,
    log: Logger,
    options: DohListenerOptions,
  ): DohListener {
    // SO_REUSEPORT like every listener: a new process starts on the same addresses while the
    // old one drains (certificate rotation without a failed query; see docs/dot.md).
    const listener = options.tls === null
      ? Deno.listen({
        transport: "tcp",
        hostname: address.hostname,
        port: address.port,
        reusePort: true,
      })
      : Deno.listenTls({
        transport: "tcp",
        hostname: address.hostname,
        port: address.port,
        reusePort: true,
        cert: options.tls.cert,
        key: options.tls.key,
        alpnProtocols: ["h2", "http/1.1"],
      });
    return new DohListener(listener, service, log, options);
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#loop.addr as Deno.NetAddr;
  }

  /** Connections open now (handshakes included). */
  get openConnections(): number {
    return this.#loop.open;
  }

  /** True for `--listen-doh`, false for `--listen-doh-plain`. */
  get tls(): boolean {
    return this.#tls;
  }

  async #serve(
    connection: DohConnection,
    conn: Deno.Conn,
    remote: Deno.NetAddr | undefined,
    key: string,
  ): Promise<void> {
    const address = remote ?? { transport: "tcp" as const, hostname: "0.0.0.0", port: 0 };
    const client = formatHostPort(address.hostname, address.port);
    let alpn: string | null = null;
    if (this.#tls) {
      const deadline = this.#options.handshakeTimeoutMs ?? HANDSHAKE_TIMEOUT_MS;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), deadline);
      });
      try {
        const outcome = await Promise.race([(conn as Deno.TlsConn).handshake(), timeout]);
        if (outcome === "timeout") {
          this.#stats.handshake("timeout");
          this.#handshakeLog.warn("doh tls handshake timed out", { client, timeout_ms: deadline });
          return;
        }
        alpn = outcome.alpnProtocol;
        this.#stats.handshake("ok");
      } catch (error) {
        if (connection.closing) return;
        this.#stats.handshake("failed");
        this.#handshakeLog.warn("doh tls handshake failed", { client, error: describe(error) });
        return;
      } finally {
        clearTimeout(timer);
      }
    }
    if (this.#closing || connection.closing) return;
    const peer = { address };
    let initial: Uint8Array = new Uint8Array(0);
    let h2 = alpn === "h2";
    if (alpn === null) {
      // Plain (or TLS without ALPN): HTTP/2 with prior knowledge starts with the preface.
      const peeked = await this.#peek(conn);
      if (peeked === null || connection.closing) return;
      initial = peeked;
      h2 = initial.length >= 3 && initial[0] === PREFACE[0] && initial[1] === PREFACE[1] &&
        initial[2] === PREFACE[2];
    }
    const budget = this.#options.budget;
    const share = h2 && budget !== undefined ? budget.share(key) : undefined;
    const responseBudget: ResponseBudget | null = share === undefined ? null : {
      mayStart: () => budget!.mayAdmit(share),
      started: () => budget!.started(share),
      answered: (bytes) => budget!.answered(share, bytes),
      queued: (bytes) => budget!.queued(share, bytes),
      sent: (bytes) => budget!.sent(share, bytes),
    };
    const session = {
      conn,
      peer,
      service: this.#service,
      limits: this.#limits,
      timers: this.#timers,
    };
    const served = h2
      ? new H2Connection(session, initial, responseBudget)
      : new H1Connection(session, initial);
    connection.served = served;
    if (this.#closing) served.shutdown();
    let outcome;
    try {
      outcome = await served.finished;
    } finally {
      if (share !== undefined) budget!.release(share);
    }
    this.#log.debug("doh connection closed", {
      client,
      protocol: h2 ? "h2" : "http/1.1",
      reason: outcome.reason,
      error: outcome.error,
    });
  }

  /** Reads the first bytes (at least 3, to tell `PRI` from a method), within the idle time. */
  async #peek(conn: Deno.Conn): Promise<Uint8Array | null> {
    const buffer = new Uint8Array(4096);
    let have = 0;
    const timer = setTimeout(() => {
      try {
        conn.close();
      } catch {
        // Gone.
      }
    }, this.#limits.idleTimeoutMs);
    try {
      while (have < 3) {
        const n = await conn.read(buffer.subarray(have));
        if (n === null) return null;
        have += n;
        if (buffer[0] !== PREFACE[0]) break;
      }
      return buffer.subarray(0, have);
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Stops accepting; open connections finish what they are answering (HTTP/2: GOAWAY) for
   * up to `timeoutMs`, then whatever is left is closed.
   */
  close(timeoutMs = 2000): Promise<void> {
    this.#closed ??= this.#close(timeoutMs);
    return this.#closed;
  }

  async #close(timeoutMs: number): Promise<void> {
    this.#closing = true;
    await this.#loop.drain(timeoutMs);
    // Let each connection's clean-up run before the caller checks for leaks.
    for (let round = 0; round < 1000 && this.#loop.open > 0; round++) {
      for (const connection of this.#loop.connections()) connection.abort();
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
    if (this.#ownsTimers) this.#timers.close();
  }
}
