/**
 * IP addresses and networks: parsing IPv4 and IPv6 literals by their grammar, CIDR
 * notation, membership, and the RFC 5952 text of an address. Used by the access list
 * (`--allow`) and by the zones given as networks (`--zone 10.96.0.0/12=...`).
 *
 * @module
 */

/** A network in CIDR notation, such as `10.0.0.0/8` or `fc00::/7`. */
export interface Cidr {
  /** 4 for IPv4, 6 for IPv6. */
  family: 4 | 6;
  /** The network address, 4 or 16 bytes, host bits zeroed. */
  bytes: Uint8Array;
  /** Prefix length, 0-32 for IPv4, 0-128 for IPv6. */
  prefix: number;
  /** Canonical text, such as `10.0.0.0/8` or `fc00::/7` (IPv6 as RFC 5952 writes it). */
  text: string;
}

function parseIpv4(text: string): Uint8Array | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  const bytes = new Uint8Array(4);
  for (let i = 0; i < 4; i++) {
    // No leading zeros: some parsers read 010 as octal, so it is ambiguous.
    if (!/^(0|[1-9]\d{0,2})$/.test(parts[i])) return null;
    const value = Number(parts[i]);
    if (value > 255) return null;
    bytes[i] = value;
  }
  return bytes;
}

/** RFC 4291 section 2.2 text: eight groups, one `::`, optionally an IPv4 address at the end. */
function parseIpv6(text: string): Uint8Array | null {
  if (!text.includes(":") || !/^[0-9A-Fa-f:.]+$/.test(text)) return null;
  let groups = text;
  let ipv4: Uint8Array | null = null;
  if (text.includes(".")) {
    // The embedded IPv4 address stands for the last two groups.
    const at = text.lastIndexOf(":");
    ipv4 = parseIpv4(text.slice(at + 1));
    if (ipv4 === null) return null;
    groups = text.slice(0, at + 1) + "0:0";
  }
  const gap = groups.indexOf("::");
  if (gap >= 0 && groups.indexOf("::", gap + 1) >= 0) return null;
  const split = (part: string) => part === "" ? [] : part.split(":");
  const head = split(gap >= 0 ? groups.slice(0, gap) : groups);
  const tail = gap >= 0 ? split(groups.slice(gap + 2)) : [];
  const count = head.length + tail.length;
  // `::` stands for at least one group of zeros.
  if (gap >= 0 ? count > 7 : count !== 8) return null;
  const bytes = new Uint8Array(16);
  const put = (group: string, index: number): boolean => {
    if (!/^[0-9A-Fa-f]{1,4}$/.test(group)) return false;
    const value = parseInt(group, 16);
    bytes[index * 2] = value >> 8;
    bytes[index * 2 + 1] = value & 0xff;
    return true;
  };
  if (!head.every((group, i) => put(group, i))) return null;
  if (!tail.every((group, i) => put(group, 8 - tail.length + i))) return null;
  if (ipv4 !== null) bytes.set(ipv4, 12);
  return bytes;
}

/**
 * The bytes of an IPv4 (4 bytes) or IPv6 (16 bytes, no brackets, no zone) literal, or `null`
 * when `text` is not one.
 *
 * @example
 * ```ts
 * import { parseIpAddress } from "./ip.ts";
 * parseIpAddress("::ffff:192.0.2.1"); // 16 bytes ending c0 00 02 01
 * parseIpAddress("dns.google"); // null
 * ```
 */
export function parseIpAddress(text: string): Uint8Array | null {
  return parseIpv4(text) ?? parseIpv6(text);
}

/** True for an IPv4 or IPv6 literal (IPv6 without brackets). */
export function isIpLiteral(text: string): boolean {
  return parseIpAddress(text) !== null;
}

/**
 * IPv4 dotted, IPv6 as RFC 5952 recommends: lowercase, the longest run of zero groups `::`.
 *
 * @example
 * ```ts
 * import { formatIp, parseIpAddress } from "./ip.ts";
 * formatIp(parseIpAddress("2001:DB8:0:0:0:0:0:1")!); // "2001:db8::1"
 * ```
 */
export function formatIp(bytes: Uint8Array): string {
  if (bytes.length === 4) return bytes.join(".");
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((bytes[i] << 8) | bytes[i + 1]);
  let bestStart = -1;
  let bestLength = 1; // a single zero group is not shortened (RFC 5952 section 4.2.2)
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let end = i;
    while (end < 8 && groups[end] === 0) end++;
    if (end - i > bestLength) {
      bestStart = i;
      bestLength = end - i;
    }
    i = end;
  }
  const hex = groups.map((group) => group.toString(16));
  if (bestStart < 0) return hex.join(":");
  return `${hex.slice(0, bestStart).join(":")}::${hex.slice(bestStart + bestLength).join(":")}`;
}

/** Why a text is not a network in CIDR notation; the message says what is wrong with it. */
export class CidrError extends Error {
  /** Creates an error with `message`, which does not quote the whole input. */
  constructor(message: string) {
    super(message);
    this.name = "CidrError";
  }
}

/**
 * Parses a network in CIDR notation; a bare address means a single host (/32 or /128).
 * Host bits must be zero, so that `10.0.0.1/8` is caught rather than silently widened. An
 * IPv4-mapped network (`::ffff:10.0.0.0/104`) is its IPv4 network (`10.0.0.0/8`), since
 * clients are matched by their IPv4 address; one shorter than /96 is refused. Throws {@linkcode CidrError} saying what is wrong (the caller names the input).
 *
 * @example
 * ```ts
 * import { parseCidr } from "./ip.ts";
 * parseCidr("fd00::/8"); // { family: 6, prefix: 8, text: "fd00::/8", bytes: ... }
 * parseCidr("192.0.2.7").text; // "192.0.2.7/32"
 * ```
 */
export function parseCidr(text: string): Cidr {
  const trimmed = text.trim();
  const slash = trimmed.indexOf("/");
  const address = slash < 0 ? trimmed : trimmed.slice(0, slash);
  let bytes = parseIpAddress(address);
  if (bytes === null) {
    throw new CidrError(`"${address}" is not an IP address (write ADDRESS/PREFIX)`);
  }
  const bits = bytes.length * 8;
  let prefix = bits;
  if (slash >= 0) {
    const prefixText = trimmed.slice(slash + 1);
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > bits) {
      throw new CidrError(`prefix "${prefixText}" is not a number from 0 to ${bits}`);
    }
    prefix = Number(prefixText);
  }
  if (isV4Mapped(bytes)) {
    // Clients are matched by their IPv4 address (a dual-stack socket's ::ffff:a.b.c.d is
    // unwrapped), so a mapped network is its IPv4 network; kept as written it never matched.
    if (prefix < 96) {
      throw new CidrError(
        "an IPv4-mapped network needs a prefix of at least /96; write the IPv4 network " +
          "(IPv4 clients are matched as IPv4, mapped or not)",
      );
    }
    bytes = bytes.subarray(12);
    prefix -= 96;
  }
  const given = bytes;
  const network = given.map((byte, i) => byte & prefixMask(prefix, i));
  const canonical = `${formatIp(network)}/${prefix}`;
  if (!network.every((byte, i) => byte === given[i])) {
    throw new CidrError(`host bits are set after /${prefix}; did you mean ${canonical}?`);
  }
  return { family: bytes.length === 4 ? 4 : 6, bytes: network, prefix, text: canonical };
}

/** True for an IPv4-mapped IPv6 address, `::ffff:a.b.c.d` (RFC 4291 section 2.5.5.2). */
function isV4Mapped(bytes: Uint8Array): boolean {
  if (bytes.length !== 16 || bytes[10] !== 0xff || bytes[11] !== 0xff) return false;
  for (let i = 0; i < 10; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** The mask byte at `index` for a prefix of `prefix` bits. */
function prefixMask(prefix: number, index: number): number {
  const bits = Math.min(8, Math.max(0, prefix - index * 8));
  return (0xff << (8 - bits)) & 0xff;
}

/**
 * True when `address` (4 or 16 bytes, as {@linkcode parseIpAddress} returns) lies in `cidr`.
 * Addresses of the other family never match; IPv4-mapped IPv6 is not unwrapped here.
 *
 * @example
 * ```ts
 * import { cidrContains, parseCidr, parseIpAddress } from "./ip.ts";
 * cidrContains(parseCidr("10.0.0.0/8"), parseIpAddress("10.1.2.3")!); // true
 * ```
 */
export function cidrContains(cidr: Cidr, address: Uint8Array): boolean {
  if (address.length !== cidr.bytes.length) return false;
  for (let i = 0; i * 8 < cidr.prefix; i++) {
    if ((address[i] & prefixMask(cidr.prefix, i)) !== cidr.bytes[i]) return false;
  }
  return true;
}

/**
 * The reverse zones (`in-addr.arpa`, `ip6.arpa`) that together hold exactly the addresses of
 * `cidr`, lowercase, without the final dot. Reverse names have a label per octet (IPv4) or
 * per nibble (IPv6), so a prefix off those boundaries stands for every zone one boundary
 * further: `10.96.0.0/12` is the 16 zones `96.10.in-addr.arpa` ... `111.10.in-addr.arpa`
 * (at most 128 zones for IPv4, 8 for IPv6).
 *
 * @example
 * ```ts
 * import { parseCidr, reverseZones } from "./ip.ts";
 * reverseZones(parseCidr("10.96.0.0/12")).length; // 16
 * reverseZones(parseCidr("fd00::/8")); // ["d.f.ip6.arpa"]
 * ```
 */
export function reverseZones(cidr: Cidr): string[] {
  const width = cidr.family === 4 ? 8 : 4;
  const labels = Math.ceil(cidr.prefix / width);
  const digit = (i: number): number =>
    width === 8 ? cidr.bytes[i] : (cidr.bytes[i >> 1] >> ((i & 1) === 0 ? 4 : 0)) & 0xf;
  const fixed: string[] = [];
  for (let i = 0; i < labels - 1; i++) fixed.push(digit(i).toString(width === 8 ? 10 : 16));
  const suffix = cidr.family === 4 ? "in-addr.arpa" : "ip6.arpa";
  if (labels === 0) return [suffix];
  const count = 2 ** (labels * width - cidr.prefix);
  const first = digit(labels - 1);
  const zones: string[] = [];
  for (let value = first; value < first + count; value++) {
    const all = [...fixed, value.toString(width === 8 ? 10 : 16)];
    zones.push(`${all.reverse().join(".")}.${suffix}`);
  }
  return zones;
}
