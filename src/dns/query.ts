/**
 * Validation of client queries: what the proxy accepts, answers itself, or drops.
 *
 * @module
 */

import {
  getAncount,
  getArcount,
  getNscount,
  getOpcode,
  getQdcount,
  HEADER_SIZE,
  isResponse,
  Opcode,
  readU16,
  RRType,
  skipUncompressedName,
} from "./wire.ts";

/** What to do with a client message. */
export const QueryVerdict = {
  /** A well-formed standard query: forward it. */
  FORWARD: 0,
  /** Not even a readable header, or a response: drop silently. */
  DROP: 1,
  /** Malformed: answer FORMERR. */
  FORMERR: 2,
  /** Well-formed but not something a forwarder serves (opcode, zone transfer): NOTIMP. */
  NOTIMP: 3,
} as const;

/** One of {@linkcode QueryVerdict}'s values. */
export type QueryVerdict = typeof QueryVerdict[keyof typeof QueryVerdict];

/**
 * What {@linkcode inspectQuery} learned about a query. Reused between calls so the hot path
 * allocates nothing; copy the fields you need before the next call.
 */
export class QueryInfo {
  /** The verdict. */
  verdict: QueryVerdict = QueryVerdict.DROP;
  /** Why a query is not forwarded (for logs and metrics); empty when forwarded. */
  reason = "";
  /** Offset just past the question's name, or 0 when the question is unreadable. */
  nameEnd = 0;
  /** Offset just past the question (name, type, class), or 0 when unreadable. */
  questionEnd = 0;
  /** QTYPE, when the question is readable. */
  qtype = 0;
  /** QCLASS, when the question is readable. */
  qclass = 0;
  /** True when the query carries an EDNS(0) OPT record. */
  hasEdns = false;
  /** The requester's advertised UDP payload size (its OPT class), when `hasEdns`. */
  ednsUdpSize = 0;
  /** The DO bit (RFC 3225) of the OPT record, when `hasEdns`. */
  dnssecOk = false;
}

function reject(info: QueryInfo, verdict: QueryVerdict, reason: string): QueryVerdict {
  info.verdict = verdict;
  info.reason = reason;
  return verdict;
}

/**
 * Decides whether `msg` is a query the proxy forwards (RFC 1035, RFC 6891, RFC 9619), and
 * records the question's extent and EDNS parameters in `info`.
 *
 * Rules: fewer than 12 bytes or QR=1 is dropped; an opcode other than QUERY, or a zone
 * transfer, is NOTIMP; QDCOUNT other than 1, answer or authority records, a malformed or
 * compressed question, a malformed additional record, more than one OPT or an OPT not owned
 * by the root, or bytes after the last record are FORMERR.
 *
 * @example
 * ```ts
 * import { inspectQuery, QueryInfo, QueryVerdict } from "./query.ts";
 * const query = new Uint8Array([
 *   0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, // header: RD, one question
 *   3, 0x63, 0x6f, 0x6d, 0, 0, 1, 0, 1,              // com. A IN
 * ]);
 * const info = new QueryInfo();
 * inspectQuery(query, info) === QueryVerdict.FORWARD; // true
 * ```
 */
export function inspectQuery(msg: Uint8Array, info: QueryInfo): QueryVerdict {
  info.nameEnd = 0;
  info.questionEnd = 0;
  info.qtype = 0;
  info.qclass = 0;
  info.hasEdns = false;
  info.ednsUdpSize = 0;
  info.dnssecOk = false;
  info.reason = "";
  const end = msg.length;
  if (end < HEADER_SIZE) return reject(info, QueryVerdict.DROP, "short header");
  if (isResponse(msg)) return reject(info, QueryVerdict.DROP, "response from client");
  if (getQdcount(msg) !== 1) {
    return reject(
      info,
      getOpcode(msg) !== Opcode.QUERY ? QueryVerdict.NOTIMP : QueryVerdict.FORMERR,
      "qdcount not 1",
    );
  }
  const nameEnd = skipUncompressedName(msg, HEADER_SIZE, end);
  if (nameEnd < 0 || nameEnd + 4 > end) {
    return reject(info, QueryVerdict.FORMERR, "malformed question");
  }
  info.nameEnd = nameEnd;
  info.questionEnd = nameEnd + 4;
  info.qtype = readU16(msg, nameEnd);
  info.qclass = readU16(msg, nameEnd + 2);
  if (getOpcode(msg) !== Opcode.QUERY) return reject(info, QueryVerdict.NOTIMP, "opcode");
  if (getAncount(msg) !== 0 || getNscount(msg) !== 0) {
    return reject(info, QueryVerdict.FORMERR, "records in answer or authority");
  }
  let offset = info.questionEnd;
  for (let remaining = getArcount(msg); remaining > 0; remaining--) {
    const ownerEnd = skipUncompressedName(msg, offset, end);
    if (ownerEnd < 0 || ownerEnd + 10 > end) {
      return reject(info, QueryVerdict.FORMERR, "malformed additional record");
    }
    // After the owner name: type(2) class(2) ttl(4) rdlength(2) rdata.
    const next = ownerEnd + 10 + readU16(msg, ownerEnd + 8);
    if (next > end) return reject(info, QueryVerdict.FORMERR, "malformed additional record");
    if (readU16(msg, ownerEnd) === RRType.OPT) {
      if (info.hasEdns) return reject(info, QueryVerdict.FORMERR, "more than one OPT");
      if (msg[offset] !== 0) return reject(info, QueryVerdict.FORMERR, "OPT owner not root");
      info.hasEdns = true;
      info.ednsUdpSize = readU16(msg, ownerEnd + 2);
      info.dnssecOk = (msg[ownerEnd + 6] & 0x80) !== 0;
    }
    offset = next;
  }
  if (offset !== end) return reject(info, QueryVerdict.FORMERR, "trailing bytes");
  if (info.qtype === RRType.AXFR || info.qtype === RRType.IXFR) {
    return reject(info, QueryVerdict.NOTIMP, "zone transfer");
  }
  if (info.qtype === RRType.OPT) return reject(info, QueryVerdict.FORMERR, "qtype OPT");
  info.verdict = QueryVerdict.FORWARD;
  return QueryVerdict.FORWARD;
}
