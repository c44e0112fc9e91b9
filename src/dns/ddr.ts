/**
 * Discovery of Designated Resolvers (RFC 9462): clients that start on plain DNS ask
 * `_dns.resolver.arpa` type SVCB whether their resolver also speaks DoT or DoH, and upgrade.
 * {@linkcode ResolverArpa} answers every query under `resolver.arpa` locally (RFC 9462
 * section 6.4: a special-use name, never sent upstream): the SVCB records of the encrypted
 * listeners for `_dns.resolver.arpa` SVCB, NODATA for its other types, NXDOMAIN below.
 *
 * The records are built from a list of {@linkcode EncryptedEndpoint}s, one per encrypted
 * listener (DoT from `--listen-dot`, DoH from `--listen-doh`), in that order of priority.
 *
 * @module
 */

import { type QueryInfo } from "./query.ts";
import { parseIpAddress } from "../config.ts";
import { HEADER_SIZE, Rcode, RRType, writeU16 } from "./wire.ts";

/** The SVCB record type (RFC 9460). */
export const SVCB = 64;

/** TTL of the local answers, seconds: clients re-check now and then (RFC 9462 section 4). */
export const DDR_TTL = 300;

/** One encrypted listener as DDR advertises it. */
export interface EncryptedEndpoint {
  /** ALPN protocol ids: `["dot"]`, or `["h2", "http/1.1"]` for DoH. */
  alpn: readonly string[];
  /** The port clients connect to. */
  port: number;
  /** For DoH: the URI template's path (`/dns-query{?dns}`, RFC 9461 `dohpath`). */
  dohpath?: string;
  /** The listen address, given as a hint unless it is a wildcard (0.0.0.0, ::). */
  address?: string;
}

const encoder = new TextEncoder();

/** `name` (dotted, no escapes) in uncompressed wire form. */
function nameWire(name: string): number[] {
  const out: number[] = [];
  for (const label of name.replace(/\.$/, "").split(".")) {
    if (label === "") continue;
    const bytes = encoder.encode(label);
    out.push(bytes.length, ...bytes);
  }
  out.push(0);
  return out;
}

function u16(value: number): number[] {
  return [value >> 8, value & 0xff];
}

/**
 * The RDATA of one SVCB record in ServiceMode (RFC 9460 section 2.2): priority, target, then
 * `alpn` (1), `port` (3), `ipv4hint` (4), `ipv6hint` (6), `dohpath` (7), keys ascending.
 *
 * @example
 * ```ts
 * import { svcbRdata } from "./ddr.ts";
 * svcbRdata(1, "dns.example", { alpn: ["dot"], port: 853 });
 * ```
 */
export function svcbRdata(
  priority: number,
  target: string,
  endpoint: EncryptedEndpoint,
): Uint8Array {
  const out: number[] = [...u16(priority), ...nameWire(target)];
  const alpn: number[] = [];
  for (const id of endpoint.alpn) {
    const bytes = encoder.encode(id);
    alpn.push(bytes.length, ...bytes);
  }
  out.push(...u16(1), ...u16(alpn.length), ...alpn);
  out.push(...u16(3), ...u16(2), ...u16(endpoint.port));
  const address = endpoint.address === undefined ? null : parseIpAddress(endpoint.address);
  const wildcard = address === null || address.every((byte) => byte === 0);
  if (!wildcard && address.length === 4) out.push(...u16(4), ...u16(4), ...address);
  if (!wildcard && address.length === 16) out.push(...u16(6), ...u16(16), ...address);
  if (endpoint.dohpath !== undefined) {
    const path = encoder.encode(endpoint.dohpath);
    out.push(...u16(7), ...u16(path.length), ...path);
  }
  return Uint8Array.from(out);
}

/** `\x08resolver\x04arpa\x00`, the wire form of the name's end. */
const RESOLVER_ARPA = Uint8Array.from([
  8,
  ..."resolver".split("").map((c) => c.charCodeAt(0)),
  4,
  0x61,
  0x72,
  0x70,
  0x61,
  0,
]);

/**
 * True when the question name ending at `nameEnd` (uncompressed, as validated) ends in the
 * labels `resolver.arpa`, case-insensitively, on a label boundary. The octets before the
 * suffix could still be the tail of a longer label; {@linkcode questionName} settles that.
 */
function endsInResolverArpa(query: Uint8Array, nameEnd: number): boolean {
  const start = nameEnd - RESOLVER_ARPA.length;
  if (start < HEADER_SIZE) return false;
  for (let i = 0; i < RESOLVER_ARPA.length; i++) {
    const c = query[start + i];
    const lower = c >= 0x41 && c <= 0x5a ? c + 0x20 : c;
    if (lower !== RESOLVER_ARPA[i]) return false;
  }
  return true;
}

/** Lower-case ASCII of the question name's labels, dotted, from wire `[12, nameEnd)`. */
function questionName(query: Uint8Array, nameEnd: number): string {
  const labels: string[] = [];
  for (let at = HEADER_SIZE; at < nameEnd && query[at] !== 0;) {
    const length = query[at];
    let label = "";
    for (let i = at + 1; i <= at + length; i++) {
      const c = query[i];
      label += String.fromCharCode(c >= 0x41 && c <= 0x5a ? c + 0x20 : c);
    }
    labels.push(label);
    at += length + 1;
  }
  return labels.join(".");
}

/**
 * Local answers for `resolver.arpa` (RFC 9462). `target` is the certificate's first DNS
 * name; with no endpoints, or `enabled` false, `_dns.resolver.arpa` SVCB gets NODATA.
 *
 * @example
 * ```ts ignore
 * const arpa = new ResolverArpa("dns.example", [{ alpn: ["h2", "http/1.1"], port: 443,
 *   dohpath: "/dns-query{?dns}" }]);
 * arpa.answer(query, info); // null: not under resolver.arpa
 * ```
 */
export class ResolverArpa {
  readonly #records: Uint8Array[];

  /** Builds the records once. */
  constructor(target: string | null, endpoints: readonly EncryptedEndpoint[], enabled = true) {
    this.#records = enabled && target !== null
      ? endpoints.map((endpoint, i) => svcbRdata(i + 1, target, endpoint))
      : [];
  }

  /** How many SVCB records `_dns.resolver.arpa` gets. */
  get records(): number {
    return this.#records.length;
  }

  /**
   * The response to a forwardable query (inspected into `info`) under `resolver.arpa`, or
   * null for any other name.
   */
  answer(query: Uint8Array, info: QueryInfo): Uint8Array | null {
    // Every query passes here: compare the name's last octets with resolver.arpa first, and
    // build no string for the others.
    if (!endsInResolverArpa(query, info.nameEnd)) return null;
    const name = questionName(query, info.nameEnd);
    if (name !== "resolver.arpa" && !name.endsWith(".resolver.arpa")) return null;
    const known = name === "_dns.resolver.arpa" || name === "resolver.arpa";
    const records = name === "_dns.resolver.arpa" && info.qtype === SVCB ? this.#records : [];
    const questionEnd = info.questionEnd;
    let size = questionEnd + (info.hasEdns ? 11 : 0);
    for (const rdata of records) size += 2 + 10 + rdata.length;
    const out = new Uint8Array(size);
    out.set(query.subarray(0, questionEnd));
    out[2] = 0x80 | (query[2] & 0x79) | 0x04; // QR, opcode, RD; AA: the proxy is the authority
    out[3] = 0x80 | (query[3] & 0x10) | (known ? Rcode.NOERROR : Rcode.NXDOMAIN); // RA, CD
    writeU16(out, 4, 1);
    writeU16(out, 6, records.length);
    writeU16(out, 8, 0);
    writeU16(out, 10, info.hasEdns ? 1 : 0);
    let at = questionEnd;
    for (const rdata of records) {
      out[at] = 0xc0; // the question's name
      out[at + 1] = HEADER_SIZE;
      writeU16(out, at + 2, SVCB);
      writeU16(out, at + 4, 1); // IN
      writeU16(out, at + 6, 0);
      writeU16(out, at + 8, DDR_TTL);
      writeU16(out, at + 10, rdata.length);
      out.set(rdata, at + 12);
      at += 12 + rdata.length;
    }
    if (info.hasEdns) {
      out[at] = 0;
      writeU16(out, at + 1, RRType.OPT);
      writeU16(out, at + 3, 1232);
      // TTL (extended rcode, version, flags) and RDLENGTH stay zero.
    }
    return out;
  }
}
