/**
 * Validation of client queries: what the proxy accepts, answers itself, or drops.
 *
 * @module
 */

import {
  EdnsOption,
  getAncount,
  getArcount,
  getNscount,
  getOpcode,
  getQdcount,
  HEADER_SIZE,
  isResponse,
  isTruncated,
  Opcode,
  Rcode,
  readU16,
  RRType,
  skipUncompressedName,
} from "./wire.ts";

/**
 * The largest query dotproxy sends upstream, padding included: 512 octets (RFC 1035 section
 * 2.3.4). Unbound with `harden-large-queries: yes` drops a larger query, which closes the
 * whole DoT connection with every other client's question on it; no real query comes near
 * it (the longest name with an OPT, a client subnet and padding is 384 octets), so a larger
 * one is answered FORMERR and never forwarded.
 */
export const MAX_UPSTREAM_QUERY_SIZE = 512;

/** Size of an OPT record without options, and of an empty Padding option. */
const OPT_FIXED = 11;
const PADDING_OPTION_FIXED = 4;

/** What to do with a client message. */
export const QueryVerdict = {
  /** A well-formed standard query: forward it. */
  FORWARD: 0,
  /** Not even a readable header, or a response: drop silently. */
  DROP: 1,
  /** Malformed: answer FORMERR. */
  FORMERR: 2,
  /**
   * Well-formed but not something a forwarder serves (opcode, zone transfer, meta QTYPE):
   * NOTIMP.
   */
  NOTIMP: 3,
  /** Signed with TSIG (RFC 8945): the proxy holds no keys, so NOTAUTH (rcode 9). */
  NOTAUTH: 4,
} as const;

/** One of {@linkcode QueryVerdict}'s values. */
export type QueryVerdict = typeof QueryVerdict[keyof typeof QueryVerdict];

/**
 * The rcode to answer a verdict with: FORMERR, NOTIMP or NOTAUTH; -1 for FORWARD and DROP,
 * which get no error response.
 *
 * @example
 * ```ts
 * import { QueryVerdict, verdictRcode } from "./query.ts";
 * verdictRcode(QueryVerdict.NOTAUTH); // 9
 * ```
 */
export function verdictRcode(verdict: QueryVerdict): number {
  switch (verdict) {
    case QueryVerdict.FORMERR:
      return Rcode.FORMERR;
    case QueryVerdict.NOTIMP:
      return Rcode.NOTIMP;
    case QueryVerdict.NOTAUTH:
      return Rcode.NOTAUTH;
    default:
      return -1;
  }
}

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
  /** The CD bit (RFC 4035 section 3.2.2) of the header, when the header is readable. */
  cd = false;
  /** The EDNS version of the OPT record (RFC 6891 section 6.1.3), when `hasEdns`. */
  ednsVersion = 0;
  /** True when the OPT record carries an EDNS Client Subnet option (8, RFC 7871). */
  hasClientSubnet = false;
  /** True when the OPT record carries an edns-tcp-keepalive option (11, RFC 7828). */
  asksKeepalive = false;
  /** True when the OPT record carries a Padding option (12, RFC 7830). */
  asksPadding = false;
  /** Offset of the OPT record (its root owner), or -1 when there is none. */
  optStart: number = -1;
  /** Offset just past the OPT record, or -1 when there is none. */
  optEnd: number = -1;
  /** True when the additional section carries a TSIG record (type 250, RFC 8945). */
  tsig = false;
  /** Offset of the TSIG record (its owner, the key name), or -1 when there is none. */
  tsigStart: number = -1;
  /**
   * Octets of the OPT options that are forwarded upstream (all but COOKIE, TCP-KEEPALIVE
   * and PADDING, which concern one hop), when `hasEdns`.
   */
  forwardedOptionBytes = 0;
}

function reject(info: QueryInfo, verdict: QueryVerdict, reason: string): QueryVerdict {
  info.verdict = verdict;
  info.reason = reason;
  return verdict;
}

/**
 * Skips the record data of a TSIG record (RFC 8945 section 4.2) in `[start, end)`: returns
 * true when it is whole: algorithm name (uncompressed), time signed, fudge, MAC, original
 * ID, error and other data, filling the data exactly.
 */
function tsigDataFits(msg: Uint8Array, start: number, end: number): boolean {
  const algorithmEnd = skipUncompressedName(msg, start, end);
  if (algorithmEnd < 0 || algorithmEnd + 10 > end) return false;
  const macEnd = algorithmEnd + 10 + readU16(msg, algorithmEnd + 8);
  if (macEnd + 6 > end) return false;
  return macEnd + 6 + readU16(msg, macEnd + 4) === end;
}

/**
 * Decides whether `msg` is a query the proxy forwards (RFC 1035, RFC 6891, RFC 9619), and
 * records the question's extent, the header's CD bit, and the EDNS and TSIG records in
 * `info`, in one pass.
 *
 * Rules, in order:
 * - fewer than 12 bytes or QR=1: dropped;
 * - QDCOUNT other than 1: NOTIMP for an opcode other than QUERY, else FORMERR;
 * - a malformed or compressed question: FORMERR; an opcode other than QUERY: NOTIMP;
 * - answer or authority records, a malformed additional record, more than one OPT, an OPT
 *   not owned by the root or whose options do not fill its data exactly, a TSIG that is not
 *   the last record or is malformed (RFC 8945 section 5.1), bytes after the last record, or
 *   TC=1: FORMERR;
 * - a TSIG record: NOTAUTH (the proxy holds no keys, RFC 8945 section 5.2);
 * - QTYPE 0 (RFC 6895 section 3.1) or OPT: FORMERR; AXFR or IXFR: NOTIMP ("zone
 *   transfer"); any other QTYPE in 128-254 (TKEY, TSIG, MAILB, MAILA...): NOTIMP ("meta
 *   qtype"). ANY (255) is forwarded;
 * - a query whose upstream form (question, OPT, the options that are forwarded, an empty
 *   Padding option) would exceed {@linkcode MAX_UPSTREAM_QUERY_SIZE}: FORMERR ("query too
 *   large").
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
  info.cd = false;
  info.ednsVersion = 0;
  info.hasClientSubnet = false;
  info.asksKeepalive = false;
  info.asksPadding = false;
  info.optStart = -1;
  info.optEnd = -1;
  info.tsig = false;
  info.tsigStart = -1;
  info.forwardedOptionBytes = 0;
  info.reason = "";
  const end = msg.length;
  if (end < HEADER_SIZE) return reject(info, QueryVerdict.DROP, "short header");
  if (isResponse(msg)) return reject(info, QueryVerdict.DROP, "response from client");
  info.cd = (msg[3] & 0x10) !== 0;
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
    const rdataStart = ownerEnd + 10;
    const next = rdataStart + readU16(msg, ownerEnd + 8);
    if (next > end) return reject(info, QueryVerdict.FORMERR, "malformed additional record");
    const type = readU16(msg, ownerEnd);
    if (type === RRType.OPT) {
      if (info.hasEdns) return reject(info, QueryVerdict.FORMERR, "more than one OPT");
      if (msg[offset] !== 0) return reject(info, QueryVerdict.FORMERR, "OPT owner not root");
      info.hasEdns = true;
      info.ednsUdpSize = readU16(msg, ownerEnd + 2);
      info.ednsVersion = msg[ownerEnd + 5];
      info.dnssecOk = (msg[ownerEnd + 6] & 0x80) !== 0;
      info.optStart = offset;
      info.optEnd = next;
      // Options: code(2) length(2) data; each takes at least 4 of at most 65535 octets.
      let at = rdataStart;
      for (let i = 0; i < 16384 && at < next; i++) {
        if (at + 4 > next) break;
        const code = readU16(msg, at);
        const optionEnd = at + 4 + readU16(msg, at + 2);
        if (code === EdnsOption.CLIENT_SUBNET) info.hasClientSubnet = true;
        else if (code === EdnsOption.TCP_KEEPALIVE) info.asksKeepalive = true;
        else if (code === EdnsOption.PADDING) info.asksPadding = true;
        if (
          code !== EdnsOption.COOKIE && code !== EdnsOption.TCP_KEEPALIVE &&
          code !== EdnsOption.PADDING
        ) info.forwardedOptionBytes += optionEnd - at;
        at = optionEnd;
      }
      if (at !== next) return reject(info, QueryVerdict.FORMERR, "malformed OPT options");
    } else if (type === RRType.TSIG) {
      if (remaining !== 1) return reject(info, QueryVerdict.FORMERR, "TSIG not last");
      if (!tsigDataFits(msg, rdataStart, next)) {
        return reject(info, QueryVerdict.FORMERR, "malformed TSIG");
      }
      info.tsig = true;
      info.tsigStart = offset;
    }
    offset = next;
  }
  if (offset !== end) return reject(info, QueryVerdict.FORMERR, "trailing bytes");
  if (isTruncated(msg)) return reject(info, QueryVerdict.FORMERR, "TC in query");
  if (info.tsig) return reject(info, QueryVerdict.NOTAUTH, "TSIG");
  const qtype = info.qtype;
  if (qtype === 0) return reject(info, QueryVerdict.FORMERR, "qtype 0");
  if (qtype === RRType.OPT) return reject(info, QueryVerdict.FORMERR, "qtype OPT");
  if (qtype === RRType.AXFR || qtype === RRType.IXFR) {
    return reject(info, QueryVerdict.NOTIMP, "zone transfer");
  }
  if (qtype >= 128 && qtype < RRType.ANY) return reject(info, QueryVerdict.NOTIMP, "meta qtype");
  const upstreamSize = info.questionEnd + OPT_FIXED + info.forwardedOptionBytes +
    PADDING_OPTION_FIXED;
  if (upstreamSize > MAX_UPSTREAM_QUERY_SIZE) {
    return reject(info, QueryVerdict.FORMERR, "query too large");
  }
  info.verdict = QueryVerdict.FORWARD;
  return QueryVerdict.FORWARD;
}
