/**
 * Query-of-death isolation against a real Unbound DoT upstream: one abusive client sends,
 * over UDP and TCP, more than 200 queries a second of what makes Unbound close a DoT
 * connection (meta QTYPEs, TC=1, other opcodes and counts: answered through its error rate
 * limit of 100 a second, past which it drops one and closes the connection; queries over
 * 512 octets, which `harden-large-queries` drops at once) plus QTYPE 0, TSIG and fuzzed
 * packets. dotproxy answers all of that itself, so the shared upstream connection never
 * closes and another client's every query is answered, never SERVFAIL.
 */
import assert from "node:assert/strict";
import { fuzzQuery, Rng, seedFromEnv } from "./support/fuzz.ts";
import { buildQuery, encodeName, parseMessage } from "./support/dns.ts";
import { signWithTsig, udpFrom } from "./support/hostile.ts";
import { sumMetric } from "./support/prometheus.ts";
import { TcpDnsClient, testConfig, withProxy } from "./support/proxy.ts";
import { UnboundUpstream } from "./support/unbound.ts";

const HAS_UNBOUND = await UnboundUpstream.available();
const RUN_MS = 2500;

/** A query for `name` whose OPT carries one unknown option of `size` octets. */
function oversized(name: string, size: number): Uint8Array {
  const base = buildQuery(name, { ednsUdpSize: 1232 });
  const out = new Uint8Array(base.length + 4 + size);
  out.set(base);
  out[base.length - 2] = (4 + size) >> 8;
  out[base.length - 1] = (4 + size) & 0xff;
  out[base.length] = 0xfd;
  out[base.length + 1] = 0xe9;
  out[base.length + 2] = size >> 8;
  out[base.length + 3] = size & 0xff;
  return out;
}

/** The abusive mix: everything a forwarding proxy must never send on. */
function poison(rng: Rng, zone: string): Uint8Array {
  const name = `www.${zone}`;
  switch (rng.int(9)) {
    case 0: // meta QTYPEs: 128-248, TKEY, TSIG, MAILB, MAILA
      return buildQuery(name, { type: rng.pick([128, 200, 248, 249, 250, 253, 254]) });
    case 1: { // TC=1
      const query = buildQuery(name, { ednsUdpSize: 1232 });
      query[2] |= 0x02;
      return query;
    }
    case 2:
      return buildQuery(name, { type: 0 });
    case 3: { // NOTIFY, UPDATE, opcode 3
      const query = buildQuery(name);
      query[2] = (query[2] & 0x87) | (rng.pick([4, 5, 3]) << 3);
      return query;
    }
    case 4:
      return signWithTsig(buildQuery(name));
    case 5: { // two questions, or an answer record
      const query = buildQuery(name);
      const qname = encodeName(name);
      const more = new Uint8Array(query.length + qname.length + 4);
      more.set(query);
      more.set([...qname, 0, 1, 0, 1], query.length);
      more[rng.chance(0.5) ? 5 : 7] = rng.chance(0.5) ? 2 : 1;
      return more;
    }
    case 6:
      return oversized(name, 500 + rng.int(2000));
    case 7:
      return buildQuery(name, { type: rng.pick([41, 251, 252]) });
    default:
      return fuzzQuery(rng);
  }
}

Deno.test({
  name: "query of death: one abusive client causes no SERVFAIL for another (real Unbound)",
  ignore: !HAS_UNBOUND,
  fn: async () => {
    const seed = seedFromEnv();
    console.log(`query of death: FUZZ_SEED=${seed}`);
    const rng = new Rng(seed);
    const unbound = await UnboundUpstream.start({
      // Hardened as guides suggest: one query over 512 octets closes the connection.
      extraServerConfig: ["  harden-large-queries: yes"],
    });
    try {
      // No cache: every good query goes to Unbound on the shared connection.
      const config = testConfig([unbound.upstream()], { cacheSize: 0, timeoutMs: 2000 });
      await withProxy(config, async ({ proxy, port, logs }) => {
        const good = `www.${unbound.zone}`;
        const stopAt = performance.now() + RUN_MS;
        let abusive = 0;
        const abuser = (async () => {
          const tcp = await TcpDnsClient.connect(port);
          try {
            for (let tick = 0; tick < 1000 && performance.now() < stopAt; tick++) {
              // 10 packets per 20 ms over UDP and 2 over TCP: 600 a second.
              const batch = Array.from({ length: 10 }, () => poison(rng, unbound.zone));
              await udpFrom("127.0.0.2", port, batch, 0);
              for (let i = 0; i < 2; i++) {
                const query = poison(rng, unbound.zone);
                // TCP frames must stay readable: short ones would close this connection.
                if (query.length >= 12 && query.length <= 4096) await tcp.send(query);
              }
              abusive += 12;
              await new Promise((resolve) => setTimeout(resolve, 20));
            }
          } finally {
            tcp.close();
          }
        })();
        const rcodes: number[] = [];
        for (let i = 0; i < 1000 && performance.now() < stopAt; i++) {
          const [reply] = await udpFrom("127.0.0.3", port, [buildQuery(good, { id: i })], 3000, 1);
          rcodes.push(reply === undefined ? -1 : parseMessage(reply).rcode);
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        await abuser;
        const text = proxy.metrics.registry.render();
        const failed = rcodes.filter((r) => r !== 0);
        assert.ok(abusive >= 200 * (RUN_MS / 1000), `abusive packets: ${abusive}`);
        assert.ok(rcodes.length >= 50, `good queries: ${rcodes.length}`);
        assert.deepEqual(failed, [], `good client: ${failed.length} of ${rcodes.length} failed`);
        assert.equal(logs.find("upstream closed the connection").length, 0);
        assert.equal(logs.find("closed two upstream connections").length, 0);
        // Timeouts are allowed (fuzzed names outside the zone send Unbound recursing with no
        // network); a connection closed or broken is not.
        for (const reason of ["reset", "bad_response", "tls", "refused", "unreachable"]) {
          assert.equal(sumMetric(text, "dotproxy_upstream_errors_total", { reason }), 0, reason);
        }
        assert.equal(sumMetric(text, "dotproxy_upstream_reconnects_total"), 0);
      });
    } finally {
      await unbound.close();
    }
  },
});

/**
 * An authoritative server for `evil.example` on UDP whose records carry octets after their
 * last field (SRV, CNAME, SOA, NS, MX): a recursive resolver relays those as they are.
 */
function startOddAuthority(): { port: number; close: () => void; done: Promise<void> } {
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const done = (async () => {
    for (let i = 0; i < 100_000; i++) {
      let received: [Uint8Array, Deno.Addr];
      try {
        received = await socket.receive();
      } catch {
        return;
      }
      const [query, from] = received;
      let end = 12;
      while (end < query.length && query[end] !== 0) end += query[end] + 1;
      const qtype = (query[end + 1] << 8) | query[end + 2];
      const head = Array.from(query.subarray(0, end + 5));
      head[2] = 0x84 | (query[2] & 1); // QR AA RD
      head[3] = 0;
      const target = [...encodeName("t.evil.example")];
      const data: Record<number, number[]> = {
        2: [...target, 0],
        5: [...target, 1, 2, 3],
        6: [...target, ...target, ...new Array(16).fill(0), 0, 0, 0, 60, 9, 9],
        15: [0, 10, ...target, 0xff],
        33: [0, 1, 0, 2, 0, 53, ...target, 0xde, 0xad],
      };
      const rdata = data[qtype] ?? [10, 0, 0, 1];
      const type = data[qtype] ? qtype : 1;
      const record = [0xc0, 12, type >> 8, type & 0xff, 0, 1, 0, 0, 0, 60, 0, rdata.length];
      head.splice(6, 6, 0, 1, 0, 0, 0, 0);
      await socket.send(new Uint8Array([...head, ...record, ...rdata]), from).catch(() => 0);
    }
  })();
  return {
    port: (socket.addr as Deno.NetAddr).port,
    close: () => socket.close(),
    done,
  };
}

Deno.test({
  name: "query of death: a zone's odd record data, relayed by Unbound, is not a bad upstream",
  ignore: !HAS_UNBOUND,
  fn: async () => {
    const authority = startOddAuthority();
    const unbound = await UnboundUpstream.start({
      extraServerConfig: [
        "  do-not-query-localhost: no",
        "stub-zone:",
        '  name: "evil.example"',
        `  stub-addr: 127.0.0.1@${authority.port}`,
        "server:",
      ],
    });
    try {
      const config = testConfig([unbound.upstream()], { cacheSize: 0, hedgeDelay: 0 });
      await withProxy(config, async ({ proxy, port }) => {
        // A burst: before the fix, three rejected answers in a row marked the upstream down
        // and every client got SERVFAIL until a probe brought it back.
        const types = [33, 5, 6, 2, 15, 33, 5, 6, 2, 15];
        const queries = types.map((type, i) => buildQuery(`q${i}.evil.example`, { id: i, type }));
        const replies = await udpFrom("127.0.0.2", port, queries, 5000, queries.length);
        assert.equal(replies.length, queries.length);
        for (const reply of replies) {
          const parsed = parseMessage(reply);
          assert.equal(parsed.rcode, 0, `rcode for ${types[parsed.id]}`);
          assert.equal(parsed.answers.length, 1, "relayed as the resolver sent it");
        }
        const [good] = await udpFrom(
          "127.0.0.3",
          port,
          [buildQuery(`www.${unbound.zone}`, { id: 99 })],
          3000,
          1,
        );
        assert.equal(parseMessage(good).rcode, 0, "another client is served");
        const text = proxy.metrics.registry.render();
        assert.equal(
          sumMetric(text, "dotproxy_upstream_errors_total", { reason: "bad_response" }),
          0,
        );
      });
    } finally {
      await unbound.close();
      authority.close();
      await authority.done;
    }
  },
});
