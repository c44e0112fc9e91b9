/**
 * EDNS(0) (RFC 6891) on the upstream leg: the query dotproxy sends upstream (the client's
 * OPT without its hop-by-hop options, block-length padding of RFC 8467 section 4.1), and the
 * response it hands back to the client (the upstream's OPT removed, or stripped of
 * hop-by-hop options).
 *
 * @module
 */

import type { ResponseInfo } from "./message.ts";
import type { QueryInfo } from "./query.ts";
import { EdnsOption, HEADER_SIZE, readU16, RRType, writeU16 } from "./wire.ts";

export { EdnsOption };

/** The smallest UDP payload size dotproxy advertises upstream (DNS flag day 2020). */
export const UPSTREAM_MIN_UDP_SIZE = 1232;

/** Queries are padded to a multiple of this many octets (RFC 8467 section 4.1). */
export const QUERY_PADDING_BLOCK = 128;

/** Size of an OPT record without options: root owner, type, class, TTL, rdlength. */
const OPT_FIXED = 11;

/**
 * True for the options that concern only one hop and never cross the proxy: COOKIE
 * (RFC 7873), edns-tcp-keepalive (RFC 7828) and Padding (RFC 7830).
 *
 * @example
 * ```ts
 * import { isHopByHopOption } from "./edns.ts";
 * isHopByHopOption(12); // true
 * isHopByHopOption(8); // false
 * ```
 */
export function isHopByHopOption(code: number): boolean {
  return code === EdnsOption.COOKIE || code === EdnsOption.TCP_KEEPALIVE ||
    code === EdnsOption.PADDING;
}

/**
 * Copies `src[from, to)` to `dst[at..]`. A plain loop: for the few dozen octets of a header,
 * question or option it beats `set(subarray())`, and allocates no view.
 */
function copy(src: Uint8Array, from: number, to: number, dst: Uint8Array, at: number): void {
  for (let i = from; i < to; i++) dst[at++] = src[i];
}

/**
 * Copies the options of `[start, end)` except the hop-by-hop ones to `out[at..]` (when `out`
 * is given) and returns the length of what is kept. The options were validated (whole TLVs
 * filling the data); the loop still stops at `end`.
 */
function keepOptions(
  msg: Uint8Array,
  start: number,
  end: number,
  out: Uint8Array | null,
  at: number,
): number {
  let kept = 0;
  let offset = start;
  // Each option takes at least 4 octets of at most 65535.
  for (let i = 0; i < 16384 && offset + 4 <= end; i++) {
    const next = offset + 4 + readU16(msg, offset + 2);
    if (next > end) break;
    if (!isHopByHopOption(readU16(msg, offset))) {
      if (out !== null) copy(msg, offset, next, out, at + kept);
      kept += next - offset;
    }
    offset = next;
  }
  return kept;
}

/**
 * Builds the message dotproxy sends upstream for a query `inspectQuery` forwards: the
 * client's header and question exactly (case kept; the ID is rewritten later by the
 * connection), no answer or authority records, and as the only additional record one OPT:
 *
 * - from a client OPT: its UDP size (at least {@linkcode UPSTREAM_MIN_UDP_SIZE}), extended
 *   rcode, version and flags (DO and the rest) as sent, and its options but COOKIE,
 *   TCP-KEEPALIVE and PADDING (hop-by-hop). An EDNS Client Subnet option of the client is
 *   kept (see `QueryInfo.hasClientSubnet`); none is ever added.
 * - without one: UDP size 1232, version 0, no flags, no options.
 *
 * With `padding`, a Padding option (RFC 7830, all zeros) makes the whole message a multiple
 * of 128 octets (RFC 8467 section 4.1); it is empty when the rest is already aligned.
 * Other additional records of the client are dropped. The result is written into `out`
 * when it is large enough (and returned as a subarray of it), else into a new array.
 *
 * @example
 * ```ts
 * import { buildUpstreamQuery } from "./edns.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * const query = new Uint8Array([0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * const upstream = buildUpstreamQuery(query, info, true);
 * upstream.length; // 128
 * ```
 */
export function buildUpstreamQuery(
  query: Uint8Array,
  info: QueryInfo,
  padding: boolean,
  out?: Uint8Array,
): Uint8Array {
  const questionEnd = info.questionEnd;
  const hasOpt = info.optStart >= 0;
  const optionsStart = info.optStart + OPT_FIXED;
  const kept = hasOpt ? keepOptions(query, optionsStart, info.optEnd, null, 0) : 0;
  const unpadded = questionEnd + OPT_FIXED + kept;
  const total = padding ? paddedLength(unpadded) : unpadded;
  const msg = room(out, total);
  copy(query, 0, questionEnd, msg, 0);
  writeU16(msg, 6, 0);
  writeU16(msg, 8, 0);
  writeU16(msg, 10, 1);
  let at = questionEnd;
  msg[at] = 0; // root owner
  writeU16(msg, at + 1, RRType.OPT);
  if (hasOpt) {
    const size = readU16(query, info.optStart + 3);
    writeU16(msg, at + 3, size < UPSTREAM_MIN_UDP_SIZE ? UPSTREAM_MIN_UDP_SIZE : size);
    copy(query, info.optStart + 5, info.optStart + 9, msg, at + 5); // rcode, version, flags
  } else {
    writeU16(msg, at + 3, UPSTREAM_MIN_UDP_SIZE);
    writeU16(msg, at + 5, 0); // extended rcode, version
    writeU16(msg, at + 7, 0); // flags
  }
  writeU16(msg, at + 9, total - questionEnd - OPT_FIXED);
  at += OPT_FIXED;
  if (kept > 0) keepOptions(query, optionsStart, info.optEnd, msg, at);
  at += kept;
  if (padding) writePadding(msg, at, total);
  return msg;
}

/**
 * The length of a message of `unpadded` octets once a Padding option (4 octets and the
 * zeros) makes it a multiple of {@linkcode QUERY_PADDING_BLOCK} (RFC 8467 section 4.1).
 */
function paddedLength(unpadded: number): number {
  const zeros = (QUERY_PADDING_BLOCK - ((unpadded + 4) % QUERY_PADDING_BLOCK)) %
    QUERY_PADDING_BLOCK;
  return unpadded + 4 + zeros;
}

/** Writes a Padding option at `at` whose zeros fill `msg` up to `total`. */
function writePadding(msg: Uint8Array, at: number, total: number): void {
  writeU16(msg, at, EdnsOption.PADDING);
  writeU16(msg, at + 2, total - at - 4);
  for (let i = at + 4; i < total; i++) msg[i] = 0;
}

/**
 * Pads a message {@linkcode buildUpstreamQuery} built without padding, as it would have
 * built it with: a Padding option appended to its OPT record (its only additional record,
 * right after the question, ending the message) makes it a multiple of
 * {@linkcode QUERY_PADDING_BLOCK} octets. Returns `message` itself when its last record is
 * not such an OPT. Written into `out` when it is large enough (and returned as a subarray
 * of it), else into a new array.
 *
 * @example
 * ```ts
 * import { buildUpstreamQuery, padUpstreamQuery } from "./edns.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * const query = new Uint8Array([0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * const plain = buildUpstreamQuery(query, info, false);
 * padUpstreamQuery(plain, info.questionEnd).length; // 128
 * ```
 */
export function padUpstreamQuery(
  message: Uint8Array,
  questionEnd: number,
  out?: Uint8Array,
): Uint8Array {
  const length = message.length;
  if (
    length < questionEnd + OPT_FIXED || readU16(message, 10) !== 1 ||
    message[questionEnd] !== 0 || readU16(message, questionEnd + 1) !== RRType.OPT ||
    questionEnd + OPT_FIXED + readU16(message, questionEnd + 9) !== length
  ) return message;
  const total = paddedLength(length);
  const msg = room(out, total);
  copy(message, 0, length, msg, 0);
  writeU16(msg, questionEnd + 9, total - questionEnd - OPT_FIXED);
  writePadding(msg, length, total);
  return msg;
}

/**
 * Shapes an upstream response for the client (RFC 6891 section 7: EDNS is hop-by-hop):
 *
 * - `keepOpt` false (the client sent no OPT): the OPT record is removed and ARCOUNT
 *   decremented;
 * - `keepOpt` true: the OPT record is kept without its COOKIE, TCP-KEEPALIVE and PADDING
 *   options (an upstream pads its answers to 468-octet blocks, RFC 8467 section 4.1).
 *
 * Of `info` (`analyzeResponse`'s account of `resp`) only `optStart` and `optEnd` are read,
 * so a caller may fill just those for a copy of an analyzed message. The OPT may sit
 * anywhere in the additional section. Returns `resp` itself when there is nothing to
 * change, else a shorter message: written into `out` when given and large enough (it must
 * not overlap `resp`), else a new array. `info`'s offsets describe `resp`, not the result
 * (analyze the result again for its TTL offsets).
 *
 * @example
 * ```ts
 * import { analyzeResponse, ResponseInfo } from "./message.ts";
 * import { stripResponseOpt } from "./edns.ts";
 * const answer = new Uint8Array(12); // an upstream's answer, as read
 * const info = new ResponseInfo();
 * if (analyzeResponse(answer, info)) {
 *   const forPlainClient = stripResponseOpt(answer, info, false);
 * }
 * ```
 */
export function stripResponseOpt(
  resp: Uint8Array,
  info: ResponseInfo,
  keepOpt: boolean,
  out?: Uint8Array,
): Uint8Array {
  const optStart = info.optStart;
  const optEnd = info.optEnd;
  if (optStart < HEADER_SIZE || optEnd > resp.length || optEnd < optStart + OPT_FIXED) {
    return resp;
  }
  if (!keepOpt) {
    const msg = room(out, resp.length - (optEnd - optStart));
    msg.set(resp.subarray(0, optStart));
    msg.set(resp.subarray(optEnd), optStart);
    writeU16(msg, 10, readU16(resp, 10) - 1);
    return msg;
  }
  const optionsStart = optStart + OPT_FIXED;
  const kept = keepOptions(resp, optionsStart, optEnd, null, 0);
  const removed = optEnd - optionsStart - kept;
  if (removed === 0) return resp;
  const msg = room(out, resp.length - removed);
  msg.set(resp.subarray(0, optionsStart));
  keepOptions(resp, optionsStart, optEnd, msg, optionsStart);
  msg.set(resp.subarray(optEnd), optionsStart + kept);
  writeU16(msg, optStart + 9, kept);
  return msg;
}

/**
 * {@linkcode stripResponseOpt} with `keepOpt`, without a copy, for the layout servers use:
 * the OPT record ends the message and the hop-by-hop options (padding, usually alone) end
 * the OPT. Then `resp` itself is cut short: its OPT RDLENGTH is lowered in place, `info.optEnd`
 * moves to the new end (every other offset in `info` stays valid), and the shorter view is
 * returned (`resp` when there is nothing to remove). Null for any other layout, `resp`
 * untouched: strip a copy with {@linkcode stripResponseOpt} instead.
 *
 * @example
 * ```ts
 * import { analyzeResponse, ResponseInfo } from "./message.ts";
 * import { stripResponseOpt, trimResponseOpt } from "./edns.ts";
 * const answer = new Uint8Array(12); // our own copy of an upstream's answer: it may change
 * const info = new ResponseInfo();
 * if (analyzeResponse(answer, info)) {
 *   const canonical = trimResponseOpt(answer, info) ?? stripResponseOpt(answer, info, true);
 * }
 * ```
 */
export function trimResponseOpt(resp: Uint8Array, info: ResponseInfo): Uint8Array | null {
  const optStart = info.optStart;
  const optEnd = info.optEnd;
  if (optStart < HEADER_SIZE || optEnd !== resp.length || optEnd < optStart + OPT_FIXED) {
    return null;
  }
  const optionsStart = optStart + OPT_FIXED;
  let offset = optionsStart;
  /** Where the trailing run of hop-by-hop options starts (-1: none so far). */
  let cut = -1;
  for (let i = 0; i < 16384 && offset + 4 <= optEnd; i++) {
    const next = offset + 4 + readU16(resp, offset + 2);
    if (next > optEnd) return null;
    if (isHopByHopOption(readU16(resp, offset))) {
      if (cut < 0) cut = offset;
    } else if (cut >= 0) {
      return null; // a hop-by-hop option before one that stays: only a copy removes it
    }
    offset = next;
  }
  if (offset !== optEnd) return null;
  if (cut < 0) return resp;
  writeU16(resp, optStart + 9, cut - optionsStart);
  info.optEnd = cut;
  return resp.subarray(0, cut);
}

/** `out[0, length)` when `out` is large enough, else a new array of `length`. */
function room(out: Uint8Array | undefined, length: number): Uint8Array {
  return out !== undefined && out.length >= length
    ? out.subarray(0, length)
    : new Uint8Array(length);
}

/**
 * A copy of an upstream query built by {@linkcode buildUpstreamQuery} (its OPT record
 * right after the question, as the last record) without the Padding option: for a
 * plain-DNS target, where padding hides nothing (the name travels in clear text) and only
 * costs octets. Any other message is copied as it is.
 *
 * @example
 * ```ts
 * import { buildUpstreamQuery, withoutPadding } from "./edns.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * const query = new Uint8Array([0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * withoutPadding(buildUpstreamQuery(query, info, true), info.questionEnd).length; // 28
 * ```
 */
export function withoutPadding(msg: Uint8Array, questionEnd: number): Uint8Array {
  const opt = questionEnd;
  const isOpt = msg.length >= opt + OPT_FIXED && msg[opt] === 0 &&
    readU16(msg, opt + 1) === RRType.OPT && readU16(msg, 10) === 1;
  if (!isOpt || opt + OPT_FIXED + readU16(msg, opt + 9) !== msg.length) return msg.slice();
  // Options in order; buildUpstreamQuery puts the Padding option last.
  let at = opt + OPT_FIXED;
  let padding = -1;
  for (let i = 0; i < 16384 && at + 4 <= msg.length; i++) {
    if (readU16(msg, at) === EdnsOption.PADDING) padding = at;
    at += 4 + readU16(msg, at + 2);
  }
  if (padding < 0 || at !== msg.length || padding + 4 + readU16(msg, padding + 2) !== at) {
    return msg.slice();
  }
  const out = msg.slice(0, padding);
  writeU16(out, opt + 9, padding - opt - OPT_FIXED);
  return out;
}
