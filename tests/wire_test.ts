import assert from "node:assert/strict";
import { inspectQuery, QueryInfo, QueryVerdict } from "../src/dns/query.ts";
import {
  answersQuestion,
  buildErrorResponse,
  clientUdpLimit,
  truncateResponse,
} from "../src/dns/response.ts";
import { nameToString, Rcode, skipName, skipUncompressedName } from "../src/dns/wire.ts";
import { answerFor, buildQuery, encodeName, parseMessage } from "./support/dns.ts";

function verdict(bytes: Uint8Array): [QueryVerdict, QueryInfo] {
  const info = new QueryInfo();
  return [inspectQuery(bytes, info), info];
}

Deno.test("inspectQuery forwards a plain query and finds the question", () => {
  const query = buildQuery("Example.COM", { id: 1 });
  const [v, info] = verdict(query);
  assert.equal(v, QueryVerdict.FORWARD);
  assert.equal(info.questionEnd, query.length);
  assert.equal(info.qtype, 1);
  assert.equal(info.hasEdns, false);
});

Deno.test("inspectQuery reads EDNS size and DO bit", () => {
  const [v, info] = verdict(buildQuery("a.test", { ednsUdpSize: 4096, dnssecOk: true }));
  assert.equal(v, QueryVerdict.FORWARD);
  assert.equal(info.hasEdns, true);
  assert.equal(info.ednsUdpSize, 4096);
  assert.equal(info.dnssecOk, true);
  assert.equal(clientUdpLimit(info, 1232), 1232);
});

Deno.test("clientUdpLimit: 512 without EDNS, clamped advertised size with", () => {
  const [, plain] = verdict(buildQuery("a.test"));
  assert.equal(clientUdpLimit(plain, 1232), 512);
  const [, small] = verdict(buildQuery("a.test", { ednsUdpSize: 100 }));
  assert.equal(clientUdpLimit(small, 1232), 512);
  const [, mid] = verdict(buildQuery("a.test", { ednsUdpSize: 900 }));
  assert.equal(clientUdpLimit(mid, 1232), 900);
});

Deno.test("inspectQuery drops what has no readable header or is a response", () => {
  assert.equal(verdict(new Uint8Array(0))[0], QueryVerdict.DROP);
  assert.equal(verdict(new Uint8Array(11))[0], QueryVerdict.DROP);
  const response = answerFor(buildQuery("a.test"));
  assert.equal(verdict(response)[0], QueryVerdict.DROP);
});

Deno.test("inspectQuery answers FORMERR for malformed queries", () => {
  const base = buildQuery("www.example.com", { id: 9 });
  const cases: [string, Uint8Array][] = [];
  const noQuestion = base.slice(0, 12);
  noQuestion[5] = 0;
  cases.push(["qdcount 0", noQuestion]);
  const two = base.slice();
  two[5] = 2;
  cases.push(["qdcount 2 with one question", two]);
  cases.push(["truncated question", base.slice(0, base.length - 2)]);
  cases.push(["trailing byte", new Uint8Array([...base, 0])]);
  const pointer = new Uint8Array([...base.slice(0, 12), 0xc0, 0x0c, 0, 1, 0, 1]);
  cases.push(["compression pointer in question", pointer]);
  const longLabel = new Uint8Array([
    ...base.slice(0, 12),
    64,
    ...new Uint8Array(64),
    0,
    0,
    1,
    0,
    1,
  ]);
  cases.push(["label over 63", longLabel]);
  const longName: number[] = [];
  for (let i = 0; i < 5; i++) longName.push(63, ...new Uint8Array(63).fill(0x61));
  cases.push(["name over 255", new Uint8Array([...base.slice(0, 12), ...longName, 0, 0, 1, 0, 1])]);
  const answerCount = base.slice();
  answerCount[7] = 1;
  cases.push(["ancount 1 without records", answerCount]);
  const arcount = base.slice();
  arcount[11] = 1;
  cases.push(["arcount 1 without record", arcount]);
  const twoOpt = buildQuery("a.test", { ednsUdpSize: 1232 });
  const doubled = new Uint8Array([...twoOpt, ...twoOpt.slice(twoOpt.length - 11)]);
  doubled[11] = 2;
  cases.push(["two OPT records", doubled]);
  const optOwner = buildQuery("a.test", { ednsUdpSize: 1232 });
  const badOwner = new Uint8Array([
    ...optOwner.slice(0, optOwner.length - 11),
    1,
    0x61,
    0,
    ...optOwner.slice(optOwner.length - 10),
  ]);
  cases.push(["OPT not owned by root", badOwner]);
  for (const [name, bytes] of cases) {
    assert.equal(verdict(bytes)[0], QueryVerdict.FORMERR, name);
  }
});

Deno.test("inspectQuery answers NOTIMP for other opcodes and zone transfers", () => {
  const notify = buildQuery("example.com");
  notify[2] = (4 << 3) | 0; // NOTIFY
  assert.equal(verdict(notify)[0], QueryVerdict.NOTIMP);
  assert.equal(verdict(buildQuery("example.com", { type: 252 }))[0], QueryVerdict.NOTIMP);
  assert.equal(verdict(buildQuery("example.com", { type: 251 }))[0], QueryVerdict.NOTIMP);
});

Deno.test("buildErrorResponse keeps ID, question bytes and case, RD and CD", () => {
  const query = buildQuery("MiXeD.Example", { id: 0xbeef });
  query[3] |= 0x10; // CD
  const [, info] = verdict(query);
  const response = buildErrorResponse(query, info, Rcode.SERVFAIL);
  const parsed = parseMessage(response);
  assert.equal(parsed.id, 0xbeef);
  assert.equal(parsed.qr, true);
  assert.equal(parsed.rd, true);
  assert.equal(parsed.ra, true);
  assert.equal(parsed.cd, true);
  assert.equal(parsed.rcode, Rcode.SERVFAIL);
  assert.equal(parsed.question?.name, "MiXeD.Example.");
  assert.deepEqual(response.subarray(12, info.questionEnd), query.subarray(12, info.questionEnd));
  assert.equal(parsed.opt, null);
});

Deno.test("buildErrorResponse adds OPT with DO and an Extended DNS Error when the query had EDNS", () => {
  const query = buildQuery("a.test", { ednsUdpSize: 4096, dnssecOk: true });
  const [, info] = verdict(query);
  const response = buildErrorResponse(query, info, Rcode.SERVFAIL, {
    ede: { code: 22, text: "upstream timeout" },
  });
  const parsed = parseMessage(response);
  assert.ok(parsed.opt);
  assert.equal(parsed.opt.dnssecOk, true);
  assert.equal(parsed.opt.udpSize, 1232);
  const ede = parsed.opt.options.find((o) => o.code === 15);
  assert.ok(ede);
  assert.equal((ede.data[0] << 8) | ede.data[1], 22);
  assert.equal(new TextDecoder().decode(ede.data.subarray(2)), "upstream timeout");
});

Deno.test("buildErrorResponse without a readable question is a bare header", () => {
  const query = buildQuery("a.test", { id: 77 });
  const broken = query.slice(0, 14);
  const [v, info] = verdict(broken);
  assert.equal(v, QueryVerdict.FORMERR);
  const response = buildErrorResponse(broken, info, Rcode.FORMERR);
  assert.equal(response.length, 12);
  const parsed = parseMessage(response);
  assert.equal(parsed.id, 77);
  assert.equal(parsed.rcode, Rcode.FORMERR);
  assert.equal(parsed.question, null);
});

Deno.test("truncateResponse keeps header, question and OPT, sets TC, drops records", () => {
  const query = buildQuery("big3000.test", { type: 16, ednsUdpSize: 1232 });
  const full = answerFor(query);
  assert.ok(full.length > 3000);
  const cut = truncateResponse(full, 1232);
  const parsed = parseMessage(cut);
  assert.equal(parsed.tc, true);
  assert.equal(parsed.answers.length, 0);
  assert.equal(parsed.question?.name, "big3000.test.");
  assert.ok(parsed.opt);
  assert.deepEqual(cut.subarray(0, 2), full.subarray(0, 2));
  assert.equal(truncateResponse(cut, 1232), cut);
  const small = answerFor(buildQuery("small.test"));
  assert.equal(truncateResponse(small, 512), small);
});

Deno.test("truncateResponse survives a malformed response", () => {
  const garbage = new Uint8Array(600).fill(0xff);
  const cut = truncateResponse(garbage, 512);
  assert.equal(cut.length, 12);
  assert.equal(cut[2] & 0x02, 0x02);
});

Deno.test("answersQuestion matches name case-insensitively and type and class exactly", () => {
  const query = buildQuery("www.Example.com", { type: 1 });
  const [, info] = verdict(query);
  const response = answerFor(buildQuery("WWW.example.COM", { type: 1 }));
  assert.equal(answersQuestion(response, query, info.questionEnd), true);
  const otherType = answerFor(buildQuery("www.example.com", { type: 28 }));
  assert.equal(answersQuestion(otherType, query, info.questionEnd), false);
  const otherName = answerFor(buildQuery("www.example.org", { type: 1 }));
  assert.equal(answersQuestion(otherName, query, info.questionEnd), false);
  const longer = answerFor(buildQuery("www.example.com.au", { type: 1 }));
  assert.equal(answersQuestion(longer, query, info.questionEnd), false);
  assert.equal(answersQuestion(query, query, info.questionEnd), false, "QR=0 is no answer");
});

Deno.test("name helpers", () => {
  const name = encodeName("a.b.example");
  assert.equal(skipUncompressedName(name, 0, name.length), name.length);
  assert.equal(skipUncompressedName(name, 0, name.length - 1), -1);
  assert.equal(skipName(new Uint8Array([0xc0, 0x0c]), 0, 2), 2);
  assert.equal(skipName(new Uint8Array([0x80, 0x0c]), 0, 2), -1);
  assert.equal(nameToString(name, 0, name.length), "a.b.example.");
  const odd = new Uint8Array([3, 0x61, 0x2e, 0x01, 0]);
  assert.equal(nameToString(odd, 0, odd.length), "a\\.\\001.");
});
