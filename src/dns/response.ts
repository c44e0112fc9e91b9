/**
 * Responses the proxy builds or reshapes itself: error answers made from the query's own
 * bytes, truncation for UDP clients, and the check that an upstream answer belongs to the
 * question that was asked.
 *
 * @module
 */

import type { QueryInfo } from "./query.ts";
import {
  getArcount,
  getQdcount,
  getRcode,
  HEADER_SIZE,
  isResponse,
  namesEqual,
  Rcode,
  readU16,
  RRType,
  skipName,
  skipRecord,
  writeU16,
} from "./wire.ts";

/** The UDP payload size the proxy advertises in OPT records it writes (DNS flag day 2020). */
export const ADVERTISED_UDP_SIZE = 1232;

/** Extended DNS Error info codes (RFC 8914) the proxy uses. */
export const EdeCode = {
  OTHER: 0,
  NOT_READY: 14,
  NO_REACHABLE_AUTHORITY: 22,
  NETWORK_ERROR: 23,
} as const;

const EDE_OPTION = 15;
const encoder = new TextEncoder();

/** Options for {@linkcode buildErrorResponse}. */
export interface ErrorResponseOptions {
  /** An Extended DNS Error (RFC 8914) to attach when the query had EDNS. */
  ede?: { code: number; text?: string };
}

/**
 * Builds an error response from the query's own bytes: the same ID, opcode, RD and CD bits
 * and the question exactly as sent (case included), with QR and RA set and the given rcode.
 * When the query carried EDNS (and the error is not FORMERR), an OPT record is included, as
 * RFC 6891 asks, with the query's DO bit and an optional Extended DNS Error.
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
  const bodyEnd = questionEnd > 0 ? questionEnd : HEADER_SIZE;
  const out = new Uint8Array(bodyEnd + optLength);
  out.set(query.subarray(0, bodyEnd));
  out[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD; AA and TC cleared
  out[3] = 0x80 | (query[3] & 0x10) | (rcode & 0x0f); // RA, CD, rcode
  writeU16(out, 4, questionEnd > 0 ? 1 : 0);
  writeU16(out, 6, 0);
  writeU16(out, 8, 0);
  writeU16(out, 10, withOpt ? 1 : 0);
  if (withOpt) {
    let at = bodyEnd;
    out[at++] = 0; // root owner
    writeU16(out, at, RRType.OPT);
    writeU16(out, at + 2, ADVERTISED_UDP_SIZE);
    out[at + 4] = 0; // extended rcode
    out[at + 5] = 0; // version
    out[at + 6] = info.dnssecOk ? 0x80 : 0;
    out[at + 7] = 0;
    writeU16(out, at + 8, edeLength);
    at += 10;
    if (options.ede) {
      writeU16(out, at, EDE_OPTION);
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
 * declare const bigAnswer: Uint8Array;
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

/**
 * True when `resp` is a response to the question in `query` (bytes `[12, questionEnd)`):
 * QR set and the same name (ignoring case), type and class. An error response without a
 * question (some servers send FORMERR, NOTIMP or REFUSED that way) also matches. The ID is
 * not compared: the caller matched it already.
 */
export function answersQuestion(
  resp: Uint8Array,
  query: Uint8Array,
  questionEnd: number,
): boolean {
  if (resp.length < HEADER_SIZE || !isResponse(resp)) return false;
  const qdcount = getQdcount(resp);
  if (qdcount === 0) return getRcode(resp) !== Rcode.NOERROR;
  if (qdcount !== 1 || resp.length < questionEnd) return false;
  const nameLength = questionEnd - 4 - HEADER_SIZE;
  if (!namesEqual(resp, HEADER_SIZE, query, HEADER_SIZE, nameLength)) return false;
  for (let i = questionEnd - 4; i < questionEnd; i++) {
    if (resp[i] !== query[i]) return false;
  }
  return true;
}

/**
 * The largest UDP response a client can take: 512 bytes without EDNS, otherwise its
 * advertised size clamped to `[512, cap]` (RFC 6891 section 6.2.5).
 */
export function clientUdpLimit(info: QueryInfo, cap: number): number {
  if (!info.hasEdns) return 512;
  const size = info.ednsUdpSize;
  return size < 512 ? 512 : size > cap ? cap : size;
}
