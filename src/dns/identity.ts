/**
 * dotproxy's own answer to `version.bind. CH TXT` (and `version.server.`, RFC 4892 section
 * 2.3): a question the proxy answers itself and never forwards, so `dotproxy healthcheck`
 * can tell this proxy from any other DNS server on the address: a plain resolver answers it
 * with its own software's name ("unbound 1.19.2"), REFUSED or NOTIMP, never `dotproxy ...`.
 *
 * Answered to loopback clients only (where the health check runs): many operators hide the
 * version from the network (Unbound's `hide-version`), and other clients' queries for it are
 * forwarded as before.
 *
 * @module
 */

import type { QueryInfo } from "./query.ts";
import { buildErrorResponse } from "./response.ts";
import { HEADER_SIZE, Rcode, RRType, writeU16 } from "./wire.ts";

/** The CHAOS class (RFC 1035 section 3.2.4). */
export const CLASS_CH = 3;

/** The names answered, in wire form, lower case. */
const NAMES: readonly Uint8Array[] = ["version.bind", "version.server"].map((name) => {
  const labels = name.split(".");
  const out = new Uint8Array(name.length + 2);
  let at = 0;
  for (const label of labels) {
    out[at++] = label.length;
    for (let i = 0; i < label.length; i++) out[at++] = label.charCodeAt(i);
  }
  return out;
});

/**
 * True when the inspected `query` asks `version.bind.` or `version.server.` (any case),
 * class CH, type TXT.
 *
 * @example
 * ```ts
 * import { isIdentityQuery } from "./identity.ts";
 * import { buildProbeQuery } from "./probe.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * const query = buildProbeQuery(); // a client's query
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * isIdentityQuery(query, info);
 * ```
 */
export function isIdentityQuery(query: Uint8Array, info: QueryInfo): boolean {
  if (info.qclass !== CLASS_CH || info.qtype !== RRType.TXT) return false;
  const length = info.nameEnd - HEADER_SIZE;
  return NAMES.some((name) => {
    if (name.length !== length) return false;
    for (let i = 0; i < length; i++) {
      const c = query[HEADER_SIZE + i];
      // Letters compare without case; length octets are below 64, never letters.
      const lower = c >= 0x41 && c <= 0x5a ? c | 0x20 : c;
      if (lower !== name[i]) return false;
    }
    return true;
  });
}

/**
 * True for a loopback client address (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104).
 *
 * @example
 * ```ts
 * import { isLoopbackClient } from "./identity.ts";
 * isLoopbackClient({ transport: "udp", hostname: "127.0.0.1", port: 5300 }); // true
 * ```
 */
export function isLoopbackClient(client: Deno.Addr | undefined): boolean {
  if (client === undefined || !("hostname" in client)) return false;
  const host = client.hostname.toLowerCase();
  return host.startsWith("127.") || host === "::1" || host.startsWith("::ffff:127.");
}

/**
 * The answer to an identity query: the query's ID, flags and question as sent (case
 * included), AA set, one `TXT` record in class CH with TTL 0 holding `text` (at most 255
 * octets of ASCII), and an OPT record when the query had one.
 *
 * @example
 * ```ts
 * import { buildIdentityAnswer } from "./identity.ts";
 * import { buildProbeQuery } from "./probe.ts";
 * import { inspectQuery, QueryInfo } from "./query.ts";
 * const query = buildProbeQuery(); // a client's query
 * const info = new QueryInfo();
 * inspectQuery(query, info);
 * const answer = buildIdentityAnswer(query, info, "dotproxy 0.1.0");
 * ```
 */
export function buildIdentityAnswer(query: Uint8Array, info: QueryInfo, text: string): Uint8Array {
  const bytes = new TextEncoder().encode(text.slice(0, 255));
  const base = buildErrorResponse(query, info, Rcode.NOERROR);
  const at = info.questionEnd;
  const record = 2 + 2 + 2 + 4 + 2 + 1 + bytes.length;
  const out = new Uint8Array(base.length + record);
  out.set(base.subarray(0, at));
  out.set(base.subarray(at), at + record);
  out[2] |= 0x04; // AA: the proxy is the authority for its own version
  writeU16(out, 6, 1); // ANCOUNT
  writeU16(out, at, 0xc000 | HEADER_SIZE); // owner: the question's name
  writeU16(out, at + 2, RRType.TXT);
  writeU16(out, at + 4, CLASS_CH);
  // TTL 0: never cached by anyone.
  writeU16(out, at + 10, 1 + bytes.length);
  out[at + 12] = bytes.length;
  out.set(bytes, at + 13);
  return out;
}
