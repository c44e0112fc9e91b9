/**
 * Answers dotproxy gives itself for names that must never reach a public resolver (RFC
 * 6761, RFC 6303): built from the query's own bytes (same ID, flags, question and casing),
 * with an SOA in the authority section of every negative answer so that caches know how
 * long the denial lives (RFC 2308 section 5), as RFC 6303 section 3 describes its zones.
 *
 * @module
 */

import { HEADER_SIZE, Rcode, readU16, RRClass, RRType, writeU16 } from "./wire.ts";

/** What a local zone says: loopback addresses for every name (`localhost`), or no names. */
export type LocalZoneKind = "localhost" | "empty";

/** TTL of the records and the negative TTL of the SOA (RFC 6303 section 3: 10800). */
export const LOCAL_TTL = 10800;

/** `nobody.invalid.`, the RNAME of RFC 6303 section 3. */
const RNAME = [6, 110, 111, 98, 111, 100, 121, 7, 105, 110, 118, 97, 108, 105, 100, 0];
/** Owner pointer, type, class, TTL, RDLENGTH. */
const RR_HEAD = 12;
/** MNAME pointer, RNAME, serial, refresh, retry, expire, minimum. */
const SOA_DATA = 2 + RNAME.length + 20;
const OPT_SIZE = 11;

function writeHead(out: Uint8Array, at: number, owner: number, type: number, length: number) {
  writeU16(out, at, 0xc000 | owner);
  writeU16(out, at + 2, type);
  writeU16(out, at + 4, RRClass.IN);
  writeU16(out, at + 6, LOCAL_TTL >>> 16);
  writeU16(out, at + 8, LOCAL_TTL & 0xffff);
  writeU16(out, at + 10, length);
}

function writeSoa(out: Uint8Array, at: number, apex: number): number {
  writeHead(out, at, apex, RRType.SOA, SOA_DATA);
  at += RR_HEAD;
  writeU16(out, at, 0xc000 | apex); // MNAME: the zone itself, as RFC 6303 writes it
  at += 2;
  out.set(RNAME, at);
  at += RNAME.length;
  const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
  for (const value of [1, 3600, 1200, 604800, LOCAL_TTL]) {
    view.setUint32(at, value);
    at += 4;
  }
  return at;
}

/**
 * The answer to the question of `query` (one question ending at `questionEnd`) from a local
 * zone whose apex is the name suffix starting at offset `apex` of `query` (12 when the name
 * is the apex):
 *
 * - `localhost`: every name has A 127.0.0.1 and AAAA ::1 (RFC 6761 section 6.3); other
 *   types get NODATA;
 * - `empty`: the apex exists with only its SOA (answered to an SOA question, else NODATA);
 *   any name below it is NXDOMAIN.
 *
 * Flags: QR, AA and RA set, opcode, RD and CD as asked. An OPT record (1232 octets, the DO
 * bit as asked) is added when the query's additional section starts with one.
 *
 * @example
 * ```ts
 * import { buildLocalAnswer } from "./local_answer.ts";
 * // "x.onion A": NXDOMAIN, the SOA of onion (at offset 14) in the authority section.
 * const query = new Uint8Array([0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0,
 *   1, 120, 5, 111, 110, 105, 111, 110, 0, 0, 1, 0, 1]);
 * const answer = buildLocalAnswer(query, query.length, 14, "empty");
 * answer[3] & 0xf; // 3
 * ```
 */
export function buildLocalAnswer(
  query: Uint8Array,
  questionEnd: number,
  apex: number,
  kind: LocalZoneKind,
): Uint8Array {
  const qtype = readU16(query, questionEnd - 4);
  const atApex = apex === HEADER_SIZE;
  let answerType = 0;
  let answerLength = 0;
  if (kind === "localhost" && (qtype === RRType.A || qtype === RRType.AAAA)) {
    answerType = qtype;
    answerLength = RR_HEAD + (qtype === RRType.A ? 4 : 16);
  } else if (atApex && qtype === RRType.SOA) {
    answerType = RRType.SOA;
    answerLength = RR_HEAD + SOA_DATA;
  }
  const exists = kind === "localhost" || atApex;
  const withOpt = readU16(query, 10) > 0 && query.length >= questionEnd + OPT_SIZE &&
    query[questionEnd] === 0 && readU16(query, questionEnd + 1) === RRType.OPT;
  const authorityLength = answerType === 0 ? RR_HEAD + SOA_DATA : 0;
  const out = new Uint8Array(
    questionEnd + answerLength + authorityLength + (withOpt ? OPT_SIZE : 0),
  );
  out.set(query.subarray(0, questionEnd));
  out[2] = 0x80 | (query[2] & 0x79) | 0x04; // QR, opcode, AA, RD
  out[3] = 0x80 | (query[3] & 0x10) | (exists ? Rcode.NOERROR : Rcode.NXDOMAIN); // RA, CD
  writeU16(out, 4, 1);
  writeU16(out, 6, answerType === 0 ? 0 : 1);
  writeU16(out, 8, authorityLength > 0 ? 1 : 0);
  writeU16(out, 10, withOpt ? 1 : 0);
  let at = questionEnd;
  if (answerType === RRType.SOA) {
    at = writeSoa(out, at, apex);
  } else if (answerType !== 0) {
    writeHead(out, at, HEADER_SIZE, answerType, answerLength - RR_HEAD);
    at += RR_HEAD;
    if (answerType === RRType.A) out.set([127, 0, 0, 1], at);
    else out[at + 15] = 1; // ::1
    at += answerLength - RR_HEAD;
  }
  if (authorityLength > 0) at = writeSoa(out, at, apex);
  if (withOpt) {
    out[at] = 0;
    writeU16(out, at + 1, RRType.OPT);
    writeU16(out, at + 3, 1232);
    out[at + 7] = query[questionEnd + 7] & 0x80; // DO as asked
  }
  return out;
}
