/**
 * The health probe query: `. IN NS` with EDNS(0), the cheapest question any DNS server
 * answers at once.
 *
 * @module
 */

import { QUERY_PADDING_BLOCK } from "./edns.ts";
import { ADVERTISED_UDP_SIZE } from "./response.ts";
import { EdnsOption, HEADER_SIZE, RRClass, RRType, writeU16 } from "./wire.ts";

/** Length of the unpadded probe. */
const PROBE_SIZE = 28;

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
 * With `padded`, the OPT record carries a PADDING option that makes the probe one block of
 * 128 octets, the size of every short query sent upstream with `--padding` (RFC 8467): the
 * probes look like the queries they travel with.
 *
 * @example
 * ```ts
 * import { buildProbeQuery } from "./probe.ts";
 * const probe = buildProbeQuery();
 * probe.length; // 28
 * ```
 */
export function buildProbeQuery(recursionDesired = true, padded = false): Uint8Array {
  const out = new Uint8Array(padded ? QUERY_PADDING_BLOCK : PROBE_SIZE);
  out.set([
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
  if (padded) {
    // RDLENGTH, then the PADDING option's code and length; its octets stay zero (RFC 7830).
    const paddingLength = QUERY_PADDING_BLOCK - PROBE_SIZE - 4;
    writeU16(out, PROBE_SIZE - 2, 4 + paddingLength);
    writeU16(out, PROBE_SIZE, EdnsOption.PADDING);
    writeU16(out, PROBE_SIZE + 2, paddingLength);
  }
  if (!recursionDesired) out[2] = 0;
  crypto.getRandomValues(out.subarray(0, 2));
  return out;
}

/**
 * Builds the health check of a plain-DNS zone target: `ZONE IN SOA` with RD set and an OPT
 * record advertising 1232 octets, a random ID. Not `. NS`: a cluster DNS forwards what is
 * outside its zones to the internet, so `. NS` would test the way out, not the server;
 * the SOA of the zone it serves it answers itself. `zone` is lowercase text without the
 * final dot (`cluster.local`), of labels of at most 63 octets.
 *
 * @example
 * ```ts
 * import { buildZoneProbe } from "./probe.ts";
 * buildZoneProbe("cluster.local").length; // 12 + 15 + 4 + 11
 * ```
 */
export function buildZoneProbe(zone: string): Uint8Array {
  const labels = zone === "" ? [] : zone.split(".");
  const nameLength = labels.reduce((sum, label) => sum + label.length + 1, 1);
  const out = new Uint8Array(HEADER_SIZE + nameLength + 4 + 11);
  out[2] = 0x01; // RD
  writeU16(out, 4, 1);
  writeU16(out, 10, 1);
  let at = HEADER_SIZE;
  for (const label of labels) {
    out[at++] = label.length;
    for (let i = 0; i < label.length; i++) out[at++] = label.charCodeAt(i);
  }
  out[at++] = 0;
  writeU16(out, at, RRType.SOA);
  writeU16(out, at + 2, RRClass.IN);
  at += 4;
  out[at] = 0; // OPT: root owner
  writeU16(out, at + 1, RRType.OPT);
  writeU16(out, at + 3, ADVERTISED_UDP_SIZE);
  crypto.getRandomValues(out.subarray(0, 2));
  return out;
}
