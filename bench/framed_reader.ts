/**
 * The read loop the benchmark's Deno baselines share (bench/udp_responder.ts,
 * bench/deno_forwarder.ts): DNS messages over a stream, each behind a 2-byte length
 * (RFC 1035 section 4.2.2, RFC 7858), pipelined.
 *
 * @module
 */

/**
 * Reads `conn` until it ends. After each read, `consume(buffer, have)` is given the bytes
 * buffered so far and returns how many of them it used (whole frames, see
 * {@linkcode eachFrame}); those are dropped, the rest waits for more. The buffer grows when
 * a frame does not fit. A read error rejects.
 */
export async function readFramed(
  conn: Deno.Conn,
  consume: (buffer: Uint8Array, have: number) => number | Promise<number>,
): Promise<void> {
  let buffer = new Uint8Array(65536 + 2);
  let have = 0;
  for (;;) {
    if (have === buffer.length) {
      const bigger = new Uint8Array(buffer.length * 2);
      bigger.set(buffer);
      buffer = bigger;
    }
    const n = await conn.read(buffer.subarray(have));
    if (n === null) return;
    have += n;
    const used = await consume(buffer, have);
    if (used > 0) {
      buffer.copyWithin(0, used, have);
      have -= used;
    }
  }
}

/**
 * Calls `each(start, end)` for every complete frame in `buffer[0, have)` (the message is
 * `buffer[start, end)`, without its length) and returns the bytes they take.
 */
export function eachFrame(
  buffer: Uint8Array,
  have: number,
  each: (start: number, end: number) => void,
): number {
  let offset = 0;
  while (have - offset >= 2) {
    const length = (buffer[offset] << 8) | buffer[offset + 1];
    if (have - offset - 2 < length) break;
    each(offset + 2, offset + 2 + length);
    offset += 2 + length;
  }
  return offset;
}
