/**
 * The health probe query: `. IN NS` with EDNS(0), the cheapest question any DNS server
 * answers at once.
 *
 * @module
 */

import { ADVERTISED_UDP_SIZE } from "./response.ts";
import { RRClass, RRType } from "./wire.ts";

/**
 * Builds a probe query: a random ID (`crypto.getRandomValues`), RD set unless
 * `recursionDesired` is false, one question `. IN NS` and an OPT record advertising 1232
 * octets, version 0, no flags, no options (28 octets).
 *
 * The upstream health check clears RD: any answer proves the server alive, and without RD
 * no server starts a recursion for it, so an upstream that cannot reach the root servers
 * (an isolated network, a forwarder whose own upstream is down) still answers at once,
 * typically REFUSED or a cached referral, instead of after its own timeouts.
 *
 * @example
 * ```ts
 * import { buildProbeQuery } from "./probe.ts";
 * const probe = buildProbeQuery();
 * probe.length; // 28
 * ```
 */
export function buildProbeQuery(recursionDesired = true): Uint8Array {
  const out = new Uint8Array([
    0, // ID, random below
    0,
    0x01, // RD
    0,
    0, // QDCOUNT 1
    1,
    0, // ANCOUNT 0
    0,
    0, // NSCOUNT 0
    0,
    0, // ARCOUNT 1
    1,
    0, // root
    0,
    RRType.NS,
    0,
    RRClass.IN,
    0, // OPT: root owner
    0,
    RRType.OPT,
    ADVERTISED_UDP_SIZE >> 8,
    ADVERTISED_UDP_SIZE & 0xff,
    0, // extended rcode, version, flags
    0,
    0,
    0,
    0, // no options
    0,
  ]);
  if (!recursionDesired) out[2] = 0;
  crypto.getRandomValues(out.subarray(0, 2));
  return out;
}
