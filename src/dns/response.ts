/**
 * Responses the proxy builds or reshapes itself: error answers made from the query's own
 * bytes, truncation for UDP clients, and the check that an upstream answer belongs to the
 * question that was asked.
 *
 * @module
 */

import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "./message.ts";
import type { QueryInfo } from "./query.ts";
import {
  ADVERTISED_UDP_SIZE,
  CLASSIC_UDP_SIZE,
  EdnsOption,
  getArcount,
  getQdcount,
  HEADER_SIZE,
  Rcode,
  readU16,
  RRClass,
  RRType,
  skipName,
  skipRecord,
  skipUncompressedName,
  writeU16,
} from "./wire.ts";

// Declared with the other wire constants; still exported here for the modules that took it
// from here.
export { ADVERTISED_UDP_SIZE } from "./wire.ts";

/** Extended DNS Error info codes (RFC 8914) the proxy uses. */
export const EdeCode = {
  OTHER: 0,
  NOT_READY: 14,
  NO_REACHABLE_AUTHORITY: 22,
  NETWORK_ERROR: 23,
} as const;

const encoder = new TextEncoder();

/** TSIG error BADKEY (RFC 8945 section 5.2). */
const TSIG_BADKEY = 17;

/** Options for {@linkcode buildErrorResponse}. */
export interface ErrorResponseOptions {
  /** An Extended DNS Error (RFC 8914) to attach when the query had EDNS. */
  ede?: { code: number; text?: string };
  /**
   * Set TC=1: the empty answer that sends a UDP client to TCP, for ANY over UDP (RFC 8482
   * section 4.1) or a rate limiter's "slip".
   */
  truncated?: boolean;
}

/**
 * The length of the unsigned TSIG record answering the TSIG at `start` (RFC 8945 section
 * 5.3.2): its key name and algorithm with an empty MAC and no other data, or 0 when there is
 * no readable TSIG there.
 */
function unsignedTsigLength(query: Uint8Array, start: number): number {
  if (start < 0) return 0;
  const ownerEnd = skipUncompressedName(query, start, query.length);
  if (ownerEnd < 0) return 0;
  const algorithmEnd = skipUncompressedName(query, ownerEnd + 10, query.length);
  if (algorithmEnd < 0 || algorithmEnd + 10 > query.length) return 0;
  const macEnd = algorithmEnd + 10 + readU16(query, algorithmEnd + 8);
  if (macEnd + 2 > query.length) return 0;
  // owner, type class ttl rdlength, algorithm, time(6) fudge(2) mac size(2) id error other-len
  return algorithmEnd - start + 16;
}

/** Writes the unsigned BADKEY TSIG answering the query's TSIG at `start` into `out[at..]`. */
function writeUnsignedTsig(query: Uint8Array, start: number, out: Uint8Array, at: number): void {
  const ownerEnd = skipUncompressedName(query, start, query.length);
  const algorithmStart = ownerEnd + 10;
  const algorithmEnd = skipUncompressedName(query, algorithmStart, query.length);
  const macEnd = algorithmEnd + 10 + readU16(query, algorithmEnd + 8);
  out.set(query.subarray(start, ownerEnd), at); // key name
  at += ownerEnd - start;
  writeU16(out, at, RRType.TSIG);
  writeU16(out, at + 2, RRClass.ANY);
  out.fill(0, at + 4, at + 8); // TTL 0
  writeU16(out, at + 8, algorithmEnd - algorithmStart + 16);
  at += 10;
  out.set(query.subarray(algorithmStart, algorithmEnd + 8), at); // algorithm, time, fudge
  at += algorithmEnd + 8 - algorithmStart;
  writeU16(out, at, 0); // MAC size
  out[at + 2] = query[macEnd]; // original ID
  out[at + 3] = query[macEnd + 1];
  writeU16(out, at + 4, TSIG_BADKEY);
  writeU16(out, at + 6, 0); // other length
}

/**
 * Builds an error response from the query's own bytes: the same ID, opcode, RD and CD bits
 * and the question exactly as sent (case included), with QR and RA set and the given rcode.
 * When the query carried EDNS (and the error is not FORMERR), an OPT record is included, as
 * RFC 6891 asks, with the query's DO bit and an optional Extended DNS Error; an extended
 * rcode (over 15, such as BADVERS) puts its upper bits there. NOTAUTH for a query signed
 * with TSIG carries the unsigned TSIG record with error BADKEY of RFC 8945 section 5.2
 * (key name, algorithm, time and fudge of the query's, empty MAC). `truncated` sets TC.
 *
 * Without an EDE the response is never larger than the query: header, question, an 11-byte
 * OPT only when the query had one, a TSIG shorter than the query's.
 *
 * @example
 * ```ts
 * import { buildErrorResponse } from "./response.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * import { Rcode } from "./wire.ts";
 * const query = new Uint8Array([0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * const servfail = buildErrorResponse(query, info, Rcode.SERVFAIL);
 * servfail[3] & 0xf; // 2
 * ```
 */
export function buildErrorResponse(
  query: Uint8Array,
  info: QueryInfo,
  rcode: number,
  options: ErrorResponseOptions = {},
): Uint8Array {
  const questionEnd = info.questionEnd;
  const withOpt = info.hasEdns && rcode !== Rcode.FORMERR;
  const edeText = withOpt && options.ede?.text ? encoder.encode(options.ede.text) : undefined;
  const edeLength = withOpt && options.ede ? 4 + 2 + (edeText?.length ?? 0) : 0;
  const optLength = withOpt ? 11 + edeLength : 0;
  const tsigLength = rcode === Rcode.NOTAUTH && info.tsig
    ? unsignedTsigLength(query, info.tsigStart)
    : 0;
  const bodyEnd = questionEnd > 0 ? questionEnd : HEADER_SIZE;
  const out = new Uint8Array(bodyEnd + optLength + tsigLength);
  out.set(query.subarray(0, bodyEnd));
  // QR, opcode, RD; AA cleared, TC on request
  out[2] = 0x80 | (query[2] & 0x79) | (options.truncated ? 0x02 : 0);
  out[3] = 0x80 | (query[3] & 0x10) | (rcode & 0x0f); // RA, CD, rcode
  writeU16(out, 4, questionEnd > 0 ? 1 : 0);
  writeU16(out, 6, 0);
  writeU16(out, 8, 0);
  writeU16(out, 10, (withOpt ? 1 : 0) + (tsigLength > 0 ? 1 : 0));
  if (tsigLength > 0) writeUnsignedTsig(query, info.tsigStart, out, bodyEnd + optLength);
  if (withOpt) {
    let at = bodyEnd;
    out[at++] = 0; // root owner
    writeU16(out, at, RRType.OPT);
    writeU16(out, at + 2, ADVERTISED_UDP_SIZE);
    out[at + 4] = (rcode >> 4) & 0xff; // extended rcode
    out[at + 5] = 0; // version
    out[at + 6] = info.dnssecOk ? 0x80 : 0;
    out[at + 7] = 0;
    writeU16(out, at + 8, edeLength);
    at += 10;
    if (options.ede) {
      writeU16(out, at, EdnsOption.EDE);
      writeU16(out, at + 2, 2 + (edeText?.length ?? 0));
      writeU16(out, at + 4, options.ede.code);
      if (edeText) out.set(edeText, at + 6);
    }
  }
  return out;
}

/**
 * Finds the end of the (single) question in a response, or -1 when it is missing or
 * malformed.
 */
function responseQuestionEnd(resp: Uint8Array): number {
  if (resp.length < HEADER_SIZE || getQdcount(resp) !== 1) return -1;
  const nameEnd = skipName(resp, HEADER_SIZE, resp.length);
  return nameEnd < 0 || nameEnd + 4 > resp.length ? -1 : nameEnd + 4;
}

/**
 * Cuts a response down to fit a UDP client that can take `maxSize` bytes: the header with
 * TC=1, the question, and the OPT record if the response had one, so the client retries
 * over TCP (RFC 1035 section 4.2.1, RFC 6891 section 7, RFC 7766 section 6.2). Returns the
 * response itself when it already fits.
 *
 * @example
 * ```ts
 * import { truncateResponse } from "./response.ts";
 * const bigAnswer = new Uint8Array(1232); // an upstream's answer, as read
 * const forUdp = truncateResponse(bigAnswer, 512);
 * ```
 */
export function truncateResponse(resp: Uint8Array, maxSize: number): Uint8Array {
  if (resp.length <= maxSize) return resp;
  const questionEnd = responseQuestionEnd(resp);
  const bodyEnd = questionEnd > 0 ? questionEnd : HEADER_SIZE;
  let optStart = -1;
  let optEnd = -1;
  if (questionEnd > 0) {
    const records = readU16(resp, 6) + readU16(resp, 8) + getArcount(resp);
    const additionalFrom = records - getArcount(resp);
    let offset = questionEnd;
    for (let i = 0; i < records; i++) {
      const next = skipRecord(resp, offset, resp.length, true);
      if (next < 0) break;
      if (i >= additionalFrom && resp[offset] === 0 && readU16(resp, offset + 1) === RRType.OPT) {
        optStart = offset;
        optEnd = next;
        break;
      }
      offset = next;
    }
  }
  const optLength = optStart >= 0 && bodyEnd + optEnd - optStart <= maxSize ? optEnd - optStart : 0;
  const out = new Uint8Array(bodyEnd + optLength);
  out.set(resp.subarray(0, bodyEnd));
  if (optLength > 0) out.set(resp.subarray(optStart, optEnd), bodyEnd);
  out[2] |= 0x02; // TC
  writeU16(out, 4, questionEnd > 0 ? 1 : 0);
  writeU16(out, 6, 0);
  writeU16(out, 8, 0);
  writeU16(out, 10, optLength > 0 ? 1 : 0);
  return out;
}

const answersInfo = new ResponseInfo();

/**
 * True when `resp` is a valid response ({@linkcode analyzeResponse}: every section parses)
 * to the question in `query` (bytes `[12, questionEnd)`): the same opcode, name (ignoring
 * case), type and class ({@linkcode responseAnswersQuery}). An error response without a
 * question (some servers send FORMERR, NOTIMP or REFUSED that way) matches only when it
 * carries no records but an OPT. The ID is not compared: the caller matched it already.
 *
 * Callers that also need the TTLs or the OPT record should call `analyzeResponse` and
 * `responseAnswersQuery` themselves with their own `ResponseInfo`.
 */
export function answersQuestion(
  resp: Uint8Array,
  query: Uint8Array,
  questionEnd: number,
): boolean {
  return analyzeResponse(resp, answersInfo) &&
    responseAnswersQuery(resp, answersInfo, query, questionEnd);
}

/**
 * The largest UDP response a client can take: 512 bytes without EDNS, otherwise its
 * advertised size clamped to `[512, cap]` (RFC 6891 section 6.2.5).
 */
export function clientUdpLimit(info: QueryInfo, cap: number): number {
  if (!info.hasEdns) return CLASSIC_UDP_SIZE;
  const size = info.ednsUdpSize;
  return size < CLASSIC_UDP_SIZE ? CLASSIC_UDP_SIZE : size > cap ? cap : size;
}
