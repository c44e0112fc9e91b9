import assert from "node:assert/strict";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import {
  clampTtls,
  MAX_TTL,
  readTtl,
  writeAgedTtls,
  writeTtl,
  writeTtls,
  zeroHighTtls,
} from "../src/dns/ttl.ts";
import { bytes, encodeName, parseMessage, rr, u16, u32 } from "./support/dns.ts";

/**
 * A response to `ttl.test. A` with answers of the given TTLs, an OPT (whose TTL field holds
 * extended rcode 0, version 0 and DO: 0x00008000) in the middle of the additional section,
 * and one more A record after it with TTL `last`.
 */
function response(ttls: number[], last: number): Uint8Array {
  const question = bytes(encodeName("ttl.test"), u16(1), u16(1));
  const answers = ttls.map((ttl, i) => rr(1, ttl, [192, 0, 2, i]));
  const opt = bytes(0, u16(41), u16(1232), u32(0x8000), u16(0));
  return bytes(
    0,
    1,
    0x81,
    0x80,
    u16(1),
    u16(ttls.length),
    u16(0),
    u16(2),
    question,
    ...answers,
    opt,
    rr(1, last, [198, 51, 100, 1]),
  );
}

function analyzed(msg: Uint8Array): ResponseInfo {
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(msg, info), true, info.reason);
  return info;
}

function recordTtls(msg: Uint8Array): number[] {
  const parsed = parseMessage(msg);
  return [...parsed.answers, ...parsed.authority, ...parsed.additional]
    .filter((r) => r.type !== 41)
    .map((r) => r.ttl);
}

/** The OPT record's bytes: never touched by the TTL writers. */
function optBytes(msg: Uint8Array, info: ResponseInfo): number[] {
  return Array.from(msg.subarray(info.optStart, info.optEnd));
}

Deno.test("readTtl and writeTtl: big-endian, top bit set reads as 0", () => {
  assert.equal(readTtl(new Uint8Array([0, 0, 0x0e, 0x10]), 0), 3600);
  assert.equal(readTtl(new Uint8Array([0x7f, 0xff, 0xff, 0xff]), 0), MAX_TTL);
  assert.equal(readTtl(new Uint8Array([0x80, 0, 0, 0]), 0), 0);
  assert.equal(readTtl(new Uint8Array([0xff, 0xff, 0xff, 0xff]), 0), 0);
  const field = new Uint8Array(6);
  writeTtl(field, 1, 0x01020304);
  assert.deepEqual(Array.from(field), [0, 1, 2, 3, 4, 0]);
  writeTtl(field, 1, MAX_TTL);
  assert.deepEqual(Array.from(field), [0, 0x7f, 0xff, 0xff, 0xff, 0]);
});

Deno.test("clampTtls clamps every TTL but OPT's into [min, max]", () => {
  const msg = response([0, 4, 60, 86400, 604800, 0x80000005], 1);
  const info = analyzed(msg);
  const opt = optBytes(msg, info);
  assert.equal(info.ttlCount, 7);
  clampTtls(msg, info.ttlOffsets, info.ttlCount, 5, 86400);
  assert.deepEqual(recordTtls(msg), [5, 5, 60, 86400, 86400, 5, 5]);
  assert.deepEqual(optBytes(msg, info), opt);
  // The top-bit TTL becomes 0 even when the floor is 0.
  const zero = response([0x80000005, 30], 0xffffffff);
  const zeroInfo = analyzed(zero);
  clampTtls(zero, zeroInfo.ttlOffsets, zeroInfo.ttlCount, 0, 3600);
  assert.deepEqual(recordTtls(zero), [0, 30, 0]);
  // Bounds beyond the 31-bit range and a floor above the ceiling.
  const wide = response([0x7fffffff, 100], 7);
  const wideInfo = analyzed(wide);
  clampTtls(wide, wideInfo.ttlOffsets, wideInfo.ttlCount, -5, 2 ** 40);
  assert.deepEqual(recordTtls(wide), [0x7fffffff, 100, 7]);
  clampTtls(wide, wideInfo.ttlOffsets, wideInfo.ttlCount, 500, 50);
  assert.deepEqual(recordTtls(wide), [50, 50, 50]);
});

Deno.test("clampTtls touches only the first `count` offsets", () => {
  const msg = response([1, 2, 3], 4);
  const info = analyzed(msg);
  clampTtls(msg, info.ttlOffsets, 2, 10, 100);
  assert.deepEqual(recordTtls(msg), [10, 10, 3, 4]);
});

Deno.test("writeAgedTtls writes max(0, ttl - elapsed) into a copy", () => {
  const stored = response([300, 60, 10, 0, 0x80000100], 3600);
  const info = analyzed(stored);
  const before = stored.slice();
  const reply = stored.slice();
  reply[0] = 0xaa; // another ID
  writeAgedTtls(reply, stored, info.ttlOffsets, info.ttlCount, 42);
  assert.deepEqual(recordTtls(reply), [258, 18, 0, 0, 0, 3558]);
  assert.deepEqual(stored, before, "the source is untouched");
  assert.equal(reply[0], 0xaa);
  assert.deepEqual(optBytes(reply, info), optBytes(stored, info));
  // Fractions are dropped; negative elapsed time counts as 0; in place works.
  writeAgedTtls(reply, stored, info.ttlOffsets, info.ttlCount, 1.9);
  assert.deepEqual(recordTtls(reply), [299, 59, 9, 0, 0, 3599]);
  writeAgedTtls(reply, stored, info.ttlOffsets, info.ttlCount, -10);
  assert.deepEqual(recordTtls(reply), [300, 60, 10, 0, 0, 3600]);
  const inPlace = stored.slice();
  writeAgedTtls(inPlace, inPlace, info.ttlOffsets, info.ttlCount, 100);
  assert.deepEqual(recordTtls(inPlace), [200, 0, 0, 0, 0, 3500]);
});

Deno.test("writeTtls sets every TTL but OPT's (serve-stale's 30 seconds)", () => {
  const msg = response([300, 0, 0xffffffff], 86400);
  const info = analyzed(msg);
  const opt = optBytes(msg, info);
  writeTtls(msg, info.ttlOffsets, info.ttlCount, 30);
  assert.deepEqual(recordTtls(msg), [30, 30, 30, 30]);
  assert.deepEqual(optBytes(msg, info), opt);
  writeTtls(msg, info.ttlOffsets, info.ttlCount, 2 ** 32);
  assert.deepEqual(recordTtls(msg), [MAX_TTL, MAX_TTL, MAX_TTL, MAX_TTL]);
  writeTtls(msg, info.ttlOffsets, info.ttlCount, -1);
  assert.deepEqual(recordTtls(msg), [0, 0, 0, 0]);
});

Deno.test("zeroHighTtls: TTLs with the top bit set become 0 (RFC 2181 section 8), others stay", () => {
  const msg = new Uint8Array([
    0x80,
    0,
    0,
    1,
    0x7f,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0xff,
    0,
    0,
    1,
    44,
  ]);
  assert.equal(zeroHighTtls(msg, new Uint32Array([0, 4, 8, 12]), 4), 2);
  assert.deepEqual([...msg], [0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 1, 44]);
  assert.equal(zeroHighTtls(msg, new Uint32Array([0, 4, 8, 12]), 4), 0);
});
