/**
 * Unit tests of the hardening rules that need no sockets: the size limit on what goes
 * upstream, the client key (IPv4 address, IPv6 /64), the rate limiter's bounded table, the
 * budget of REFUSED answers over UDP, and what the resolver sheds at `--max-inflight`.
 */
import assert from "node:assert/strict";
import { parseCidr } from "../src/config.ts";
import { buildUpstreamQuery } from "../src/dns/edns.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import {
  inspectQuery,
  MAX_UPSTREAM_QUERY_SIZE,
  QueryInfo,
  QueryVerdict,
} from "../src/dns/query.ts";
import { buildErrorResponse } from "../src/dns/response.ts";
import { Admission, Admit, clientKey, UDP_REFUSALS_PER_SECOND } from "../src/resolver/admission.ts";
import { Logger } from "../src/log.ts";
import { NO_RESOLVER_STATS, Resolver } from "../src/resolver.ts";
import { ManualClock } from "../src/timers.ts";
import { buildQuery, encodeName, parseMessage } from "./support/dns.ts";
import { TEST_CACHE } from "./support/cache.ts";
import { FakeForwarder } from "./support/forwarder.ts";

/** A query for `name` with one OPT carrying `options` (code, data length) in that order. */
function queryWithOptions(name: string, options: [number, number][]): Uint8Array {
  const qname = encodeName(name);
  const data: number[] = [];
  for (const [code, length] of options) {
    data.push(code >> 8, code & 0xff, length >> 8, length & 0xff, ...new Array(length).fill(0));
  }
  return new Uint8Array([
    0x12,
    0x34,
    1,
    0,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    1,
    ...qname,
    0,
    1,
    0,
    1,
    0,
    0,
    41,
    0x04,
    0xd0,
    0,
    0,
    0,
    0,
    data.length >> 8,
    data.length & 0xff,
    ...data,
  ]);
}

Deno.test("inspectQuery: a query whose upstream form would pass 512 octets is FORMERR", () => {
  const info = new QueryInfo();
  const name = "example.test"; // 14 octets: question ends at 12 + 14 + 4 = 30
  // 30 + 11 (OPT) + 4 (padding option) = 45: 467 octets of forwarded options still fit.
  const fits = queryWithOptions(name, [[65001, 463]]);
  assert.equal(inspectQuery(fits, info), QueryVerdict.FORWARD, info.reason);
  assert.equal(info.forwardedOptionBytes, 467);
  const upstream = buildUpstreamQuery(fits, info, true);
  assert.equal(upstream.length, MAX_UPSTREAM_QUERY_SIZE);
  const over = queryWithOptions(name, [[65001, 464]]);
  assert.equal(inspectQuery(over, info), QueryVerdict.FORMERR);
  assert.equal(info.reason, "query too large");
  const reply = parseMessage(buildErrorResponse(over, info, 1));
  assert.equal(reply.rcode, 1);
  assert.equal(reply.opt, null, "FORMERR carries no OPT (RFC 6891 section 7)");
  assert.equal(reply.question?.name, "example.test.");
});

Deno.test("inspectQuery: hop-by-hop options do not count towards the upstream size", () => {
  const info = new QueryInfo();
  // A client that pads its own query to 1024 octets with a cookie: both are removed upstream.
  const padded = queryWithOptions("example.test", [[10, 16], [12, 950], [8, 8]]);
  assert.equal(inspectQuery(padded, info), QueryVerdict.FORWARD, info.reason);
  assert.equal(info.forwardedOptionBytes, 12, "only the client subnet goes upstream");
  const upstream = buildUpstreamQuery(padded, info, true);
  assert.equal(upstream.length, 128);
  // Without EDNS every query fits: the longest name is 255 octets.
  const longest = "a".repeat(63) + "." + "b".repeat(63) + "." + "c".repeat(63) + "." +
    "d".repeat(61);
  const plain = new Uint8Array([
    0,
    1,
    1,
    0,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    ...encodeName(longest),
    0,
    1,
    0,
    1,
  ]);
  assert.equal(inspectQuery(plain, info), QueryVerdict.FORWARD, info.reason);
  assert.ok(buildUpstreamQuery(plain, info, true).length <= 384);
});

Deno.test("clientKey: IPv4 address (mapped or not), IPv6 /64, anything else as is", () => {
  assert.equal(clientKey("192.0.2.1"), "192.0.2.1");
  assert.equal(clientKey("::ffff:192.0.2.1"), "192.0.2.1");
  assert.equal(clientKey("2001:db8:1:2:aaaa::1"), clientKey("2001:db8:1:2:bbbb::9"));
  assert.notEqual(clientKey("2001:db8:1:2::1"), clientKey("2001:db8:1:3::1"));
  assert.equal(clientKey("2001:db8::1"), "2001:db8:0:0::/64");
  assert.equal(clientKey("not an address"), "not an address");
});

function addr(hostname: string): Deno.NetAddr {
  return { transport: "udp", hostname, port: 53 };
}

Deno.test("Admission: the rate limiter's table is bounded; the least recently seen goes", () => {
  const clock = new ManualClock();
  const admission = new Admission({
    allow: [parseCidr("0.0.0.0/0", "--allow"), parseCidr("::/0", "--allow")],
    rateLimit: 1,
    rateLimitBurst: 1,
    clock,
    maxClients: 100,
  });
  // A flood from 10,000 (spoofed) sources keeps the table at its bound.
  for (let i = 0; i < 10_000; i++) {
    admission.admit(addr(`10.${(i >> 16) & 0xff}.${(i >> 8) & 0xff}.${i & 0xff}`), "udp");
    assert.ok(admission.trackedClients <= 100);
  }
  assert.equal(admission.trackedClients, 100);
  // A client seen again moves to the back: it keeps its (empty) bucket...
  const kept = addr("192.0.2.1");
  assert.equal(admission.admit(kept, "udp"), Admit.ALLOW);
  for (let i = 0; i < 99; i++) admission.admit(addr(`198.51.100.${i}`), "udp");
  assert.notEqual(admission.admit(kept, "udp"), Admit.ALLOW, "still limited");
  // ...and once 100 others were seen after it, it was forgotten: a fresh bucket.
  for (let i = 0; i < 100; i++) admission.admit(addr(`203.0.113.${i}`), "udp");
  assert.equal(admission.admit(kept, "udp"), Admit.ALLOW);
  // One IPv6 /64 is one client.
  const v6 = addr("2001:db8:5:6::1");
  assert.equal(admission.admit(v6, "tcp"), Admit.ALLOW);
  assert.equal(admission.admit(addr("2001:db8:5:6::ffff"), "tcp"), Admit.REFUSE);
  assert.equal(admission.admit(addr("2001:db8:5:7::1"), "tcp"), Admit.ALLOW);
});

Deno.test("Admission: remembered access-list verdicts are bounded under a spoofed flood", () => {
  const admission = new Admission({
    allow: [parseCidr("10.0.0.0/8", "--allow")],
    rateLimit: 0,
    rateLimitBurst: 0,
    clock: new ManualClock(),
  });
  // 20,000 sources: inside the allowed prefix and out of it, each seen once.
  let most = 0;
  for (let i = 0; i < 20_000; i++) {
    const a = `${i % 2 === 0 ? 10 : 11}.${(i >> 16) & 0xff}.${(i >> 8) & 0xff}.${i & 0xff}`;
    assert.equal(admission.admit(addr(a), "udp"), i % 2 === 0 ? Admit.ALLOW : Admit.DENY);
    most = Math.max(most, admission.rememberedVerdicts);
  }
  assert.ok(most <= 8192, `at most 8,192 remembered (${most})`);
  assert.ok(admission.rememberedVerdicts > 0);
});

Deno.test("Admission: REFUSED over UDP is budgeted in all; TCP is always answered", () => {
  const clock = new ManualClock();
  const admission = new Admission({
    allow: [parseCidr("10.0.0.0/8", "--allow")],
    rateLimit: 0,
    rateLimitBurst: 1,
    clock,
  });
  assert.equal(admission.admit(addr("192.0.2.1"), "udp"), Admit.DENY);
  let answered = 0;
  for (let i = 0; i < 1000; i++) if (admission.answerRefusal("udp")) answered++;
  assert.equal(answered, UDP_REFUSALS_PER_SECOND);
  for (let i = 0; i < 10; i++) assert.equal(admission.answerRefusal("tcp"), true);
  clock.advance(100);
  answered = 0;
  for (let i = 0; i < 1000; i++) if (admission.answerRefusal("udp")) answered++;
  assert.equal(answered, UDP_REFUSALS_PER_SECOND / 10, "refills at the rate");
});

Deno.test("analyzeResponse: octets after the last field of record data are relayed as is", () => {
  // Found by fuzzing authoritative answers behind Unbound: it relays such data unchanged,
  // and three rejected in a row marked the (honest) upstream down for every client.
  const question = [...encodeName("x.test"), 0, 33, 0, 1];
  const target = [...encodeName("t.test")];
  const srv = [0, 1, 0, 2, 0, 53, ...target, 0xde, 0xad];
  const soa = [...target, ...target, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4];
  const minimum = [0, 0, 0, 30];
  const answer = new Uint8Array([
    0x12,
    0x34,
    0x81,
    0x80,
    0,
    1,
    0,
    1,
    0,
    1,
    0,
    0,
    ...question,
    0xc0,
    12,
    0,
    33,
    0,
    1,
    0,
    0,
    0,
    60,
    0,
    srv.length,
    ...srv,
    0xc0,
    12,
    0,
    6,
    0,
    1,
    0,
    0,
    1,
    0,
    0,
    soa.length + 6,
    ...soa,
    ...minimum,
    0xff,
    0xff, // two octets after MINIMUM
  ]);
  const info = new ResponseInfo();
  assert.equal(analyzeResponse(answer, info), true, info.reason);
  assert.equal(info.negativeTtl, 30, "MINIMUM read where it is, not from the last octets");
  // Names that do not parse or run past the data are still refused.
  const cut = answer.slice();
  cut[12 + question.length + 12 + 6] = 40; // the SRV target's first label runs past the data
  assert.equal(analyzeResponse(cut, info), false);
  assert.equal(info.reason, "malformed record data");
});

Deno.test("Resolver: at --max-inflight cache hits are answered; only UDP bound upstream is shed", () => {
  const clock = new ManualClock();
  const forwarder = new FakeForwarder();
  const drops: string[] = [];
  const r = new Resolver(forwarder, {
    udpMaxSize: 1232,
    maxInflight: 1,
    timeoutMs: 4000,
    logQueries: false,
    log: new Logger({ level: "error", sink: () => {} }),
    clock,
    stats: { ...NO_RESOLVER_STATS, dropped: (_transport, reason) => drops.push(reason) },
    cache: TEST_CACHE,
  });
  const ask = (name: string, id: number, transport: "udp" | "tcp" = "udp") => {
    const out: (Uint8Array | null)[] = [];
    r.resolveWith(buildQuery(name, { id }), transport, addr("127.0.0.1"), {
      deliver: (response) => out.push(response),
    });
    return out;
  };
  try {
    // stale.test is cached, then expires (TTL 60); hit.test is cached and fresh.
    ask("stale.test", 1);
    forwarder.release();
    clock.advance(61_000);
    ask("hit.test", 2);
    forwarder.release();
    // One query held upstream: the resolver is at its limit.
    const held = ask("busy.test", 3);
    assert.equal(r.hasCapacity, false);
    // hit.test is in the last tenth of its TTL: a hit would prefetch it, but not now.
    clock.advance(55_000);

    const [hit] = ask("hit.test", 4);
    assert.ok(hit, "a cache hit is answered under overload");
    assert.equal(parseMessage(hit).answers.length, 1);
    const [stale] = ask("stale.test", 5);
    assert.ok(stale, "an expired entry is served stale rather than dropped");
    assert.equal(parseMessage(stale).answers[0].ttl, 30);
    assert.deepEqual(ask("miss.test", 6), [null], "a miss over UDP is shed");
    assert.deepEqual(drops, ["overload"]);
    assert.equal(forwarder.forwarded, 3, "nothing else went upstream, no prefetch either");
    // TCP is never shed by the resolver (its listener pauses reading instead).
    const tcp = ask("miss.test", 7, "tcp");
    assert.equal(forwarder.forwarded, 4);
    forwarder.release();
    assert.equal(held.length, 1);
    assert.equal(tcp.length, 1);
    assert.equal(r.inflight, 0);
    assert.equal(r.hasCapacity, true);
    // With capacity back, the next hit prefetches.
    assert.equal(ask("hit.test", 8).length, 1);
    assert.equal(forwarder.forwarded, 5);
    forwarder.release();
  } finally {
    r.close();
  }
});
