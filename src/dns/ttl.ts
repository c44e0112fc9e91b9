/**
 * Reading and rewriting the TTL fields of a message in place, for the cache: clamp on
 * store, age on serve, a fixed TTL when serving stale. The offsets come from
 * `ResponseInfo.ttlOffsets` (`message.ts`) (every TTL field except the OPT record's, whose TTL
 * holds EDNS flags, RFC 6891 section 6.1.3).
 *
 * TTLs are unsigned 32-bit, but RFC 2181 section 8 limits them to 2^31 - 1 and says a value
 * with the top bit set is to be treated as zero; every function here does so.
 *
 * @module
 */

/** The largest TTL a record may carry (RFC 2181 section 8): 2^31 - 1 seconds. */
export const MAX_TTL = 0x7fffffff;

/**
 * Reads the TTL at `offset` as RFC 2181 section 8 asks: a value with the top bit set is 0.
 *
 * @example
 * ```ts
 * import { readTtl } from "./ttl.ts";
 * readTtl(new Uint8Array([0, 0, 0x0e, 0x10]), 0); // 3600
 * readTtl(new Uint8Array([0x80, 0, 0, 1]), 0); // 0
 * ```
 */
export function readTtl(msg: Uint8Array, offset: number): number {
  const high = msg[offset];
  if (high & 0x80) return 0;
  return high * 0x1000000 + ((msg[offset + 1] << 16) | (msg[offset + 2] << 8) | msg[offset + 3]);
}

/**
 * Writes `value` (an integer in `[0, MAX_TTL]`) as a big-endian 32-bit TTL at `offset`.
 *
 * @example
 * ```ts
 * import { writeTtl } from "./ttl.ts";
 * const field = new Uint8Array(4);
 * writeTtl(field, 0, 300); // field is [0, 0, 1, 44]
 * ```
 */
export function writeTtl(msg: Uint8Array, offset: number, value: number): void {
  msg[offset] = value >>> 24;
  msg[offset + 1] = (value >>> 16) & 0xff;
  msg[offset + 2] = (value >>> 8) & 0xff;
  msg[offset + 3] = value & 0xff;
}

/**
 * Writes 0 over every TTL field of `msg` (at the first `count` of `offsets`) that has its top
 * bit set: RFC 2181 section 8 says such a TTL is treated as zero, and a client reading it
 * unsigned would keep the record for 68 years. Returns how many it changed.
 *
 * @example
 * ```ts
 * import { zeroHighTtls } from "./ttl.ts";
 * const msg = new Uint8Array([0x80, 0, 0, 1, 0, 0, 1, 44]);
 * zeroHighTtls(msg, new Uint32Array([0, 4]), 2); // 1: msg is [0, 0, 0, 0, 0, 0, 1, 44]
 * ```
 */
export function zeroHighTtls(msg: Uint8Array, offsets: Uint32Array, count: number): number {
  let changed = 0;
  const n = Math.min(count, offsets.length);
  for (let i = 0; i < n; i++) {
    const offset = offsets[i];
    if ((msg[offset] & 0x80) === 0) continue;
    writeTtl(msg, offset, 0);
    changed++;
  }
  return changed;
}

/** Clamps `n` into `[0, MAX_TTL]`, dropping any fraction. */
function toTtl(n: number): number {
  if (!(n > 0)) return 0; // also NaN
  return n >= MAX_TTL ? MAX_TTL : Math.floor(n);
}

/**
 * The one rewrite the functions below are made of: each TTL field listed in
 * `offsets[0..count)`, as read from `source`, less `elapsed`, clamped into `[low, high]`,
 * written into `out` (which may be `source`). `elapsed`, `low` and `high` are integers in
 * `[0, MAX_TTL]` with `low <= high`.
 */
function rewriteTtls(
  out: Uint8Array,
  source: Uint8Array,
  offsets: Uint32Array,
  count: number,
  elapsed: number,
  low: number,
  high: number,
): void {
  const n = Math.min(count, offsets.length);
  for (let i = 0; i < n; i++) {
    const offset = offsets[i];
    const ttl = readTtl(source, offset) - elapsed;
    writeTtl(out, offset, ttl < low ? low : ttl > high ? high : ttl);
  }
}

/**
 * Clamps every TTL field of `msg` listed in `offsets[0..count)` into `[min, max]`, in place
 * (a TTL with the top bit set counts as 0 first, so it becomes `min`). `min` and `max` are
 * themselves clamped into `[0, MAX_TTL]`; when `min > max`, `max` wins.
 *
 * @example
 * ```ts
 * import { analyzeResponse, ResponseInfo } from "./message.ts";
 * import { clampTtls } from "./ttl.ts";
 * const answer = new Uint8Array(12); // an upstream's answer, as read
 * const info = new ResponseInfo();
 * if (analyzeResponse(answer, info)) clampTtls(answer, info.ttlOffsets, info.ttlCount, 5, 86400);
 * ```
 */
export function clampTtls(
  msg: Uint8Array,
  offsets: Uint32Array,
  count: number,
  min: number,
  max: number,
): void {
  const high = toTtl(max);
  rewriteTtls(msg, msg, offsets, count, 0, Math.min(toTtl(min), high), high);
}

/**
 * Writes into `out` the TTLs of `source` aged by `elapsedSeconds` (whole seconds; fractions
 * are dropped, negative counts as 0): `max(0, ttl - elapsed)` for each field listed in
 * `offsets[0..count)`. `out` holds the same message layout as `source` (typically a copy of
 * it with another ID) and may be `source` itself. Nothing else is written.
 *
 * @example
 * ```ts
 * import { analyzeResponse, ResponseInfo } from "./message.ts";
 * import { writeAgedTtls } from "./ttl.ts";
 * const stored = new Uint8Array(12); // a cached answer
 * const info = new ResponseInfo();
 * if (analyzeResponse(stored, info)) {
 *   const reply = stored.slice();
 *   writeAgedTtls(reply, stored, info.ttlOffsets, info.ttlCount, 42);
 * }
 * ```
 */
export function writeAgedTtls(
  out: Uint8Array,
  source: Uint8Array,
  offsets: Uint32Array,
  count: number,
  elapsedSeconds: number,
): void {
  rewriteTtls(out, source, offsets, count, toTtl(elapsedSeconds), 0, MAX_TTL);
}

/**
 * Sets every TTL field listed in `offsets[0..count)` of `out` to `value` (clamped into
 * `[0, MAX_TTL]`), as serve-stale does with its 30 seconds (RFC 8767 section 4).
 *
 * @example
 * ```ts
 * import { analyzeResponse, ResponseInfo } from "./message.ts";
 * import { writeTtls } from "./ttl.ts";
 * const stale = new Uint8Array(12); // a copy of an expired cached answer
 * const info = new ResponseInfo();
 * if (analyzeResponse(stale, info)) writeTtls(stale, info.ttlOffsets, info.ttlCount, 30);
 * ```
 */
export function writeTtls(
  out: Uint8Array,
  offsets: Uint32Array,
  count: number,
  value: number,
): void {
  const ttl = toTtl(value);
  rewriteTtls(out, out, offsets, count, 0, ttl, ttl); // clamped into [ttl, ttl]: all become ttl
}
