import assert from "node:assert/strict";
import { buildUpstreamQuery } from "../src/dns/edns.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { buildProbeQuery } from "../src/dns/probe.ts";
import { inspectQuery, QueryInfo, QueryVerdict, verdictRcode } from "../src/dns/query.ts";
import { buildErrorResponse } from "../src/dns/response.ts";
import { Rcode } from "../src/dns/wire.ts";
import { buildQuery, bytes, encodeName, opt, parseMessage, type Part, u16 } from "./support/dns.ts";

const MAC = new Uint8Array(32).fill(0x5a);
const TIME = [0, 0, 0x65, 0x92, 0x00, 0x01];

/** A TSIG record (RFC 8945 section 4.2) signed with key `key.example.`, HMAC-SHA256. */
function tsig(originalId: number, other: Part = []): Uint8Array {
  const otherData = bytes(other);
  const data = bytes(
    encodeName("hmac-sha256"),
    TIME,
    u16(300),
    u16(MAC.length),
    MAC,
    u16(originalId),
    u16(0),
    u16(otherData.length),
    otherData,
  );
  return bytes(encodeName("key.example"), u16(250), u16(255), 0, 0, 0, 0, u16(data.length), data);
}

/** A query for `name` with the given additional records. */
function query(name: string, type: number, additional: Uint8Array[], flags = [0x01, 0x00]) {
  return bytes(
    0xbe,
    0xef,
    flags,
    u16(1),
    u16(0),
    u16(0),
    u16(additional.length),
    encodeName(name),
    u16(type),
    u16(1),
    ...additional,
  );
}

function inspect(msg: Uint8Array): QueryInfo {
  const info = new QueryInfo();
  inspectQuery(msg, info);
  return info;
}

Deno.test("QueryVerdict keeps its values; verdictRcode maps the error verdicts", () => {
  assert.deepEqual(
    [QueryVerdict.FORWARD, QueryVerdict.DROP, QueryVerdict.FORMERR, QueryVerdict.NOTIMP],
    [0, 1, 2, 3],
  );
  assert.equal(QueryVerdict.NOTAUTH, 4);
  assert.equal(verdictRcode(QueryVerdict.FORMERR), 1);
  assert.equal(verdictRcode(QueryVerdict.NOTIMP), 4);
  assert.equal(verdictRcode(QueryVerdict.NOTAUTH), 9);
  assert.equal(verdictRcode(QueryVerdict.FORWARD), -1);
  assert.equal(verdictRcode(QueryVerdict.DROP), -1);
});

Deno.test("inspectQuery: query-of-death QTYPEs", () => {
  const cases: [number, QueryVerdict, string][] = [
    [0, QueryVerdict.FORMERR, "qtype 0"],
    [41, QueryVerdict.FORMERR, "qtype OPT"],
    [251, QueryVerdict.NOTIMP, "zone transfer"],
    [252, QueryVerdict.NOTIMP, "zone transfer"],
    [255, QueryVerdict.FORWARD, ""],
    [127, QueryVerdict.FORWARD, ""],
    [256, QueryVerdict.FORWARD, ""],
    [65535, QueryVerdict.FORWARD, ""],
  ];
  for (let type = 128; type <= 254; type++) {
    if (type !== 251 && type !== 252) cases.push([type, QueryVerdict.NOTIMP, "meta qtype"]);
  }
  for (const [type, verdict, reason] of cases) {
    const info = inspect(buildQuery("qod.test", { type }));
    assert.equal(info.verdict, verdict, `type ${type}`);
    assert.equal(info.reason, reason, `type ${type}`);
    assert.equal(info.qtype, type);
  }
});

Deno.test("inspectQuery: TC=1 in a query is FORMERR", () => {
  const tc = buildQuery("tc.test");
  tc[2] |= 0x02;
  const info = inspect(tc);
  assert.equal(info.verdict, QueryVerdict.FORMERR);
  assert.equal(info.reason, "TC in query");
  assert.equal(info.questionEnd, tc.length, "the question is still there for the response");
});

Deno.test("inspectQuery: CD, EDNS version, client subnet and the OPT's extent", () => {
  const ecs = [0, 1, 24, 0, 192, 0, 2];
  const msg = query("ecs.test", 1, [
    opt([[10, new Uint8Array(8)], [8, ecs]], 4096, [0, 1, 0x80, 0]),
  ], [
    0x01,
    0x10,
  ]);
  const info = inspect(msg);
  assert.equal(info.verdict, QueryVerdict.FORWARD, info.reason);
  assert.equal(info.cd, true);
  assert.equal(info.hasEdns, true);
  assert.equal(info.ednsVersion, 1);
  assert.equal(info.dnssecOk, true);
  assert.equal(info.ednsUdpSize, 4096);
  assert.equal(info.hasClientSubnet, true);
  assert.equal(info.optStart, 12 + 10 + 4);
  assert.equal(info.optEnd, msg.length);
  assert.equal(msg[info.optStart], 0);
  assert.equal(msg[info.optStart + 2], 41);
  assert.equal(info.tsig, false);
  assert.equal(info.tsigStart, -1);
  const plain = inspect(buildQuery("plain.test"));
  assert.equal(plain.cd, false);
  assert.equal(plain.hasClientSubnet, false);
  assert.equal(plain.optStart, -1);
  assert.equal(plain.optEnd, -1);
  const noEcs = inspect(query("x.test", 1, [opt([[3, []], [12, [0, 0]]])]));
  assert.equal(noEcs.verdict, QueryVerdict.FORWARD);
  assert.equal(noEcs.hasClientSubnet, false);
  // The same info object is reset by the next call.
  inspectQuery(buildQuery("plain.test"), info);
  assert.deepEqual(
    [info.cd, info.hasEdns, info.ednsVersion, info.hasClientSubnet, info.optStart],
    [false, false, 0, false, -1],
  );
});

Deno.test("inspectQuery: OPT options must fill the OPT data exactly", () => {
  const overrun = bytes(0, u16(41), u16(1232), 0, 0, 0, 0, u16(4), u16(12), u16(1));
  const spare = bytes(0, u16(41), u16(1232), 0, 0, 0, 0, u16(6), u16(12), u16(0), 0, 0);
  for (const bad of [overrun, spare]) {
    const info = inspect(query("x.test", 1, [bad]));
    assert.equal(info.verdict, QueryVerdict.FORMERR);
    assert.equal(info.reason, "malformed OPT options");
  }
});

Deno.test("inspectQuery: a TSIG-signed query is NOTAUTH; TSIG must be last and whole", () => {
  const signed = query("signed.test", 1, [opt(), tsig(0xbeef)]);
  const info = inspect(signed);
  assert.equal(info.verdict, QueryVerdict.NOTAUTH);
  assert.equal(info.reason, "TSIG");
  assert.equal(info.tsig, true);
  assert.equal(info.tsigStart, signed.length - tsig(0xbeef).length);
  assert.equal(info.hasEdns, true);
  assert.equal(inspect(query("signed.test", 1, [tsig(1)])).verdict, QueryVerdict.NOTAUTH);
  assert.equal(
    inspect(query("signed.test", 252, [tsig(1)])).verdict,
    QueryVerdict.NOTAUTH,
    "TSIG is checked before the QTYPE",
  );
  const notLast = inspect(query("signed.test", 1, [tsig(1), opt()]));
  assert.equal(notLast.verdict, QueryVerdict.FORMERR);
  assert.equal(notLast.reason, "TSIG not last");
  const withOther = tsig(1, [1, 2, 3, 4, 5, 6]);
  assert.equal(inspect(query("x.test", 1, [withOther])).verdict, QueryVerdict.NOTAUTH);
  const cut = tsig(1);
  cut[cut.length - 1] = 1; // says one octet of other data that is not there
  const malformed = inspect(query("x.test", 1, [cut]));
  assert.equal(malformed.verdict, QueryVerdict.FORMERR);
  assert.equal(malformed.reason, "malformed TSIG");
});

Deno.test("buildErrorResponse: NOTAUTH answers TSIG with an unsigned BADKEY TSIG", () => {
  const signed = query("Signed.Test", 1, [opt([[10, new Uint8Array(8)]], 4096), tsig(0x4242)]);
  const info = inspect(signed);
  const response = buildErrorResponse(signed, info, verdictRcode(info.verdict));
  assert.ok(response.length <= signed.length);
  const parsed = parseMessage(response);
  assert.equal(parsed.rcode, Rcode.NOTAUTH);
  assert.equal(parsed.id, 0xbeef);
  assert.equal(parsed.question?.name, "Signed.Test.");
  assert.equal(parsed.additional.length, 2);
  assert.equal(parsed.additional[0].type, 41);
  const record = parsed.additional[1];
  assert.equal(record.name, "key.example.");
  assert.equal(record.type, 250);
  assert.equal(record.qclass, 255);
  assert.equal(record.ttl, 0);
  assert.deepEqual(
    record.data,
    bytes(encodeName("hmac-sha256"), TIME, u16(300), u16(0), u16(0x4242), u16(17), u16(0)),
  );
  const check = new ResponseInfo();
  assert.equal(analyzeResponse(response, check), true, check.reason);
  // Without EDNS: the TSIG alone.
  const bare = query("x.test", 1, [tsig(7)]);
  const bareInfo = inspect(bare);
  const bareResponse = parseMessage(buildErrorResponse(bare, bareInfo, Rcode.NOTAUTH));
  assert.deepEqual(bareResponse.additional.map((r) => r.type), [250]);
  // NOTAUTH for a query without TSIG is a plain error.
  const unsigned = buildQuery("x.test");
  const plain = parseMessage(buildErrorResponse(unsigned, inspect(unsigned), Rcode.NOTAUTH));
  assert.equal(plain.rcode, 9);
  assert.equal(plain.additional.length, 0);
});

Deno.test("buildErrorResponse: truncated sets TC and keeps the question", () => {
  const any = buildQuery("any.test", { type: 255, id: 0x0102, ednsUdpSize: 1232, dnssecOk: true });
  const info = inspect(any);
  const response = buildErrorResponse(any, info, Rcode.NOERROR, { truncated: true });
  const parsed = parseMessage(response);
  assert.equal(parsed.tc, true);
  assert.equal(parsed.qr, true);
  assert.equal(parsed.rcode, 0);
  assert.equal(parsed.answers.length, 0);
  assert.equal(parsed.question?.type, 255);
  assert.ok(parsed.opt);
  assert.equal(parsed.opt.dnssecOk, true);
  assert.equal(parsed.opt.options.length, 0);
  assert.deepEqual(response.subarray(0, 2), any.subarray(0, 2));
  const notTruncated = parseMessage(buildErrorResponse(any, info, Rcode.REFUSED));
  assert.equal(notTruncated.tc, false);
});

Deno.test("buildErrorResponse: REFUSED and TC=1 answers are never larger than the query", () => {
  const queries: Uint8Array[] = [];
  for (const name of [".", "a", "www.example.com", "x".repeat(63) + ".test"]) {
    queries.push(buildQuery(name));
    queries.push(buildQuery(name, { ednsUdpSize: 512 }));
    queries.push(buildQuery(name, { ednsUdpSize: 4096, dnssecOk: true }));
    queries.push(query(name, 1, [opt([[10, new Uint8Array(8)]])]));
    queries.push(query(name, 1, [opt([[8, [0, 1, 0, 0]], [12, new Uint8Array(100)]])]));
    const other = bytes(encodeName("x"), u16(1), u16(1), 0, 0, 0, 0, u16(4), 1, 2, 3, 4);
    queries.push(query(name, 1, [other, opt()]));
  }
  for (const q of queries) {
    const info = inspect(q);
    assert.equal(info.verdict, QueryVerdict.FORWARD, info.reason);
    const expected = info.questionEnd + (info.hasEdns ? 11 : 0);
    const variants = [[Rcode.REFUSED, false], [Rcode.REFUSED, true], [Rcode.NOERROR, true]];
    for (const [rcode, truncated] of variants as [number, boolean][]) {
      const response = buildErrorResponse(q, info, rcode, { truncated });
      assert.ok(response.length <= q.length, `${response.length} > ${q.length}`);
      assert.equal(response.length, expected);
      assert.deepEqual(response.subarray(12, info.questionEnd), q.subarray(12, info.questionEnd));
      const parsed = parseMessage(response);
      assert.equal(parsed.tc, truncated);
      assert.equal(parsed.rcode, rcode);
      assert.equal(parsed.opt?.options.length ?? 0, 0, "no EDE unless asked");
    }
  }
});

Deno.test("buildErrorResponse: an extended rcode puts its upper bits in the OPT", () => {
  const q = buildQuery("v.test", { ednsUdpSize: 1232 });
  const response = buildErrorResponse(q, inspect(q), Rcode.BADVERS);
  assert.equal(response[3] & 0x0f, 0);
  const optAt = response.length - 11;
  assert.deepEqual(Array.from(response.subarray(optAt)), [0, 0, 41, 4, 0xd0, 1, 0, 0, 0, 0, 0]);
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(response, info), true);
  assert.equal(info.extendedRcode, 16);
});

Deno.test("buildProbeQuery: . IN NS with EDNS 1232 and a random ID", () => {
  const flags = [0x01, 0x00, ...u16(1), ...u16(0), ...u16(0), ...u16(1)]; // RD; QD 1, AR 1
  const question = [0, ...u16(2), ...u16(1)]; // . NS IN
  const optRecord = [0, ...u16(41), ...u16(1232), 0, 0, 0, 0, ...u16(0)];
  const expected = [...flags, ...question, ...optRecord];
  const ids = new Set<number>();
  for (let i = 0; i < 8; i++) {
    const probe = buildProbeQuery();
    assert.deepEqual(Array.from(probe.subarray(2)), expected);
    ids.add((probe[0] << 8) | probe[1]);
    const info = inspect(probe);
    assert.equal(info.verdict, QueryVerdict.FORWARD);
    assert.equal(info.qtype, 2);
  }
  assert.ok(ids.size > 1, "IDs are random");
  // The upstream health check asks without RD: no server recurses for it.
  const plain = buildProbeQuery(false);
  assert.deepEqual(Array.from(plain.subarray(3)), expected.slice(1));
  assert.equal(plain[2], 0);
});

Deno.test("buildProbeQuery: padded, one 128-octet block like the queries --padding sends", () => {
  const padded = buildProbeQuery(false, true);
  assert.equal(padded.length, 128);
  const flags = [0x00, 0x00, ...u16(1), ...u16(0), ...u16(0), ...u16(1)]; // QD 1, AR 1
  const question = [0, ...u16(2), ...u16(1)]; // . NS IN
  // OPT: RDLENGTH 100 = the PADDING option (code 12) with 96 zero octets (RFC 7830).
  const optRecord = [0, ...u16(41), ...u16(1232), 0, 0, 0, 0, ...u16(100), ...u16(12), ...u16(96)];
  assert.deepEqual(Array.from(padded.subarray(2)), [
    ...flags,
    ...question,
    ...optRecord,
    ...new Array(96).fill(0),
  ]);
  assert.equal(inspect(padded).verdict, QueryVerdict.FORWARD);
  // The same bytes the upstream form of the unpadded probe has with padding on.
  const plain = buildProbeQuery(false);
  const info = new QueryInfo();
  inspectQuery(plain, info);
  const upstream = buildUpstreamQuery(plain, info, true, new Uint8Array(plain.length + 142));
  assert.deepEqual(Array.from(upstream.subarray(2)), Array.from(padded.subarray(2)));
});
