/**
 * The cache key, from a message's own bytes: the question (name ignoring ASCII case, RFC
 * 4343; type; class) and the four header and EDNS bits that change the answer a resolver
 * gives, as a flags word ({@linkcode cacheKeyFlags}) and a keyed hash
 * ({@linkcode cacheKeyHash}). Two keys are equal when their flags are equal and `wire.ts`'s
 * `sameQuestion` holds for their questions. The answer cache and the table of flights
 * in progress (coalescing) both use it, so what one keeps apart the other does too.
 *
 * Why these four bits:
 * - DO (RFC 3225): with it, an answer carries the DNSSEC records;
 * - CD (RFC 4035 section 3.2.2): with it, a validating upstream answers what it could not
 *   validate;
 * - AD: an upstream sets AD in an answer only when the query had AD or DO (RFC 6840
 *   section 5.7);
 * - RD: an upstream answers a query without RD from its cache alone (RFC 1034 section
 *   4.3.1).
 *
 * So answers to the same question with different bits are different answers.
 *
 * Both functions work on any message whose question is uncompressed and starts at offset 12:
 * a query accepted by `inspectQuery`, or a response accepted by `analyzeResponse`.
 *
 * @module
 */

import { HEADER_SIZE } from "./wire.ts";

/** Key flag: the DO bit of the query's OPT record. */
export const KEY_DNSSEC_OK = 1;
/** Key flag: the CD bit of the query's header. */
export const KEY_CHECKING_DISABLED = 2;
/** Key flag: the AD bit of the query's header. */
export const KEY_AUTHENTIC_DATA = 4;
/** Key flag: the RD bit of the query's header. */
export const KEY_RECURSION_DESIRED = 8;

/**
 * The key flags of a query: DO and CD (as the query's analysis found them), AD and RD (from
 * its header).
 *
 * @example
 * ```ts
 * import { cacheKeyFlags } from "./cache_key.ts";
 * cacheKeyFlags(new Uint8Array([0, 0, 1, 0x20]), true, false); // DO | AD | RD = 13
 * ```
 */
export function cacheKeyFlags(query: Uint8Array, dnssecOk: boolean, cd: boolean): number {
  return (dnssecOk ? KEY_DNSSEC_OK : 0) | (cd ? KEY_CHECKING_DISABLED : 0) |
    ((query[3] & 0x20) !== 0 ? KEY_AUTHENTIC_DATA : 0) |
    ((query[2] & 0x01) !== 0 ? KEY_RECURSION_DESIRED : 0);
}

/**
 * A per-process random seed for {@linkcode cacheKeyHash}: names are chosen by clients, and
 * with a fixed hash anyone could send names that all land in one chain.
 */
const SEED = crypto.getRandomValues(new Uint32Array(1))[0];

/**
 * The hash of a cache key: the question in `msg[12, questionEnd)` (name lower-cased, type,
 * class) and the key `flags`, keyed by a per-process random seed. A 30-bit value, so V8
 * keeps it (and a `Map` keyed by it) in small integers. Allocates nothing.
 *
 * @example
 * ```ts
 * import { cacheKeyHash } from "./cache_key.ts";
 * const a = new Uint8Array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0x41, 0, 0, 1, 0, 1]);
 * const b = a.slice();
 * b[13] = 0x61; // "a" for "A"
 * cacheKeyHash(a, a.length, 0) === cacheKeyHash(b, b.length, 0); // true
 * ```
 */
export function cacheKeyHash(msg: Uint8Array, questionEnd: number, flags: number): number {
  // FNV-1a from a random basis, then a murmur3 finalizer so every input bit reaches the
  // low bits the hash tables use.
  let hash = SEED ^ 0x811c9dc5;
  const nameEnd = questionEnd - 4;
  for (let i = HEADER_SIZE; i < nameEnd; i++) {
    let c = msg[i];
    if (c >= 0x41 && c <= 0x5a) c |= 0x20;
    hash = Math.imul(hash ^ c, 0x01000193);
  }
  for (let i = nameEnd; i < questionEnd; i++) hash = Math.imul(hash ^ msg[i], 0x01000193);
  hash = Math.imul(hash ^ flags, 0x01000193);
  hash ^= hash >>> 16;
  hash = Math.imul(hash, 0x85ebca6b);
  hash ^= hash >>> 13;
  hash = Math.imul(hash, 0xc2b2ae35);
  hash ^= hash >>> 16;
  return hash & 0x3fffffff;
}
