/**
 * EDNS options that only a stream client's answer carries, added where the answer leaves the
 * resolver:
 *
 * - edns-tcp-keepalive (RFC 7828): a client that sent the option over TCP or TLS gets the
 *   server's idle timeout back in it, in units of 100 ms (section 3.3.2), so that it keeps
 *   its connection no longer than the server will (Stubby relies on it). Never over UDP
 *   (section 3.2.1: "MUST NOT be sent ... over UDP").
 * - Padding (RFC 8467 section 4.1): over TLS, a client whose query carried a Padding option
 *   gets its answer padded to a multiple of 468 octets (`padResponse`).
 *
 * @module
 */

import { analyzeResponse, ResponseInfo } from "./message.ts";
import { padResponse } from "./padding.ts";
import { EdnsOption, readU16, writeU16 } from "./wire.ts";

/** OPT record up to its RDATA: root owner (1), type, class, TTL, RDLENGTH. */
const OPT_FIXED = 11;

/** What a stream answer gets beyond the resolver's answer. */
export interface StreamAnswerOptions {
  /** The idle timeout to announce in edns-tcp-keepalive, in ms; negative for none. */
  keepaliveMs: number;
  /** Pad to a multiple of 468 octets (RFC 8467). */
  pad: boolean;
}

const info = new ResponseInfo();

/**
 * `response` with an edns-tcp-keepalive option (when `keepaliveMs` is not negative) and
 * padding (when `pad`) added to its OPT record. A response without an OPT record, one that
 * does not parse, or one that would pass 65,535 octets is returned as it is. Allocates only
 * when it adds something.
 *
 * @example
 * ```ts ignore
 * const out = addStreamOptions(answer, { keepaliveMs: 10_000, pad: false });
 * // out's OPT ends with 00 0b 00 02 00 64: keepalive, 100 x 100 ms
 * ```
 */
export function addStreamOptions(response: Uint8Array, options: StreamAnswerOptions): Uint8Array {
  if (!analyzeResponse(response, info) || info.optStart < 0) return response;
  let out = response;
  let optEnd = info.optEnd;
  if (options.keepaliveMs >= 0 && !hasOption(response, info.optStart, optEnd)) {
    if (response.length + 6 > 65_535) return response;
    const timeout = Math.min(65_535, Math.round(options.keepaliveMs / 100));
    out = new Uint8Array(response.length + 6);
    out.set(response.subarray(0, optEnd));
    writeU16(out, optEnd, EdnsOption.TCP_KEEPALIVE);
    writeU16(out, optEnd + 2, 2);
    writeU16(out, optEnd + 4, timeout);
    out.set(response.subarray(optEnd), optEnd + 6);
    const rdlength = info.optStart + 9;
    writeU16(out, rdlength, readU16(response, rdlength) + 6);
    optEnd += 6;
  }
  return options.pad ? padResponse(out, info.optStart, optEnd) : out;
}

/** True when the OPT record at `[optStart, optEnd)` already has an edns-tcp-keepalive. */
function hasOption(msg: Uint8Array, optStart: number, optEnd: number): boolean {
  for (let at = optStart + OPT_FIXED; at + 4 <= optEnd;) {
    if (readU16(msg, at) === EdnsOption.TCP_KEEPALIVE) return true;
    at += 4 + readU16(msg, at + 2);
  }
  return false;
}
