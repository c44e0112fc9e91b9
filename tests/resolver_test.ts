/**
 * Unit tests of the resolver's stages (admit, validate, forward, finish) with a fake
 * forwarder and a manual clock: no sockets, real bytes.
 */

import assert from "node:assert/strict";
import { parseCidr } from "../src/config.ts";
import { Logger } from "../src/log.ts";
import type { ResponseSink, Transport } from "../src/resolver.ts";
import { type DropReason, Resolver, type ResolverOptions } from "../src/resolver.ts";
import { Admission } from "../src/resolver/admission.ts";
import { ManualClock } from "../src/timers.ts";
import { UpstreamError } from "../src/upstream/errors.ts";
import type { Forwarder } from "../src/upstream/forwarder.ts";
import { buildQuery, parseMessage } from "./support/dns.ts";
import { VERSION } from "../src/version.ts";
import { FakeForwarder } from "./support/forwarder.ts";

interface Delivered {
  response: Uint8Array | null;
  close: boolean;
}

function sink(out: Delivered[]): ResponseSink {
  return { deliver: (response, _client, close) => out.push({ response, close: !!close }) };
}

const CLIENT: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port: 5353 };
const quiet = new Logger({ level: "error", sink: () => {} });

function resolver(
  forwarder: Forwarder,
  overrides: Partial<ResolverOptions> = {},
): { resolver: Resolver; clock: ManualClock; drops: DropReason[] } {
  const clock = new ManualClock();
  const drops: DropReason[] = [];
  const instance = new Resolver(forwarder, {
    udpMaxSize: 1232,
    maxInflight: 100,
    timeoutMs: 2000,
    logQueries: false,
    log: quiet,
    refuseAny: true,
    clock,
    stats: {
      query() {},
      dropped: (_transport, reason) => drops.push(reason),
      truncated() {},
      refused() {},
      slipped() {},
      cacheLookup() {},
      prefetched() {},
    },
    ...overrides,
  });
  return { resolver: instance, clock, drops };
}

function ask(
  r: Resolver,
  query: Uint8Array,
  transport: Transport = "udp",
  client: Deno.Addr = CLIENT,
): Delivered[] {
  const out: Delivered[] = [];
  r.resolveWith(query, transport, client, sink(out));
  return out;
}

Deno.test("validate: malformed, unsupported and dangerous queries never reach the forwarder", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r, drops } = resolver(forwarder);
  const good = buildQuery("x.test", { id: 7 });
  const cases: [string, Uint8Array, number][] = [
    ["trailing byte", new Uint8Array([...good, 0]), 1],
    ["TC=1 in a query", Uint8Array.from(good, (b, i) => i === 2 ? b | 0x02 : b), 1],
    ["QTYPE 0", buildQuery("x.test", { id: 7, type: 0 }), 1],
    ["AXFR", buildQuery("x.test", { id: 7, type: 252 }), 4],
    ["TKEY (meta)", buildQuery("x.test", { id: 7, type: 249 }), 4],
    ["MAILA (meta)", buildQuery("x.test", { id: 7, type: 254 }), 4],
    ["NOTIFY opcode", Uint8Array.from(good, (b, i) => i === 2 ? (4 << 3) | 1 : b), 4],
  ];
  for (const [what, query, rcode] of cases) {
    const [reply] = ask(r, query);
    assert.ok(reply?.response, what);
    const parsed = parseMessage(reply.response);
    assert.equal(parsed.id, 7, what);
    assert.equal(parsed.rcode, rcode, what);
    assert.equal(parsed.qr, true, what);
  }
  // Unreadable and reflected messages are dropped.
  assert.equal(ask(r, new Uint8Array(5))[0].response, null);
  assert.equal(ask(r, Uint8Array.from(good, (b, i) => i === 2 ? b | 0x80 : b))[0].response, null);
  assert.deepEqual(drops, ["malformed", "response"]);
  assert.equal(forwarder.requests.length, 0);
});

Deno.test("forward + finish: the client's ID and casing, no OPT for a client without EDNS", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder);
  const plain = buildQuery("MiXeD.Case.TEST", { id: 0x1234 });
  const out = ask(r, plain);
  assert.equal(out.length, 0, "waiting for the upstream");
  const upstreamQuery = forwarder.requests[0].query;
  // With an OPT the client did not send; not padded (the upstream set pads, see pool_test).
  const upstreamOpt = parseMessage(upstreamQuery).opt;
  assert.ok(upstreamOpt !== null);
  assert.ok(!upstreamOpt.options.some((o) => o.code === 12), "padding is the pool's");
  forwarder.answer(0);
  const reply = parseMessage(out[0].response!);
  assert.equal(reply.id, 0x1234);
  assert.equal(reply.question?.name, "MiXeD.Case.TEST.");
  assert.equal(reply.opt, null, "no OPT for a client that sent none");
  assert.equal(reply.answers.length, 1);
  assert.equal(r.inflight, 0);

  const withEdns = buildQuery("edns.test", { id: 9, ednsUdpSize: 4096, dnssecOk: true });
  const out2 = ask(r, withEdns);
  forwarder.answer(1);
  const reply2 = parseMessage(out2[0].response!);
  assert.ok(reply2.opt, "OPT kept for an EDNS client");
  assert.equal(reply2.opt.dnssecOk, true);
  assert.ok(!reply2.opt.options.some((o) => o.code === 12), "no padding goes back to clients");
});

Deno.test("finish: UDP answers are truncated per client, TCP answers never", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder, { cache: undefined });
  const udp = ask(r, buildQuery("big2000.test", { id: 1, type: 16 }));
  const tcp = ask(r, buildQuery("big2000.test", { id: 2, type: 16 }), "tcp");
  forwarder.answer(0);
  forwarder.answer(1);
  const small = parseMessage(udp[0].response!);
  assert.equal(small.tc, true);
  assert.ok(udp[0].response!.length <= 512);
  const whole = parseMessage(tcp[0].response!);
  assert.equal(whole.tc, false);
  assert.equal(whole.answers.length, 1);
});

Deno.test("forward: an upstream failure is SERVFAIL from the query's own bytes, with EDE", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder);
  const out = ask(r, buildQuery("Fail.Test", { id: 77, ednsUdpSize: 1232 }));
  forwarder.requests[0].settleFailure(new UpstreamError("timeout", "no answer", "fake"));
  const reply = parseMessage(out[0].response!);
  assert.equal(reply.rcode, 2);
  assert.equal(reply.id, 77);
  assert.equal(reply.question?.name, "Fail.Test.");
  const ede = reply.opt?.options.find((o) => o.code === 15);
  assert.ok(ede, "an Extended DNS Error");
  assert.equal((ede.data[0] << 8) | ede.data[1], 22); // No Reachable Authority
  assert.equal(r.inflight, 0);
});

Deno.test("capacity: at --max-inflight UDP is shed, TCP is taken, and capacity comes back", async () => {
  const forwarder = new FakeForwarder();
  const { resolver: r, drops } = resolver(forwarder, { maxInflight: 2 });
  ask(r, buildQuery("a.test", { id: 1 }));
  ask(r, buildQuery("b.test", { id: 2 }));
  assert.equal(r.hasCapacity, false);
  const shed = ask(r, buildQuery("c.test", { id: 3 }));
  assert.equal(shed[0].response, null);
  assert.deepEqual(drops, ["overload"]);
  const tcp = ask(r, buildQuery("d.test", { id: 4 }), "tcp");
  assert.equal(tcp.length, 0, "a TCP query is never dropped");
  assert.equal(forwarder.requests.length, 3);
  let woken = false;
  const wait = r.waitForCapacity().then(() => woken = true);
  forwarder.answer(0);
  forwarder.answer(2);
  await wait;
  assert.equal(woken, true);
  assert.equal(r.hasCapacity, true);
});

Deno.test("validate: ANY over UDP gets an empty TC=1 answer at once; over TCP it is forwarded", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder);
  const query = buildQuery("any.test", { id: 5, type: 255 });
  const [udp] = ask(r, query);
  const parsed = parseMessage(udp.response!);
  assert.equal(parsed.tc, true);
  assert.equal(parsed.answers.length, 0);
  assert.ok(udp.response!.length <= query.length);
  assert.equal(forwarder.requests.length, 0);
  ask(r, query, "tcp");
  assert.equal(forwarder.requests.length, 1);
});

Deno.test("admit: a client outside --allow gets REFUSED, no larger than its query", () => {
  const forwarder = new FakeForwarder();
  const clock = new ManualClock();
  const admission = new Admission({
    allow: [parseCidr("10.0.0.0/8", "--allow")],
    rateLimit: 0,
    rateLimitBurst: 1,
    clock,
  });
  const { resolver: r } = resolver(forwarder, { admission, clock });
  const query = buildQuery("refused.test", { id: 3, ednsUdpSize: 1232 });
  const [udp] = ask(r, query);
  assert.equal(parseMessage(udp.response!).rcode, 5);
  assert.ok(udp.response!.length <= query.length);
  const tcpClient: Deno.NetAddr = { transport: "tcp", hostname: "192.0.2.1", port: 1 };
  const [tcp] = ask(r, query, "tcp", tcpClient);
  assert.equal(parseMessage(tcp.response!).rcode, 5);
  assert.equal(tcp.close, true, "the TCP connection closes after REFUSED");
  const inside: Deno.NetAddr = { transport: "udp", hostname: "10.1.2.3", port: 1 };
  assert.equal(ask(r, query, "udp", inside).length, 0, "an allowed client goes upstream");
  assert.equal(forwarder.requests.length, 1);
});

Deno.test("admit: over the rate limit UDP alternates drop and TC=1 slip; TCP gets REFUSED", () => {
  const forwarder = new FakeForwarder();
  const clock = new ManualClock();
  const admission = new Admission({
    allow: [parseCidr("0.0.0.0/0", "--allow"), parseCidr("::/0", "--allow")],
    rateLimit: 10,
    rateLimitBurst: 3,
    clock,
  });
  const { resolver: r, drops } = resolver(forwarder, { admission, clock });
  const query = buildQuery("flood.test", { id: 1 });
  for (let i = 0; i < 3; i++) ask(r, query);
  assert.equal(forwarder.requests.length, 3, "the burst goes through");
  const limited = [ask(r, query)[0], ask(r, query)[0], ask(r, query)[0], ask(r, query)[0]];
  assert.deepEqual(limited.map((d) => d.response === null), [true, false, true, false]);
  assert.equal(parseMessage(limited[1].response!).tc, true);
  assert.deepEqual(drops, ["rate_limit", "rate_limit"]);
  const tcp = ask(r, query, "tcp", { transport: "tcp", hostname: "127.0.0.1", port: 2 });
  assert.equal(parseMessage(tcp[0].response!).rcode, 5);
  // Another client is not limited.
  ask(r, query, "udp", { transport: "udp", hostname: "127.0.0.9", port: 1 });
  assert.equal(forwarder.requests.length, 4);
  // Tokens come back with time: 10 per second.
  clock.advance(200);
  ask(r, query);
  ask(r, query);
  assert.equal(forwarder.requests.length, 6);
});

Deno.test("identity: version.bind CH TXT from loopback is answered by the proxy, never forwarded", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder);
  for (const name of ["version.bind", "VERSION.Bind", "version.server"]) {
    const query = buildQuery(name, { id: 0x4242, type: 16, qclass: 3, ednsUdpSize: 1232 });
    const [reply] = ask(r, query);
    assert.ok(reply?.response, name);
    const parsed = parseMessage(reply.response);
    assert.equal(parsed.id, 0x4242);
    assert.equal(parsed.rcode, 0);
    assert.equal(parsed.question?.name, `${name}.`, "the question as sent, case included");
    assert.equal(parsed.answers.length, 1);
    const [txt] = parsed.answers;
    assert.deepEqual([txt.type, txt.qclass, txt.ttl], [16, 3, 0]);
    const text = new TextDecoder().decode(txt.data.subarray(1, 1 + txt.data[0]));
    assert.equal(text, `dotproxy ${VERSION}`);
    assert.ok(parsed.opt, "OPT kept for an EDNS client");
  }
  const v6: Deno.NetAddr = { transport: "udp", hostname: "::1", port: 5353 };
  assert.ok(ask(r, buildQuery("version.bind", { type: 16, qclass: 3 }), "tcp", v6)[0]?.response);
  assert.equal(forwarder.requests.length, 0, "none of them went upstream");

  // Other clients, other classes and other names go upstream as before.
  const lan: Deno.NetAddr = { transport: "udp", hostname: "10.1.2.3", port: 5353 };
  assert.equal(ask(r, buildQuery("version.bind", { type: 16, qclass: 3 }), "udp", lan).length, 0);
  assert.equal(ask(r, buildQuery("version.bind", { type: 16 })).length, 0);
  assert.equal(ask(r, buildQuery("version.bind.example", { type: 16, qclass: 3 })).length, 0);
  assert.equal(ask(r, buildQuery("version.bind", { type: 1, qclass: 3 })).length, 0);
  assert.equal(forwarder.requests.length, 4);
});

Deno.test("identity: the access list comes first: a refused loopback client gets REFUSED", () => {
  const forwarder = new FakeForwarder();
  const { resolver: r } = resolver(forwarder, {
    admission: new Admission({
      allow: [parseCidr("10.0.0.0/8", "--allow")],
      rateLimit: 0,
      rateLimitBurst: 1,
      clock: new ManualClock(),
    }),
  });
  const [reply] = ask(r, buildQuery("version.bind", { id: 5, type: 16, qclass: 3 }));
  assert.equal(parseMessage(reply.response!).rcode, 5);
});
