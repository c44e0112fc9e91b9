/**
 * EDNS(0) padding of answers to encrypted clients (RFC 7830, RFC 8467 section 4.1): a client
 * whose query carried a Padding option gets its answer padded to a multiple of
 * {@linkcode RESPONSE_PADDING_BLOCK} octets, so that the size of what it receives says little
 * about the name. For the DoT and DoH listeners; never over UDP or plain TCP.
 *
 * @module
 */

import { EdnsOption, readU16, writeU16 } from "./wire.ts";

/** Answers are padded to a multiple of this many octets (RFC 8467 section 4.1). */
export const RESPONSE_PADDING_BLOCK = 468;

/** OPT record up to its RDATA: root owner (1), type, class, TTL, RDLENGTH. */
const OPT_FIXED = 11;

/**
 * True when the OPT record at `[optStart, optEnd)` of `msg` (as `QueryInfo` or
 * `ResponseInfo` locate it) carries a Padding option.
 *
 * @example
 * ```ts ignore
 * inspectQuery(query, info);
 * const wantsPadding = info.optStart >= 0 && hasPaddingOption(query, info.optStart, info.optEnd);
 * ```
 */
export function hasPaddingOption(msg: Uint8Array, optStart: number, optEnd: number): boolean {
  if (optStart < 0 || optEnd > msg.length) return false;
  for (let at = optStart + OPT_FIXED; at + 4 <= optEnd;) {
    if (readU16(msg, at) === EdnsOption.PADDING) return true;
    at += 4 + readU16(msg, at + 2);
  }
  return false;
}

/**
 * `response` with a Padding option added to its OPT record (at `[optStart, optEnd)`) so that
 * its length is a multiple of `block`; the response itself when it has no OPT record or
 * already carries padding, or when padding would pass 65,535 octets.
 *
 * @example
 * ```ts ignore
 * analyzeResponse(answer, info);
 * const padded = padResponse(answer, info.optStart, info.optEnd);
 * padded.length % 468; // 0
 * ```
 */
export function padResponse(
  response: Uint8Array,
  optStart: number,
  optEnd: number,
  block: number = RESPONSE_PADDING_BLOCK,
): Uint8Array {
  if (optStart < 0 || optEnd > response.length || optEnd - optStart < OPT_FIXED) return response;
  if (hasPaddingOption(response, optStart, optEnd)) return response;
  const unpadded = response.length + 4;
  const total = Math.ceil(unpadded / block) * block;
  if (total > 65_535) return response;
  const padding = total - unpadded;
  const out = new Uint8Array(total);
  out.set(response.subarray(0, optEnd));
  writeU16(out, optEnd, EdnsOption.PADDING);
  writeU16(out, optEnd + 2, padding);
  // The padding octets are zero (RFC 7830 section 3): the array starts zeroed.
  out.set(response.subarray(optEnd), optEnd + 4 + padding);
  const rdlength = optStart + 9;
  writeU16(out, rdlength, readU16(response, rdlength) + 4 + padding);
  return out;
}
