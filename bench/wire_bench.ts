/**
 * Micro-benchmarks of the wire-format hot path: `deno bench bench/wire_bench.ts`
 * (or `deno task bench`). Numbers go in bench/README.md.
 */
import { cacheKeyHash } from "../src/dns/cache_key.ts";
import { buildUpstreamQuery, stripResponseOpt } from "../src/dns/edns.ts";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../src/dns/message.ts";
import { inspectQuery, QueryInfo } from "../src/dns/query.ts";
import { answersQuestion, truncateResponse } from "../src/dns/response.ts";
import { writeAgedTtls } from "../src/dns/ttl.ts";
import { getRcode, sameQuestion, setId } from "../src/dns/wire.ts";
import { answerFor, buildQuery, encodeName } from "../tests/support/dns.ts";

const query = buildQuery("www.Example.com", { id: 0x1234, ednsUdpSize: 1232 });
const answer = answerFor(query);
const big = answerFor(buildQuery("big3000.example.com", { type: 16, ednsUdpSize: 1232 }));
const info = new QueryInfo();
inspectQuery(query, info);
const questionEnd = info.questionEnd;
const frame = new Uint8Array(4096);

Deno.bench("inspectQuery (header, question, OPT)", { group: "parse", baseline: true }, () => {
  inspectQuery(query, info);
});

Deno.bench("header only: rcode + id", { group: "parse" }, () => {
  getRcode(answer);
  setId(answer, 0x1234);
});

Deno.bench("answersQuestion (case-insensitive name compare)", () => {
  answersQuestion(answer, query, questionEnd);
});

Deno.bench("frame query with new ID (copy into write buffer)", () => {
  frame[0] = query.length >> 8;
  frame[1] = query.length & 0xff;
  frame.set(query, 2);
  frame[2] = 0xab;
  frame[3] = 0xcd;
});

Deno.bench("copy answer out of read buffer (slice)", () => {
  answer.slice(0, answer.length);
});

Deno.bench("truncateResponse 3 kB answer to 1232", () => {
  truncateResponse(big, 1232);
});

Deno.bench("truncateResponse no-op (fits)", () => {
  truncateResponse(answer, 1232);
});

// --- full response validation, upstream EDNS, TTLs and cache keys -----------------------

type Part = number | readonly number[] | Uint8Array;

function bytes(...parts: Part[]): Uint8Array {
  const out: number[] = [];
  for (const part of parts) {
    if (typeof part === "number") out.push(part);
    else out.push(...part);
  }
  return new Uint8Array(out);
}

const u16 = (n: number): number[] => [(n >> 8) & 0xff, n & 0xff];

function rr(owner: Part, type: number, ttl: number, rdata: Part): Uint8Array {
  const data = bytes(rdata);
  return bytes(owner, u16(type), u16(1), u16(ttl >>> 16), u16(ttl), u16(data.length), data);
}

function rrsig(covered: number, signatureLength: number): Uint8Array {
  const fixed = [
    ...u16(covered),
    13,
    2,
    0,
    0,
    0x0e,
    0x10,
    0x65,
    0,
    0,
    0,
    0x64,
    0,
    0,
    0,
    0x12,
    0x34,
  ];
  return bytes(fixed, encodeName("example.com"), new Uint8Array(signatureLength).fill(0x42));
}

const header = (qd: number, an: number, ns: number, ar: number) =>
  bytes(0x12, 0x34, 0x81, 0xa0, u16(qd), u16(an), u16(ns), u16(ar));
const WWW = bytes(encodeName("www.example.com"), u16(1), u16(1)); // at 12; example.com at 16
const EDNS = bytes(0, u16(41), u16(1232), 0, 0, 0x80, 0, u16(0));

// www.example.com CNAME cdn.example.net (data at 45, example.net at 49), two A records.
const typical = bytes(
  header(1, 3, 0, 1),
  WWW,
  rr([0xc0, 12], 5, 300, encodeName("cdn.example.net")),
  rr([0xc0, 45], 1, 20, [192, 0, 2, 1]),
  rr([0xc0, 45], 1, 20, [192, 0, 2, 2]),
  EDNS,
);
// A DNSSEC answer: A RRset + RRSIG, NS RRset + RRSIG, glue, OPT with DO.
const nsNames = [1, 2, 3, 4].map((i) => bytes(3, 0x6e, 0x73, 0x30 + i, 0xc0, 16));
const signed = bytes(
  header(1, 3, 5, 9),
  WWW,
  rr([0xc0, 12], 1, 3600, [192, 0, 2, 1]),
  rr([0xc0, 12], 1, 3600, [192, 0, 2, 2]),
  rr([0xc0, 12], 46, 3600, rrsig(1, 256)),
  ...nsNames.map((ns) => rr([0xc0, 16], 2, 86400, ns)),
  rr([0xc0, 16], 46, 86400, rrsig(2, 256)),
  ...nsNames.map((_, i) => rr(encodeName(`ns${i + 1}.example.com`), 1, 86400, [192, 0, 2, i])),
  ...nsNames.map((_, i) => rr(encodeName(`ns${i + 1}.example.com`), 28, 86400, new Uint8Array(16))),
  EDNS,
);
const responseInfo = new ResponseInfo();
const typicalInfo = new ResponseInfo();
const signedInfo = new ResponseInfo();
if (!analyzeResponse(typical, typicalInfo) || !analyzeResponse(signed, signedInfo)) {
  throw new Error(`bench fixture invalid: ${typicalInfo.reason} ${signedInfo.reason}`);
}
const clientQuery = buildQuery("www.Example.com", {
  id: 0x1234,
  ednsUdpSize: 4096,
  dnssecOk: true,
});
const clientInfo = new QueryInfo();
inspectQuery(clientQuery, clientInfo);
const upstreamBuffer = new Uint8Array(512);
const aged = signed.slice();
const stripBuffer = new Uint8Array(512);

Deno.bench(`analyzeResponse ${typical.length}-byte CNAME + A answer`, {
  group: "analyze",
  baseline: true,
}, () => {
  analyzeResponse(typical, responseInfo);
});

Deno.bench(`analyzeResponse ${signed.length}-byte DNSSEC answer (2 RRSIGs, 18 RRs)`, {
  group: "analyze",
}, () => {
  analyzeResponse(signed, responseInfo);
});

Deno.bench("analyze + responseAnswersQuery (typical)", { group: "analyze" }, () => {
  analyzeResponse(typical, responseInfo);
  responseAnswersQuery(typical, responseInfo, clientQuery, clientInfo.questionEnd);
});

Deno.bench("buildUpstreamQuery padded, into a reused buffer", { group: "upstream" }, () => {
  buildUpstreamQuery(clientQuery, clientInfo, true, upstreamBuffer);
});

Deno.bench("buildUpstreamQuery padded, new array", { group: "upstream" }, () => {
  buildUpstreamQuery(clientQuery, clientInfo, true);
});

Deno.bench("stripResponseOpt keepOpt=false, new array", { group: "upstream" }, () => {
  stripResponseOpt(typical, typicalInfo, false);
});

Deno.bench("stripResponseOpt keepOpt=false, into a reused buffer", { group: "upstream" }, () => {
  stripResponseOpt(typical, typicalInfo, false, stripBuffer);
});

Deno.bench("cacheKeyHash www.Example.com A +DO +RD", { group: "cache" }, () => {
  cacheKeyHash(clientQuery, clientInfo.questionEnd, 9);
});

Deno.bench("sameQuestion (same question, other case)", { group: "cache" }, () => {
  sameQuestion(clientQuery, clientInfo.questionEnd, typical, 33);
});

Deno.bench("writeAgedTtls 18 records", { group: "cache" }, () => {
  writeAgedTtls(aged, signed, signedInfo.ttlOffsets, signedInfo.ttlCount, 7);
});
