import assert from "node:assert/strict";
import { questionHash, questionKeyEquals, questionKeyFlags } from "../src/dns/cache_key.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { inspectQuery, QueryInfo } from "../src/dns/query.ts";
import { answerFor, buildQuery } from "./support/dns.ts";

/** An independent FNV-1a over plain numbers. */
function fnv1a(octets: number[]): number {
  let hash = 0x811c9dc5;
  for (const octet of octets) hash = Math.imul(hash ^ octet, 0x01000193) >>> 0;
  return hash;
}

function questionEnd(msg: Uint8Array): number {
  const info = new QueryInfo();
  inspectQuery(msg, info);
  return info.questionEnd;
}

function hash(msg: Uint8Array, dnssecOk = false, cd = false): number {
  return questionHash(msg, questionEnd(msg), dnssecOk, cd);
}

Deno.test("questionHash is FNV-1a of the lower-cased question, then DO and CD", () => {
  const q = buildQuery("WwW.Example.Com", { type: 28 });
  const lower = [3, 119, 119, 119, 7, 101, 120, 97, 109, 112, 108, 101, 3, 99, 111, 109, 0];
  const tail = [0, 28, 0, 1];
  assert.equal(hash(q), fnv1a([...lower, ...tail, 0]));
  assert.equal(hash(q, true, false), fnv1a([...lower, ...tail, 1]));
  assert.equal(hash(q, false, true), fnv1a([...lower, ...tail, 2]));
  assert.equal(hash(q, true, true), fnv1a([...lower, ...tail, 3]));
  assert.ok(hash(q) >= 0 && hash(q) <= 0xffffffff && Number.isInteger(hash(q)));
});

Deno.test("questionHash: case and ID do not matter; name, type, class, DO, CD do", () => {
  const base = hash(buildQuery("www.example.com", { id: 1 }));
  assert.equal(hash(buildQuery("WWW.EXAMPLE.COM", { id: 2, ednsUdpSize: 1232 })), base);
  assert.notEqual(hash(buildQuery("www.example.org")), base);
  assert.notEqual(hash(buildQuery("www.example.com", { type: 28 })), base);
  assert.notEqual(hash(buildQuery("www.example.com", { qclass: 3 })), base);
  assert.notEqual(hash(buildQuery("www.example.com"), true), base);
  assert.notEqual(hash(buildQuery("www.example.com"), false, true), base);
  // Only ASCII letters fold: "[" (0x5b) and "{" (0x7b) stay apart, as do "@" and "`".
  assert.notEqual(hash(buildQuery("a[.test")), hash(buildQuery("a{.test")));
  assert.notEqual(hash(buildQuery("a@.test")), hash(buildQuery("a`.test")));
});

Deno.test("questionHash and questionKeyEquals agree between a query and its response", () => {
  const query = buildQuery("Mixed.Case.test", { ednsUdpSize: 1232 });
  const response = answerFor(buildQuery("mixed.case.TEST"));
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(response, info), true);
  assert.equal(
    questionHash(response, info.questionEnd, false, false),
    questionHash(query, questionEnd(query), false, false),
  );
  assert.equal(
    questionKeyEquals(query, questionEnd(query), 0, response, info.questionEnd, 0),
    true,
  );
});

Deno.test("questionKeyEquals compares names ignoring case, type, class and flags", () => {
  const a = buildQuery("www.Example.com");
  const end = questionEnd(a);
  const same = (other: Uint8Array, aFlags = 0, bFlags = 0) =>
    questionKeyEquals(a, end, aFlags, other, questionEnd(other), bFlags);
  assert.equal(same(buildQuery("WWW.EXAMPLE.COM")), true);
  assert.equal(same(buildQuery("www.example.com"), 1, 1), true);
  assert.equal(same(buildQuery("www.example.com"), 1, 0), false, "DO");
  assert.equal(same(buildQuery("www.example.com"), 2, 0), false, "CD");
  assert.equal(same(buildQuery("www.example.com", { type: 28 })), false);
  assert.equal(same(buildQuery("www.example.com", { qclass: 3 })), false);
  assert.equal(same(buildQuery("www.example.co")), false);
  assert.equal(same(buildQuery("ww.example.com")), false);
  assert.equal(same(buildQuery("www.examplf.com")), false);
  assert.equal(same(buildQuery("www.example.com.")), true);
  assert.deepEqual(
    [questionKeyFlags(false, false), questionKeyFlags(true, false), questionKeyFlags(false, true)],
    [0, 1, 2],
  );
});
