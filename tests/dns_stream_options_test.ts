import assert from "node:assert/strict";
import { inspectQuery, QueryInfo, QueryVerdict } from "../src/dns/query.ts";
import { addStreamOptions } from "../src/dns/stream_options.ts";
import { answerFor, buildQuery, parseMessage, withEdnsOptions } from "./support/dns.ts";

const KEEPALIVE = 11;
const PADDING = 12;

function optionsOf(message: Uint8Array): Map<number, number[]> {
  return new Map((parseMessage(message).opt?.options ?? []).map((o) => [o.code, [...o.data]]));
}

Deno.test("stream options: a query's keepalive and padding options are noticed", () => {
  const info = new QueryInfo();
  const plain = buildQuery("a.test", { ednsUdpSize: 1232 });
  assert.equal(inspectQuery(plain, info), QueryVerdict.FORWARD);
  assert.equal(info.asksKeepalive || info.asksPadding, false);
  const both = withEdnsOptions(plain, [[KEEPALIVE, []], [PADDING, [0, 0, 0]]]);
  assert.equal(inspectQuery(both, info), QueryVerdict.FORWARD);
  assert.equal(info.asksKeepalive, true);
  assert.equal(info.asksPadding, true);
  // The flags do not stick to the next query.
  inspectQuery(plain, info);
  assert.equal(info.asksKeepalive || info.asksPadding, false);
});

Deno.test("stream options: keepalive in units of 100 ms, then padding to 468 octets", () => {
  const answer = answerFor(buildQuery("a.test", { id: 9, ednsUdpSize: 1232 }));
  const kept = addStreamOptions(answer, { keepaliveMs: 10_000, pad: false });
  assert.deepEqual(optionsOf(kept).get(KEEPALIVE), [0, 100]);
  assert.equal(kept.length, answer.length + 6);
  assert.equal(parseMessage(kept).answers.length, 1, "the records are intact");
  const both = addStreamOptions(answer, { keepaliveMs: 2000, pad: true });
  assert.equal(both.length % 468, 0);
  assert.deepEqual(optionsOf(both).get(KEEPALIVE), [0, 20]);
  assert.ok(optionsOf(both).has(PADDING), "padding comes last");
  assert.equal(parseMessage(both).id, 9);
  // Past 6,553.5 s the value saturates.
  assert.deepEqual(
    optionsOf(addStreamOptions(answer, { keepaliveMs: 1e9, pad: false })).get(KEEPALIVE),
    [0xff, 0xff],
  );
});

Deno.test("stream options: an answer without OPT, or nothing asked, comes back as it is", () => {
  const noOpt = answerFor(buildQuery("a.test"));
  assert.equal(addStreamOptions(noOpt, { keepaliveMs: 10_000, pad: true }), noOpt);
  const answer = answerFor(buildQuery("a.test", { ednsUdpSize: 1232 }));
  assert.equal(addStreamOptions(answer, { keepaliveMs: -1, pad: false }), answer);
  assert.equal(addStreamOptions(new Uint8Array(5), { keepaliveMs: 100, pad: true }).length, 5);
});
