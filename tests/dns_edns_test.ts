import assert from "node:assert/strict";
import {
  buildUpstreamQuery,
  isHopByHopOption,
  padUpstreamQuery,
  stripResponseOpt,
  trimResponseOpt,
} from "../src/dns/edns.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { inspectQuery, QueryInfo, QueryVerdict } from "../src/dns/query.ts";
import {
  answerFor,
  buildQuery,
  bytes,
  encodeName,
  opt,
  parseMessage,
  type Part,
  rr,
  u16,
  u32,
} from "./support/dns.ts";

type Option = [number, Part];

function query(name: string, additional: Uint8Array[], id = 0x1234): Uint8Array {
  return bytes(
    u16(id),
    0x01,
    0x30, // RD; AD and CD
    u16(1),
    u16(0),
    u16(0),
    u16(additional.length),
    encodeName(name),
    u16(1),
    u16(1),
    ...additional,
  );
}

function inspected(msg: Uint8Array): QueryInfo {
  const info = new QueryInfo();
  assert.equal(inspectQuery(msg, info), QueryVerdict.FORWARD, info.reason);
  return info;
}

const COOKIE: Option = [10, [1, 2, 3, 4, 5, 6, 7, 8]];
const ECS: Option = [8, [0, 1, 24, 0, 192, 0, 2]];
const NSID: Option = [3, []];
const KEEPALIVE: Option = [11, [0, 100]];
const PADDING: Option = [12, new Uint8Array(20)];
const UNKNOWN: Option = [65001, [0xca, 0xfe]];

Deno.test("isHopByHopOption: COOKIE, TCP-KEEPALIVE, PADDING", () => {
  assert.deepEqual([3, 8, 10, 11, 12, 15].map(isHopByHopOption), [
    false,
    false,
    true,
    true,
    true,
    false,
  ]);
});

Deno.test("buildUpstreamQuery without a client OPT adds OPT 1232, version 0, no flags", () => {
  const client = query("Www.Example.COM", []);
  const info = inspected(client);
  const upstream = buildUpstreamQuery(client, info, false);
  const questionEnd = info.questionEnd;
  assert.deepEqual(
    upstream,
    bytes(client.subarray(0, 10), u16(1), client.subarray(12, questionEnd), opt()),
  );
});

Deno.test("buildUpstreamQuery: padding makes the whole message a multiple of 128", () => {
  const client = query("www.example.com", []);
  const upstream = buildUpstreamQuery(client, inspected(client), true);
  assert.equal(upstream.length, 128);
  const questionEnd = client.length;
  const padLength = 128 - questionEnd - 11 - 4;
  assert.deepEqual(
    upstream,
    bytes(
      client.subarray(0, 10),
      u16(1),
      client.subarray(12),
      opt([[12, new Uint8Array(padLength)]]),
    ),
  );
});

Deno.test("padUpstreamQuery: the same bytes buildUpstreamQuery pads, for every name length and option mix", () => {
  const mixes: Option[][] = [[], [COOKIE], [ECS, NSID], [PADDING, UNKNOWN, KEEPALIVE]];
  for (let length = 1; length <= 200; length += 7) {
    const name = Array.from({ length: Math.ceil(length / 60) }, () => "b".repeat(59)).join(".")
      .slice(0, length).replace(/\.$/, "c");
    for (const mix of [null, ...mixes]) {
      const client = query(name, mix === null ? [] : [opt(mix)]);
      const info = inspected(client);
      const plain = buildUpstreamQuery(client, info, false);
      const padded = padUpstreamQuery(plain, info.questionEnd, new Uint8Array(1024));
      assert.deepEqual(padded, buildUpstreamQuery(client, info, true), `name ${length}`);
      assert.equal(padded.length % 128, 0);
    }
  }
  // Not the shape buildUpstreamQuery makes (no OPT ending the message): left as it is.
  const bare = query("example.test", []);
  assert.equal(padUpstreamQuery(bare, inspected(bare).questionEnd), bare);
});

Deno.test("buildUpstreamQuery: padded length for every name length and option mix", () => {
  const mixes: Option[][] = [[], [COOKIE], [ECS, NSID], [PADDING, UNKNOWN, KEEPALIVE]];
  let checked = 0;
  for (let length = 1; length <= 200; length++) {
    // Labels of up to 63 octets giving a name of `length` characters.
    const labels: string[] = [];
    for (let left = length; left > 0;) {
      const n = Math.min(63, left);
      labels.push("a".repeat(n));
      left -= n + 1;
    }
    const name = labels.join(".");
    for (const mix of [null, ...mixes]) {
      const client = query(name, mix === null ? [] : [opt(mix)]);
      const info = inspected(client);
      const upstream = buildUpstreamQuery(client, info, true);
      assert.equal(upstream.length % 128, 0, `name ${length}`);
      const parsed = parseMessage(upstream);
      assert.deepEqual(
        upstream.subarray(12, info.questionEnd),
        client.subarray(12, info.questionEnd),
      );
      assert.ok(parsed.opt);
      const last = parsed.opt.options[parsed.opt.options.length - 1];
      assert.equal(last.code, 12);
      assert.ok(last.data.every((b) => b === 0));
      assert.ok(last.data.length < 128);
      assert.equal(parsed.opt.options.filter((o) => o.code === 12).length, 1);
      checked++;
    }
  }
  assert.equal(checked, 1000);
});

Deno.test("buildUpstreamQuery keeps the client's OPT fields and end-to-end options", () => {
  const ttl = [0x00, 0x00, 0x80, 0x01]; // ext rcode 0, version 0, DO and a Z bit
  const client = query("e.test", [
    opt([COOKIE, ECS, KEEPALIVE, NSID, PADDING, UNKNOWN], 4096, ttl),
  ]);
  const info = inspected(client);
  assert.equal(info.hasClientSubnet, true);
  const upstream = buildUpstreamQuery(client, info, false);
  assert.deepEqual(
    upstream,
    bytes(
      client.subarray(0, info.questionEnd),
      opt([ECS, NSID, UNKNOWN], 4096, ttl),
    ),
  );
  const small = query("e.test", [opt([], 512, [0, 1, 0, 0])]);
  const smallInfo = inspected(small);
  const raised = buildUpstreamQuery(small, smallInfo, false);
  assert.deepEqual(raised.subarray(smallInfo.questionEnd), opt([], 1232, [0, 1, 0, 0]));
});

Deno.test("buildUpstreamQuery drops the client's other additional records", () => {
  const other = bytes(encodeName("x"), u16(1), u16(1), u32(60), u16(4), 1, 2, 3, 4);
  const client = query("drop.test", [other, opt([NSID]), other]);
  const info = inspected(client);
  const upstream = buildUpstreamQuery(client, info, false);
  const parsed = parseMessage(upstream);
  assert.equal(parsed.additional.length, 1);
  assert.deepEqual(parsed.opt?.options.map((o) => o.code), [3]);
  assert.equal(upstream[11], 1);
  assert.equal(upstream.length, info.questionEnd + 15);
});

Deno.test("buildUpstreamQuery writes into a caller buffer when it fits", () => {
  const client = buildQuery("buffer.test", { id: 7, ednsUdpSize: 1232, dnssecOk: true });
  const info = inspected(client);
  const expected = buildUpstreamQuery(client, info, true);
  const buffer = new Uint8Array(512).fill(0xff);
  const written = buildUpstreamQuery(client, info, true, buffer);
  assert.equal(written.buffer, buffer.buffer);
  assert.equal(written.byteOffset, 0);
  assert.deepEqual(written, expected, "dirty buffer: padding still zeros");
  const tooSmall = new Uint8Array(64);
  const allocated = buildUpstreamQuery(client, info, true, tooSmall);
  assert.notEqual(allocated.buffer, tooSmall.buffer);
  assert.deepEqual(allocated, expected);
  assert.ok(tooSmall.every((b) => b === 0), "an undersized buffer is not written");
});

// --- stripResponseOpt -------------------------------------------------------------------

const QUESTION = bytes(encodeName("strip.test"), u16(1), u16(1));

/** A response with one answer and `additional` in the additional section. */
function response(additional: Uint8Array[]): Uint8Array {
  return bytes(
    0x12,
    0x34,
    0x81,
    0x80,
    u16(1),
    u16(1),
    u16(0),
    u16(additional.length),
    QUESTION,
    rr(1, 60, [192, 0, 2, 1]),
    ...additional,
  );
}

function analyzed(msg: Uint8Array): ResponseInfo {
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(msg, info), true, info.reason);
  return info;
}

const GLUE_A = rr(1, 300, [198, 51, 100, 7]);
const GLUE_AAAA = rr(28, 300, new Uint8Array(16).fill(1));

Deno.test("stripResponseOpt removes the OPT wherever it sits in the additional section", () => {
  const padded = opt([PADDING]);
  const layouts: Uint8Array[][] = [
    [padded],
    [padded, GLUE_A, GLUE_AAAA],
    [GLUE_A, padded, GLUE_AAAA],
    [GLUE_A, GLUE_AAAA, padded],
  ];
  for (const layout of layouts) {
    const msg = response(layout);
    const info = analyzed(msg);
    const stripped = stripResponseOpt(msg, info, false);
    const expected = response(layout.filter((record) => record !== padded));
    assert.deepEqual(stripped, expected);
    assert.equal(parseMessage(stripped).opt, null);
    analyzed(stripped);
  }
});

Deno.test("stripResponseOpt keeps the OPT without hop-by-hop options", () => {
  const ttl = [0, 0, 0x80, 0];
  for (const position of [0, 1, 2]) {
    const full = opt([PADDING, NSID, COOKIE, ECS, KEEPALIVE, [15, [0, 22]]], 1232, ttl);
    const kept = opt([NSID, ECS, [15, [0, 22]]], 1232, ttl);
    const glue = [GLUE_A, GLUE_AAAA];
    const msg = response(glue.toSpliced(position, 0, full));
    const info = analyzed(msg);
    const stripped = stripResponseOpt(msg, info, true);
    assert.deepEqual(stripped, response(glue.toSpliced(position, 0, kept)));
    analyzed(stripped);
  }
});

Deno.test("stripResponseOpt returns the response itself when there is nothing to do", () => {
  const noOpt = response([GLUE_A]);
  assert.equal(stripResponseOpt(noOpt, analyzed(noOpt), false), noOpt);
  assert.equal(stripResponseOpt(noOpt, analyzed(noOpt), true), noOpt);
  const clean = response([opt([NSID, ECS])]);
  assert.equal(stripResponseOpt(clean, analyzed(clean), true), clean);
  const empty = answerFor(buildQuery("x.test", { ednsUdpSize: 1232 }));
  assert.equal(stripResponseOpt(empty, analyzed(empty), true), empty);
  const removed = stripResponseOpt(empty, analyzed(empty), false);
  assert.notEqual(removed, empty);
  assert.equal(removed.length, empty.length - 11);
  assert.equal(removed[11], 0);
});

Deno.test("stripResponseOpt: only padding in a 468-octet block answer", () => {
  // An upstream's padded answer: the options are nothing but Padding.
  const unpadded = response([opt()]).length;
  const padded = response([opt([[12, new Uint8Array(468 - unpadded - 4)]])]);
  assert.equal(padded.length, 468);
  const info = analyzed(padded);
  const forEdnsClient = stripResponseOpt(padded, info, true);
  assert.deepEqual(forEdnsClient, response([opt()]));
  const forPlainClient = stripResponseOpt(padded, info, false);
  assert.deepEqual(forPlainClient, response([]));
});

Deno.test("stripResponseOpt writes into a caller buffer when it fits", () => {
  const msg = response([GLUE_A, opt([PADDING, NSID]), GLUE_AAAA]);
  const info = analyzed(msg);
  for (const keepOpt of [false, true]) {
    const expected = stripResponseOpt(msg, info, keepOpt);
    const buffer = new Uint8Array(1024).fill(0xee);
    const written = stripResponseOpt(msg, info, keepOpt, buffer);
    assert.equal(written.buffer, buffer.buffer);
    assert.deepEqual(written, expected);
    const tooSmall = new Uint8Array(8);
    const allocated = stripResponseOpt(msg, info, keepOpt, tooSmall);
    assert.notEqual(allocated.buffer, tooSmall.buffer);
    assert.deepEqual(allocated, expected);
  }
  const clean = response([opt([NSID])]);
  assert.equal(stripResponseOpt(clean, analyzed(clean), true, new Uint8Array(512)), clean);
});

Deno.test("trimResponseOpt cuts trailing hop-by-hop options in place, as a copy would strip them", () => {
  const ttl = [0, 0, 0x80, 0];
  const layouts: [string, Uint8Array[], boolean][] = [
    ["padding alone, OPT last", [GLUE_A, opt([PADDING], 1232, ttl)], true],
    ["kept options then padding", [opt([NSID, ECS, PADDING], 1232, ttl)], true],
    ["kept, then cookie, keepalive and padding", [opt([NSID, COOKIE, KEEPALIVE, PADDING])], true],
    ["nothing to remove", [GLUE_A, opt([NSID, ECS])], true],
    ["padding before a kept option", [opt([PADDING, NSID])], false],
    ["OPT not last", [opt([PADDING]), GLUE_A], false],
  ];
  for (const [what, layout, inPlace] of layouts) {
    const msg = response(layout);
    const expected = stripResponseOpt(msg, analyzed(msg), true).slice();
    const info = analyzed(msg);
    const before = msg.slice();
    const trimmed = trimResponseOpt(msg, info);
    if (!inPlace) {
      assert.equal(trimmed, null, what);
      assert.deepEqual(msg, before, `${what}: untouched`);
      continue;
    }
    assert.ok(trimmed !== null, what);
    assert.equal(trimmed.buffer, msg.buffer, `${what}: no copy`);
    assert.deepEqual(trimmed, expected, what);
    // The info still describes the trimmed answer: as analysing it afresh finds.
    const fresh = analyzed(trimmed);
    assert.equal(info.optEnd, fresh.optEnd, what);
    assert.equal(info.optEnd, trimmed.length, what);
    assert.deepEqual([info.ttlCount, info.minTtl], [fresh.ttlCount, fresh.minTtl], what);
  }
  const noOpt = response([GLUE_A]);
  assert.equal(trimResponseOpt(noOpt, analyzed(noOpt)), null);
});
