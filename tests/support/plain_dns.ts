/**
 * A plain-DNS server on loopback (UDP and TCP on one port) for the plain-DNS zone targets:
 * it records every query and answers through a handler, which may also answer from other
 * sockets or with other IDs (spoofing tests). By default it answers like the test upstream
 * (`answerFor`), truncating over UDP what does not fit the query's advertised size.
 *
 * @module
 */

import { answerFor, appendChunk, lengthFramed, parseMessage } from "./dns.ts";

/** One query the server read. */
export interface PlainQuery {
  transport: "udp" | "tcp";
  query: Uint8Array;
  from: Deno.NetAddr;
}

/** Sends `bytes` back the way the query came. */
export type Reply = (bytes: Uint8Array) => Promise<void>;

/** Decides what to do with a query; the default answers with `answerFor`. */
export type PlainHandler = (query: PlainQuery, reply: Reply, server: PlainDnsServer) => unknown;

/** The UDP form of `answer` for `query`: TC=1 and no records when it does not fit. */
export function fitUdp(query: Uint8Array, answer: Uint8Array): Uint8Array {
  const limit = parseMessage(query).opt?.udpSize ?? 512;
  if (answer.length <= Math.max(512, limit)) return answer;
  const parsed = parseMessage(query);
  let questionEnd = 12;
  while (query[questionEnd] !== 0) questionEnd += query[questionEnd] + 1;
  questionEnd += 5;
  const out = answer.slice(0, questionEnd);
  out[2] |= 0x02;
  out.fill(0, 6, 12);
  out[5] = parsed.question ? 1 : 0;
  return out;
}

/** The default handler: `answerFor`, truncated over UDP when too large. */
export const ANSWER_FOR: PlainHandler = (query, reply) => {
  const answer = answerFor(query.query);
  return reply(query.transport === "udp" ? fitUdp(query.query, answer) : answer);
};

/**
 * A plain DNS server. Close it at the end of the test.
 *
 * @example
 * ```ts ignore
 * const server = PlainDnsServer.start();
 * // --zone cluster.test=dns://127.0.0.1:${server.port}
 * await server.close();
 * ```
 */
export class PlainDnsServer {
  /** Every query read, in order. */
  readonly queries: PlainQuery[] = [];
  /** The UDP socket (a handler may answer from another one to spoof). */
  readonly udp: Deno.DatagramConn;
  readonly #tcp: Deno.TcpListener;
  readonly #conns = new Set<Deno.Conn>();
  readonly #loops: Promise<void>[] = [];
  /** Handlers still running (a handler may wait before it answers). */
  readonly #handling = new Set<Promise<unknown>>();
  /** The handler; tests may swap it. */
  handler: PlainHandler;
  /** True while it reads nothing (a frozen server). */
  frozen = false;

  private constructor(udp: Deno.DatagramConn, tcp: Deno.TcpListener, handler: PlainHandler) {
    this.udp = udp;
    this.#tcp = tcp;
    this.handler = handler;
    this.#loops.push(this.#serveUdp(), this.#serveTcp());
  }

  /** Listens on `hostname` (UDP and TCP on the same free port). */
  static start(handler: PlainHandler = ANSWER_FOR, hostname = "127.0.0.1"): PlainDnsServer {
    for (let attempt = 0; attempt < 20; attempt++) {
      const udp = Deno.listenDatagram({ transport: "udp", hostname, port: 0 });
      const port = (udp.addr as Deno.NetAddr).port;
      try {
        const tcp = Deno.listen({ hostname, port });
        return new PlainDnsServer(udp, tcp, handler);
      } catch {
        udp.close();
      }
    }
    throw new Error("no free port for UDP and TCP");
  }

  /** The port of both sockets. */
  get port(): number {
    return (this.udp.addr as Deno.NetAddr).port;
  }

  /** Queries read over `transport`. */
  count(transport: "udp" | "tcp"): number {
    return this.queries.filter((q) => q.transport === transport).length;
  }

  async #serveUdp(): Promise<void> {
    try {
      for (;;) {
        const [data, from] = await this.udp.receive();
        if (this.frozen) continue;
        const query: PlainQuery = { transport: "udp", query: data, from: from as Deno.NetAddr };
        this.queries.push(query);
        const reply: Reply = async (bytes) => {
          await this.udp.send(bytes, from).catch(() => 0);
        };
        this.#handle(query, reply);
      }
    } catch {
      // Closed.
    }
  }

  async #serveTcp(): Promise<void> {
    try {
      for await (const conn of this.#tcp) {
        this.#conns.add(conn);
        this.#loops.push(this.#serveConn(conn));
      }
    } catch {
      // Closed.
    }
  }

  async #serveConn(conn: Deno.Conn): Promise<void> {
    let buffer = new Uint8Array(0);
    const chunk = new Uint8Array(65536);
    try {
      for (;;) {
        const n = await conn.read(chunk);
        if (n === null) break;
        buffer = appendChunk(buffer, chunk, n);
        while (buffer.length >= 2 && buffer.length >= 2 + ((buffer[0] << 8) | buffer[1])) {
          const length = (buffer[0] << 8) | buffer[1];
          const data = buffer.slice(2, 2 + length);
          buffer = buffer.slice(2 + length);
          if (this.frozen) continue;
          const query: PlainQuery = {
            transport: "tcp",
            query: data,
            from: conn.remoteAddr as Deno.NetAddr,
          };
          this.queries.push(query);
          const reply: Reply = async (bytes) => {
            const frame = lengthFramed(bytes);
            for (let at = 0; at < frame.length;) at += await conn.write(frame.subarray(at));
          };
          this.#handle(query, reply);
        }
      }
    } catch {
      // Reset or closed.
    } finally {
      this.#conns.delete(conn);
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
  }

  #handle(query: PlainQuery, reply: Reply): void {
    const handling = Promise.resolve(this.handler(query, reply, this)).catch(() => {});
    this.#handling.add(handling);
    handling.finally(() => this.#handling.delete(handling));
  }

  /** Closes every socket and waits for its loops and handlers. */
  async close(): Promise<void> {
    this.udp.close();
    this.#tcp.close();
    for (const conn of this.#conns) {
      try {
        conn.close();
      } catch {
        // Already closed.
      }
    }
    await Promise.all(this.#loops);
    await Promise.all(this.#handling);
  }
}
