/**
 * A trivial DNS responder for the benchmark harness (bench/run.sh): the Deno runtime's own
 * ceiling. It answers every query from the query's own bytes (QR=1, RA=1, RCODE=NOERROR, no
 * answer records) without any upstream, over UDP and over TCP (2-byte length framing,
 * pipelined queries answered in order).
 *
 * Usage: deno run --unstable-net --allow-net bench/udp_responder.ts --listen 127.0.0.1:5399
 */

import { eachFrame, readFramed } from "./framed_reader.ts";

const HEADER_LEN = 12;

/** Parses `host:port` (an IPv6 host in brackets: `[::1]:53`). */
function parseListen(arg: string): { hostname: string; port: number } {
  const m = /^\[?([^\]]+?)\]?:(\d+)$/.exec(arg);
  if (m === null) throw new Error(`bad --listen ${arg}: want host:port`);
  return { hostname: m[1], port: Number(m[2]) };
}

/** Turns a query (in place) into an empty NOERROR answer; false when it is not a query. */
function makeAnswer(msg: Uint8Array): boolean {
  if (msg.length < HEADER_LEN || (msg[2] & 0x80) !== 0) return false;
  msg[2] = (msg[2] & 0x79) | 0x80; // QR=1, keep opcode and RD, clear AA and TC
  msg[3] = 0x80; // RA=1, Z=0, RCODE=NOERROR
  return true;
}

async function serveUdp(hostname: string, port: number): Promise<void> {
  const sock = Deno.listenDatagram({ transport: "udp", hostname, port });
  const buf = new Uint8Array(65536);
  for (;;) {
    const [view, addr] = await sock.receive(buf);
    const msg = view.slice(); // the only copy: the receive buffer is reused at once
    if (!makeAnswer(msg)) continue;
    sock.send(msg, addr).catch(() => {});
  }
}

async function serveTcpConn(conn: Deno.Conn): Promise<void> {
  try {
    // Every complete frame of a read is answered in place, all of them with one write.
    await readFramed(conn, async (buf, have) => {
      const used = eachFrame(buf, have, (start, end) => makeAnswer(buf.subarray(start, end)));
      if (used > 0) {
        const out = buf.slice(0, used);
        let sent = 0;
        while (sent < out.length) sent += await conn.write(out.subarray(sent));
      }
      return used;
    });
  } catch {
    // the client went away: nothing to do
  } finally {
    try {
      conn.close();
    } catch {
      // already closed
    }
  }
}

async function serveTcp(hostname: string, port: number): Promise<void> {
  const listener = Deno.listen({ transport: "tcp", hostname, port });
  for await (const conn of listener) {
    conn.setNoDelay(true);
    serveTcpConn(conn);
  }
}

if (import.meta.main) {
  const i = Deno.args.indexOf("--listen");
  const { hostname, port } = parseListen(i >= 0 ? Deno.args[i + 1] ?? "" : "127.0.0.1:5399");
  await Promise.all([serveUdp(hostname, port), serveTcp(hostname, port)]);
}
