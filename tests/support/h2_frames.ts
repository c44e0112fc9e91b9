/**
 * Hand-built HTTP/2 client bytes for tests and benchmarks that must send exactly what they
 * mean (a hostile client, the least client), with no HTTP/2 library in between.
 *
 * @module
 */

/** The HTTP/2 client connection preface (RFC 9113, section 3.4). */
export const H2_PREFACE: Uint8Array = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/** One HTTP/2 frame: the 9-octet header (RFC 9113, section 4.1) and the payload. */
export function h2Frame(
  type: number,
  flags: number,
  stream: number,
  payload: Uint8Array,
): Uint8Array {
  const f = new Uint8Array(9 + payload.length);
  f[0] = payload.length >> 16;
  f[1] = (payload.length >> 8) & 0xff;
  f[2] = payload.length & 0xff;
  f[3] = type;
  f[4] = flags;
  new DataView(f.buffer).setUint32(5, stream & 0x7fffffff);
  f.set(payload, 9);
  return f;
}

/** An HPACK string literal without Huffman; short strings only (7-bit length prefix). */
export function hpackLiteral(text: string): number[] {
  const bytes = new TextEncoder().encode(text);
  if (bytes.length >= 127) throw new Error("HPACK literal too long for this client");
  return [bytes.length, ...bytes];
}

/**
 * What an HTTP/2 client that never reads sends: the preface, SETTINGS with the largest stream
 * window, a WINDOW_UPDATE opening the connection window to match (so flow control holds
 * nothing back), then `streams` HEADERS frames (END_STREAM | END_HEADERS) carrying `block`,
 * on streams 1, 3, 5...
 */
export function h2NoReadClientBytes(block: Uint8Array, streams: number): Uint8Array {
  const window = 0x7fffffff;
  const settings = new Uint8Array(6);
  new DataView(settings.buffer).setUint16(0, 4); // SETTINGS_INITIAL_WINDOW_SIZE
  new DataView(settings.buffer).setUint32(2, window);
  const increment = new Uint8Array(4);
  new DataView(increment.buffer).setUint32(0, window - 65_535);
  const parts = [H2_PREFACE, h2Frame(4, 0, 0, settings), h2Frame(8, 0, 0, increment)];
  for (let i = 0; i < streams; i++) parts.push(h2Frame(1, 0x05, 1 + 2 * i, block));
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  parts.reduce((at, p) => (out.set(p, at), at + p.length), 0);
  return out;
}
