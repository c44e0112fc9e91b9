/**
 * Unit tests of the answer cache through the resolver: a fake forwarder that answers only
 * when the test says so, and a manual clock. No sockets, real bytes: every answer is built
 * here and parsed with the tests' own DNS parser.
 */

import assert from "node:assert/strict";
import {
  AnswerCache,
  type CacheSettings,
  MAX_CACHED_ANSWER,
  MAX_CHAIN,
} from "../src/cache/answer_cache.ts";
import { cacheKeyHash } from "../src/dns/cache_key.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { Logger } from "../src/log.ts";
import { type CacheStatus, Resolver, type ResolverOptions } from "../src/resolver.ts";
import { Flight, type FlightOwner, FlightTable } from "../src/resolver/flight.ts";
import { ManualClock } from "../src/timers.ts";
import { TEST_CACHE } from "./support/cache.ts";
import {
  buildQuery,
  encodeName,
  type ParsedMessage,
  parseMessage,
  u16,
  u32,
} from "./support/dns.ts";
import { LogCapture } from "./support/proxy.ts";
import { FakeForwarder } from "./support/forwarder.ts";

// ---- answers built by hand -------------------------------------------------------------------

interface Rec {
  /** Owner; omitted: a compression pointer to the question name. */
  name?: string;
  type: number;
  ttl: number;
  rdata: number[];
}

interface Shape {
  rcode?: number;
  tc?: boolean;
  ad?: boolean;
  answers?: Rec[];
  authority?: Rec[];
  additional?: Rec[];
  /** The upstream's OPT record; null: none. Default: 1232 octets, no flags, no padding. */
  opt?: { udpSize?: number; dnssecOk?: boolean; padding?: number } | null;
  /** Answer without a question section (some servers do for errors). */
  noQuestion?: boolean;
  /** The OPT record first in the additional section rather than last. */
  optFirst?: boolean;
}

const A = 1;
const NS = 2;
const SOA = 6;
const TXT = 16;
const AAAA = 28;
const RRSIG = 46;

function questionEnd(msg: Uint8Array): number {
  let at = 12;
  while (msg[at] !== 0) at += msg[at] + 1;
  return at + 5;
}

/** A response to `query` (the message the resolver sent upstream) shaped by `shape`. */
function respond(query: Uint8Array, shape: Shape = {}): Uint8Array {
  const rcode = shape.rcode ?? 0;
  const end = questionEnd(query);
  const out: number[] = [
    query[0],
    query[1],
    0x80 | (query[2] & 0x79) | (shape.tc ? 0x02 : 0),
    0x80 | (shape.ad ? 0x20 : 0) | (query[3] & 0x10) | (rcode & 0x0f),
  ];
  const answers = shape.answers ?? [];
  const authority = shape.authority ?? [];
  const additional = shape.additional ?? [];
  const opt = shape.opt === undefined ? {} : shape.opt;
  out.push(...u16(shape.noQuestion ? 0 : 1), ...u16(answers.length), ...u16(authority.length));
  out.push(...u16(additional.length + (opt ? 1 : 0)));
  if (!shape.noQuestion) out.push(...query.subarray(12, end));
  const records = (list: Rec[]) => {
    for (const rec of list) {
      out.push(...(rec.name === undefined ? [0xc0, 12] : encodeName(rec.name)));
      out.push(...u16(rec.type), ...u16(1), ...u32(rec.ttl), ...u16(rec.rdata.length));
      out.push(...rec.rdata);
    }
  };
  records([...answers, ...authority, ...(shape.optFirst ? [] : additional)]);
  if (opt) {
    const options = opt.padding !== undefined
      ? [...u16(12), ...u16(opt.padding), ...new Array(opt.padding).fill(0)]
      : [];
    out.push(0, ...u16(41), ...u16(opt.udpSize ?? 1232), rcode >> 4, 0);
    out.push(opt.dnssecOk ? 0x80 : 0, 0, ...u16(options.length), ...options);
  }
  if (shape.optFirst) records(additional);
  return new Uint8Array(out);
}

function a(ttl: number, address = [192, 0, 2, 1]): Rec {
  return { type: A, ttl, rdata: address };
}

function soa(zone: string, ttl: number, minimum: number): Rec {
  const rdata = [
    ...encodeName(`ns.${zone}`),
    ...encodeName(`hostmaster.${zone}`),
    ...u32(2026112901),
    ...u32(7200),
    ...u32(900),
    ...u32(1209600),
    ...u32(minimum),
  ];
  return { name: zone, type: SOA, ttl, rdata };
}

/** An RRSIG-shaped record: opaque to the proxy, so it must come back byte for byte. */
function rrsig(ttl: number, covered = A): Rec {
  const rdata = [
    ...u16(covered),
    13, // algorithm
    2, // labels
    ...u32(ttl), // original TTL: never rewritten
    ...u32(0x70000000),
    ...u32(0x60000000),
    ...u16(12345),
    ...encodeName("example.test"),
  ];
  for (let i = 0; i < 64; i++) rdata.push((i * 37 + 11) & 0xff);
  return { type: RRSIG, ttl, rdata };
}

// ---- the resolver under test -----------------------------------------------------------------

interface CacheOptions extends CacheSettings {
  prefetch: boolean;
  staleAnswerTimeoutMs: number;
}

interface Harness {
  r: Resolver;
  clock: ManualClock;
  up: FakeForwarder<Shape>;
  lookups: CacheStatus[];
  prefetches: number;
  evictions: number;
}

function setup(cache: Partial<CacheOptions> = {}, options: Partial<ResolverOptions> = {}): Harness {
  const clock = new ManualClock();
  const up = new FakeForwarder<Shape>({ respond });
  const harness = { clock, up, lookups: [], prefetches: 0, evictions: 0 } as unknown as Harness;
  harness.r = new Resolver(up, {
    udpMaxSize: 1232,
    maxInflight: 10_000,
    timeoutMs: 4000,
    logQueries: false,
    log: new Logger({ level: "error", sink: () => {} }),
    clock,
    stats: {
      query() {},
      dropped() {},
      truncated() {},
      refused() {},
      slipped() {},
      cacheLookup: (result) => harness.lookups.push(result),
      prefetched: () => harness.prefetches++,
    },
    cache: { ...TEST_CACHE, ...cache },
    cacheStats: { evicted: () => harness.evictions++ },
    ...options,
  });
  return harness;
}

const CLIENT: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port: 5353 };

/** Sends `query`; the replies delivered so far (more may come later into the same array). */
function ask(r: Resolver, query: Uint8Array, transport: "udp" | "tcp" = "udp"): Uint8Array[] {
  const out: Uint8Array[] = [];
  r.resolveWith(query, transport, CLIENT, {
    deliver: (response) => {
      assert.ok(response, "no query here is dropped");
      out.push(response);
    },
  });
  return out;
}

/** Sends `query` and expects an answer at once (from the cache). */
function askNow(r: Resolver, query: Uint8Array, transport: "udp" | "tcp" = "udp"): ParsedMessage {
  const out = ask(r, query, transport);
  assert.equal(out.length, 1, "answered at once");
  return parseMessage(out[0]);
}

function q(name: string, id = 1, options: Parameters<typeof buildQuery>[1] = {}): Uint8Array {
  return buildQuery(name, { id, ...options });
}

function ttls(message: ParsedMessage): number[] {
  return [...message.answers, ...message.authority, ...message.additional]
    .filter((rec) => rec.type !== 41)
    .map((rec) => rec.ttl);
}

// ---- TTLs ------------------------------------------------------------------------------------

Deno.test("cache: served TTLs are the original minus whole seconds in cache; expiry goes upstream", () => {
  const { r, clock, up, lookups } = setup({ prefetch: false });
  const first = ask(r, q("www.example.test", 1));
  up.answer(0, { answers: [a(300), a(600, [192, 0, 2, 2])] });
  assert.deepEqual(ttls(parseMessage(first[0])), [300, 600]);

  assert.deepEqual(ttls(askNow(r, q("www.example.test", 2))), [300, 600], "same second");
  clock.advance(999);
  assert.deepEqual(ttls(askNow(r, q("www.example.test", 3))), [300, 600], "not a whole second");
  clock.advance(1);
  assert.deepEqual(ttls(askNow(r, q("www.example.test", 4))), [299, 599]);
  clock.advance(298_999);
  assert.deepEqual(ttls(askNow(r, q("www.example.test", 5))), [1, 301], "last moment: TTL 1");
  assert.equal(up.requests.length, 1, "every answer so far from the cache");
  clock.advance(1);
  const again = ask(r, q("www.example.test", 6));
  assert.equal(again.length, 0, "expired: waits for the upstream");
  assert.equal(up.requests.length, 2);
  up.answer(1, { answers: [a(300)] });
  assert.deepEqual(ttls(parseMessage(again[0])), [300]);
  assert.deepEqual(lookups, ["miss", "hit", "hit", "hit", "hit", "miss"]);
});

Deno.test("cache: --cache-min-ttl raises and --cache-max-ttl lowers positive TTLs and lifetimes", () => {
  const { r, clock, up } = setup({ minTtl: 60, maxTtl: 100 });
  ask(r, q("low.test"));
  up.answer(0, { answers: [a(10)] });
  ask(r, q("high.test"));
  up.answer(1, { answers: [a(3600), a(50, [192, 0, 2, 9])] });
  assert.deepEqual(ttls(askNow(r, q("low.test"))), [60]);
  assert.deepEqual(ttls(askNow(r, q("high.test"))), [100, 60]);
  clock.advance(59_000);
  assert.deepEqual(ttls(askNow(r, q("low.test"))), [1], "lives 60 s, not 10");
  assert.deepEqual(ttls(askNow(r, q("high.test"))), [41, 1]);
  clock.advance(1000);
  assert.equal(ask(r, q("low.test")).length, 0, "expired after 60 s");
  assert.equal(ask(r, q("high.test")).length, 0, "the smallest clamped TTL, 60 s, set its life");
});

// ---- negative caching ------------------------------------------------------------------------

Deno.test("cache: NXDOMAIN lives min(SOA TTL, MINIMUM), every TTL at most that, decremented", () => {
  const { r, clock, up } = setup();
  const first = ask(r, q("nope.example.test"));
  up.answer(0, { rcode: 3, authority: [soa("example.test", 3600, 300)] });
  assert.equal(parseMessage(first[0]).rcode, 3);
  const hit = askNow(r, q("nope.example.test", 2));
  assert.equal(hit.rcode, 3);
  assert.deepEqual(ttls(hit), [300], "the SOA's TTL says how long the denial lives");
  clock.advance(120_000);
  assert.deepEqual(ttls(askNow(r, q("nope.example.test", 3))), [180]);
  clock.advance(180_000);
  assert.equal(ask(r, q("nope.example.test", 4)).length, 0, "expired after 300 s");
  assert.equal(up.requests.length, 2);
});

Deno.test("cache: NODATA (NOERROR, no answers) is cached from the SOA, clamped by --cache-max-negative-ttl", () => {
  const { r, clock, up } = setup({ maxNegativeTtl: 60 });
  ask(r, q("v4only.example.test", 1, { type: AAAA }));
  up.answer(0, { authority: [soa("example.test", 120, 900)] });
  const hit = askNow(r, q("v4only.example.test", 2, { type: AAAA }));
  assert.equal(hit.rcode, 0);
  assert.equal(hit.answers.length, 0);
  assert.deepEqual(ttls(hit), [60]);
  clock.advance(60_000);
  assert.equal(ask(r, q("v4only.example.test", 3, { type: AAAA })).length, 0);
  // The A record of the same name is another key.
  assert.equal(ask(r, q("v4only.example.test", 4)).length, 0);
  assert.equal(up.requests.length, 3);
});

Deno.test("cache: a negative answer without an SOA, or with a 0 TTL, is not cached", () => {
  const { r, up } = setup();
  const ns: Rec = { name: "test", type: NS, ttl: 300, rdata: [...encodeName("ns.test")] };
  const cases: [string, Shape][] = [
    ["NXDOMAIN without SOA", { rcode: 3 }],
    ["NODATA with only NS in authority", { authority: [ns] }],
    ["SOA TTL 0", { rcode: 3, authority: [soa("test", 0, 300)] }],
    ["SOA MINIMUM 0", { authority: [soa("test", 300, 0)] }],
  ];
  for (const [i, [what, shape]] of cases.entries()) {
    for (let round = 0; round < 2; round++) {
      const out = ask(r, q(`neg${i}.test`, round));
      assert.equal(out.length, 0, `${what}: round ${round} goes upstream`);
      up.answer(up.requests.length - 1, shape);
      assert.equal(out.length, 1);
    }
  }
  assert.equal(r.cache!.size, 0);
});

// ---- what is never cached -----------------------------------------------------------------------

Deno.test("cache: TC=1, TTL 0, REFUSED, FORMERR, NOTIMP and answers to ECS queries are never cached", () => {
  const { r, up } = setup();
  const cases: [string, Shape][] = [
    ["TC=1", { tc: true, answers: [a(300)] }],
    ["TTL 0", { answers: [a(300), a(0, [192, 0, 2, 3])] }],
    ["REFUSED", { rcode: 5 }],
    ["FORMERR", { rcode: 1 }],
    ["NOTIMP", { rcode: 4 }],
    ["REFUSED without a question", { rcode: 5, noQuestion: true }],
  ];
  let sent = 0;
  for (const [what, shape] of cases) {
    const name = `${what.replace(/[^a-z0-9]/gi, "")}.test`;
    const first = ask(r, q(name, 1, { ednsUdpSize: 1232 }));
    up.answer(sent++, shape);
    assert.equal(first.length, 1, what);
    const parsed = parseMessage(first[0]);
    assert.equal(parsed.id, 1, what);
    assert.equal(ask(r, q(name, 2, { ednsUdpSize: 1232 })).length, 0, `${what}: asked again`);
    assert.equal(up.requests.length, ++sent, what);
    up.answer(sent - 1, shape);
  }
  // EDNS Client Subnet: the answer is for one subnet; neither cached nor served from cache.
  ask(r, q("ecs.test"));
  up.answer(sent++, { answers: [a(300)] });
  const ecs = withClientSubnet(q("ecs.test", 2, { ednsUdpSize: 1232 }));
  assert.equal(ask(r, ecs).length, 0, "an ECS query goes upstream despite the entry");
  up.answer(sent++, { answers: [a(300, [198, 51, 100, 7])] });
  assert.equal(ask(r, withClientSubnet(q("ecs.test", 3, { ednsUdpSize: 1232 }))).length, 0);
  assert.equal(up.requests.length, sent + 1);
  assert.deepEqual(
    askNow(r, q("ecs.test", 4)).answers.map((rec) => rec.data.join(".")),
    ["192.0.2.1"],
    "the ECS answer did not replace the plain one",
  );
});

/** Adds an EDNS Client Subnet option (192.0.2.0/24) to a query that has an empty OPT last. */
function withClientSubnet(query: Uint8Array): Uint8Array {
  const option = [...u16(8), ...u16(7), ...u16(1), 24, 0, 192, 0, 2];
  const out = new Uint8Array([...query, ...option]);
  out[out.length - option.length - 1] = option.length; // OPT RDLENGTH
  return out;
}

Deno.test("cache: SERVFAIL is cached for 5 seconds, never served stale", () => {
  const { r, clock, up, lookups } = setup();
  const first = ask(r, q("broken.test"));
  up.answer(0, { rcode: 2 });
  assert.equal(parseMessage(first[0]).rcode, 2);
  clock.advance(4999);
  assert.equal(askNow(r, q("broken.test", 2)).rcode, 2, "no upstream query within 5 s");
  clock.advance(1);
  const later = ask(r, q("broken.test", 3));
  assert.equal(later.length, 0, "after 5 s it is asked again");
  clock.advance(1800);
  assert.equal(later.length, 0, "and no stale SERVFAIL after the stale answer timeout");
  up.answer(1, { answers: [a(60)] });
  assert.equal(parseMessage(later[0]).answers.length, 1);
  assert.deepEqual(lookups, ["miss", "hit", "miss"]);
});

Deno.test("cache: answers over 16 KiB are not cached; smaller ones are, and UDP clients get TC=1 from them", () => {
  const { r, up } = setup();
  const txt = (size: number): Rec[] => {
    const records: Rec[] = [];
    for (let left = size; left > 0; left -= 255) {
      const n = Math.min(255, left);
      records.push({ type: TXT, ttl: 300, rdata: [n, ...new Array(n).fill(0x78)] });
    }
    return records;
  };
  ask(r, q("huge.test", 1, { type: TXT }), "tcp");
  const huge = up.answer(0, { answers: txt(MAX_CACHED_ANSWER) });
  assert.ok(huge.length > MAX_CACHED_ANSWER);
  ask(r, q("huge.test", 2, { type: TXT }), "tcp");
  assert.equal(up.requests.length, 2, "over 16 KiB: asked again");
  up.answer(1, { answers: txt(MAX_CACHED_ANSWER) });

  ask(r, q("large.test", 1, { type: TXT }), "tcp");
  up.answer(2, { answers: txt(3000) });
  const tcp = askNow(r, q("large.test", 2, { type: TXT }), "tcp");
  assert.equal(tcp.tc, false);
  assert.equal(tcp.answers.length, 12);
  const udp = askNow(r, q("large.test", 3, { type: TXT }));
  assert.equal(udp.tc, true, "cut for a 512-octet client after the cache");
  const bigUdp = askNow(r, q("large.test", 4, { type: TXT, ednsUdpSize: 4096 }));
  assert.equal(bigUdp.tc, true, "over --udp-max-size 1232 too");
  assert.equal(up.requests.length, 3);
});

// ---- the key ---------------------------------------------------------------------------------

Deno.test("cache: the key splits on DO, CD, AD and RD, and ignores name case and EDNS size", () => {
  const { r, up } = setup();
  const variants: [string, Uint8Array][] = [
    ["plain", q("k.test", 1)],
    ["DO", q("k.test", 2, { ednsUdpSize: 1232, dnssecOk: true })],
    ["CD", withBits(q("k.test", 3), 0, 0x10)],
    ["AD", withBits(q("k.test", 4), 0, 0x20)],
    ["no RD", q("k.test", 5, { rd: false })],
  ];
  for (const [what, query] of variants) {
    assert.equal(ask(r, query).length, 0, `${what}: a key of its own`);
  }
  assert.equal(up.requests.length, variants.length);
  variants.forEach((_, i) => up.answer(i, { answers: [a(300, [192, 0, 2, i + 1])] }));
  for (const [i, [what, query]] of variants.entries()) {
    const again = query.slice();
    again[1] ^= 0xff;
    const hit = askNow(r, again);
    assert.equal(hit.answers[0].data[3], i + 1, what);
  }
  // EDNS or not, any size, any case: the plain entry.
  for (
    const query of [q("K.TEST", 6, { ednsUdpSize: 4096 }), q("k.TeSt", 7, { ednsUdpSize: 512 })]
  ) {
    assert.equal(askNow(r, query).answers[0].data[3], 1);
  }
  assert.equal(up.requests.length, variants.length);
});

function withBits(query: Uint8Array, byte2: number, byte3: number): Uint8Array {
  const out = query.slice();
  out[2] |= byte2;
  out[3] |= byte3;
  return out;
}

Deno.test("cache: a 0x20 client gets its own ID and casing; the rest is byte for byte, RRSIGs too", () => {
  const { r, clock, up } = setup();
  const first = ask(r, q("www.example.test", 0x1111, { ednsUdpSize: 1232, dnssecOk: true }));
  const upstream = up.answer(0, {
    ad: true,
    answers: [a(300), rrsig(300)],
    authority: [{
      name: "example.test",
      type: NS,
      ttl: 300,
      rdata: [...encodeName("ns.example.test")],
    }],
    opt: { dnssecOk: true, padding: 0 },
  });
  assert.equal(first.length, 1);
  clock.advance(7000);
  const query = q("wWw.ExAmPlE.tEsT", 0xbeef, { ednsUdpSize: 1232, dnssecOk: true });
  const [bytes] = ask(r, query);
  const hit = parseMessage(bytes);
  assert.equal(hit.id, 0xbeef);
  assert.equal(hit.question?.name, "wWw.ExAmPlE.tEsT.");
  assert.deepEqual(ttls(hit), [293, 293, 293]);
  // Everything else as the upstream sent it, apart from its Padding option (hop-by-hop).
  const expected = parseMessage(upstream);
  assert.equal(bytes[2], upstream[2]);
  assert.equal(bytes[3], upstream[3], "flags, AD included");
  for (const section of ["answers", "authority"] as const) {
    assert.deepEqual(
      hit[section].map((rec) => [rec.name.toLowerCase(), rec.type, rec.data]),
      expected[section].map((rec) => [rec.name.toLowerCase(), rec.type, rec.data]),
    );
  }
  assert.equal(hit.opt?.dnssecOk, true);
  assert.deepEqual(hit.opt?.options, [], "no padding from the upstream's hop");
  // Byte for byte: the cached answer differs from the upstream's only in ID, question
  // casing, TTL fields and the removed Padding option (4 octets).
  assert.equal(bytes.length, upstream.length - 4);
  const diff: number[] = [];
  for (let i = 0; i < bytes.length - 11; i++) if (bytes[i] !== upstream[i]) diff.push(i);
  const ttlAt = (n: number) => [n, n + 1, n + 2, n + 3];
  const end = questionEnd(bytes);
  const allowed = new Set([0, 1, ...Array.from({ length: end - 12 }, (_, i) => 12 + i)]);
  for (const offset of ttlOffsetsOf(bytes)) ttlAt(offset).forEach((i) => allowed.add(i));
  assert.deepEqual(diff.filter((i) => !allowed.has(i)), []);
});

/** TTL field offsets of every record but OPT (the tests' own walk over the message). */
function ttlOffsetsOf(msg: Uint8Array): number[] {
  const view = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const records = view.getUint16(6) + view.getUint16(8) + view.getUint16(10);
  let at = questionEnd(msg);
  const out: number[] = [];
  for (let i = 0; i < records; i++) {
    while (msg[at] !== 0 && (msg[at] & 0xc0) !== 0xc0) at += msg[at] + 1;
    at += msg[at] === 0 ? 1 : 2;
    if (view.getUint16(at) !== 41) out.push(at + 4);
    at += 10 + view.getUint16(at + 8);
  }
  return out;
}

Deno.test("cache: one entry serves clients with and without EDNS; a client without EDNS gets no OPT", () => {
  const { r, up } = setup();
  ask(r, q("shape.test", 1, { ednsUdpSize: 4096 }));
  up.answer(0, {
    answers: [a(300)],
    additional: [a(300, [192, 0, 2, 53])],
    opt: { udpSize: 1232 },
  });
  const plain = askNow(r, q("shape.test", 2));
  assert.equal(plain.opt, null);
  assert.equal(plain.additional.length, 1, "the record after which the OPT sat is kept");
  assert.deepEqual(ttls(plain), [300, 300]);
  const edns = askNow(r, q("shape.test", 3, { ednsUdpSize: 1232 }));
  assert.ok(edns.opt);
  assert.equal(edns.additional.length, 2);
  // An OPT in the middle of the additional section: the records after it keep their TTLs.
  ask(r, q("middle.test", 1, { ednsUdpSize: 1232 }));
  const upstream = respond(up.requests[1].query, { answers: [a(300)], opt: {} });
  // Move the OPT before one more additional record by hand.
  const extra = [0xc0, 12, ...u16(A), ...u16(1), ...u32(77), ...u16(4), 192, 0, 2, 99];
  const moved = new Uint8Array([...upstream, ...extra]);
  moved[11] += 1;
  up.requests[1].settleAnswer(moved, "fake", null);
  const stripped = askNow(r, q("middle.test", 2));
  assert.equal(stripped.opt, null);
  assert.deepEqual(ttls(stripped), [300, 77]);
  assert.equal(stripped.additional[0].data.join("."), "192.0.2.99");
});

// ---- serve-stale -------------------------------------------------------------------------------

Deno.test("serve-stale: every upstream dead: stale with TTL 30 at once, then without asking for 30 s", () => {
  const { r, clock, up, lookups } = setup();
  ask(r, q("stale.test"));
  up.answer(0, { answers: [a(10)] });
  clock.advance(11_000);
  const waiting = ask(r, q("stale.test", 2, { ednsUdpSize: 1232 }));
  assert.equal(waiting.length, 0, "an expired entry first tries upstream");
  up.fail(1);
  const stale = parseMessage(waiting[0]);
  assert.equal(stale.id, 2);
  assert.equal(stale.rcode, 0);
  assert.deepEqual(ttls(stale), [30]);
  // Within the failure recheck window: stale at once, no upstream query.
  clock.advance(29_000);
  assert.deepEqual(ttls(askNow(r, q("stale.test", 3))), [30]);
  assert.equal(up.requests.length, 2);
  // After it: one new refresh attempt.
  clock.advance(1000);
  const retry = ask(r, q("stale.test", 4));
  assert.equal(up.requests.length, 3);
  up.fail(2, "timeout");
  assert.deepEqual(ttls(parseMessage(retry[0])), [30]);
  assert.deepEqual(lookups, ["miss", "stale", "stale", "stale"]);
});

Deno.test("serve-stale: an upstream slower than --stale-answer-timeout: stale first, the fresh answer replaces it", () => {
  const { r, clock, up } = setup({ staleAnswerTimeoutMs: 1800 });
  ask(r, q("slow.test"));
  up.answer(0, { answers: [a(20)] });
  clock.advance(25_000);
  const first = ask(r, q("slow.test", 2));
  const joined = ask(r, q("SLOW.test", 3));
  assert.equal(up.requests.length, 2, "both wait on one refresh");
  clock.advance(1799);
  assert.equal(first.length + joined.length, 0);
  clock.advance(1);
  assert.deepEqual(ttls(parseMessage(first[0])), [30], "stale at the client response timer");
  assert.equal(parseMessage(joined[0]).question?.name, "SLOW.test.");
  assert.equal(r.inflight, 0);
  clock.advance(3000);
  up.answer(1, { answers: [a(600, [192, 0, 2, 42])] });
  const fresh = askNow(r, q("slow.test", 4));
  assert.deepEqual(ttls(fresh), [600]);
  assert.equal(fresh.answers[0].data.join("."), "192.0.2.42");
  assert.equal(up.requests.length, 2);
});

Deno.test("serve-stale: a SERVFAIL refresh does not replace the stale entry, and starts the recheck window", () => {
  const { r, clock, up } = setup();
  ask(r, q("flaky.test"));
  up.answer(0, { answers: [a(10)] });
  clock.advance(60_000);
  const plain = ask(r, q("flaky.test", 2));
  const edns = ask(r, q("flaky.test", 3, { ednsUdpSize: 1232 }));
  const noRd = ask(r, q("flaky.test", 4, { rd: false }));
  up.answer(1, { rcode: 2, opt: { padding: 8 } });
  assert.deepEqual(ttls(parseMessage(plain[0])), [30], "stale, not SERVFAIL");
  assert.equal(parseMessage(plain[0]).opt, null);
  assert.deepEqual(ttls(parseMessage(edns[0])), [30]);
  assert.equal(noRd.length, 0, "RD=0 is another key (its own flight)");
  up.answer(2, { rcode: 2 });
  assert.equal(parseMessage(noRd[0]).rcode, 2, "without RD: no stale data (RFC 8767 section 5)");
  // The good entry is still there, served stale without asking for 30 s.
  clock.advance(10_000);
  assert.deepEqual(ttls(askNow(r, q("flaky.test", 5))), [30]);
  assert.equal(up.requests.length, 3);
});

Deno.test("serve-stale: a SERVFAIL after the stale timer already answered still starts the recheck window", () => {
  const { r, clock, up } = setup();
  ask(r, q("late.test"));
  up.answer(0, { answers: [a(10)] });
  clock.advance(20_000);
  const out = ask(r, q("late.test", 2));
  clock.advance(1800);
  assert.deepEqual(ttls(parseMessage(out[0])), [30]);
  up.answer(1, { rcode: 2 });
  assert.deepEqual(ttls(askNow(r, q("late.test", 3))), [30], "no second 1.8 s wait");
  assert.equal(up.requests.length, 2);
});

Deno.test("serve-stale: past --serve-stale, or with it 0, or with RD=0, no stale answer", () => {
  for (const serveStaleSeconds of [0, 60]) {
    const { r, clock, up } = setup({ serveStaleSeconds });
    ask(r, q("gone.test"));
    up.answer(0, { answers: [a(10)] });
    clock.advance(10_000 + serveStaleSeconds * 1000);
    const out = ask(r, q("gone.test", 2));
    clock.advance(1800);
    assert.equal(out.length, 0, `serve-stale ${serveStaleSeconds}: no stale answer`);
    up.fail(1);
    assert.equal(parseMessage(out[0]).rcode, 2);
    assert.equal(r.cache!.size, 0);
  }
  const { r, clock, up } = setup();
  ask(r, q("nord.test", 1, { rd: false }));
  up.answer(0, { answers: [a(10)] });
  clock.advance(11_000);
  const out = ask(r, q("nord.test", 2, { rd: false }));
  clock.advance(1800);
  assert.equal(out.length, 0);
  up.fail(1);
  assert.equal(parseMessage(out[0]).rcode, 2);
});

Deno.test("serve-stale: 257 waiters share one refresh and get the fresh answer, not stale", () => {
  const { r, clock, up } = setup();
  ask(r, q("crowded.test"));
  up.answer(0, { answers: [a(10)] });
  clock.advance(11_000);
  // 256 wait on the refresh, the 257th on its follower: still one question upstream.
  const waiting = Array.from({ length: 257 }, (_, i) => ask(r, q("crowded.test", i)));
  assert.equal(up.requests.length, 2);
  clock.advance(1000);
  up.answer(1, { answers: [a(120, [192, 0, 2, 9])] });
  assert.equal(waiting[256].length, 0, "the follower's waiters: in the next turn");
  clock.advance(0);
  for (const out of waiting) assert.deepEqual(ttls(parseMessage(out[0])), [120]);
  assert.equal(r.inflight, 0);
});

Deno.test("serve-stale: --stale-answer-timeout 0 answers stale at once and refreshes behind", () => {
  const { r, clock, up } = setup({ staleAnswerTimeoutMs: 0 });
  ask(r, q("now.test"));
  up.answer(0, { answers: [a(10)] });
  clock.advance(15_000);
  assert.deepEqual(ttls(askNow(r, q("now.test", 2))), [30]);
  assert.equal(up.requests.length, 2, "the refresh went out");
  up.answer(1, { answers: [a(120)] });
  assert.deepEqual(ttls(askNow(r, q("now.test", 3))), [120]);
  assert.equal(r.inflight, 0);
});

Deno.test("serve-stale: an entry flushed or evicted while a client waits on it is never served", () => {
  const { r, clock, up } = setup({ maxEntries: 2 });
  ask(r, q("mixed.test", 1, { ednsUdpSize: 1232 }));
  up.answer(0, { answers: [a(10)], additional: [a(10, [192, 0, 2, 53])] });
  clock.advance(11_000);
  // A waiter with the expired entry to fall back on; then SIGHUP flushes the cache, and a
  // second waiter joins with none. The SERVFAIL reaches both, well formed, OPT removed.
  const first = ask(r, q("mixed.test", 2));
  r.flushCache();
  const second = ask(r, q("mixed.test", 3));
  assert.equal(up.requests.length, 2);
  up.answer(1, { rcode: 2, opt: { udpSize: 4096, padding: 40 } });
  for (const [out, id] of [[first, 2], [second, 3]] as const) {
    const failed = parseMessage(out[0]);
    assert.equal(failed.rcode, 2);
    assert.equal(failed.opt, null);
    assert.equal(failed.id, id);
    assert.equal(out[0].length, questionEnd(out[0]));
  }
  // Evicted while waiting (its entry object and arena slot now hold another answer): no
  // stale answer at the stale answer timeout; the client waits for the refresh instead.
  ask(r, q("evicted.test"));
  up.answer(2, { answers: [a(10, [192, 0, 2, 66])] });
  clock.advance(11_000);
  const waiting = ask(r, q("evicted.test", 2));
  for (const [i, name] of ["other1.test", "other2.test"].entries()) {
    ask(r, q(name));
    up.answer(4 + i, { answers: [a(300, [198, 51, 100, i])] });
  }
  clock.advance(1800);
  assert.equal(waiting.length, 0, "not served from a freed slot");
  up.answer(3, { answers: [a(60, [192, 0, 2, 67])] });
  assert.equal(formatAddress(parseMessage(waiting[0])), "192.0.2.67");
});

function formatAddress(message: ParsedMessage): string {
  return message.answers[0].data.join(".");
}

// ---- prefetch --------------------------------------------------------------------------------

Deno.test("prefetch: asked in the last tenth, the entry is refreshed once before it expires; clients never miss", () => {
  const { r, clock, up, lookups } = setup();
  ask(r, q("hot.test"));
  up.answer(0, { answers: [a(100)] });
  clock.advance(89_000);
  askNow(r, q("hot.test", 2));
  assert.equal(up.requests.length, 1, "11 s left: not yet");
  clock.advance(1000);
  assert.deepEqual(ttls(askNow(r, q("hot.test", 3))), [10]);
  assert.equal(up.requests.length, 2, "10 s left: one refresh");
  clock.advance(2000);
  askNow(r, q("hot.test", 4));
  askNow(r, q("hot.test", 5));
  assert.equal(up.requests.length, 2, "only once");
  up.answer(1, { answers: [a(100, [192, 0, 2, 77])] });
  clock.advance(50_000);
  const later = askNow(r, q("hot.test", 6));
  assert.deepEqual(ttls(later), [50], "the refreshed entry, 50 s in");
  assert.equal(later.answers[0].data.join("."), "192.0.2.77");
  assert.deepEqual(lookups, ["miss", "hit", "hit", "hit", "hit", "hit"]);
});

Deno.test("prefetch: not for TTLs under 10 s, not with --cache-prefetch false; a failed one keeps the entry", () => {
  {
    const { r, clock, up, prefetches } = setup();
    ask(r, q("short.test"));
    up.answer(0, { answers: [a(9)] });
    clock.advance(8500);
    askNow(r, q("short.test", 2));
    assert.equal(up.requests.length, 1);
    assert.equal(prefetches, 0);
  }
  {
    const { r, clock, up } = setup({ prefetch: false });
    ask(r, q("off.test"));
    up.answer(0, { answers: [a(100)] });
    clock.advance(95_000);
    askNow(r, q("off.test", 2));
    assert.equal(up.requests.length, 1);
  }
  const harness = setup();
  const { r, clock, up } = harness;
  ask(r, q("fails.test"));
  up.answer(0, { answers: [a(100)] });
  clock.advance(95_000);
  askNow(r, q("fails.test", 2));
  assert.equal(harness.prefetches, 1);
  up.answer(1, { rcode: 2 });
  assert.deepEqual(ttls(askNow(r, q("fails.test", 3))), [5], "a SERVFAIL refresh keeps the entry");
  assert.equal(up.requests.length, 2);
});

Deno.test("prefetch: a client whose entry expired during a slow prefetch joins it", () => {
  const { r, clock, up, lookups } = setup();
  ask(r, q("join.test"));
  up.answer(0, { answers: [a(100)] });
  clock.advance(95_000);
  askNow(r, q("join.test", 2));
  clock.advance(6000);
  const out = ask(r, q("join.test", 3));
  assert.equal(up.requests.length, 2, "no second query");
  up.answer(1, { answers: [a(100)] });
  assert.deepEqual(ttls(parseMessage(out[0])), [100]);
  assert.deepEqual(lookups, ["miss", "hit", "coalesced"]);
});

// ---- coalescing ------------------------------------------------------------------------------

Deno.test("coalescing: 100 concurrent identical misses make 1 upstream query and 100 correct answers", () => {
  const { r, up, lookups } = setup();
  const replies: Uint8Array[][] = [];
  const names: string[] = [];
  for (let i = 0; i < 100; i++) {
    // 0x20: each client its own casing.
    const name = [..."www.coalesce.test"].map((c, j) => (i >> (j % 7)) & 1 ? c.toUpperCase() : c)
      .join("");
    names.push(name);
    replies.push(ask(r, q(name, 1000 + i, i % 2 === 0 ? { ednsUdpSize: 1232 } : {})));
  }
  assert.equal(up.requests.length, 1);
  assert.equal(r.flights, 1);
  assert.equal(r.inflight, 100);
  up.answer(0, { answers: [a(300)] });
  for (let i = 0; i < 100; i++) {
    assert.equal(replies[i].length, 1, `client ${i}`);
    const reply = parseMessage(replies[i][0]);
    assert.equal(reply.id, 1000 + i);
    assert.equal(reply.question?.name, `${names[i]}.`);
    assert.equal(reply.answers[0].data.join("."), "192.0.2.1");
    assert.equal(reply.opt !== null, i % 2 === 0, "OPT only for EDNS clients");
  }
  assert.equal(r.inflight, 0);
  assert.equal(r.flights, 0);
  assert.equal(lookups.filter((l) => l === "miss").length, 1);
  assert.equal(lookups.filter((l) => l === "coalesced").length, 99);
});

Deno.test("coalescing: clients without EDNS get the answer without the OPT, wherever it sits", () => {
  // Servers put the OPT last (then the last waiter's answer is cut short in place) but may put
  // it anywhere in the additional section (then it is copied out around it).
  for (const optFirst of [false, true]) {
    const { r, up } = setup();
    const replies: Uint8Array[][] = [];
    for (let i = 0; i < 3; i++) {
      replies.push(ask(r, q("glue.coalesce.test", 2000 + i, i === 1 ? { ednsUdpSize: 1232 } : {})));
    }
    assert.equal(up.requests.length, 1);
    const glue = { name: "ns.glue.coalesce.test", type: A, ttl: 300, rdata: [192, 0, 2, 53] };
    up.answer(0, { answers: [a(300)], additional: [glue], optFirst, opt: { padding: 20 } });
    for (let i = 0; i < 3; i++) {
      const what = `optFirst=${optFirst} client ${i}`;
      const bytes = replies[i][0];
      const reply = parseMessage(bytes);
      assert.equal(reply.id, 2000 + i, what);
      assert.equal(reply.opt !== null, i === 1, what);
      const glueBack = reply.additional.filter((rec) => rec.type !== 41);
      assert.equal(glueBack.length, 1, what);
      assert.equal(glueBack[0].data.join("."), "192.0.2.53", what);
      // ARCOUNT says exactly what is there: no OPT counted that was cut off.
      assert.equal((bytes[10] << 8) | bytes[11], i === 1 ? 2 : 1, what);
      assert.equal(reply.answers[0].data.join("."), "192.0.2.1", what);
    }
  }
});

Deno.test("coalescing: past 256 waiters, clients wait on a follower: one upstream query", () => {
  const { r, up, clock } = setup();
  const replies: Uint8Array[][] = [];
  for (let i = 0; i < 600; i++) {
    replies.push(ask(r, q(i % 2 === 0 ? "crowd.test" : "CROWD.test", i)));
  }
  assert.equal(up.requests.length, 1);
  assert.equal(r.flights, 1, "the newest follower is the one to join");
  assert.equal(r.inflight, 600);
  up.answer(0, { answers: [a(300)] });
  // The flight's 256 at once, each follower's in a turn of its own.
  assert.equal(replies.filter((out) => out.length === 1).length, 256);
  assert.equal(r.flights, 0, "a settled chain is joined by nobody");
  clock.advance(0);
  for (const [i, out] of replies.entries()) {
    assert.equal(out.length, 1);
    const reply = parseMessage(out[0]);
    assert.equal(reply.id, i);
    assert.equal(reply.question?.name, i % 2 === 0 ? "crowd.test." : "CROWD.test.");
  }
  assert.equal(r.inflight, 0);
  assert.equal(r.flights, 0);
  // A failure reaches the followers' clients too.
  const failed: Uint8Array[][] = [];
  for (let i = 0; i < 300; i++) failed.push(ask(r, q("lost.test", i)));
  assert.equal(up.requests.length, 2);
  up.fail(1, "timeout");
  assert.ok(failed.every((out) => out.length === 1 && parseMessage(out[0]).rcode === 2));
  assert.equal(r.inflight, 0);
  assert.equal(r.flights, 0);
});

Deno.test("coalescing: waiters that get TC=1 are cut from the shared answer in their own shape", () => {
  const { r, up, clock } = setup();
  const txt = (size: number): Rec[] => {
    const records: Rec[] = [];
    for (let left = size; left > 0; left -= 255) {
      const n = Math.min(255, left);
      records.push({ type: TXT, ttl: 300, rdata: [n, ...new Array(n).fill(0x78)] });
    }
    return records;
  };
  const plain = ask(r, q("Cut.test", 1, { type: TXT }));
  const edns = ask(r, q("cUT.test", 2, { type: TXT, ednsUdpSize: 1232 }));
  const stream = ask(r, q("CUT.TEST", 3, { type: TXT }), "tcp");
  const last = ask(r, q("cut.TEST", 4, { type: TXT }));
  // Followers too: past 256 waiters.
  const more = Array.from({ length: 300 }, (_, i) => ask(r, q("cut.test", 10 + i, { type: TXT })));
  assert.equal(up.requests.length, 1);
  up.answer(0, { answers: txt(3000), opt: { udpSize: 4096 } });
  clock.advance(0);
  for (
    const [out, id, name, tc, opt] of [
      [plain, 1, "Cut.test.", true, false],
      [edns, 2, "cUT.test.", true, true],
      [stream, 3, "CUT.TEST.", false, false],
      [last, 4, "cut.TEST.", true, false],
      ...more.map((o, i) => [o, 10 + i, "cut.test.", true, false] as const),
    ] as const
  ) {
    assert.equal(out.length, 1, `answer ${id}`);
    const reply = parseMessage(out[0]);
    assert.deepEqual(
      [reply.id, reply.question?.name, reply.tc, reply.opt !== null, reply.answers.length],
      [id, name, tc, opt, tc ? 0 : 12],
      `answer ${id}`,
    );
    assert.ok(out[0].length <= (tc ? (opt ? 1232 : 512) : 65535));
  }
  assert.equal(r.inflight, 0);
});

Deno.test("coalescing: an upstream failure reaches every waiter as SERVFAIL with its own ID", () => {
  const { r, up } = setup();
  const replies = [ask(r, q("down.test", 1)), ask(r, q("DOWN.test", 2, { ednsUdpSize: 1232 }))];
  up.fail(0, "timeout");
  const [one, two] = replies.map((out) => parseMessage(out[0]));
  assert.deepEqual([one.id, one.rcode, one.question?.name], [1, 2, "down.test."]);
  assert.deepEqual([two.id, two.rcode, two.question?.name], [2, 2, "DOWN.test."]);
  assert.equal(r.cache!.size, 0, "a timeout is not cached");
});

Deno.test("coalescing: the flight table bounds its chains", () => {
  const owner: FlightOwner = { flightAnswered() {}, flightFailed() {} };
  const table = new FlightTable();
  const flights = Array.from({ length: MAX_CHAIN + 2 }, (_, i) => {
    const query = q(`name${i}.test`);
    return new Flight(owner, query, questionEnd(query), 0, query, 42, 0);
  });
  const added = flights.map((flight) => table.add(flight));
  assert.deepEqual(added, flights.map((_, i) => i < MAX_CHAIN));
  assert.equal(table.size, MAX_CHAIN);
  assert.equal(
    table.find(flights[3].keyQuery, questionEnd(flights[3].keyQuery), 42, 0),
    flights[3],
  );
  for (const flight of flights) table.remove(flight);
  assert.equal(table.size, 0);
});

// ---- bounds ----------------------------------------------------------------------------------

Deno.test("eviction: the least recently used entry goes at --cache-size", () => {
  const harness = setup({ maxEntries: 3 });
  const { r, up } = harness;
  for (const [i, name] of ["one.test", "two.test", "three.test"].entries()) {
    ask(r, q(name));
    up.answer(i, { answers: [a(300)] });
  }
  askNow(r, q("one.test")); // now "two" is the least recently used
  ask(r, q("four.test"));
  up.answer(3, { answers: [a(300)] });
  assert.equal(r.cache!.size, 3);
  assert.equal(harness.evictions, 1);
  askNow(r, q("one.test"));
  askNow(r, q("three.test"));
  askNow(r, q("four.test"));
  assert.equal(ask(r, q("two.test")).length, 0, "evicted");
  assert.equal(up.requests.length, 5);
});

Deno.test("bounded memory: an endless stream of unique names keeps the cache at --cache-size", () => {
  const harness = setup({ maxEntries: 500 });
  const { r, up } = harness;
  for (let i = 0; i < 20_000; i++) {
    const out = ask(r, q(`u${i}.stream.test`, i & 0xffff));
    up.answer(i, { answers: [a(300)] });
    assert.equal(out.length, 1);
  }
  assert.equal(r.cache!.size, 500);
  assert.equal(harness.evictions, 19_500);
  assert.equal(r.flights, 0);
  assert.equal(r.inflight, 0);
  // The newest 500 are there, the older ones are not.
  askNow(r, q("u19999.stream.test"));
  askNow(r, q("u19500.stream.test"));
  assert.equal(ask(r, q("u19499.stream.test")).length, 0);
});

/** An AnswerCache used directly (no resolver): `maxEntries`, no TTL clamps, no serve-stale. */
function directCache(maxEntries: number): AnswerCache {
  return new AnswerCache({
    maxEntries,
    minTtl: 0,
    maxTtl: 86_400,
    maxNegativeTtl: 3600,
    serveStaleSeconds: 0,
  });
}

Deno.test("cache: AnswerCache keys, hash and flush, directly", () => {
  const cache = directCache(10);
  const upper = q("CASE.test");
  const lower = q("case.test");
  assert.equal(
    cacheKeyHash(upper, questionEnd(upper), 8),
    cacheKeyHash(lower, questionEnd(lower), 8),
  );
  assert.notEqual(
    cacheKeyHash(lower, questionEnd(lower), 8),
    cacheKeyHash(lower, questionEnd(lower), 9),
  );
  assert.ok(cacheKeyHash(lower, questionEnd(lower), 8) < 2 ** 30);
  assert.equal(cache.flush(), 0);
});

Deno.test("cache: at most MAX_CHAIN entries share a hash (a flood of colliding names stores no more)", () => {
  const cache = directCache(100);
  // Every name stored under one forced hash, as colliding names would be.
  const collide = 42;
  const info = new ResponseInfo();
  const queries = Array.from({ length: MAX_CHAIN + 2 }, (_, i) => q(`collide${i}.test`));
  const stored = queries.map((query) => {
    const response = respond(query, { answers: [a(300)] });
    assert.ok(analyzeResponse(response, info));
    return cache.store(query, questionEnd(query), 0, response, info, 1000, collide) !== null;
  });
  assert.deepEqual(stored, queries.map((_, i) => i < MAX_CHAIN));
  assert.equal(cache.size, MAX_CHAIN);
  const found = queries.map((query) =>
    cache.lookup(query, questionEnd(query), 0, 1000, collide) !== null
  );
  assert.deepEqual(found, stored, "each stored name found, by its own question");
});

Deno.test("cache: --cache-max-bytes bounds the memory held whatever the mix of answer sizes", () => {
  const mib = 1024 * 1024;
  const cache = new AnswerCache({
    maxEntries: 10_000,
    maxBytes: mib,
    minTtl: 0,
    maxTtl: 86_400,
    maxNegativeTtl: 3600,
    serveStaleSeconds: 0,
  });
  const info = new ResponseInfo();
  const txt = (size: number): Rec[] => {
    const records: Rec[] = [];
    for (let left = size; left > 0; left -= 255) {
      const n = Math.min(255, left);
      records.push({ type: TXT, ttl: 300, rdata: [n, ...new Array(n).fill(0x78)] });
    }
    return records;
  };
  const store = (name: string, answers: Rec[]): boolean => {
    const query = q(name, 1, { type: TXT });
    const response = respond(query, { answers });
    assert.ok(analyzeResponse(response, info));
    return cache.store(query, questionEnd(query), 0, response, info, 1000) !== null;
  };
  const has = (name: string): boolean => {
    const query = q(name, 1, { type: TXT });
    return cache.lookup(query, questionEnd(query), 0, 1000) !== null;
  };
  // 15 KB answers (16 KiB slots): 1 MiB holds 64 of them (16 per chunk), not 500.
  const large = txt(14_500);
  for (let i = 0; i < 500; i++) assert.ok(store(`large${i}.test`, large));
  assert.ok(cache.bytes <= mib, `${cache.bytes} bytes held`);
  assert.equal(cache.size, 64);
  assert.ok(has("large499.test") && !has("large435.test"), "the least recently used went");
  // Then small answers: the chunks of the large ones go to them, the total stays bounded.
  const small = [a(300)];
  for (let i = 0; i < 20_000; i++) assert.ok(store(`small${i}.test`, small));
  assert.ok(cache.bytes <= mib, `${cache.bytes} bytes held`);
  assert.equal(cache.size, 10_000, "small answers: the entry limit binds first");
  // And mixed, over and over: still bounded, and each answer stored finds its slot.
  for (let i = 0; i < 2_000; i++) {
    assert.ok(store(`mixed${i}.test`, i % 3 === 0 ? large : i % 3 === 1 ? txt(2000) : small));
    assert.ok(cache.bytes <= mib);
  }
  assert.ok(has("mixed1999.test") && has("mixed1998.test") && has("mixed1997.test"));
  assert.equal(cache.flush() > 0, true);
  assert.equal(cache.bytes, 0);
});

// ---- off -----------------------------------------------------------------------------------------

Deno.test("--cache-size 0: no cache, no coalescing, no prefetch; the log says cache=off", () => {
  const logs = new LogCapture();
  const { r, clock, up, lookups } = setup({ maxEntries: 0 }, {
    logQueries: true,
    log: logs.logger("info"),
  });
  assert.equal(r.cache, null);
  const one = ask(r, q("off.test", 1));
  const two = ask(r, q("off.test", 2));
  assert.equal(up.requests.length, 2, "identical concurrent queries are not coalesced");
  up.answer(0, { answers: [a(300)] });
  up.answer(1, { answers: [a(300)] });
  assert.equal(one.length + two.length, 2);
  clock.advance(295_000);
  ask(r, q("off.test", 3));
  assert.equal(up.requests.length, 3, "nothing cached");
  assert.deepEqual(lookups, []);
  assert.deepEqual(logs.find("query").map((line) => line.cache), ["off", "off"]);
  assert.equal(r.flushCache(), 0);
});

Deno.test("observability: the query log's cache= field says hit, miss, stale or coalesced", () => {
  const logs = new LogCapture();
  const { r, clock, up } = setup({}, { logQueries: true, log: logs.logger("info") });
  ask(r, q("log.test", 1));
  ask(r, q("log.test", 2));
  up.answer(0, { answers: [a(10)] });
  askNow(r, q("log.test", 3));
  clock.advance(11_000);
  ask(r, q("log.test", 4));
  up.fail(1);
  assert.deepEqual(
    logs.find("query").map((line) => line.cache),
    ["miss", "coalesced", "hit", "stale"],
  );
  assert.equal(r.flushCache(), 1);
  assert.equal(r.cache!.size, 0);
});
