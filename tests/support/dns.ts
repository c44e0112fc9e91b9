/**
 * A small DNS message builder and parser for tests, written independently of `src/dns` so
 * the tests do not check the proxy's wire code against itself.
 *
 * @module
 */

/** Hand-written bytes: a number is one octet, arrays and Uint8Arrays are spliced in. */
export type Part = number | readonly number[] | Uint8Array;

/** The octets of `parts`, in order, in one array. */
export function bytes(...parts: Part[]): Uint8Array {
  const out: number[] = [];
  for (const part of parts) {
    if (typeof part === "number") out.push(part);
    else out.push(...part);
  }
  return new Uint8Array(out);
}

/** `n` as two octets, network order. */
export const u16 = (n: number): number[] => [(n >> 8) & 0xff, n & 0xff];
/** `n` as four octets, network order. */
export const u32 = (n: number): number[] => [
  n >>> 24,
  (n >>> 16) & 0xff,
  (n >>> 8) & 0xff,
  n & 0xff,
];

/**
 * An OPT record: UDP size, the TTL field's four octets (ext rcode, version, flags), options
 * (code, data).
 */
export function opt(
  options: [number, Part][] = [],
  udp = 1232,
  ttl: number[] = [0, 0, 0, 0],
): Uint8Array {
  const data = bytes(...options.map(([code, d]) => bytes(u16(code), u16(bytes(d).length), d)));
  return bytes(0, u16(41), u16(udp), ttl, u16(data.length), data);
}

/** A resource record whose owner is the question's name (a pointer to offset 12), class IN. */
export function rr(type: number, ttl: number, rdata: Part): Uint8Array {
  const data = bytes(rdata);
  return bytes(0xc0, 12, u16(type), u16(1), u32(ttl), u16(data.length), data);
}

/** `message` with its two-octet length in front: one DNS-over-TCP (and DoT) frame. */
export function lengthFramed(message: Uint8Array): Uint8Array {
  const frame = new Uint8Array(2 + message.length);
  frame[0] = message.length >> 8;
  frame[1] = message.length & 0xff;
  frame.set(message, 2);
  return frame;
}

/** Options for {@linkcode buildQuery}. */
export interface QueryOptions {
  /** Message ID (random when omitted). */
  id?: number;
  /** Record type (default 1, A). */
  type?: number;
  /** Class (default 1, IN). */
  qclass?: number;
  /** Add an OPT record advertising this UDP size. */
  ednsUdpSize?: number;
  /** Set DO in the OPT record. */
  dnssecOk?: boolean;
  /** Recursion desired (default true). */
  rd?: boolean;
}

/** Encodes a presentation name (no escapes) to wire format. */
export function encodeName(name: string): Uint8Array {
  const labels = name.replace(/\.$/, "").split(".").filter((l) => l !== "");
  const bytes: number[] = [];
  for (const label of labels) {
    const encoded = new TextEncoder().encode(label);
    bytes.push(encoded.length, ...encoded);
  }
  bytes.push(0);
  return new Uint8Array(bytes);
}

/** Builds a standard query for `name`. */
export function buildQuery(name: string, options: QueryOptions = {}): Uint8Array {
  const id = options.id ?? Math.floor(Math.random() * 65536);
  const qname = encodeName(name);
  const opt = options.ednsUdpSize !== undefined
    ? [
      0,
      0,
      41,
      options.ednsUdpSize >> 8,
      options.ednsUdpSize & 0xff,
      0,
      0,
      options.dnssecOk ? 0x80 : 0,
      0,
      0,
      0,
    ]
    : [];
  const type = options.type ?? 1;
  const qclass = options.qclass ?? 1;
  return new Uint8Array([
    id >> 8,
    id & 0xff,
    options.rd === false ? 0 : 1,
    0,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    opt.length > 0 ? 1 : 0,
    ...qname,
    type >> 8,
    type & 0xff,
    qclass >> 8,
    qclass & 0xff,
    ...opt,
  ]);
}

/** A parsed resource record. */
export interface ParsedRecord {
  name: string;
  type: number;
  qclass: number;
  ttl: number;
  data: Uint8Array;
}

/** A parsed message. */
export interface ParsedMessage {
  id: number;
  qr: boolean;
  opcode: number;
  aa: boolean;
  tc: boolean;
  rd: boolean;
  ra: boolean;
  cd: boolean;
  rcode: number;
  question: { name: string; type: number; qclass: number } | null;
  answers: ParsedRecord[];
  authority: ParsedRecord[];
  additional: ParsedRecord[];
  /** The OPT record, if any: its advertised size and options. */
  opt: { udpSize: number; dnssecOk: boolean; options: { code: number; data: Uint8Array }[] } | null;
}

function readName(msg: Uint8Array, offset: number): [string, number] {
  const labels: string[] = [];
  let end = -1;
  for (let jumps = 0; jumps < 64; jumps++) {
    const length = msg[offset];
    if (length === undefined) throw new Error("name runs past the message");
    if (length === 0) {
      if (end < 0) end = offset + 1;
      return [labels.length === 0 ? "." : labels.join(".") + ".", end];
    }
    if ((length & 0xc0) === 0xc0) {
      if (end < 0) end = offset + 2;
      offset = ((length & 0x3f) << 8) | msg[offset + 1];
      continue;
    }
    labels.push(new TextDecoder().decode(msg.subarray(offset + 1, offset + 1 + length)));
    offset += 1 + length;
  }
  throw new Error("compression loop");
}

/** Parses a message strictly; throws on anything malformed. */
export function parseMessage(msg: Uint8Array): ParsedMessage {
  if (msg.length < 12) throw new Error(`message too short: ${msg.length}`);
  const view = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const counts = [view.getUint16(4), view.getUint16(6), view.getUint16(8), view.getUint16(10)];
  let offset = 12;
  let question: ParsedMessage["question"] = null;
  for (let i = 0; i < counts[0]; i++) {
    const [name, next] = readName(msg, offset);
    question = { name, type: view.getUint16(next), qclass: view.getUint16(next + 2) };
    offset = next + 4;
  }
  const sections: ParsedRecord[][] = [[], [], []];
  let opt: ParsedMessage["opt"] = null;
  for (let s = 0; s < 3; s++) {
    for (let i = 0; i < counts[s + 1]; i++) {
      const [name, next] = readName(msg, offset);
      const type = view.getUint16(next);
      const qclass = view.getUint16(next + 2);
      const ttl = view.getUint32(next + 4);
      const length = view.getUint16(next + 8);
      if (next + 10 + length > msg.length) throw new Error("record runs past the message");
      const data = msg.slice(next + 10, next + 10 + length);
      sections[s].push({ name, type, qclass, ttl, data });
      if (type === 41) {
        const options: { code: number; data: Uint8Array }[] = [];
        for (let at = 0; at + 4 <= data.length;) {
          const code = (data[at] << 8) | data[at + 1];
          const len = (data[at + 2] << 8) | data[at + 3];
          options.push({ code, data: data.slice(at + 4, at + 4 + len) });
          at += 4 + len;
        }
        opt = { udpSize: qclass, dnssecOk: (ttl & 0x8000) !== 0, options };
      }
      offset = next + 10 + length;
    }
  }
  if (offset !== msg.length) throw new Error(`${msg.length - offset} trailing bytes`);
  return {
    id: view.getUint16(0),
    qr: (msg[2] & 0x80) !== 0,
    opcode: (msg[2] >> 3) & 0xf,
    aa: (msg[2] & 0x04) !== 0,
    tc: (msg[2] & 0x02) !== 0,
    rd: (msg[2] & 0x01) !== 0,
    ra: (msg[3] & 0x80) !== 0,
    cd: (msg[3] & 0x10) !== 0,
    rcode: msg[3] & 0xf,
    question,
    answers: sections[0],
    authority: sections[1],
    additional: sections[2],
    opt,
  };
}

/** A stable fake IPv4 address for a name, so tests can tell answers apart. */
export function addressFor(name: string): string {
  let hash = 2166136261;
  for (const c of name.toLowerCase().replace(/\.$/, "")) {
    hash = Math.imul(hash ^ c.charCodeAt(0), 16777619) >>> 0;
  }
  return `10.${(hash >>> 16) & 0xff}.${(hash >>> 8) & 0xff}.${hash & 0xff}`;
}

/** Renders A record data as dotted quad. */
export function formatA(data: Uint8Array): string {
  return Array.from(data).join(".");
}

/**
 * Answers a query the way the test upstream does: A records from {@linkcode addressFor};
 * TXT for `bigN.<anything>` is N bytes of text in 200-byte strings; `nx.` names get
 * NXDOMAIN; an OPT record is echoed when the query had one.
 */
export function answerFor(query: Uint8Array): Uint8Array {
  const parsed = parseMessage(query);
  const q = parsed.question;
  let questionEnd = 12;
  if (q) {
    const [, next] = readName(query, 12);
    questionEnd = next + 4;
  }
  const header = query.slice(0, questionEnd);
  header[2] = 0x80 | (query[2] & 0x79);
  header[3] = 0x80;
  const records: number[] = [];
  let ancount = 0;
  const name = q?.name.toLowerCase() ?? "";
  if (q && name.startsWith("nx.")) {
    header[3] |= 3;
  } else if (q && q.type === 1) {
    ancount = 1;
    records.push(
      0xc0,
      12,
      0,
      1,
      0,
      1,
      0,
      0,
      0,
      60,
      0,
      4,
      ...addressFor(q.name).split(".").map(Number),
    );
  } else if (q && q.type === 16) {
    const big = /^big(\d+)\./.exec(name);
    const size = big ? Number(big[1]) : q.name.length;
    const text = big ? "x".repeat(size) : q.name;
    const rdata: number[] = [];
    for (let at = 0; at < text.length; at += 200) {
      const chunk = new TextEncoder().encode(text.slice(at, at + 200));
      rdata.push(chunk.length, ...chunk);
    }
    ancount = 1;
    records.push(
      0xc0,
      12,
      0,
      16,
      0,
      1,
      0,
      0,
      0,
      60,
      rdata.length >> 8,
      rdata.length & 0xff,
      ...rdata,
    );
  }
  const opt = parsed.opt
    ? [0, 0, 41, 0x04, 0xd0, 0, 0, parsed.opt.dnssecOk ? 0x80 : 0, 0, 0, 0]
    : [];
  header[6] = 0;
  header[7] = ancount;
  header[8] = 0;
  header[9] = 0;
  header[10] = 0;
  header[11] = opt.length > 0 ? 1 : 0;
  const out = new Uint8Array(header.length + records.length + opt.length);
  out.set(header);
  out.set(records, header.length);
  out.set(opt, header.length + records.length);
  return out;
}

/** `buffer` followed by the first `n` octets of `chunk`, in a new array (stream reassembly). */
export function appendChunk(
  buffer: Uint8Array,
  chunk: Uint8Array,
  n: number,
): Uint8Array<ArrayBuffer> {
  const joined = new Uint8Array(buffer.length + n);
  joined.set(buffer);
  joined.set(chunk.subarray(0, n), buffer.length);
  return joined;
}

/**
 * `query` (built with an OPT record: `ednsUdpSize` set, so the OPT is last and has no
 * options) with EDNS options, each `[code, data]`, added to its OPT.
 */
export function withEdnsOptions(query: Uint8Array, options: [number, number[]][]): Uint8Array {
  const bytes = options.flatMap(([code, data]) => [
    code >> 8,
    code & 0xff,
    data.length >> 8,
    data.length & 0xff,
    ...data,
  ]);
  const out = new Uint8Array(query.length + bytes.length);
  out.set(query);
  const rdlength = query.length - 2;
  const length = ((query[rdlength] << 8) | query[rdlength + 1]) + bytes.length;
  out[rdlength] = length >> 8;
  out[rdlength + 1] = length & 0xff;
  out.set(bytes, query.length);
  return out;
}

/** {@linkcode withEdnsOptions} with one option. */
export function withEdnsOption(query: Uint8Array, code: number, data: number[] = []): Uint8Array {
  return withEdnsOptions(query, [[code, data]]);
}
