/**
 * DNS wire-format primitives (RFC 1035 section 4): header fields, names and resource
 * records, as pure functions over `Uint8Array`. Nothing here allocates on the hot path.
 *
 * @module
 */

/** Size of the fixed DNS header. */
export const HEADER_SIZE = 12;

/** Largest DNS message a two-byte length prefix can carry. */
export const MAX_MESSAGE_SIZE = 65535;

/** Largest UDP answer for a client that sent no EDNS (RFC 1035 section 4.2.1). */
export const CLASSIC_UDP_SIZE = 512;

/** The UDP payload size the proxy advertises in OPT records it writes (DNS flag day 2020). */
export const ADVERTISED_UDP_SIZE = 1232;

/** Response codes (RFC 1035, RFC 6895). */
export const Rcode = {
  NOERROR: 0,
  FORMERR: 1,
  SERVFAIL: 2,
  NXDOMAIN: 3,
  NOTIMP: 4,
  REFUSED: 5,
  /** Not authorized / TSIG key not known (RFC 8945 section 5.2). */
  NOTAUTH: 9,
  /** Extended rcode 16: the OPT version is not supported (RFC 6891 section 6.1.3). */
  BADVERS: 16,
} as const;

/** Opcodes (RFC 1035, RFC 6895). */
export const Opcode = { QUERY: 0 } as const;

/** Record types the proxy looks at (RFC 1035, RFC 6895 and the RFCs named per type). */
export const RRType = {
  A: 1,
  NS: 2,
  CNAME: 5,
  SOA: 6,
  PTR: 12,
  MX: 15,
  TXT: 16,
  AAAA: 28,
  SRV: 33,
  DNAME: 39,
  OPT: 41,
  DS: 43,
  RRSIG: 46,
  TKEY: 249,
  TSIG: 250,
  IXFR: 251,
  AXFR: 252,
  MAILB: 253,
  MAILA: 254,
  ANY: 255,
} as const;

/** Classes (RFC 1035 section 3.2.4, RFC 6895 section 3.2). */
export const RRClass = { IN: 1, ANY: 255 } as const;

/** EDNS(0) option codes (RFC 6891 section 6.1.2 and the RFCs named per code). */
export const EdnsOption = {
  /** Name server identifier (RFC 5001). */
  NSID: 3,
  /** Client subnet (RFC 7871). */
  CLIENT_SUBNET: 8,
  /** DNS cookie (RFC 7873): hop-by-hop. */
  COOKIE: 10,
  /** edns-tcp-keepalive (RFC 7828): hop-by-hop. */
  TCP_KEEPALIVE: 11,
  /** Padding (RFC 7830): hop-by-hop. */
  PADDING: 12,
  /** Extended DNS Error (RFC 8914). */
  EDE: 15,
} as const;

/**
 * The mnemonics of the header rcodes RFC 1035 and RFC 2136 define (0 to 10), by value: the
 * names a user may write where a setting takes response codes.
 */
export const RCODE_MNEMONICS: readonly string[] = [
  "NOERROR",
  "FORMERR",
  "SERVFAIL",
  "NXDOMAIN",
  "NOTIMP",
  "REFUSED",
  "YXDOMAIN",
  "YXRRSET",
  "NXRRSET",
  "NOTAUTH",
  "NOTZONE",
];

/** Every 4-bit header rcode's name: the mnemonics, then RFC 8490's, then numbered ones. */
const RCODE_NAMES = [...RCODE_MNEMONICS, "DSOTYPENI", "RCODE12", "RCODE13", "RCODE14", "RCODE15"];

/**
 * The mnemonic of a 4-bit header rcode, for logs and metric labels.
 *
 * @example
 * ```ts
 * import { rcodeName } from "./wire.ts";
 * rcodeName(3); // "NXDOMAIN"
 * ```
 */
export function rcodeName(rcode: number): string {
  return RCODE_NAMES[rcode & 0xf];
}

/** The message ID (bytes 0-1). */
export function getId(msg: Uint8Array): number {
  return (msg[0] << 8) | msg[1];
}

/** Writes the message ID in place. */
export function setId(msg: Uint8Array, id: number): void {
  msg[0] = id >> 8;
  msg[1] = id & 0xff;
}

/** True when the QR bit marks the message as a response. */
export function isResponse(msg: Uint8Array): boolean {
  return (msg[2] & 0x80) !== 0;
}

/** The 4-bit opcode. */
export function getOpcode(msg: Uint8Array): number {
  return (msg[2] >> 3) & 0xf;
}

/** True when the TC (truncated) bit is set. */
export function isTruncated(msg: Uint8Array): boolean {
  return (msg[2] & 0x02) !== 0;
}

/** The 4-bit header rcode (without any EDNS extension bits). */
export function getRcode(msg: Uint8Array): number {
  return msg[3] & 0x0f;
}

/** QDCOUNT, the number of questions. */
export function getQdcount(msg: Uint8Array): number {
  return (msg[4] << 8) | msg[5];
}

/** ANCOUNT, the number of answer records. */
export function getAncount(msg: Uint8Array): number {
  return (msg[6] << 8) | msg[7];
}

/** NSCOUNT, the number of authority records. */
export function getNscount(msg: Uint8Array): number {
  return (msg[8] << 8) | msg[9];
}

/** ARCOUNT, the number of additional records. */
export function getArcount(msg: Uint8Array): number {
  return (msg[10] << 8) | msg[11];
}

/** Reads a big-endian 16-bit integer. */
export function readU16(msg: Uint8Array, offset: number): number {
  return (msg[offset] << 8) | msg[offset + 1];
}

/** Writes a big-endian 16-bit integer. */
export function writeU16(msg: Uint8Array, offset: number, value: number): void {
  msg[offset] = (value >> 8) & 0xff;
  msg[offset + 1] = value & 0xff;
}

/**
 * Skips an uncompressed name starting at `offset` and returns the offset just past it, or
 * -1 when the name is malformed: a compression pointer, a reserved label type, a label
 * running past `end`, or a name longer than 255 octets. Queries never need compression,
 * so a pointer in a question is malformed.
 *
 * @example
 * ```ts
 * import { skipUncompressedName } from "./wire.ts";
 * const name = new Uint8Array([3, 0x77, 0x77, 0x77, 0]);
 * skipUncompressedName(name, 0, name.length); // 5
 * ```
 */
export function skipUncompressedName(msg: Uint8Array, offset: number, end: number): number {
  let length = 0;
  for (;;) {
    if (offset >= end) return -1;
    const labelLength = msg[offset];
    if (labelLength === 0) return length + 1 > 255 ? -1 : offset + 1;
    if (labelLength > 63) return -1;
    length += labelLength + 1;
    offset += labelLength + 1;
    if (length > 255) return -1;
  }
}

/**
 * Skips a possibly compressed name (as found in responses) and returns the offset just past
 * it in the record, or -1 when malformed. Pointers are not followed: their target was
 * already checked or does not matter for walking records.
 */
export function skipName(msg: Uint8Array, offset: number, end: number): number {
  let length = 0;
  for (;;) {
    if (offset >= end) return -1;
    const labelLength = msg[offset];
    if (labelLength === 0) return offset + 1;
    const kind = labelLength & 0xc0;
    if (kind === 0xc0) return offset + 2 <= end ? offset + 2 : -1;
    if (kind !== 0) return -1;
    length += labelLength + 1;
    offset += labelLength + 1;
    if (length > 255) return -1;
  }
}

/** The most compression pointers {@linkcode checkName} follows in one name. */
export const MAX_POINTER_HOPS = 128;

/**
 * Validates a possibly compressed name (RFC 1035 section 4.1.4) at `offset` by following
 * its pointers, and returns the offset just past the part stored at `offset` (its labels
 * and its pointer, if any), or -1 when the name is malformed.
 *
 * The in-place part must end before `limit` (the end of the record data that holds the
 * name, or of the message). Each pointer must point strictly backwards: before the start of
 * the name, or of the label run that jumped to it, and not into the header, and the run it
 * points to must end before the pointer itself; this makes loops impossible. Label types
 * other than 00 (length) and 11 (pointer) are rejected (RFC 6891 section 5 retired 01), as
 * are names over 255 octets and more than {@linkcode MAX_POINTER_HOPS} pointers.
 *
 * @example
 * ```ts
 * import { checkName } from "./wire.ts";
 * const msg = new Uint8Array(20);
 * msg.set([3, 0x63, 0x6f, 0x6d, 0], 12); // com. at 12
 * msg.set([0xc0, 12], 17); // a pointer to it
 * checkName(msg, 17, 19); // 19
 * checkName(msg, 12, 20); // 17
 * ```
 */
export function checkName(msg: Uint8Array, offset: number, limit: number): number {
  let runStart = offset;
  let end = limit < msg.length ? limit : msg.length;
  let after = -1;
  let length = 1; // the root label
  let hops = 0;
  // Each step reads one label (at least 2 octets of the 255) or follows one pointer.
  for (let step = 0; step < 128 + MAX_POINTER_HOPS; step++) {
    if (offset >= end) return -1;
    const labelLength = msg[offset];
    if (labelLength === 0) return after < 0 ? offset + 1 : after;
    const kind = labelLength & 0xc0;
    if (kind === 0xc0) {
      if (offset + 2 > end) return -1;
      const target = ((labelLength & 0x3f) << 8) | msg[offset + 1];
      if (target >= runStart || target < HEADER_SIZE || ++hops > MAX_POINTER_HOPS) return -1;
      if (after < 0) after = offset + 2;
      end = offset;
      runStart = target;
      offset = target;
      continue;
    }
    if (kind !== 0) return -1;
    length += labelLength + 1;
    if (length > 255) return -1;
    offset += labelLength + 1;
  }
  return -1;
}

/**
 * Skips one resource record at `offset`, returning the offset past it or -1 when it runs
 * past `end`. `compressed` says whether the owner name may use compression pointers.
 */
export function skipRecord(
  msg: Uint8Array,
  offset: number,
  end: number,
  compressed: boolean,
): number {
  const afterName = compressed
    ? skipName(msg, offset, end)
    : skipUncompressedName(msg, offset, end);
  if (afterName < 0 || afterName + 10 > end) return -1;
  const next = afterName + 10 + readU16(msg, afterName + 8);
  return next > end ? -1 : next;
}

/**
 * Compares two uncompressed wire names (already validated) ignoring ASCII case, as DNS
 * requires (RFC 4343).
 */
export function namesEqual(
  a: Uint8Array,
  aOffset: number,
  b: Uint8Array,
  bOffset: number,
  length: number,
): boolean {
  for (let i = 0; i < length; i++) {
    let x = a[aOffset + i];
    let y = b[bOffset + i];
    if (x === y) continue;
    if (x >= 0x41 && x <= 0x5a) x |= 0x20;
    if (y >= 0x41 && y <= 0x5a) y |= 0x20;
    if (x !== y) return false;
  }
  return true;
}

/**
 * True when two messages ask the same question: the uncompressed questions
 * `a[aBase + 12, aBase + aQuestionEnd)` and `b[12, bQuestionEnd)` have the same name
 * ignoring ASCII case (RFC 4343), the same type and the same class. The one question
 * comparison: the cache key, coalescing and the check that a response answers its query all
 * use it. `aBase` is where message `a` starts in its array (the cache keeps answers in
 * shared chunks).
 *
 * @example
 * ```ts
 * import { sameQuestion } from "./wire.ts";
 * const a = new Uint8Array([0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0x41, 0, 0, 1, 0, 1]);
 * const b = a.slice();
 * b[13] = 0x61; // "a" for "A"
 * sameQuestion(a, a.length, b, b.length); // true
 * ```
 */
export function sameQuestion(
  a: Uint8Array,
  aQuestionEnd: number,
  b: Uint8Array,
  bQuestionEnd: number,
  aBase = 0,
): boolean {
  if (aQuestionEnd !== bQuestionEnd || aQuestionEnd < HEADER_SIZE + 5) return false;
  if (a.length < aBase + aQuestionEnd || b.length < bQuestionEnd) return false;
  const typeAt = aQuestionEnd - 4;
  if (!namesEqual(a, aBase + HEADER_SIZE, b, HEADER_SIZE, typeAt - HEADER_SIZE)) return false;
  return a[aBase + typeAt] === b[typeAt] && a[aBase + typeAt + 1] === b[typeAt + 1] &&
    a[aBase + typeAt + 2] === b[typeAt + 2] && a[aBase + typeAt + 3] === b[typeAt + 3];
}

/**
 * Renders an uncompressed wire name as presentation text (`www.example.com.`), escaping
 * dots and non-printable bytes as RFC 1035 section 5.1 does. For logs only.
 */
export function nameToString(msg: Uint8Array, offset: number, end: number): string {
  let out = "";
  while (offset < end) {
    const labelLength = msg[offset++];
    if (labelLength === 0 || labelLength > 63) break;
    for (let i = 0; i < labelLength && offset < end; i++) {
      const c = msg[offset++];
      if (c === 0x2e || c === 0x5c) out += "\\" + String.fromCharCode(c);
      else if (c > 0x20 && c < 0x7f) out += String.fromCharCode(c);
      else out += "\\" + String(c).padStart(3, "0");
    }
    out += ".";
  }
  return out === "" ? "." : out;
}

const TYPE_NAMES: Record<number, string> = {
  1: "A",
  2: "NS",
  5: "CNAME",
  6: "SOA",
  12: "PTR",
  15: "MX",
  16: "TXT",
  28: "AAAA",
  33: "SRV",
  35: "NAPTR",
  39: "DNAME",
  41: "OPT",
  43: "DS",
  46: "RRSIG",
  47: "NSEC",
  48: "DNSKEY",
  50: "NSEC3",
  52: "TLSA",
  64: "SVCB",
  65: "HTTPS",
  99: "SPF",
  249: "TKEY",
  250: "TSIG",
  251: "IXFR",
  252: "AXFR",
  253: "MAILB",
  254: "MAILA",
  255: "ANY",
  257: "CAA",
};

/** The mnemonic of a record type (`TYPE1234` when unknown, as RFC 3597 writes it). */
export function typeName(type: number): string {
  return TYPE_NAMES[type] ?? `TYPE${type}`;
}
