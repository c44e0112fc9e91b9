/**
 * The DoH listener: accepts TCP (`--listen-doh-plain`) or TLS (`--listen-doh`, ALPN `h2`,
 * `http/1.1`) connections within its limits, then serves each with HTTP/2
 * ({@linkcode H2Connection}: ALPN `h2`, or the client preface on a plain listener, "prior
 * knowledge") or HTTP/1.1 ({@linkcode H1Connection}), both handing requests to one
 * {@linkcode HttpService} (the DoH mapping of `server/doh.ts`).
 *
 * Limits, each logged rate-limited when it acts:
 * - connections per listen address (`--max-tcp-connections`) and per client address
 *   (`--max-tcp-connections-per-client`); past either, a new connection is closed at once;
 *   a connection counts from accept, TLS handshake included;
 * - the TLS handshake must finish within {@linkcode HANDSHAKE_TIMEOUT_MS}: a client that
 *   connects and sends nothing, half a ClientHello or garbage holds its slot no longer;
 * - per connection, the {@linkcode HttpLimits} (request deadline, idle timeout, body size,
 *   streams);
 * - out of descriptors (EMFILE), accepting pauses 10-50 ms and resumes: the kernel keeps
 *   new connections in the backlog meanwhile.
 *
 * @module
 */

import { formatHostPort } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { H1Connection } from "../http/h1.ts";
import { H2Connection, PREFACE } from "../http/h2.ts";
import type { HttpLimits, HttpService } from "../http/types.ts";
import { type Logger, RateLimitedLog } from "../log.ts";
import { isDescriptorExhaustion } from "../net/accept_loop.ts";

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
  writeTimeoutMs: 10_000,
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
}

const EXHAUSTED_PAUSE_MIN_MS = 10;
const EXHAUSTED_PAUSE_MAX_MS = 50;
const LOG_INTERVAL_MS = 10_000;

type Served = H1Connection | H2Connection;

function describe(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/**
 * One DoH listen address.
 *
 * @example
 * ```ts ignore
 * const doh = DohListener.listen({ hostname: "127.0.0.1", port: 443 }, service, log, {
 *   tls: { cert, key }, maxConnections: 1000, maxConnectionsPerClient: 64 });
 * await doh.close(2000);
 * ```
 */
export class DohListener {
  readonly #listener: Deno.Listener;
  readonly #service: HttpService;
  readonly #log: Logger;
  readonly #options: DohListenerOptions;
  readonly #limits: HttpLimits;
  readonly #stats: DohListenerStats;
  readonly #tls: boolean;
  /** Every connection, from accept (handshake included) to close. */
  readonly #open = new Set<{ served: Served | null; conn: Deno.Conn }>();
  readonly #perClient = new Map<string, number>();
  readonly #limitLog: RateLimitedLog;
  readonly #handshakeLog: RateLimitedLog;
  readonly #acceptLog: RateLimitedLog;
  readonly #accepting: Promise<void>;
  #closing = false;
  #closed: Promise<void> | null = null;
  #wake: (() => void) | null = null;

  private constructor(
    listener: Deno.Listener,
    service: HttpService,
    log: Logger,
    options: DohListenerOptions,
  ) {
    this.#listener = listener;
    this.#service = service;
    this.#log = log;
    this.#options = options;
    this.#limits = { ...DOH_LIMITS, ...options.limits };
    this.#stats = options.stats ?? NO_DOH_LISTENER_STATS;
    this.#tls = options.tls !== null;
    this.#limitLog = new RateLimitedLog(log, LOG_INTERVAL_MS);
    this.#handshakeLog = new RateLimitedLog(log, LOG_INTERVAL_MS);
    this.#acceptLog = new RateLimitedLog(log, LOG_INTERVAL_MS);
    this.#accepting = this.#acceptLoop().catch((error) => {
      log.error("doh accept loop failed; no longer serving", { error: describe(error) });
    });
  }

  /** Binds `address` and serves; throws the OS error when it cannot bind. */
  static listen(
    address: ListenAddress,
    service: HttpService,
    log: Logger,
    options: DohListenerOptions,
  ): DohListener {
    const listener = options.tls === null
      ? Deno.listen({ transport: "tcp", hostname: address.hostname, port: address.port })
      : Deno.listenTls({
        transport: "tcp",
        hostname: address.hostname,
        port: address.port,
        cert: options.tls.cert,
        key: options.tls.key,
        alpnProtocols: ["h2", "http/1.1"],
      });
    return new DohListener(listener, service, log, options);
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#listener.addr as Deno.NetAddr;
  }

  /** Connections open now (handshakes included). */
  get openConnections(): number {
    return this.#open.size;
  }

  /** True for `--listen-doh`, false for `--listen-doh-plain`. */
  get tls(): boolean {
    return this.#tls;
  }

  async #acceptLoop(): Promise<void> {
    let pauseMs = 0;
    while (!this.#closing) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing) return;
        if (error instanceof Deno.errors.BadResource) {
          this.#log.error("doh listener closed unexpectedly; no longer serving", {
            error: describe(error),
          });
          return;
        }
        if (isDescriptorExhaustion(error)) {
          pauseMs = pauseMs === 0
            ? EXHAUSTED_PAUSE_MIN_MS
            : Math.min(2 * pauseMs, EXHAUSTED_PAUSE_MAX_MS);
          this.#acceptLog.warn("doh accept failed: out of file descriptors; pausing", {
            error: describe(error),
            pause_ms: pauseMs,
          });
        } else {
          this.#acceptLog.warn("doh accept failed", { error: describe(error) });
          pauseMs = EXHAUSTED_PAUSE_MIN_MS;
        }
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, pauseMs);
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wake = null;
        continue;
      }
      pauseMs = 0;
      this.#admit(conn);
    }
  }

  #admit(conn: Deno.Conn): void {
    const remote = conn.remoteAddr as Deno.NetAddr;
    const client = remote.hostname;
    const fromClient = this.#perClient.get(client) ?? 0;
    const { maxConnections, maxConnectionsPerClient } = this.#options;
    if (
      this.#closing || this.#open.size >= maxConnections || fromClient >= maxConnectionsPerClient
    ) {
      if (!this.#closing) {
        this.#stats.rejected();
        this.#limitLog.warn("doh connection limit reached; closing new connection", {
          listener: formatHostPort(this.addr.hostname, this.addr.port),
          client,
          limit: this.#open.size >= maxConnections ? maxConnections : maxConnectionsPerClient,
          per: this.#open.size >= maxConnections ? "listener" : "client",
        });
      }
      try {
        conn.close();
      } catch {
        // Gone already.
      }
      return;
    }
    this.#perClient.set(client, fromClient + 1);
    const entry: { served: Served | null; conn: Deno.Conn } = { served: null, conn };
    this.#open.add(entry);
    this.#serve(entry, remote).catch((error) => {
      this.#log.debug("doh connection failed", { client, error: describe(error) });
    }).finally(() => {
      try {
        conn.close();
      } catch {
        // Closed by the connection already.
      }
      this.#open.delete(entry);
      const left = (this.#perClient.get(client) ?? 1) - 1;
      if (left <= 0) this.#perClient.delete(client);
      else this.#perClient.set(client, left);
    });
  }

  async #serve(entry: { served: Served | null; conn: Deno.Conn }, remote: Deno.NetAddr) {
    const conn = entry.conn;
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
          this.#handshakeLog.warn("doh tls handshake timed out", {
            client: formatHostPort(remote.hostname, remote.port),
            timeout_ms: deadline,
          });
          return;
        }
        alpn = outcome.alpnProtocol;
        this.#stats.handshake("ok");
      } catch (error) {
        this.#stats.handshake("failed");
        this.#handshakeLog.warn("doh tls handshake failed", {
          client: formatHostPort(remote.hostname, remote.port),
          error: describe(error),
        });
        return;
      } finally {
        clearTimeout(timer);
      }
    }
    if (this.#closing) return;
    const peer = { address: remote };
    let initial: Uint8Array = new Uint8Array(0);
    let h2 = alpn === "h2";
    if (alpn === null) {
      // Plain (or TLS without ALPN): HTTP/2 with prior knowledge starts with the preface.
      const peeked = await this.#peek(conn);
      if (peeked === null) return;
      initial = peeked;
      h2 = initial.length >= 3 && initial[0] === PREFACE[0] && initial[1] === PREFACE[1] &&
        initial[2] === PREFACE[2];
    }
    const served = h2
      ? new H2Connection(conn, peer, this.#service, this.#limits, initial)
      : new H1Connection(conn, peer, this.#service, this.#limits, initial);
    entry.served = served;
    if (this.#closing) served.shutdown();
    const outcome = await served.finished;
    this.#log.debug("doh connection closed", {
      client: formatHostPort(remote.hostname, remote.port),
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
    try {
      this.#listener.close();
    } catch {
      // Already closed.
    }
    this.#wake?.();
    await this.#accepting;
    const entries = [...this.#open];
    for (const entry of entries) {
      if (entry.served !== null) entry.served.shutdown();
      else {
        try {
          entry.conn.close();
        } catch {
          // Gone.
        }
      }
    }
    const done = Promise.all(
      entries.map((entry) => entry.served?.finished ?? Promise.resolve()),
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    const forced = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        for (const entry of this.#open) entry.served?.abort("shutdown timeout");
        resolve();
      }, timeoutMs);
    });
    await Promise.race([done, forced]);
    clearTimeout(timer);
    // Let each connection's clean-up run before the caller checks for leaks.
    while (this.#open.size > 0) {
      await new Promise((resolve) => setTimeout(resolve, 1));
      for (const entry of this.#open) entry.served?.abort("shutdown");
    }
  }
}
