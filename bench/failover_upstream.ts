/**
 * Broken upstreams for `bench/failover.sh`:
 *
 * - `slow`: a DNS-over-TLS server that answers one name in ten (by a hash of the name, so
 *   the same name is slow each time it is asked, as a recursive resolver's cache misses are)
 *   after `--slow-ms` (default 200), the rest at once. It answers the benchmark's zones the
 *   way the upstream Unbound does: `<anything>.u.bench.test A` is 192.0.2.1,
 *   `n<i>.bench.test A` is 10.0.<i/256>.<i%256>; anything else, `. NS` included, is REFUSED.
 * - `blackhole`: a port where TCP connects hang: a listener with an accept backlog of 0 whose
 *   one queue slot is taken by a connection nobody accepts, so Linux drops every further SYN
 *   without an answer (as a firewall that drops packets does).
 *
 * ```sh
 * deno run --allow-net --allow-read bench/failover_upstream.ts slow --port 18954 \
 *   --cert server.pem --key server.key [--slow-ms 200] [--every 10]
 * deno run --allow-net bench/failover_upstream.ts blackhole --port 18954
 * ```
 *
 * Runs until killed.
 *
 * @module
 */

import { appendChunk } from "../tests/support/dns.ts";

const MAX_FRAMES = 1_000_000_000;

function arg(name: string, fallback?: string): string {
  const at = Deno.args.indexOf(`--${name}`);
  if (at >= 0 && at + 1 < Deno.args.length) return Deno.args[at + 1];
  if (fallback !== undefined) return fallback;
  throw new Error(`--${name} is required`);
}

/** The question's name (lower case, dotted, "." for the root), its end, and its type. */
function question(query: Uint8Array): { name: string; end: number; type: number } | null {
  if (query.length < 17 || ((query[4] << 8) | query[5]) !== 1) return null;
  const labels: string[] = [];
  let at = 12;
  for (let i = 0; i < 128; i++) {
    const length = query[at];
    if (length === undefined || (length & 0xc0) !== 0) return null;
    if (length === 0) {
      const end = at + 5;
      if (end > query.length) return null;
      const name = labels.length === 0 ? "." : labels.join(".").toLowerCase() + ".";
      return { name, end, type: (query[at + 1] << 8) | query[at + 2] };
    }
    labels.push(String.fromCharCode(...query.subarray(at + 1, at + 1 + length)));
    at += 1 + length;
  }
  return null;
}

/** The answer to `query`: header and question copied, then one A record or REFUSED. */
function answer(query: Uint8Array): Uint8Array | null {
  const q = question(query);
  if (q === null) return null;
  let address: number[] | null = null;
  if (q.type === 1 && q.name.endsWith(".u.bench.test.")) address = [192, 0, 2, 1];
  const numbered = /^n(\d+)\.bench\.test\.$/.exec(q.name);
  if (q.type === 1 && numbered && Number(numbered[1]) < 10000) {
    const i = Number(numbered[1]);
    address = [10, 0, i >> 8, i & 0xff];
  }
  const record = address === null ? [] : [0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, ...address];
  const out = new Uint8Array(q.end + record.length);
  out.set(query.subarray(0, q.end));
  out[2] = 0x80 | (query[2] & 0x79); // QR, opcode and RD kept
  out[3] = 0x80 | (address === null ? 5 : 0); // RA; NOERROR or REFUSED
  out.fill(0, 6, 12);
  out[7] = address === null ? 0 : 1;
  out.set(record, q.end);
  return out;
}

/** True for one name in `every`, the same each time the name is asked. */
function isSlow(query: Uint8Array, every: number): boolean {
  const q = question(query);
  if (q === null || q.name === ".") return false;
  let hash = 2166136261;
  for (let i = 0; i < q.name.length; i++) hash = Math.imul(hash ^ q.name.charCodeAt(i), 16777619);
  return (hash >>> 0) % every === 0;
}

function frame(message: Uint8Array): Uint8Array {
  const out = new Uint8Array(2 + message.length);
  out[0] = message.length >> 8;
  out[1] = message.length & 0xff;
  out.set(message, 2);
  return out;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
}

async function serve(conn: Deno.TlsConn, slowMs: number, every: number): Promise<void> {
  let writing = Promise.resolve();
  let closed = false;
  const write = (bytes: Uint8Array) => {
    writing = writing.then(async () => {
      if (closed) return;
      try {
        await writeAll(conn, bytes);
      } catch {
        closed = true;
      }
    });
  };
  const timers = new Set<ReturnType<typeof setTimeout>>();
  let buffer = new Uint8Array(0);
  const chunk = new Uint8Array(65536);
  try {
    for (let i = 0; i < MAX_FRAMES && !closed; i++) {
      const n = await conn.read(chunk);
      if (n === null) break;
      buffer = appendChunk(buffer, chunk, n);
      // Everything answerable now goes out in one write, as a server that batches does.
      const now: Uint8Array[] = [];
      while (buffer.length >= 2) {
        const length = (buffer[0] << 8) | buffer[1];
        if (buffer.length < 2 + length) break;
        const query = buffer.slice(2, 2 + length);
        buffer = buffer.slice(2 + length);
        const response = answer(query);
        if (response === null) continue;
        if (isSlow(query, every)) {
          const timer = setTimeout(() => {
            timers.delete(timer);
            write(frame(response));
          }, slowMs);
          timers.add(timer);
        } else {
          now.push(frame(response));
        }
      }
      if (now.length > 0) {
        const total = now.reduce((sum, f) => sum + f.length, 0);
        const batch = new Uint8Array(total);
        let off = 0;
        for (const f of now) {
          batch.set(f, off);
          off += f.length;
        }
        write(batch);
      }
    }
  } catch {
    // A client breaking the connection ends it.
  }
  for (const timer of timers) clearTimeout(timer);
  closed = true;
  await writing;
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}

async function slow(): Promise<void> {
  const listener = Deno.listenTls({
    hostname: "127.0.0.1",
    port: Number(arg("port")),
    cert: await Deno.readTextFile(arg("cert")),
    key: await Deno.readTextFile(arg("key")),
  });
  const slowMs = Number(arg("slow-ms", "200"));
  const every = Number(arg("every", "10"));
  console.error(`slow DoT server on ${listener.addr.port}: 1 name in ${every} after ${slowMs} ms`);
  for (let i = 0; i < MAX_FRAMES; i++) {
    const conn = await listener.accept();
    serve(conn, slowMs, every).catch(() => {});
  }
}

async function blackhole(): Promise<void> {
  const port = Number(arg("port"));
  const listener = Deno.listen({ hostname: "127.0.0.1", port, tcpBacklog: 0 });
  const fillers: Deno.TcpConn[] = [];
  for (let attempt = 0; attempt < 16; attempt++) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), 200);
    try {
      fillers.push(await Deno.connect({ hostname: "127.0.0.1", port, signal: abort.signal }));
    } catch {
      if (abort.signal.aborted) {
        console.error(`black hole on ${port}: connects hang (${fillers.length} in the queue)`);
        // Hold the listener and the fillers until killed (an interval keeps the process up;
        // an accept would empty the queue).
        await new Promise(() => setInterval(() => {}, 3_600_000));
      }
      throw new Error("the black hole's probe connect failed");
    } finally {
      clearTimeout(timer);
    }
  }
  listener.close();
  throw new Error("could not fill the accept queue");
}

if (import.meta.main) {
  const mode = Deno.args[0];
  if (mode === "slow") await slow();
  else if (mode === "blackhole") await blackhole();
  else {
    console.error("usage: failover_upstream.ts slow|blackhole --port N [...]");
    Deno.exit(2);
  }
}
