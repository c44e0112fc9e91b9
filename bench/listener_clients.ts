/**
 * Client helpers of bench/listeners.sh (the DoT and DoH listener benchmark).
 *
 *   urls BASE-URL < names > urls        one GET URL per name: BASE-URL?dns=BASE64URL (A, ID 0)
 *   body NAME > file                    the wire query for NAME (A, ID 0): h2load's POST body
 *   idle dot|h2|h1 PORT COUNT [HOLD-S]  opens COUNT TLS connections to 127.0.0.1:PORT, asks one
 *                                       question on each (so each is set up as a client would
 *                                       use it), keeps them open and idle, prints
 *                                       "ready OPEN FAILED SECONDS" and holds them HOLD-S seconds
 *                                       (default 120) or until killed. The CA is the PEM text in
 *                                       env LISTENER_CA; the name verified is 127.0.0.1 (the test
 *                                       certificate carries it as an IP SAN).
 *
 * The HTTP/2 client is the least that carries one request: the preface, an empty SETTINGS,
 * one HEADERS frame (HPACK literals without Huffman), the ACK of the server's SETTINGS; it reads
 * until stream 1 ends. No HTTP/2 library, so that nothing but the connection is measured on
 * the server (and Deno's fetch would pool connections).
 *
 * @module
 */

import { H2_PREFACE, h2Frame, hpackLiteral } from "../tests/support/h2_frames.ts";

/** A DNS query for NAME type A class IN, RD set. */
function query(name: string, id: number): Uint8Array {
  const labels = name.replace(/\.$/, "").split(".").filter((l) => l !== "");
  const bytes = [id >> 8, id & 0xff, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
  for (const label of labels) {
    const l = new TextEncoder().encode(label);
    if (l.length > 63) throw new Error(`label too long in ${name}`);
    bytes.push(l.length, ...l);
  }
  bytes.push(0, 0, 1, 0, 1);
  return new Uint8Array(bytes);
}

function base64url(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function urls(base: string): Promise<void> {
  const text = await new Response(Deno.stdin.readable).text();
  const out: string[] = [];
  for (const line of text.split("\n")) {
    const name = line.trim().split(/\s+/)[0];
    if (name) out.push(`${base}?dns=${base64url(query(name, 0))}`);
  }
  await Deno.stdout.write(new TextEncoder().encode(out.join("\n") + "\n"));
}

/** Reads exactly `n` more bytes after `have` into a growing buffer; false at end of stream. */
async function readAtLeast(conn: Deno.Conn, buf: { b: Uint8Array; have: number }, n: number) {
  while (buf.have < n) {
    if (buf.have === buf.b.length) {
      const bigger = new Uint8Array(buf.b.length * 2);
      bigger.set(buf.b);
      buf.b = bigger;
    }
    const got = await conn.read(buf.b.subarray(buf.have));
    if (got === null) return false;
    buf.have += got;
  }
  return true;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

/** One DoT question and its answer. */
async function dotOnce(conn: Deno.Conn, name: string): Promise<void> {
  const q = query(name, Math.floor(Math.random() * 65536));
  const msg = new Uint8Array(2 + q.length);
  msg[0] = q.length >> 8;
  msg[1] = q.length & 0xff;
  msg.set(q, 2);
  await writeAll(conn, msg);
  const buf = { b: new Uint8Array(4096), have: 0 };
  if (!await readAtLeast(conn, buf, 2)) throw new Error("closed before the answer");
  const len = (buf.b[0] << 8) | buf.b[1];
  if (!await readAtLeast(conn, buf, 2 + len)) throw new Error("closed in the answer");
  if ((buf.b[2 + 3] & 0x0f) !== 0) throw new Error(`rcode ${buf.b[2 + 3] & 0x0f}`);
}

/** One HTTP/2 GET on stream 1, read until the stream ends. */
async function h2Once(conn: Deno.Conn, name: string, port: number): Promise<void> {
  const path = `/dns-query?dns=${base64url(query(name, 0))}`;
  const block = new Uint8Array([
    0x82, // :method GET
    0x87, // :scheme https
    0x04, // :path, literal without indexing, name index 4
    ...hpackLiteral(path),
    0x01, // :authority, name index 1
    ...hpackLiteral(`127.0.0.1:${port}`),
    0x0f, // accept (static index 19 = 15 + 4), literal without indexing
    0x04,
    ...hpackLiteral("application/dns-message"),
  ]);
  const out = new Uint8Array([
    ...H2_PREFACE,
    ...h2Frame(4, 0, 0, new Uint8Array(0)),
    ...h2Frame(1, 0x05, 1, block), // END_STREAM | END_HEADERS
  ]);
  await writeAll(conn, out);
  const buf = { b: new Uint8Array(16384), have: 0 };
  let data = 0;
  for (let frames = 0; frames < 64; frames++) {
    if (!await readAtLeast(conn, buf, 9)) throw new Error("closed before the answer");
    const len = (buf.b[0] << 16) | (buf.b[1] << 8) | buf.b[2];
    if (!await readAtLeast(conn, buf, 9 + len)) throw new Error("closed in a frame");
    const type = buf.b[3], flags = buf.b[4];
    const stream = new DataView(buf.b.buffer).getUint32(5) & 0x7fffffff;
    if (type === 4 && (flags & 1) === 0) await writeAll(conn, h2Frame(4, 1, 0, new Uint8Array(0)));
    if (type === 7) throw new Error("GOAWAY");
    if (type === 3 && stream === 1) throw new Error("RST_STREAM");
    if (type === 0 && stream === 1) data += len;
    buf.b.copyWithin(0, 9 + len, buf.have);
    buf.have -= 9 + len;
    if (stream === 1 && (type === 0 || type === 1) && (flags & 1) !== 0) {
      if (data < 12) throw new Error("no DNS message in the response");
      return;
    }
  }
  throw new Error("stream 1 did not end within 64 frames");
}

/** One HTTP/1.1 GET, keep-alive, read until the body (Content-Length) is complete. */
async function h1Once(conn: Deno.Conn, name: string, port: number): Promise<void> {
  const req = `GET /dns-query?dns=${base64url(query(name, 0))} HTTP/1.1\r\n` +
    `Host: 127.0.0.1:${port}\r\nAccept: application/dns-message\r\n\r\n`;
  await writeAll(conn, new TextEncoder().encode(req));
  const buf = { b: new Uint8Array(4096), have: 0 };
  for (let i = 0; i < 64; i++) {
    const head = new TextDecoder().decode(buf.b.subarray(0, buf.have));
    const end = head.indexOf("\r\n\r\n");
    if (end >= 0) {
      if (!/^HTTP\/1\.1 200/.test(head)) throw new Error(head.split("\r\n")[0]);
      const m = /content-length:\s*(\d+)/i.exec(head.slice(0, end));
      if (!m) throw new Error("no Content-Length");
      if (!await readAtLeast(conn, buf, end + 4 + Number(m[1]))) throw new Error("closed in body");
      return;
    }
    if (!await readAtLeast(conn, buf, buf.have + 1)) throw new Error("closed before the answer");
  }
  throw new Error("no response head");
}

async function idle(mode: string, port: number, count: number, holdS: number): Promise<void> {
  const ca = Deno.env.get("LISTENER_CA");
  if (!ca) throw new Error("LISTENER_CA (the CA's PEM text) is not set");
  const alpn = mode === "h2" ? ["h2"] : mode === "h1" ? ["http/1.1"] : undefined;
  const conns: Deno.Conn[] = [];
  let failed = 0;
  const errors = new Map<string, number>();
  const started = performance.now();
  const one = async (i: number) => {
    let conn: Deno.TlsConn | undefined;
    try {
      conn = await Deno.connectTls({
        hostname: "127.0.0.1",
        port,
        caCerts: [ca],
        ...(alpn ? { alpnProtocols: alpn } : {}),
      });
      await conn.handshake();
      const name = `n${i % 10000}.bench.test`;
      if (mode === "dot") await dotOnce(conn, name);
      else if (mode === "h2") await h2Once(conn, name, port);
      else await h1Once(conn, name, port);
      conns.push(conn);
    } catch (e) {
      failed++;
      const why = e instanceof Error ? e.message : String(e);
      errors.set(why, (errors.get(why) ?? 0) + 1);
      try {
        conn?.close();
      } catch { /* already closed */ }
    }
  };
  // 50 handshakes at a time: what a burst of reconnecting clients looks like, without
  // overrunning the listeners' accept backlogs (128 by default).
  let next = 0;
  const workers = Array.from({ length: Math.min(50, count) }, async () => {
    while (next < count) await one(next++);
  });
  await Promise.all(workers);
  const seconds = (performance.now() - started) / 1000;
  for (const [why, n] of errors) console.error(`idle ${mode}: ${n} connection(s) failed: ${why}`);
  console.log(`ready ${conns.length} ${failed} ${seconds.toFixed(2)}`);
  await new Promise((resolve) => setTimeout(resolve, holdS * 1000));
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed by the server */ }
  }
}

async function main(args: string[]): Promise<void> {
  const [cmd, ...rest] = args;
  if (cmd === "urls" && rest.length === 1) return await urls(rest[0]);
  if (cmd === "body" && rest.length === 1) {
    await Deno.stdout.write(query(rest[0], 0));
    return;
  }
  if (cmd === "idle" && rest.length >= 3 && ["dot", "h2", "h1"].includes(rest[0])) {
    return await idle(rest[0], Number(rest[1]), Number(rest[2]), Number(rest[3] ?? 120));
  }
  console.error(
    "usage: listener_clients.ts urls BASE-URL | body NAME | idle dot|h2|h1 PORT COUNT [HOLD-S]",
  );
  Deno.exit(2);
}

if (import.meta.main) await main(Deno.args);
