import assert from "node:assert/strict";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../src/dns/message.ts";
import { inspectQuery, QueryInfo } from "../src/dns/query.ts";
import { answersQuestion } from "../src/dns/response.ts";
import { checkName, MAX_POINTER_HOPS } from "../src/dns/wire.ts";
import {
  answerFor,
  buildQuery,
  bytes,
  encodeName,
  parseMessage,
  type Part,
  u16,
  u32,
} from "./support/dns.ts";

const name = (text: string): Uint8Array => encodeName(text);
const ptr = (offset: number): number[] => [0xc0 | (offset >> 8), offset & 0xff];

/** A header: QR=1 RD RA, the given rcode and counts. */
function header(counts: [number, number, number, number], rcode = 0, flags2 = 0x81): number[] {
  return [0x12, 0x34, flags2, 0x80 | rcode, ...counts.flatMap(u16)];
}

function rr(owner: Part, type: number, ttl: number, rdata: Part, qclass = 1): Uint8Array {
  const data = bytes(rdata);
  return bytes(owner, u16(type), u16(qclass), u32(ttl), u16(data.length), data);
}

function opt(options: Part = [], udp = 1232, extRcode = 0): Uint8Array {
  const data = bytes(options);
  return bytes(0, u16(41), u16(udp), extRcode, 0, 0, 0, u16(data.length), data);
}

function soaData(mname: Part, rname: Part, minimum: number): Uint8Array {
  return bytes(mname, rname, u32(2024010101), u32(7200), u32(3600), u32(1209600), u32(minimum));
}

const QUESTION = bytes(name("www.example.com"), u16(1), u16(1)); // at 12, 21 octets
const Q_END = 12 + QUESTION.length; // 33
const EXAMPLE_COM = 16; // "example.com" inside the question

function analyze(msg: Uint8Array): ResponseInfo {
  const info = new ResponseInfo();
  analyzeResponse(msg, info);
  return info;
}

function ttlsAt(msg: Uint8Array, info: ResponseInfo): number[] {
  const view = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  return Array.from(info.ttlOffsets.subarray(0, info.ttlCount), (o) => view.getUint32(o));
}

function assertInvalid(msg: Uint8Array, reason: string, label = reason): void {
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(msg, info), false, label);
  assert.equal(info.reason, reason, label);
}

Deno.test("analyzeResponse accepts a typical A answer and records its TTL", () => {
  const query = buildQuery("www.example.com", { ednsUdpSize: 1232 });
  const answer = answerFor(query);
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(answer, info), true, info.reason);
  assert.equal(info.reason, "");
  assert.equal(info.qdcount, 1);
  assert.equal(info.questionEnd, Q_END);
  assert.equal(info.answerEnd, Q_END + 16);
  assert.equal(info.authorityEnd, Q_END + 16);
  assert.deepEqual([info.ancount, info.nscount, info.arcount], [1, 0, 1]);
  assert.equal(info.rcode, 0);
  assert.equal(info.truncated, false);
  assert.equal(info.optStart, Q_END + 16);
  assert.equal(info.optEnd, answer.length);
  assert.equal(info.ttlCount, 1);
  assert.equal(info.ttlOffsets[0], Q_END + 6);
  assert.equal(info.minTtl, 60);
  assert.equal(info.negativeTtl, -1);
});

Deno.test("analyzeResponse: compressed names in NS, CNAME, MX, SRV, PTR, DNAME, SOA data", () => {
  // Offsets: question at 12..33; each record's start is noted to aim pointers at it.
  const a1 = bytes(ptr(12), u16(5), u16(1), u32(300), u16(6), 3, 0x63, 0x64, 0x6e, ptr(16));
  // a1 at 33: owner 33-34, fixed 35-44, rdata 45-50 ("cdn" at 45 + ptr to example.com)
  const a2 = rr(ptr(45), 1, 20, [192, 0, 2, 1]);
  const a3 = rr(ptr(12), 15, 3600, bytes(u16(10), 4, 0x6d, 0x61, 0x69, 0x6c, ptr(EXAMPLE_COM)));
  const a4 = rr(ptr(12), 33, 100, bytes(u16(1), u16(2), u16(443), ptr(45)));
  const a5 = rr(ptr(12), 12, 100, ptr(16));
  const a6 = rr(ptr(EXAMPLE_COM), 39, 100, name("example.net"));
  const ns1 = rr(ptr(EXAMPLE_COM), 2, 86400, bytes(3, 0x6e, 0x73, 0x31, ptr(EXAMPLE_COM)));
  const ns2 = rr(ptr(EXAMPLE_COM), 6, 900, soaData(ptr(16), bytes(1, 0x68, ptr(16)), 300));
  const glue = rr(ptr(12), 28, 7, new Uint8Array(16));
  const msg = bytes(
    header([1, 6, 2, 2]),
    QUESTION,
    a1,
    a2,
    a3,
    a4,
    a5,
    a6,
    ns1,
    ns2,
    opt(bytes(u16(3), u16(0))),
    glue,
  );
  parseMessage(msg); // the independent parser agrees it is well-formed
  const info = analyze(msg);
  assert.equal(info.reason, "");
  assert.equal(info.ttlCount, 9);
  assert.deepEqual(ttlsAt(msg, info), [300, 20, 3600, 100, 100, 100, 86400, 900, 7]);
  assert.equal(info.minTtl, 7);
  assert.equal(info.negativeTtl, 300);
  const additional = msg.length - glue.length - 15;
  assert.equal(info.optStart, additional);
  assert.equal(info.optEnd, additional + 15);
  assert.equal(
    info.answerEnd,
    Q_END + a1.length + a2.length + a3.length + a4.length +
      a5.length + a6.length,
  );
  assert.equal(info.authorityEnd, info.answerEnd + ns1.length + ns2.length);
});

Deno.test("analyzeResponse: minTtl and negativeTtl for NXDOMAIN, NODATA and no SOA", () => {
  const soa = (ttl: number, minimum: number) =>
    rr(ptr(EXAMPLE_COM), 6, ttl, soaData(name("ns.example.com"), name("h.example.com"), minimum));
  const nx = bytes(header([1, 0, 1, 0], 3), QUESTION, soa(900, 300));
  let info = analyze(nx);
  assert.equal(info.reason, "");
  assert.equal(info.rcode, 3);
  assert.equal(info.minTtl, 900);
  assert.equal(info.negativeTtl, 300, "NXDOMAIN: MINIMUM is the smaller");
  const nodata = bytes(header([1, 0, 1, 0]), QUESTION, soa(60, 3600));
  info = analyze(nodata);
  assert.equal(info.negativeTtl, 60, "NODATA: the SOA TTL is the smaller");
  assert.equal(info.minTtl, 60);
  const twoSoa = bytes(header([1, 0, 2, 0], 3), QUESTION, soa(500, 400), soa(10, 10));
  info = analyze(twoSoa);
  assert.equal(info.negativeTtl, 400, "the first SOA counts");
  assert.equal(info.minTtl, 10);
  const noSoa = bytes(header([1, 0, 1, 0], 3), QUESTION, rr(ptr(16), 2, 100, name("ns.x")));
  info = analyze(noSoa);
  assert.equal(info.reason, "");
  assert.equal(info.negativeTtl, -1);
  assert.equal(info.minTtl, 100);
  const soaInAnswer = bytes(header([1, 1, 0, 0]), QUESTION, soa(50, 40));
  info = analyze(soaInAnswer);
  assert.equal(info.negativeTtl, -1, "an SOA in the answer section is no negative answer");
  const bare = bytes(header([1, 0, 0, 1], 3), QUESTION, opt());
  info = analyze(bare);
  assert.equal(info.reason, "");
  assert.equal(info.minTtl, -1, "OPT has no TTL");
  assert.equal(info.negativeTtl, -1);
  assert.equal(info.ttlCount, 0);
});

Deno.test("analyzeResponse: a TTL with the top bit set counts as 0 (RFC 2181 section 8)", () => {
  const msg = bytes(
    header([1, 2, 1, 0], 3),
    QUESTION,
    rr(ptr(12), 1, 3600, [192, 0, 2, 1]),
    rr(ptr(12), 1, 0x80000001, [192, 0, 2, 2]),
    rr(ptr(16), 6, 0xffffffff, soaData(0, 0, 300)),
  );
  const info = analyze(msg);
  assert.equal(info.reason, "");
  assert.equal(info.minTtl, 0);
  assert.equal(info.negativeTtl, 0);
  const soaMinimum = bytes(header([1, 0, 1, 0], 3), QUESTION, rr(0, 6, 60, soaData(0, 0, -1)));
  assert.equal(analyze(soaMinimum).negativeTtl, 0, "MINIMUM with the top bit set");
});

Deno.test("analyzeResponse: header facts: TC, no question, extended rcode", () => {
  const tc = answerFor(buildQuery("www.example.com", { ednsUdpSize: 1232 }));
  tc[2] |= 0x02;
  assert.equal(analyze(tc).truncated, true);
  const badvers = bytes(header([0, 0, 0, 1], 0), opt([], 1232, 1));
  const info = analyze(badvers);
  assert.equal(info.reason, "");
  assert.equal(info.qdcount, 0);
  assert.equal(info.questionEnd, 12);
  assert.equal(info.rcode, 0);
  assert.equal(info.extendedRcode, 16);
});

Deno.test("analyzeResponse: the TTL offset array grows and is reused", () => {
  const records: Uint8Array[] = [];
  for (let i = 0; i < 200; i++) records.push(rr(ptr(12), 1, 1000 + i, [10, 0, i >> 8, i & 0xff]));
  const many = bytes(header([1, 200, 0, 0]), QUESTION, ...records);
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(many, info), true, info.reason);
  assert.equal(info.ttlCount, 200);
  assert.deepEqual(ttlsAt(many, info), records.map((_, i) => 1000 + i));
  const grown = info.ttlOffsets;
  assert.ok(grown.length >= 200);
  const small = answerFor(buildQuery("www.example.com"));
  assert.equal(analyzeResponse(small, info), true);
  assert.equal(info.ttlOffsets, grown, "the grown array is kept");
  assert.equal(info.ttlCount, 1);
  assert.equal(info.minTtl, 60);
});

Deno.test("analyzeResponse rejects malformed headers and questions", () => {
  const ok = answerFor(buildQuery("www.example.com"));
  assertInvalid(ok.slice(0, 11), "short header");
  assertInvalid(buildQuery("www.example.com"), "not a response");
  const two = ok.slice();
  two[5] = 2;
  assertInvalid(two, "qdcount over 1");
  // A question can only point forwards or at itself: never allowed.
  assertInvalid(bytes(header([1, 0, 0, 0]), ptr(12), u16(1), u16(1)), "malformed question");
  assertInvalid(
    bytes(header([1, 0, 0, 0]), 1, 0x61, ptr(12), u16(1), u16(1)),
    "malformed question",
    "pointer at the question's own start",
  );
  assertInvalid(ok.slice(0, Q_END - 1), "malformed question", "question cut short");
});

Deno.test("analyzeResponse rejects bad compression pointers", () => {
  const a = [192, 0, 2, 1];
  const cases: [string, Uint8Array][] = [];
  // Owner at 33 pointing at itself.
  cases.push(["pointer to itself", bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(33), 1, 1, a))]);
  // Owner at 33 pointing forwards to a name in the next record.
  const next = 33 + 2 + 10 + 4;
  cases.push([
    "forward pointer",
    bytes(header([1, 2, 0, 0]), QUESTION, rr(ptr(next), 1, 1, a), rr(name("x"), 1, 1, a)),
  ]);
  // A loop: the second name (at 49) points back to the first, which points forwards to it.
  cases.push([
    "compression loop",
    bytes(header([1, 2, 0, 0]), QUESTION, rr(ptr(49), 1, 1, a), rr(ptr(33), 1, 1, a)),
  ]);
  // Labels then a pointer to the start of the same name.
  cases.push([
    "pointer into the same name",
    bytes(header([1, 1, 0, 0]), QUESTION, rr(bytes(1, 0x61, ptr(33)), 1, 1, a)),
  ]);
  cases.push([
    "pointer into the header",
    bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(4), 1, 1, a)),
  ]);
  cases.push([
    "pointer past the end",
    bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(0x3fff), 1, 1, a)),
  ]);
  cases.push([
    "label type 01",
    bytes(header([1, 1, 0, 0]), QUESTION, rr(bytes(0x41, 0x61, 0), 1, 1, a)),
  ]);
  cases.push([
    "label type 10",
    bytes(header([1, 1, 0, 0]), QUESTION, rr(bytes(0x81, 0x61, 0), 1, 1, a)),
  ]);
  cases.push(["half a pointer at the end", bytes(header([1, 1, 0, 0]), QUESTION, 0xc0)]);
  for (const [label, msg] of cases) assertInvalid(msg, "malformed owner name", label);
});

Deno.test("analyzeResponse: a pointer's target must end before the pointer", () => {
  // A pointer into the middle of an earlier name is fine.
  const inner = bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(24), 1, 1, [1, 2, 3, 4]));
  assert.equal(analyze(inner).reason, "");
  // Record 1 (a TXT at 33, data at 45) ends with the octet 3; record 2's owner (at 46) is a
  // pointer to that octet: read from there, a 3-octet label would cover the pointer itself
  // and go on into record 2's type field (whose 0 would end the name).
  const over = bytes(
    header([1, 2, 0, 0]),
    QUESTION,
    rr(ptr(12), 16, 1, [3]),
    rr(ptr(45), 1, 1, [1]),
  );
  assertInvalid(over, "malformed owner name");
  // A name in record data that points into itself.
  const self = bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(12), 5, 1, bytes(1, 0x61, ptr(45))));
  assertInvalid(self, "malformed record data");
});

Deno.test("analyzeResponse bounds pointer chains and name length", () => {
  // Each owner points at the previous owner: record k needs k + 1 hops.
  const chain = (records: number) => {
    const parts: Uint8Array[] = [];
    let previous = 12;
    let offset = Q_END;
    for (let k = 0; k < records; k++) {
      parts.push(rr(ptr(previous), 1, 1, [1, 2, 3, 4]));
      previous = offset;
      offset += 16;
    }
    return bytes(header([1, records, 0, 0]), QUESTION, ...parts);
  };
  assert.equal(analyze(chain(MAX_POINTER_HOPS)).reason, "");
  assertInvalid(chain(MAX_POINTER_HOPS + 1), "malformed owner name");
  // 4 x 63-octet labels (253 with the root) in the question; one more label through a
  // pointer makes 255 (fine), two more make 257.
  const label = [63, ...new Uint8Array(63).fill(0x61)];
  const long = bytes(label, label, label, 59, new Uint8Array(59).fill(0x62), 0);
  assert.equal(long.length, 253);
  const question = bytes(long, u16(1), u16(1));
  const fits = bytes(
    header([1, 1, 0, 0]),
    question,
    rr(bytes(1, 0x63, ptr(12)), 1, 1, [1, 2, 3, 4]),
  );
  assert.equal(analyze(fits).reason, "");
  const over = bytes(header([1, 1, 0, 0]), question, rr(bytes(2, 0x63, 0x63, ptr(12)), 1, 1, [1]));
  assertInvalid(over, "malformed owner name");
});

Deno.test("analyzeResponse rejects records cut short and record data that does not fit", () => {
  const base = answerFor(buildQuery("www.example.com")); // one A record, no OPT
  assertInvalid(base.slice(0, base.length - 1), "record data past the end");
  assertInvalid(base.slice(0, Q_END + 11), "truncated record");
  const missing = base.slice();
  missing[7] = 2;
  assertInvalid(missing, "malformed owner name", "ancount larger than the records");
  const soa = (data: Uint8Array) =>
    bytes(header([1, 0, 1, 0], 3), QUESTION, rr(ptr(16), 6, 60, data));
  const good = soaData(name("ns.example"), ptr(16), 300);
  assert.equal(analyze(soa(good)).reason, "");
  assertInvalid(soa(good.subarray(0, good.length - 1)), "malformed record data", "SOA 19 octets");
  // Octets after the last field are relayed as resolvers relay them (see checkRdata).
  assert.equal(analyze(soa(bytes(good, 0))).reason, "", "SOA 21 octets");
  assertInvalid(soa(bytes(name("ns.example"))), "malformed record data", "SOA without rname");
  const rdata = (type: number, data: Part) =>
    bytes(header([1, 1, 0, 0]), QUESTION, rr(ptr(12), type, 60, data));
  assert.equal(analyze(rdata(5, bytes(name("a.example"), 0))).reason, "", "CNAME + 1");
  assertInvalid(rdata(5, [3, 0x61, 0x62]), "malformed record data", "CNAME name past rdlength");
  assertInvalid(rdata(5, []), "malformed record data", "empty CNAME");
  assertInvalid(rdata(5, ptr(45)), "malformed record data", "CNAME pointing at itself");
  assertInvalid(rdata(2, ptr(200)), "malformed record data", "NS forward pointer");
  assertInvalid(rdata(15, u16(10)), "malformed record data", "MX without exchange");
  assertInvalid(rdata(33, bytes(u16(1), u16(1), 0)), "malformed record data", "SRV short");
  assertInvalid(rdata(12, bytes(0x40, 0)), "malformed record data", "PTR label type 01");
  assert.equal(analyze(rdata(39, bytes(name("a"), 1))).reason, "", "DNAME + 1");
  assert.equal(analyze(rdata(33, bytes(u16(1), u16(1), u16(53), name("ns.x")))).reason, "");
  assert.equal(
    analyze(rdata(35, bytes(u16(1), u16(2), 1, 0x55, 0, 0, name("_sip._udp.x")))).reason,
    "",
    "NAPTR",
  );
  assertInvalid(rdata(35, bytes(u16(1), u16(2), 9, 0x55)), "malformed record data", "NAPTR");
  // Opaque types are not looked into.
  assert.equal(analyze(rdata(16, [5, 0x68])).reason, "", "TXT is opaque here");
});

Deno.test("analyzeResponse: OPT rules and trailing bytes", () => {
  const a = rr(ptr(12), 1, 60, [192, 0, 2, 1]);
  assertInvalid(bytes(header([1, 1, 0, 2]), QUESTION, a, opt(), opt()), "more than one OPT");
  assertInvalid(bytes(header([1, 2, 0, 0]), QUESTION, a, opt()), "OPT outside additional");
  assertInvalid(bytes(header([1, 1, 1, 0]), QUESTION, a, opt()), "OPT outside additional");
  const owned = bytes(name("x"), u16(41), u16(1232), u32(0), u16(0));
  assertInvalid(bytes(header([1, 1, 0, 1]), QUESTION, a, owned), "OPT owner not root");
  const compressedRoot = bytes(ptr(28), u16(41), u16(1232), u32(0), u16(0)); // 28: the root
  assertInvalid(bytes(header([1, 1, 0, 1]), QUESTION, a, compressedRoot), "OPT owner not root");
  const longOption = opt(bytes(u16(12), u16(5), 0, 0, 0, 0)); // says 5, has 4
  assertInvalid(bytes(header([1, 1, 0, 1]), QUESTION, a, longOption), "malformed OPT options");
  const spare = bytes(0, u16(41), u16(1232), u32(0), u16(6), u16(12), u16(0), 0, 0);
  assertInvalid(bytes(header([1, 1, 0, 1]), QUESTION, a, spare), "malformed OPT options");
  const overrun = bytes(0, u16(41), u16(1232), u32(0), u16(4), u16(12), u16(1));
  assertInvalid(bytes(header([1, 1, 0, 1]), QUESTION, a, overrun), "malformed OPT options");
  const options = opt(bytes(u16(12), u16(2), 0, 0, u16(15), u16(2), u16(22)));
  assert.equal(analyze(bytes(header([1, 1, 0, 1]), QUESTION, a, options)).reason, "");
  const ok = bytes(header([1, 1, 0, 1]), QUESTION, a, opt());
  assertInvalid(bytes(ok, 0), "trailing bytes");
  assertInvalid(bytes(ok, ok.subarray(Q_END)), "trailing bytes", "a record more than counted");
  const tsig = rr(0, 250, 0, bytes(name("hmac-sha256"), new Uint8Array(16)), 255);
  const signed = bytes(header([1, 1, 0, 2]), QUESTION, a, opt(), tsig);
  assert.equal(analyze(signed).reason, "");
  assertInvalid(bytes(header([1, 1, 0, 2]), QUESTION, a, tsig, opt()), "TSIG not last");
  assertInvalid(bytes(header([1, 2, 0, 0]), QUESTION, a, tsig), "TSIG not last", "in answers");
});

Deno.test("checkName returns the end of the in-place part", () => {
  const msg = bytes(header([1, 0, 0, 0]), QUESTION, 1, 0x61, ptr(16), ptr(12));
  assert.equal(checkName(msg, 12, msg.length), 29);
  assert.equal(checkName(msg, 33, msg.length), 37);
  assert.equal(checkName(msg, 37, msg.length), 39);
  assert.equal(checkName(msg, 33, 36), -1, "pointer past the limit");
  assert.equal(checkName(msg, 12, 20), -1, "labels past the limit");
});

Deno.test("responseAnswersQuery: one question must match name (any case), type, class", () => {
  const query = buildQuery("www.Example.com", { type: 1 });
  const q = new QueryInfo();
  inspectQuery(query, q);
  const info = new ResponseInfo();
  const check = (resp: Uint8Array) =>
    analyzeResponse(resp, info) && responseAnswersQuery(resp, info, query, q.questionEnd);
  assert.equal(check(answerFor(buildQuery("WWW.example.COM", { type: 1 }))), true);
  assert.equal(check(answerFor(buildQuery("www.example.com", { type: 28 }))), false, "type");
  assert.equal(check(answerFor(buildQuery("www.example.com", { qclass: 3 }))), false, "class");
  assert.equal(check(answerFor(buildQuery("www.example.org"))), false, "name");
  assert.equal(check(answerFor(buildQuery("www.example.com.au"))), false, "longer name");
  assert.equal(check(answerFor(buildQuery("ww.example.com"))), false, "shorter name");
  const notify = answerFor(buildQuery("www.example.com"));
  notify[2] |= 4 << 3;
  assert.equal(check(notify), false, "another opcode");
});

Deno.test("responseAnswersQuery: no question only for a bare error", () => {
  const query = buildQuery("x", { ednsUdpSize: 1232 });
  const q = new QueryInfo();
  inspectQuery(query, q);
  const info = new ResponseInfo();
  const check = (resp: Uint8Array) => {
    assert.equal(analyzeResponse(resp, info), true, info.reason);
    return responseAnswersQuery(resp, info, query, q.questionEnd) &&
      answersQuestion(resp, query, q.questionEnd);
  };
  assert.equal(check(bytes(header([0, 0, 0, 0], 5))), true, "REFUSED, nothing else");
  assert.equal(check(bytes(header([0, 0, 0, 1], 1), opt())), true, "FORMERR with OPT");
  assert.equal(check(bytes(header([0, 0, 0, 1], 0), opt([], 1232, 1))), true, "BADVERS");
  assert.equal(check(bytes(header([0, 0, 0, 0], 0))), false, "NOERROR");
  // The poisoning attempt: an error without a question carrying an answer.
  const poison = bytes(header([0, 1, 0, 0], 3), rr(name("x"), 1, 86400, [6, 6, 6, 6]));
  assert.equal(check(poison), false, "x. A 6.6.6.6 in the answer section");
  const authority = bytes(header([0, 0, 1, 0], 2), rr(name("x"), 2, 86400, name("ns.evil")));
  assert.equal(check(authority), false, "authority records");
  const glue = bytes(header([0, 0, 0, 2], 2), opt(), rr(name("x"), 1, 86400, [6, 6, 6, 6]));
  assert.equal(check(glue), false, "additional records besides OPT");
  const noOptGlue = bytes(header([0, 0, 0, 1], 2), rr(name("x"), 1, 86400, [6, 6, 6, 6]));
  assert.equal(check(noOptGlue), false, "one additional record that is not OPT");
});

Deno.test("answersQuestion now rejects malformed responses", () => {
  const query = buildQuery("www.example.com");
  const q = new QueryInfo();
  inspectQuery(query, q);
  const good = answerFor(query);
  assert.equal(answersQuestion(good, query, q.questionEnd), true);
  assert.equal(answersQuestion(bytes(good, 0), query, q.questionEnd), false, "trailing byte");
  const loop = good.slice();
  loop[Q_END + 1] = Q_END; // the answer's owner points at itself
  assert.equal(answersQuestion(loop, query, q.questionEnd), false);
});
