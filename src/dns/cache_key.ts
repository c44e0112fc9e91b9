/**
 * Cache keys from a message's own bytes: a 32-bit hash and an equality test over the
 * question (name ignoring ASCII case, RFC 4343; type; class) and the two bits that change
 * the answer a resolver gives: DO (RFC 3225) and CD (RFC 4035 section 3.2.2).
 *
 * Both work on any message whose question is uncompressed and starts at offset 12: a query
 * accepted by `inspectQuery`, or a response accepted by `analyzeResponse`.
 *
 * @module
 */

import { HEADER_SIZE, namesEqual } from "./wire.ts";

/** Key flag: the DO bit of the query's OPT record. */
export const KEY_DNSSEC_OK = 1;

/** Key flag: the CD bit of the query's header. */
export const KEY_CHECKING_DISABLED = 2;

const FNV_OFFSET = 0x811c9dc5;
const FNV_PRIME = 0x01000193;

/**
 * The flags word {@linkcode questionKeyEquals} compares: {@linkcode KEY_DNSSEC_OK} and
 * {@linkcode KEY_CHECKING_DISABLED} or-ed together.
 *
 * @example
 * ```ts
 * import { questionKeyFlags } from "./cache_key.ts";
 * questionKeyFlags(true, false); // 1
 * ```
 */
export function questionKeyFlags(dnssecOk: boolean, cd: boolean): number {
  return (dnssecOk ? KEY_DNSSEC_OK : 0) | (cd ? KEY_CHECKING_DISABLED : 0);
}

/**
 * A 32-bit FNV-1a hash of the question in `msg[12, questionEnd)` with the name's ASCII
 * letters lower-cased, then the DO and CD bits. Allocates nothing.
 *
 * @example
 * ```ts
 * import { questionHash } from "./cache_key.ts";
 * const a = new Uint8Array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0x41, 0, 0, 1, 0, 1]);
 * const b = a.slice();
 * b[13] = 0x61; // "a" for "A"
 * questionHash(a, a.length, false, false) === questionHash(b, b.length, false, false); // true
 * ```
 */
export function questionHash(
  msg: Uint8Array,
  questionEnd: number,
  dnssecOk: boolean,
  cd: boolean,
): number {
  let hash = FNV_OFFSET;
  const nameEnd = questionEnd - 4;
  for (let i = HEADER_SIZE; i < nameEnd; i++) {
    let c = msg[i];
    if (c >= 0x41 && c <= 0x5a) c |= 0x20;
    hash = Math.imul(hash ^ c, FNV_PRIME);
  }
  for (let i = nameEnd; i < questionEnd; i++) hash = Math.imul(hash ^ msg[i], FNV_PRIME);
  hash = Math.imul(hash ^ questionKeyFlags(dnssecOk, cd), FNV_PRIME);
  return hash >>> 0;
}

/**
 * True when two questions (each `msg[12, questionEnd)`) and their key flags
 * ({@linkcode questionKeyFlags}) make the same cache key: equal flags, the same name
 * ignoring ASCII case, and the same type and class.
 *
 * @example
 * ```ts
 * import { questionKeyEquals } from "./cache_key.ts";
 * const a = new Uint8Array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0x41, 0, 0, 1, 0, 1]);
 * const b = a.slice();
 * b[13] = 0x61;
 * questionKeyEquals(a, a.length, 0, b, b.length, 0); // true
 * questionKeyEquals(a, a.length, 0, b, b.length, 1); // false
 * ```
 */
export function questionKeyEquals(
  a: Uint8Array,
  aQuestionEnd: number,
  aFlags: number,
  b: Uint8Array,
  bQuestionEnd: number,
  bFlags: number,
): boolean {
  if (aFlags !== bFlags || aQuestionEnd !== bQuestionEnd) return false;
  if (aQuestionEnd < HEADER_SIZE + 5 || a.length < aQuestionEnd || b.length < bQuestionEnd) {
    return false;
  }
  const typeAt = aQuestionEnd - 4;
  if (!namesEqual(a, HEADER_SIZE, b, HEADER_SIZE, typeAt - HEADER_SIZE)) return false;
  return a[typeAt] === b[typeAt] && a[typeAt + 1] === b[typeAt + 1] &&
    a[typeAt + 2] === b[typeAt + 2] && a[typeAt + 3] === b[typeAt + 3];
}
