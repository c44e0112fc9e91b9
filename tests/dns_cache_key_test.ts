import assert from "node:assert/strict";
import {
  cacheKeyFlags,
  cacheKeyHash,
  KEY_AUTHENTIC_DATA,
  KEY_CHECKING_DISABLED,
  KEY_DNSSEC_OK,
  KEY_RECURSION_DESIRED,
} from "../src/dns/cache_key.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { inspectQuery, QueryInfo } from "../src/dns/query.ts";
import { sameQuestion } from "../src/dns/wire.ts";
import { answerFor, buildQuery } from "./support/dns.ts";

function info(msg: Uint8Array): QueryInfo {
  const out = new QueryInfo();
  inspectQuery(msg, out);
  return out;
}

/** The key flags of `msg` as the resolver computes them. */
function flags(msg: Uint8Array): number {
  const i = info(msg);
  return cacheKeyFlags(msg, i.dnssecOk, i.cd);
}

function hash(msg: Uint8Array, keyFlags = flags(msg)): number {
  return cacheKeyHash(msg, info(msg).questionEnd, keyFlags);
}

Deno.test("cacheKeyFlags: DO and CD from the query's analysis, AD and RD from its header", () => {
  const plain = buildQuery("www.example.com", { rd: false });
  assert.equal(flags(plain), 0);
  assert.equal(flags(buildQuery("www.example.com")), KEY_RECURSION_DESIRED);
  assert.equal(
    flags(buildQuery("www.example.com", { rd: false, ednsUdpSize: 1232, dnssecOk: true })),
    KEY_DNSSEC_OK,
  );
  const cd = buildQuery("www.example.com", { rd: false });
  cd[3] |= 0x10;
  assert.equal(flags(cd), KEY_CHECKING_DISABLED);
  const ad = buildQuery("www.example.com", { rd: false });
  ad[3] |= 0x20;
  assert.equal(flags(ad), KEY_AUTHENTIC_DATA);
  assert.deepEqual(
    [KEY_DNSSEC_OK, KEY_CHECKING_DISABLED, KEY_AUTHENTIC_DATA, KEY_RECURSION_DESIRED],
    [1, 2, 4, 8],
  );
});

Deno.test("cacheKeyHash: case and ID do not matter; name, type, class and each key bit do", () => {
  const base = hash(buildQuery("www.example.com", { id: 1 }));
  assert.ok(Number.isInteger(base) && base >= 0 && base < 2 ** 30);
  assert.equal(hash(buildQuery("WWW.EXAMPLE.COM", { id: 2, ednsUdpSize: 1232 })), base);
  assert.notEqual(hash(buildQuery("www.example.org")), base);
  assert.notEqual(hash(buildQuery("www.example.com", { type: 28 })), base);
  assert.notEqual(hash(buildQuery("www.example.com", { qclass: 3 })), base);
  const q = buildQuery("www.example.com");
  const each = [0, 1, 2, 4, 8, 15].map((f) => hash(q, f));
  assert.equal(new Set(each).size, each.length, "every flag changes the hash");
  // Only ASCII letters fold: "[" (0x5b) and "{" (0x7b) stay apart, as do "@" and "`".
  assert.notEqual(hash(buildQuery("a[.test")), hash(buildQuery("a{.test")));
  assert.notEqual(hash(buildQuery("a@.test")), hash(buildQuery("a`.test")));
});

Deno.test("cacheKeyHash and sameQuestion agree between a query and its response", () => {
  const query = buildQuery("Mixed.Case.test", { ednsUdpSize: 1232 });
  const response = answerFor(buildQuery("mixed.case.TEST"));
  const responseInfo = new ResponseInfo();
  assert.equal(analyzeResponse(response, responseInfo), true);
  const end = info(query).questionEnd;
  assert.equal(cacheKeyHash(response, responseInfo.questionEnd, 9), cacheKeyHash(query, end, 9));
  assert.equal(sameQuestion(query, end, response, responseInfo.questionEnd), true);
});

Deno.test("sameQuestion compares names ignoring ASCII case, then type and class; at an offset too", () => {
  const a = buildQuery("www.Example.com");
  const end = info(a).questionEnd;
  const same = (other: Uint8Array) => sameQuestion(a, end, other, info(other).questionEnd);
  assert.equal(same(buildQuery("WWW.EXAMPLE.COM", { id: 9 })), true);
  assert.equal(same(buildQuery("www.example.com.")), true);
  assert.equal(same(buildQuery("www.example.com", { type: 28 })), false);
  assert.equal(same(buildQuery("www.example.com", { qclass: 3 })), false);
  assert.equal(same(buildQuery("www.example.co")), false);
  assert.equal(same(buildQuery("ww.example.com")), false);
  assert.equal(same(buildQuery("www.examplf.com")), false);
  assert.equal(same(buildQuery("a[.test")), false);
  assert.equal(sameQuestion(buildQuery("a[.test"), 20, buildQuery("a{.test"), 20), false);
  // `a` inside a larger array at offset 100, as the cache keeps answers.
  const chunk = new Uint8Array(200);
  chunk.set(a, 100);
  const upper = buildQuery("WWW.EXAMPLE.COM");
  assert.equal(sameQuestion(chunk, end, upper, end, 100), true);
  assert.equal(sameQuestion(chunk, end, upper, end, 99), false);
  // Different lengths, or too short to hold a question, are never the same.
  assert.equal(sameQuestion(a, end, a, end - 1), false);
  assert.equal(sameQuestion(a, 16, a, 16), false);
  assert.equal(sameQuestion(a.subarray(0, end - 1), end, a, end), false);
});
