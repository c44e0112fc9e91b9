/**
 * Seeded packet fuzzing shared by `tests/fuzz_test.ts` (a few thousand packets per run) and
 * `scripts/fuzz.ts` (`deno task fuzz`, millions): generators of hostile DNS messages
 * (random, built from parts, and mutations of valid ones: truncations, bit flips, pointer
 * loops, huge counts, every opcode and meta type, odd OPT options, TSIG) and
 * {@linkcode checkParsers}, which runs one message through every wire-format function the
 * proxy applies to client queries and upstream answers and checks what must hold of the
 * results. A failure names the seed and the message in hex, so it can be replayed.
 *
 * @module
 */

import { buildUpstreamQuery, QUERY_PADDING_BLOCK, stripResponseOpt } from "../../src/dns/edns.ts";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../../src/dns/message.ts";
import {
  inspectQuery,
  MAX_UPSTREAM_QUERY_SIZE,
  QueryInfo,
  QueryVerdict,
  verdictRcode,
} from "../../src/dns/query.ts";
import { buildErrorResponse, EdeCode, truncateResponse } from "../../src/dns/response.ts";
import { parseMessage } from "./dns.ts";

/** A small, fast, seeded generator (mulberry32): the same seed gives the same packets. */
export class Rng {
  #state: number;

  /** Starts from `seed` (any 32-bit number). */
  constructor(seed: number) {
    this.#state = seed >>> 0;
  }

  /** A uniformly random 32-bit unsigned integer. */
  u32(): number {
    let t = (this.#state = (this.#state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  }

  /** An integer in `[0, n)`. */
  int(n: number): number {
    return n <= 1 ? 0 : this.u32() % n;
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.u32() / 4294967296 < p;
  }

  /** One element of `items`. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }

  /** `n` random bytes. */
  bytes(n: number): Uint8Array {
    const out = new Uint8Array(n);
    for (let i = 0; i < n; i++) out[i] = this.u32() & 0xff;
    return out;
  }
}

/** A fresh random seed (for runs that do not ask for one). */
export function randomSeed(): number {
  return crypto.getRandomValues(new Uint32Array(1))[0];
}

/** Seed from `FUZZ_SEED` when set, else a random one. */
export function seedFromEnv(): number {
  let text: string | undefined;
  try {
    text = Deno.env.get("FUZZ_SEED");
  } catch {
    text = undefined;
  }
  if (text === undefined || text.trim() === "") return randomSeed();
  const seed = Number(text);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xffffffff) {
    throw new Error(`FUZZ_SEED: "${text}" is not a 32-bit unsigned integer`);
  }
  return seed;
}

/** Lowercase hex of `bytes`, for replaying a failure. */
export function hex(bytes: Uint8Array): string {
  let out = "";
  for (const b of bytes) out += b.toString(16).padStart(2, "0");
  return out;
}

/** The bytes of a hex string. */
export function fromHex(text: string): Uint8Array {
  const clean = text.replace(/\s+/g, "");
  const out = new Uint8Array(clean.length >> 1);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** QTYPEs worth trying: ordinary, meta (128-255), zero, OPT, the largest. */
export const INTERESTING_QTYPES: readonly number[] = [
  1,
  2,
  5,
  6,
  12,
  15,
  16,
  28,
  33,
  35,
  39,
  41,
  43,
  46,
  48,
  64,
  65,
  0,
  99,
  127,
  128,
  129,
  200,
  248,
  249,
  250,
  251,
  252,
  253,
  254,
  255,
  256,
  32768,
  65280,
  65535,
];

/** QCLASSes worth trying: IN, CH, HS, NONE, ANY, zero, reserved. */
export const INTERESTING_QCLASSES: readonly number[] = [1, 1, 1, 1, 3, 4, 254, 255, 0, 2, 65535];

/** EDNS option codes worth trying. */
const OPTION_CODES: readonly number[] = [3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 65001];

/** A growable byte list. */
class Bytes {
  readonly data: number[] = [];
  u8(value: number): this {
    this.data.push(value & 0xff);
    return this;
  }
  u16(value: number): this {
    this.data.push((value >> 8) & 0xff, value & 0xff);
    return this;
  }
  u32(value: number): this {
    return this.u16(value >>> 16).u16(value & 0xffff);
  }
  add(bytes: ArrayLike<number>): this {
    for (let i = 0; i < bytes.length; i++) this.data.push(bytes[i] & 0xff);
    return this;
  }
  get length(): number {
    return this.data.length;
  }
  done(): Uint8Array {
    return new Uint8Array(this.data);
  }
}

/** A random name in wire form: mostly ordinary, sometimes long, odd bytes, or bad labels. */
function randomName(rng: Rng, allowCompression: boolean): number[] {
  const out: number[] = [];
  const shape = rng.int(12);
  if (shape === 0) return [0]; // the root
  if (shape === 1 && allowCompression) return [0xc0, 12]; // pointer to the question
  const labels = shape === 2 ? 40 + rng.int(100) : 1 + rng.int(5);
  let total = 0;
  for (let i = 0; i < labels; i++) {
    const length = shape === 3 ? 63 : shape === 4 ? rng.int(70) : 1 + rng.int(12);
    if (shape !== 2 && total + length + 1 > 254) break;
    out.push(length);
    for (let j = 0; j < length; j++) {
      out.push(
        shape === 5 ? rng.u32() & 0xff : rng.pick([0x61, 0x62, 0x41, 0x2d, 0x30, 0x2e, 0x5c]) +
          (rng.chance(0.5) ? rng.int(20) : 0),
      );
    }
    total += length + 1;
  }
  if (shape === 6) out.push(0x40 + rng.int(0x40)); // extended label type
  else if (shape === 7) out.push(0x80 + rng.int(0x40)); // reserved label type
  else if (shape === 8 && allowCompression) out.push(0xc0 | rng.int(4), rng.u32() & 0xff);
  else out.push(0);
  return out;
}

/** An EDNS option: a plausible one, an empty one, or one whose length lies. */
function randomOption(rng: Rng, out: Bytes): void {
  const code = rng.pick(OPTION_CODES);
  switch (rng.int(8)) {
    case 0: // lies about its length
      out.u16(code).u16(rng.pick([1, 40, 300, 65535])).add(rng.bytes(rng.int(8)));
      return;
    case 1: // empty
      out.u16(code).u16(0);
      return;
    case 2: // client subnet, well formed or not
      out.u16(8).u16(4 + 4).u16(rng.pick([1, 2, 0, 3])).u8(rng.int(140)).u8(rng.int(140))
        .add(rng.bytes(4));
      return;
    case 3: // cookie: 8, 16 or 40 octets, or a wrong length
      {
        const length = rng.pick([8, 16, 40, 7, 41, 0]);
        out.u16(10).u16(length).add(rng.bytes(length));
      }
      return;
    case 4: // large padding
      {
        const length = rng.pick([0, 1, 127, 468, 1000]);
        out.u16(12).u16(length).add(new Uint8Array(length));
      }
      return;
    default: {
      const length = rng.int(24);
      out.u16(code).u16(length).add(rng.bytes(length));
    }
  }
}

/** An OPT record: owner, type, class (UDP size), TTL (rcode, version, flags), options. */
function randomOpt(rng: Rng, out: Bytes): void {
  out.add(rng.chance(0.95) ? [0] : randomName(rng, false));
  out.u16(41).u16(rng.pick([0, 512, 1232, 4096, 65535, rng.int(65536)]));
  out.u8(rng.chance(0.9) ? 0 : rng.int(256)); // extended rcode
  out.u8(rng.chance(0.9) ? 0 : rng.pick([1, 2, 255])); // version
  out.u16(rng.chance(0.5) ? 0x8000 : rng.chance(0.8) ? 0 : rng.int(65536)); // DO, Z
  const options = new Bytes();
  const count = rng.chance(0.4) ? 0 : 1 + rng.int(4);
  for (let i = 0; i < count; i++) randomOption(rng, options);
  const declared = rng.chance(0.93) ? options.length : rng.int(options.length + 8);
  out.u16(declared).add(options.data);
}

/** A TSIG record (RFC 8945 section 4.2): whole, or cut somewhere. */
function randomTsig(rng: Rng, out: Bytes): void {
  out.add(randomName(rng, false)).u16(250).u16(255).u32(0);
  const data = new Bytes();
  data.add([11, ...new TextEncoder().encode("hmac-sha256"), 0]);
  data.u16(0).u32(rng.u32()).u16(300); // time signed (48 bits), fudge
  const macLength = rng.pick([0, 16, 32]);
  data.u16(macLength).add(rng.bytes(macLength)).u16(rng.int(65536)).u16(0);
  const other = rng.chance(0.8) ? 0 : rng.int(8);
  data.u16(other).add(rng.bytes(other));
  const cut = rng.chance(0.8) ? data.length : rng.int(data.length);
  out.u16(cut).add(data.data.slice(0, cut));
}

/** Some other record: random owner, type, class, TTL and data. */
function randomRecord(rng: Rng, out: Bytes, compression: boolean): void {
  out.add(randomName(rng, compression)).u16(rng.pick(INTERESTING_QTYPES)).u16(1).u32(rng.u32());
  const length = rng.int(20);
  out.u16(length).add(rng.bytes(length));
}

/** A header: mostly a plain query, sometimes every flag, opcode and count at random. */
function randomHeader(rng: Rng, out: Bytes, counts: number[]): void {
  out.u16(rng.int(65536));
  let flags = rng.chance(0.7) ? 0x0100 : rng.int(65536); // RD, or anything
  if (rng.chance(0.85)) flags &= ~0x8000; // QR mostly clear
  if (rng.chance(0.25)) flags = (flags & ~0x7800) | (rng.int(16) << 11); // any opcode
  if (rng.chance(0.1)) flags |= 0x0200; // TC
  out.u16(flags);
  for (const count of counts) out.u16(rng.chance(0.05) ? rng.pick([0xffff, 2, 0, 100]) : count);
}

/** A query built from parts: header, question, and a mix of OPT, TSIG and other records. */
export function structuredQuery(rng: Rng): Uint8Array {
  const additional = new Bytes();
  let arcount = 0;
  if (rng.chance(0.6)) {
    randomOpt(rng, additional);
    arcount++;
  }
  if (rng.chance(0.1)) {
    randomOpt(rng, additional);
    arcount++;
  }
  if (rng.chance(0.12)) {
    randomTsig(rng, additional);
    arcount++;
  }
  if (rng.chance(0.08)) {
    randomRecord(rng, additional, false);
    arcount++;
  }
  const qdcount = rng.chance(0.93) ? 1 : rng.pick([0, 2, 3]);
  const answers = new Bytes();
  let ancount = 0;
  let nscount = 0;
  if (rng.chance(0.05)) {
    randomRecord(rng, answers, true);
    ancount++;
  }
  if (rng.chance(0.05)) {
    randomRecord(rng, answers, true);
    nscount++;
  }
  const out = new Bytes();
  randomHeader(rng, out, [qdcount, ancount, nscount, arcount]);
  for (let i = 0; i < Math.max(1, qdcount); i++) {
    out.add(randomName(rng, rng.chance(0.1)));
    out.u16(rng.chance(0.6) ? rng.pick([1, 28, 255, 16]) : rng.pick(INTERESTING_QTYPES));
    out.u16(rng.pick(INTERESTING_QCLASSES));
  }
  out.add(answers.data).add(additional.data);
  return out.done();
}

/** A valid answer for `query`'s question, rich in names and compression, or a failure. */
export function structuredResponse(rng: Rng, query: Uint8Array): Uint8Array {
  const info = new QueryInfo();
  inspectQuery(query, info);
  const questionEnd = info.questionEnd > 0 ? info.questionEnd : 12;
  const out = new Bytes();
  out.add(query.subarray(0, 2));
  out.u16(0x8180 | (rng.chance(0.2) ? rng.int(16) : 0) | (rng.chance(0.05) ? 0x0200 : 0));
  const sections = [0, 0, 0];
  const body = new Bytes();
  const pointer = [0xc0, 12];
  const kinds = rng.int(4);
  for (let i = 0; i < kinds + 1; i++) {
    const section = rng.chance(0.7) ? 0 : rng.chance(0.5) ? 1 : 2;
    sections[section]++;
    body.add(rng.chance(0.8) ? pointer : randomName(rng, true));
    const type = rng.pick([1, 5, 6, 15, 16, 28, 33, 35, 2, 12, 39, 46, 250]);
    body.u16(type).u16(1).u32(rng.chance(0.1) ? 0xffffffff : rng.int(86400));
    const data = new Bytes();
    switch (type) {
      case 1:
        data.add(rng.bytes(4));
        break;
      case 28:
        data.add(rng.bytes(16));
        break;
      case 5:
      case 2:
      case 12:
      case 39:
        data.add(rng.chance(0.5) ? pointer : randomName(rng, true));
        break;
      case 6:
        data.add(pointer).add(randomName(rng, true)).u32(1).u32(2).u32(3).u32(4).u32(300);
        break;
      case 15:
        data.u16(10).add(pointer);
        break;
      case 33:
        data.u16(1).u16(2).u16(53).add(randomName(rng, true));
        break;
      case 35:
        data.u16(1).u16(2).add([1, 0x75, 0]).add([0]).add(randomName(rng, true));
        break;
      default:
        data.add(rng.bytes(rng.int(40)));
    }
    body.u16(data.length).add(data.data);
  }
  if (rng.chance(0.6)) {
    randomOpt(rng, body);
    sections[2]++;
  }
  out.u16(info.questionEnd > 0 ? 1 : 0).u16(sections[0]).u16(sections[1]).u16(sections[2]);
  out.add(query.subarray(12, questionEnd)).add(body.data);
  return out.done();
}

/** Makes a new message from `msg` by one or more random cuts, flips, writes and pastes. */
export function mutate(rng: Rng, msg: Uint8Array): Uint8Array {
  let out = msg.slice();
  const rounds = 1 + rng.int(3);
  for (let round = 0; round < rounds; round++) {
    const length = out.length;
    switch (rng.int(10)) {
      case 0: // truncate
        out = out.slice(0, rng.int(length + 1));
        break;
      case 1: // flip bits
      case 2:
        for (let i = rng.int(8) + 1; i > 0 && length > 0; i--) {
          out[rng.int(length)] ^= 1 << rng.int(8);
        }
        break;
      case 3: // write bytes
        for (let i = rng.int(4) + 1; i > 0 && length > 0; i--) {
          out[rng.int(length)] = rng.pick([0, 0xff, 0xc0, 0x3f, 0x40, 0x80, rng.int(256)]);
        }
        break;
      case 4: { // a compression pointer (loops, forwards, into the header)
        if (length < 14) break;
        const at = 12 + rng.int(length - 13);
        const target = rng.pick([at, at - 2, at + 2, 12, 0, 6, rng.int(length)]);
        out[at] = 0xc0 | ((target >> 8) & 0x3f);
        out[at + 1] = target & 0xff;
        break;
      }
      case 5: // huge or wrong counts
        if (length >= 12) {
          const field = 4 + 2 * rng.int(4);
          const value = rng.pick([0xffff, 0x8000, 0, 1, 2, rng.int(65536)]);
          out[field] = value >> 8;
          out[field + 1] = value & 0xff;
        }
        break;
      case 6: { // insert bytes
        const at = rng.int(length + 1);
        const inserted = rng.bytes(1 + rng.int(16));
        const grown = new Uint8Array(length + inserted.length);
        grown.set(out.subarray(0, at));
        grown.set(inserted, at);
        grown.set(out.subarray(at), at + inserted.length);
        out = grown;
        break;
      }
      case 7: { // duplicate a region
        if (length === 0) break;
        const from = rng.int(length);
        const to = Math.min(length, from + 1 + rng.int(32));
        const grown = new Uint8Array(length + to - from);
        grown.set(out);
        grown.set(out.subarray(from, to), length);
        out = grown;
        break;
      }
      case 8: // opcode, QR, TC, rcode
        if (length >= 4) {
          out[2] = rng.pick([out[2] ^ 0x80, out[2] ^ 0x02, (out[2] & 0x87) | (rng.int(16) << 3)]);
          out[3] = rng.int(256);
        }
        break;
      default: // append garbage
      {
        const grown = new Uint8Array(length + 1 + rng.int(24));
        grown.set(out);
        grown.set(rng.bytes(grown.length - length), length);
        out = grown;
      }
    }
  }
  return out;
}

/** A well-formed standard query for `name` (A IN, RD), with or without EDNS. */
export function plainQuery(rng: Rng, name = "fuzz.test"): Uint8Array {
  const out = new Bytes();
  out.u16(rng.int(65536)).u16(0x0100).u16(1).u16(0).u16(0).u16(0);
  for (const label of name.split(".")) {
    out.u8(label.length).add(new TextEncoder().encode(label));
  }
  out.u8(0).u16(1).u16(1);
  if (rng.chance(0.5)) {
    out.data[11] = 1;
    out.add([0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
  }
  return out.done();
}

/** A hostile client message: built from parts, mutated, or plain random bytes. */
export function fuzzQuery(rng: Rng): Uint8Array {
  const kind = rng.int(10);
  if (kind === 0) return rng.bytes(rng.int(rng.chance(0.5) ? 20 : 600));
  const base = kind < 4 ? plainQuery(rng) : structuredQuery(rng);
  return kind % 2 === 0 ? mutate(rng, base) : base;
}

/** A hostile answer to `query`: valid, mutated, or random bytes with the query's ID. */
export function fuzzResponse(rng: Rng, query: Uint8Array): Uint8Array {
  const kind = rng.int(6);
  if (kind === 0) {
    const junk = rng.bytes(rng.int(300) + 2);
    junk.set(query.subarray(0, 2));
    return junk;
  }
  const base = structuredResponse(rng, query);
  return kind < 3 ? base : mutate(rng, base);
}

/** Raised by {@linkcode checkParsers} when a property does not hold. */
export class FuzzFailure extends Error {
  /** Creates a failure naming the message and what went wrong. */
  constructor(what: string, message: Uint8Array, cause?: unknown) {
    super(`${what}; message ${hex(message)}`, { cause });
    this.name = "FuzzFailure";
  }
}

const queryInfo = new QueryInfo();
const checkInfo = new QueryInfo();
const responseInfo = new ResponseInfo();
const checkResponseInfo = new ResponseInfo();

/** True when `msg` passes `analyzeResponse` (into a scratch info). */
function validResponse(msg: Uint8Array): boolean {
  return analyzeResponse(msg, checkResponseInfo);
}

function expect(ok: boolean, what: string, msg: Uint8Array): void {
  if (!ok) throw new FuzzFailure(what, msg);
}

/** Everything the proxy does to a client message, with the properties its results must have. */
export function checkQuery(msg: Uint8Array): QueryVerdict {
  const info = queryInfo;
  let verdict: QueryVerdict;
  try {
    verdict = inspectQuery(msg, info);
  } catch (error) {
    throw new FuzzFailure("inspectQuery threw", msg, error);
  }
  expect(verdict === info.verdict || verdict === QueryVerdict.FORWARD, "verdict recorded", msg);
  if (verdict === QueryVerdict.DROP) return verdict;
  expect(info.questionEnd === 0 || info.questionEnd === info.nameEnd + 4, "question extent", msg);
  expect(info.questionEnd <= msg.length, "question inside the message", msg);
  const rcodes = verdict === QueryVerdict.FORWARD ? [5, 2, 0] : [verdictRcode(verdict), 5];
  for (const rcode of rcodes) {
    for (const truncated of [false, true]) {
      let error: Uint8Array;
      try {
        error = buildErrorResponse(msg, info, rcode, { truncated });
      } catch (cause) {
        throw new FuzzFailure(`buildErrorResponse(rcode ${rcode}) threw`, msg, cause);
      }
      expect(error.length <= msg.length, `error response (rcode ${rcode}) larger than query`, msg);
      expect(validResponse(error), `error response (rcode ${rcode}) invalid`, msg);
      expect(error[0] === msg[0] && error[1] === msg[1], "error response keeps the ID", msg);
      if (info.questionEnd > 0) {
        expect(
          responseAnswersQuery(error, checkResponseInfo, msg, info.questionEnd),
          "error response answers the question",
          msg,
        );
      }
    }
  }
  const withEde = buildErrorResponse(msg, info, 2, {
    ede: { code: EdeCode.NETWORK_ERROR, text: "upstream reset" },
  });
  expect(validResponse(withEde), "SERVFAIL with EDE invalid", msg);
  if (verdict !== QueryVerdict.FORWARD) return verdict;
  const qtype = info.qtype;
  expect(
    qtype !== 0 && qtype !== 41 && !(qtype >= 128 && qtype < 255) && !info.tsig,
    "forwarded a type that must be answered locally",
    msg,
  );
  expect((msg[2] & 0x02) === 0 && (msg[2] & 0x78) === 0, "forwarded TC=1 or an opcode", msg);
  for (const padding of [true, false]) {
    let upstream: Uint8Array;
    try {
      upstream = buildUpstreamQuery(msg, info, padding);
    } catch (cause) {
      throw new FuzzFailure("buildUpstreamQuery threw", msg, cause);
    }
    if (padding) {
      expect(upstream.length % QUERY_PADDING_BLOCK === 0, "padded length not a multiple", msg);
    }
    expect(upstream.length <= MAX_UPSTREAM_QUERY_SIZE, "upstream query over 512 octets", msg);
    const again = inspectQuery(upstream, checkInfo);
    expect(
      again === QueryVerdict.FORWARD,
      `upstream query not forwardable (${checkInfo.reason})`,
      msg,
    );
    expect(checkInfo.questionEnd === info.questionEnd, "upstream question moved", msg);
    for (let i = 2; i < info.questionEnd; i++) {
      if (i >= 4 && i < 12) continue; // the counts
      expect(upstream[i] === msg[i], "upstream query changed the flags or question", msg);
    }
    expect(checkInfo.hasEdns && !checkInfo.tsig, "upstream query has exactly one OPT", msg);
    expect(upstream[11] === 1 && upstream[10] === 0, "upstream ARCOUNT is 1", msg);
    expect(checkInfo.dnssecOk === info.dnssecOk, "DO bit kept", msg);
  }
  return verdict;
}

/** Everything the proxy does to an upstream answer, with the properties its results must have. */
export function checkResponse(msg: Uint8Array, query: Uint8Array | null): boolean {
  const info = responseInfo;
  let valid: boolean;
  try {
    valid = analyzeResponse(msg, info);
  } catch (error) {
    throw new FuzzFailure("analyzeResponse threw", msg, error);
  }
  if (query !== null && inspectQuery(query, checkInfo) === QueryVerdict.FORWARD && valid) {
    try {
      responseAnswersQuery(msg, info, query, checkInfo.questionEnd);
    } catch (error) {
      throw new FuzzFailure("responseAnswersQuery threw", msg, error);
    }
  }
  if (!valid) {
    // Never called on invalid answers by the proxy, but must not throw either.
    for (const size of [512, 12, msg.length - 1]) {
      try {
        truncateResponse(msg, size);
      } catch (error) {
        throw new FuzzFailure("truncateResponse threw on an invalid message", msg, error);
      }
    }
    return false;
  }
  expect(info.answerEnd <= info.authorityEnd && info.authorityEnd <= msg.length, "sections", msg);
  // An independent parser (tests/support/dns.ts) agrees that the message is whole.
  try {
    const parsed = parseMessage(msg);
    expect(parsed.answers.length === info.ancount, "answer count disagrees", msg);
  } catch (error) {
    throw new FuzzFailure("accepted, but the test parser rejects it", msg, error);
  }
  expect(info.optStart < 0 || info.optEnd <= msg.length, "OPT inside", msg);
  const optStart = info.optStart;
  const ancount = info.ancount;
  for (const keep of [false, true]) {
    // Re-analyze: stripResponseOpt reads only the OPT offsets.
    analyzeResponse(msg, info);
    let stripped: Uint8Array;
    try {
      stripped = stripResponseOpt(msg, info, keep);
    } catch (error) {
      throw new FuzzFailure("stripResponseOpt threw", msg, error);
    }
    expect(validResponse(stripped), `stripResponseOpt(keep ${keep}) made it invalid`, msg);
    if (!keep && optStart >= 0) expect(checkResponseInfo.optStart < 0, "OPT not removed", msg);
    expect(checkResponseInfo.ancount === ancount, "stripResponseOpt changed the answers", msg);
  }
  analyzeResponse(msg, info);
  const questionEnd = info.questionEnd;
  for (const size of [512, 12, questionEnd, msg.length - 1, 1232]) {
    let cut: Uint8Array;
    try {
      cut = truncateResponse(msg, size);
    } catch (error) {
      throw new FuzzFailure(`truncateResponse(${size}) threw`, msg, error);
    }
    if (cut === msg) {
      expect(msg.length <= size, `truncateResponse(${size}) returned an oversized message`, msg);
      continue;
    }
    expect(validResponse(cut), `truncateResponse(${size}) made it invalid`, msg);
    expect((cut[2] & 0x02) !== 0, `truncateResponse(${size}) did not set TC`, msg);
    expect(cut.length <= Math.max(size, questionEnd), `truncateResponse(${size}) too big`, msg);
  }
  return true;
}

/** What one {@linkcode checkParsers} run saw. */
export interface ParserTally {
  /** Messages checked. */
  messages: number;
  /** Client messages by verdict name. */
  verdicts: Record<string, number>;
  /** Upstream answers that were valid. */
  validResponses: number;
}

const VERDICT_NAMES = Object.fromEntries(
  Object.entries(QueryVerdict).map(([name, value]) => [value, name]),
);

/**
 * Runs `count` fuzzed client messages and as many fuzzed answers through the parsers.
 * Throws {@linkcode FuzzFailure} at the first property that does not hold.
 */
export function checkParsers(rng: Rng, count: number, tally?: ParserTally): ParserTally {
  const result = tally ?? { messages: 0, verdicts: {}, validResponses: 0 };
  for (let i = 0; i < count; i++) {
    const query = fuzzQuery(rng);
    const verdict = checkQuery(query);
    const name = VERDICT_NAMES[verdict] ?? String(verdict);
    result.verdicts[name] = (result.verdicts[name] ?? 0) + 1;
    const base = verdict === QueryVerdict.FORWARD ? query : plainQuery(rng);
    if (checkResponse(fuzzResponse(rng, base), base)) result.validResponses++;
    result.messages++;
  }
  return result;
}
