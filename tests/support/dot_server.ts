/**
 * An in-process DNS-over-TLS upstream for tests (`Deno.listenTls` with the test CA's
 * certificate; or plain DNS over TCP with `plain`), with knobs for the misbehaviour a proxy must survive: slow and out-of-order
 * answers, closing after a few answers, wrong answers, silence.
 *
 * @module
 */

import { SERVER_KEY, SERVER_PEM } from "../fixtures/certs.ts";
import { answerFor, appendChunk, lengthFramed } from "./dns.ts";

/** Options of {@linkcode DotServer}. */
export interface DotServerOptions {
  /** Certificate chain (PEM); defaults to the test server certificate for `dns.test`. */
  cert?: string;
  /** Private key (PEM). */
  key?: string;
  /** Builds the answer; `null` means never answer. Defaults to {@linkcode answerFor}. */
  answer?: (query: Uint8Array) => Uint8Array | null;
  /** Milliseconds to hold each answer back (answers go out as their delays end). */
  delayMs?: (query: Uint8Array) => number;
  /** Close each connection after writing this many answers. */
  closeAfterAnswers?: number;
  /**
   * Close a connection that has sent nothing for this many milliseconds (dnsdist closes idle
   * client connections after 2 s by default).
   */
  idleCloseMs?: number;
  /**
   * Behave like a server under Nagle's algorithm with a client that never acknowledges on
   * its own: after each write, further answers are held until the client sends more bytes.
   */
  nagle?: boolean;
  /** Address to listen on (default 127.0.0.1). */
  hostname?: string;
  /** Port to listen on (default 0: any). */
  port?: number;
  /** Plain DNS over TCP (`Deno.listen`), no TLS. */
  plain?: boolean;
}

/** A DoT server for tests. Close it at the end of the test. */
export class DotServer {
  readonly #listener: Deno.Listener<Deno.Conn, Deno.NetAddr>;
  readonly #options: DotServerOptions;
  readonly #conns = new Set<Deno.Conn>();
  readonly #timers = new Set<ReturnType<typeof setTimeout>>();
  readonly #loops = new Set<Promise<void>>();
  readonly #accepting: Promise<void>;
  /** Queries received, over all connections, health probes (`. IN NS`) not included. */
  queries = 0;
  /** Health probes (`. IN NS`) received. */
  probes = 0;
  /** Health probes received with RD set. */
  probesWithRd = 0;
  /** Lengths of the messages received, in order: queries and probes alike. */
  readonly messageLengths: { probe: boolean; length: number }[] = [];
  /** Answers written. */
  answers = 0;
  /** Connections accepted (handshake completed or not). */
  connections = 0;
  /**
   * Times a read ended one octet into a length prefix: what a client's nudge sends (the first
   * octet of the next frame's length, alone, to carry its ACK).
   */
  lengthOctets = 0;
  /** Query IDs seen, per connection, in arrival order. */
  readonly idsPerConnection: number[][] = [];

  private constructor(
    listener: Deno.Listener<Deno.Conn, Deno.NetAddr>,
    options: DotServerOptions,
  ) {
    this.#listener = listener;
    this.#options = options;
    this.#accepting = this.#accept();
  }

  /** Starts a server. */
  static start(options: DotServerOptions = {}): DotServer {
    const hostname = options.hostname ?? "127.0.0.1";
    const port = options.port ?? 0;
    if (options.plain) {
      return new DotServer(Deno.listen({ hostname, port, transport: "tcp" }), options);
    }
    const listener = Deno.listenTls({
      hostname,
      port,
      cert: options.cert ?? SERVER_PEM,
      key: options.key ?? SERVER_KEY,
    });
    return new DotServer(listener, options);
  }

  /** The port it listens on. */
  get port(): number {
    return this.#listener.addr.port;
  }

  /** `--upstream` text for this server, verified against `tlsName`. */
  upstream(tlsName = "dns.test"): string {
    return `127.0.0.1:${this.port}#${tlsName}`;
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.Conn;
      try {
        conn = await this.#listener.accept();
      } catch {
        return;
      }
      this.connections++;
      this.#conns.add(conn);
      const ids: number[] = [];
      this.idsPerConnection.push(ids);
      const loop = this.#serve(conn, ids).finally(() => {
        this.#conns.delete(conn);
        this.#loops.delete(loop);
      });
      this.#loops.add(loop);
    }
  }

  async #serve(conn: Deno.Conn, ids: number[]): Promise<void> {
    let buffer = new Uint8Array(0);
    let answered = 0;
    let closed = false;
    let writing = Promise.resolve();
    // Nagle model: after a write, answers wait until the client sends something.
    let acknowledged = true;
    const held: Uint8Array[] = [];
    const close = () => {
      if (closed) return;
      closed = true;
      try {
        conn.close();
      } catch {
        // already closed
      }
    };
    const send = (response: Uint8Array) => {
      if (closed) return;
      if (this.#options.nagle) {
        held.push(response);
        if (!acknowledged) return;
        acknowledged = false;
        const batch = held.splice(0);
        for (const one of batch) writeFrame(one);
        return;
      }
      writeFrame(response);
    };
    const writeFrame = (response: Uint8Array) => {
      const frame = lengthFramed(response);
      writing = writing.then(async () => {
        if (closed) return;
        try {
          for (let off = 0; off < frame.length;) off += await conn.write(frame.subarray(off));
          this.answers++;
          answered++;
          const limit = this.#options.closeAfterAnswers;
          if (limit !== undefined && answered >= limit) close();
        } catch {
          close();
        }
      });
    };
    let idleTimer: ReturnType<typeof setTimeout> | undefined;
    const idleCloseMs = this.#options.idleCloseMs;
    const armIdle = () => {
      if (idleCloseMs === undefined) return;
      if (idleTimer !== undefined) {
        clearTimeout(idleTimer);
        this.#timers.delete(idleTimer);
      }
      const timer = setTimeout(() => {
        this.#timers.delete(timer);
        close();
      }, idleCloseMs);
      idleTimer = timer;
      this.#timers.add(timer);
    };
    try {
      const chunk = new Uint8Array(65536);
      armIdle();
      while (!closed) {
        const n = await conn.read(chunk);
        if (n === null) break;
        armIdle();
        if (this.#options.nagle) {
          acknowledged = true;
          if (held.length > 0) {
            acknowledged = false;
            for (const one of held.splice(0)) writeFrame(one);
          }
        }
        buffer = appendChunk(buffer, chunk, n);
        while (buffer.length >= 2) {
          const length = (buffer[0] << 8) | buffer[1];
          if (buffer.length < 2 + length) break;
          const query = buffer.slice(2, 2 + length);
          buffer = buffer.slice(2 + length);
          // The proxy's health checks ask `. IN NS`; tests count client queries.
          const isProbe = query.length >= 17 && query[12] === 0 && query[13] === 0 &&
            query[14] === 2;
          if (this.messageLengths.length < 10_000) {
            this.messageLengths.push({ probe: isProbe, length: query.length });
          }
          if (isProbe) {
            this.probes++;
            this.probesWithRd += query[2] & 0x01;
          } else {
            this.queries++;
            ids.push((query[0] << 8) | query[1]);
          }
          const response = (this.#options.answer ?? answerFor)(query);
          if (response === null) continue;
          const delay = this.#options.delayMs?.(query) ?? 0;
          if (delay > 0) {
            const timer = setTimeout(() => {
              this.#timers.delete(timer);
              send(response);
            }, delay);
            this.#timers.add(timer);
          } else {
            send(response);
          }
        }
        if (buffer.length === 1) this.lengthOctets++;
      }
    } catch {
      // A client that breaks the connection is part of what we test.
    }
    if (idleTimer !== undefined) {
      clearTimeout(idleTimer);
      this.#timers.delete(idleTimer);
    }
    await writing;
    close();
  }

  /** Closes every connection now (the proxy sees them break). */
  dropConnections(): void {
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch {
        // already closed
      }
    }
  }

  /** Stops the server and waits for its loops to end. */
  async close(): Promise<void> {
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    this.#listener.close();
    this.dropConnections();
    await this.#accepting;
    await Promise.all([...this.#loops]);
  }
}
