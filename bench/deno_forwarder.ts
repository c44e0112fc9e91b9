/**
 * The least a Deno DNS-over-TLS forwarder can do, for the benchmark harness (bench/run.sh,
 * target `deno-forwarder`): the floor that dotproxy's latency and CPU per query are measured
 * against (issue 12). UDP and TCP in; queries pipelined over a few TLS connections to one
 * upstream (the certificate verified against its name); the wire ID rewritten on the way out
 * and restored on the way back. Nothing else: no parsing beyond the header, no cache, no
 * timeouts per query (a sweep drops queries unanswered after 5 s), no retries, no metrics.
 *
 * As in dotproxy: four UDP receives wait at once on the socket; a query goes to the first
 * connection with nothing in flight, else to the least loaded; queries queued while a write is
 * under way go out together in the next TLS write of their connection. Unlike dotproxy it has
 * no nudge, so an answer the upstream holds back (Nagle) waits for the next write.
 *
 * Usage:
 *   DENO_FORWARDER_CA="$(cat ca.pem)" deno run --unstable-net --allow-net --allow-env \
 *     bench/deno_forwarder.ts --listen 127.0.0.1:5307 --upstream 127.0.0.1:8853#dns.test \
 *     [--connections 8]
 */

import { eachFrame, readFramed } from "./framed_reader.ts";

const HEADER_LEN = 12;
const SWEEP_MS = 1000;
const GIVE_UP_MS = 5000;

interface HostPort {
  hostname: string;
  port: number;
}

/** Parses `host:port` (an IPv6 host in brackets). */
function parseHostPort(arg: string): HostPort {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(arg);
  if (m === null) throw new Error(`bad address ${arg}: want host:port`);
  return { hostname: m[1], port: Number(m[2]) };
}

/** Where an answer goes back to: a UDP peer or a TCP client connection. */
type Reply = (answer: Uint8Array) => void;

interface Waiting {
  clientId: number;
  reply: Reply;
  sentAt: number;
}

/** One TLS connection: a 16-bit ID space of its own, one write per event-loop run. */
class Carrier {
  #conn: Deno.TlsConn | null = null;
  #connecting: Promise<void> | null = null;
  readonly waiting = new Map<number, Waiting>();
  #nextId = 1;
  #batch: Uint8Array[] = [];
  #batchLen = 0;
  #flushQueued = false;
  #writing = false;

  constructor(readonly upstream: HostPort, readonly tlsName: string, readonly caCerts: string[]) {}

  get inflight(): number {
    return this.waiting.size;
  }

  /** Queues one query (its ID rewritten in a copy) for the next write. */
  send(query: Uint8Array, reply: Reply, now: number): void {
    let id = this.#nextId;
    while (this.waiting.has(id)) id = (id + 1) & 0xffff;
    this.#nextId = (id + 1) & 0xffff;
    this.waiting.set(id, { clientId: (query[0] << 8) | query[1], reply, sentAt: now });
    const frame = new Uint8Array(query.length + 2);
    frame[0] = query.length >> 8;
    frame[1] = query.length & 0xff;
    frame.set(query, 2);
    frame[2] = id >> 8;
    frame[3] = id & 0xff;
    this.#batch.push(frame);
    this.#batchLen += frame.length;
    if (!this.#flushQueued) {
      this.#flushQueued = true;
      queueMicrotask(() => this.#flush());
    }
  }

  async #flush(): Promise<void> {
    this.#flushQueued = false;
    if (this.#writing || this.#batch.length === 0) return;
    this.#writing = true;
    try {
      const conn = await this.#open();
      while (this.#batch.length > 0) {
        let out: Uint8Array;
        if (this.#batch.length === 1) out = this.#batch[0];
        else {
          out = new Uint8Array(this.#batchLen);
          let off = 0;
          for (const f of this.#batch) {
            out.set(f, off);
            off += f.length;
          }
        }
        this.#batch = [];
        this.#batchLen = 0;
        let sent = 0;
        while (sent < out.length) sent += await conn.write(out.subarray(sent));
      }
    } catch (err) {
      console.error(`upstream write failed: ${err}`);
      this.#drop();
    } finally {
      this.#writing = false;
    }
  }

  #open(): Promise<Deno.TlsConn> {
    if (this.#conn !== null) return Promise.resolve(this.#conn);
    this.#connecting ??= (async () => {
      const tcp = await Deno.connect(this.upstream);
      tcp.setNoDelay(true);
      this.#conn = await Deno.startTls(tcp, { hostname: this.tlsName, caCerts: this.caCerts });
      this.#readLoop(this.#conn);
    })().finally(() => (this.#connecting = null));
    return this.#connecting.then(() => this.#conn!);
  }

  async #readLoop(conn: Deno.TlsConn): Promise<void> {
    const answered = (buf: Uint8Array, start: number, end: number) => {
      if (end - start < HEADER_LEN) return;
      const id = (buf[start] << 8) | buf[start + 1];
      const w = this.waiting.get(id);
      if (w === undefined) return;
      this.waiting.delete(id);
      const answer = buf.slice(start, end); // the one copy
      answer[0] = w.clientId >> 8;
      answer[1] = w.clientId & 0xff;
      w.reply(answer);
    };
    try {
      await readFramed(
        conn,
        (buf, have) => eachFrame(buf, have, (start, end) => answered(buf, start, end)),
      );
    } catch (err) {
      console.error(`upstream read failed: ${err}`);
    }
    if (this.#conn === conn) this.#drop();
  }

  #drop(): void {
    try {
      this.#conn?.close();
    } catch {
      // already closed
    }
    this.#conn = null;
    this.waiting.clear();
  }

  /** Forgets queries unanswered for GIVE_UP_MS (their clients time out on their own). */
  sweep(now: number): void {
    for (const [id, w] of this.waiting) if (now - w.sentAt > GIVE_UP_MS) this.waiting.delete(id);
  }
}

class Forwarder {
  readonly carriers: Carrier[];

  constructor(upstream: HostPort, tlsName: string, caCerts: string[], connections: number) {
    this.carriers = Array.from(
      { length: connections },
      () => new Carrier(upstream, tlsName, caCerts),
    );
    setInterval(() => {
      const now = performance.now();
      for (const c of this.carriers) c.sweep(now);
    }, SWEEP_MS);
  }

  forward(query: Uint8Array, reply: Reply): void {
    if (query.length < HEADER_LEN || (query[2] & 0x80) !== 0) return;
    let best = this.carriers[0];
    for (const c of this.carriers) {
      if (c.inflight === 0) {
        best = c;
        break;
      }
      if (c.inflight < best.inflight) best = c;
    }
    best.send(query, reply, performance.now());
  }
}

/** Receives at once on one socket, as dotproxy does (more queries per turn of the loop). */
const PARALLEL_RECEIVES = 4;

async function serveUdp(listen: HostPort, fwd: Forwarder): Promise<void> {
  const sock = Deno.listenDatagram({ transport: "udp", ...listen });
  await Promise.all(Array.from({ length: PARALLEL_RECEIVES }, () => receiveLoop(sock, fwd)));
}

async function receiveLoop(sock: Deno.DatagramConn, fwd: Forwarder): Promise<void> {
  const buf = new Uint8Array(65536);
  for (;;) {
    const [view, addr] = await sock.receive(buf);
    // The query is copied once, into its TLS frame, before the buffer is reused.
    fwd.forward(view, (answer) => {
      sock.send(answer, addr).catch(() => {});
    });
  }
}

async function serveTcpConn(conn: Deno.Conn, fwd: Forwarder): Promise<void> {
  let writes = Promise.resolve();
  const reply: Reply = (answer) => {
    const frame = new Uint8Array(answer.length + 2);
    frame[0] = answer.length >> 8;
    frame[1] = answer.length & 0xff;
    frame.set(answer, 2);
    writes = writes.then(async () => {
      let sent = 0;
      while (sent < frame.length) sent += await conn.write(frame.subarray(sent));
    }).catch(() => {});
  };
  try {
    // Each query is copied into its TLS frame before the buffer moves on.
    await readFramed(
      conn,
      (buf, have) =>
        eachFrame(buf, have, (start, end) => fwd.forward(buf.subarray(start, end), reply)),
    );
  } catch {
    // the client went away
  } finally {
    await writes;
    try {
      conn.close();
    } catch {
      // already closed
    }
  }
}

async function serveTcp(listen: HostPort, fwd: Forwarder): Promise<void> {
  for await (const conn of Deno.listen({ transport: "tcp", ...listen })) {
    conn.setNoDelay(true);
    serveTcpConn(conn, fwd);
  }
}

if (import.meta.main) {
  const arg = (name: string, fallback: string): string => {
    const i = Deno.args.indexOf(name);
    return i >= 0 ? Deno.args[i + 1] ?? fallback : fallback;
  };
  const listen = parseHostPort(arg("--listen", "127.0.0.1:5307"));
  const [upstreamAddr, tlsName] = arg("--upstream", "127.0.0.1:853#dns.test").split("#");
  const connections = Number(arg("--connections", "8"));
  const ca = Deno.env.get("DENO_FORWARDER_CA");
  const fwd = new Forwarder(
    parseHostPort(upstreamAddr),
    tlsName ?? upstreamAddr,
    ca ? [ca] : [],
    Math.max(1, connections),
  );
  await Promise.all([serveUdp(listen, fwd), serveTcp(listen, fwd)]);
}
