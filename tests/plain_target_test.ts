/**
 * A plain-DNS zone target (`--zone ZONE=dns://IP:PORT`) over real sockets: the proxy
 * in-process, the tests' DoT server as the default upstream and a plain-DNS server on
 * loopback as the zone's target. What goes where, the plain leg's wire (random IDs and
 * source ports, no padding, AD cleared, TCP after truncation), spoofed answers ignored,
 * `--cache-min-ttl` not applied to zone answers, the route metric.
 */

import assert from "node:assert/strict";
import type { RunningProxy } from "../src/app.ts";
import { addressFor, answerFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { DotServer } from "./support/dot_server.ts";
import { PlainDnsServer, type PlainHandler } from "./support/plain_dns.ts";
import { metricValue } from "./support/prometheus.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy, zones } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

/** Queries of clients the server read over `transport` (not the health checks: `ZONE SOA`). */
function asked(plain: PlainDnsServer, transport?: "udp" | "tcp") {
  return plain.queries.filter((q) =>
    parseMessage(q.query).question?.type !== 6 &&
    (transport === undefined || q.transport === transport)
  );
}

/** The address in the first answer of `reply`. */
function formatAnswer(reply: Uint8Array): string {
  return formatA(parseMessage(reply).answers[0]?.data ?? new Uint8Array());
}

async function withPlainZone(
  handler: PlainHandler | undefined,
  overrides: Parameters<typeof testConfig>[1],
  fn: (
    port: number,
    plain: PlainDnsServer,
    dot: DotServer,
    metrics: () => string,
    proxy: RunningProxy,
  ) => Promise<void>,
): Promise<void> {
  const plain = PlainDnsServer.start(handler);
  const dot = DotServer.start();
  try {
    const config = testConfig([dot.upstream()], {
      zones: zones(`cluster.test,10.96.0.0/12=dns://127.0.0.1:${plain.port}`),
      ...overrides,
    });
    await withProxy(config, async ({ proxy, port }) => {
      await fn(port, plain, dot, () => proxy.metrics.registry.render(), proxy);
    });
  } finally {
    await plain.close();
    await dot.close();
  }
}

Deno.test("plain zone target: zone names go there over UDP, the rest to DoT; IDs and ports vary, no padding, AD cleared", async () => {
  const handler: PlainHandler = (query, reply) => {
    const answer = answerFor(query.query);
    answer[3] |= 0x20; // AD: the proxy must clear it
    return reply(answer);
  };
  await withPlainZone(handler, {}, async (port, plain, dot, metrics) => {
    const names = ["orders.ns.svc.Cluster.Test", "a.cluster.test", "b.cluster.test"];
    for (const [i, name] of names.entries()) {
      const reply = await udpExchange(port, buildQuery(name, { id: 100 + i, ednsUdpSize: 1232 }));
      assert.ok(reply, name);
      const parsed = parseMessage(reply);
      assert.equal(parsed.id, 100 + i);
      assert.equal(parsed.question?.name, `${name}.`, "the client's casing");
      assert.equal(formatA(parsed.answers[0].data), addressFor(name));
      assert.equal(parsed.cd, false);
      assert.equal(reply[3] & 0x20, 0, "AD cleared");
    }
    const ptr = await udpExchange(port, buildQuery("10.0.96.10.in-addr.arpa", { type: 12 }));
    assert.ok(ptr);
    assert.equal(
      asked(plain, "udp").length,
      4,
      "the three names and the PTR went to the plain target",
    );
    assert.equal(dot.queries, 0, "nothing of the zone reached the DoT upstream");
    // Not in the zone: whole labels only.
    const other = await udpExchange(port, buildQuery("mycluster.test"));
    assert.ok(other);
    const reverseOther = await udpExchange(
      port,
      buildQuery("1.0.112.10.in-addr.arpa", { type: 12 }),
    );
    assert.ok(reverseOther);
    assert.equal(dot.queries, 1, "mycluster.test went to DoT");
    assert.equal(parseMessage(reverseOther).rcode, 3, "10.112/12 is not the zone's: special-use");
    const wire = asked(plain);
    const ids = new Set(wire.map((q) => (q.query[0] << 8) | q.query[1]));
    const ports = new Set(wire.map((q) => q.from.port));
    assert.equal(ids.size, wire.length, "a random ID per query");
    assert.equal(ports.size, wire.length, "a fresh source port per query");
    for (const q of wire) {
      const opt = parseMessage(q.query).opt;
      assert.ok(opt, "the client's EDNS goes on");
      assert.deepEqual(opt.options.map((o) => o.code), [], "no padding on the plain leg");
    }
    const text = metrics();
    assert.equal(metricValue(text, "dotproxy_routed_total", { route: "cluster.test" }), 3);
    assert.equal(metricValue(text, "dotproxy_routed_total", { route: "10.96.0.0/12" }), 1);
    assert.equal(metricValue(text, "dotproxy_routed_total", { route: "default" }), 1);
    assert.equal(metricValue(text, "dotproxy_routed_total", { route: "special-use" }), 1);
    const label = `dns://127.0.0.1:${plain.port}`;
    assert.equal(metricValue(text, "dotproxy_upstream_answers_total", { upstream: label }), 4);
    assert.equal(metricValue(text, "dotproxy_upstream_healthy", { upstream: label }), 1);
  });
});

Deno.test("plain zone target: a truncated UDP answer is asked again over TCP; a TCP client gets it whole", async () => {
  await withPlainZone(undefined, {}, async (port, plain) => {
    const name = "big3000.cluster.test";
    const overUdp = await udpExchange(port, buildQuery(name, { type: 16, ednsUdpSize: 1232 }));
    assert.ok(overUdp);
    assert.equal(parseMessage(overUdp).tc, true, "too big for the client's UDP");
    assert.equal(asked(plain, "udp").length, 1);
    assert.equal(asked(plain, "tcp").length, 1, "the proxy asked again over TCP");
    for (const other of ["big2000.cluster.test", "big4000.cluster.test"]) {
      const reply = await udpExchange(port, buildQuery(other, { type: 16, ednsUdpSize: 1232 }));
      assert.equal(parseMessage(reply!).tc, true);
    }
    const overTcp = asked(plain, "tcp");
    assert.equal(overTcp.length, 3);
    assert.equal(new Set(overTcp.map((q) => q.from.port)).size, 1, "one TCP connection, reused");
    const tcp = await TcpDnsClient.connect(port);
    try {
      await tcp.send(buildQuery(name, { type: 16, ednsUdpSize: 1232 }));
      const whole = parseMessage((await tcp.receive())!);
      const text = new TextDecoder().decode(whole.answers[0].data);
      assert.equal(text.replace(/[^x]/g, "").length, 3000, "every octet of the TXT");
    } finally {
      tcp.close();
    }
  });
});

Deno.test("plain zone target: answers from another port, with another ID or for another question are ignored", async () => {
  let spoofs = 0;
  const handler: PlainHandler = async (query, reply, server) => {
    if (query.transport !== "udp" || parseMessage(query.query).question?.type === 6) {
      return reply(answerFor(query.query));
    }
    const spoofed = (bytes: Uint8Array) => {
      const out = bytes.slice();
      // 6.6.6.6 instead of the real address
      out.set([6, 6, 6, 6], out.length - 4 - (parseMessage(bytes).opt ? 11 : 0));
      return out;
    };
    const real = answerFor(query.query);
    // 1. From another port of the same host.
    const other = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    await other.send(spoofed(real), query.from);
    other.close();
    // 2. The right port, another ID.
    const wrongId = spoofed(real);
    wrongId[1] ^= 0x5a;
    await reply(wrongId);
    // 3. The right port and ID, another question.
    const otherName = answerFor(
      buildQuery("evil.cluster.test", { id: (query.query[0] << 8) | query.query[1] }),
    );
    await reply(otherName);
    spoofs += 3;
    await sleep(30);
    await reply(real);
    void server;
  };
  // Hedging off: each question is one exchange, so each real answer follows its three spoofs.
  await withPlainZone(handler, { hedgeDelay: 0 }, async (port) => {
    for (let i = 0; i < 3; i++) {
      const name = `svc${i}.cluster.test`;
      const reply = await udpExchange(port, buildQuery(name));
      assert.ok(reply);
      const parsed = parseMessage(reply);
      assert.equal(parsed.question?.name, `${name}.`);
      assert.equal(formatA(parsed.answers[0].data), addressFor(name), "the real answer");
    }
    assert.ok(spoofs >= 9, "three spoofs before each real answer");
  });
});

Deno.test("plain zone target: --cache-min-ttl does not raise its answers; it still raises the default route's", async () => {
  await withPlainZone(undefined, { cacheMinTtl: 600 }, async (port) => {
    const zone = parseMessage((await udpExchange(port, buildQuery("svc.cluster.test")))!);
    assert.equal(zone.answers[0].ttl, 60, "the target's TTL");
    const again = parseMessage((await udpExchange(port, buildQuery("svc.cluster.test")))!);
    assert.ok(again.answers[0].ttl <= 60, "from the cache, not raised");
    const publicName = parseMessage((await udpExchange(port, buildQuery("www.public.test")))!);
    assert.equal(publicName.answers[0].ttl, 600, "--cache-min-ttl for the default route");
  });
});

Deno.test("plain zone target: health-checked with ZONE SOA, shown in /healthz/upstreams' body, not deciding it", async () => {
  await withPlainZone(undefined, {}, async (_port, plain, _dot, metrics, proxy) => {
    const label = `dns://127.0.0.1:${plain.port}`;
    for (
      let i = 0;
      i < 100 && !metrics().includes(`health_checks_total{upstream="${label}",result="ok"} 1`);
      i++
    ) {
      await sleep(20);
    }
    const checks = plain.queries.map((q) => parseMessage(q.query).question);
    assert.deepEqual(checks[0], { name: "cluster.test.", type: 6, qclass: 1 }, "ZONE SOA");
    assert.ok(!checks.some((q) => q?.name === "."), "never . NS: the cluster DNS would forward it");
    const health = await proxy.upstreamHealth();
    assert.equal(health.ready, true);
    assert.match(health.reason, new RegExp(`zone targets: ${label.replaceAll(".", "\\.")} up`));
    plain.frozen = true;
    // Down or not, it does not decide the default upstreams' health: public names still work.
    const after = await proxy.upstreamHealth();
    assert.equal(after.ready, true);
  });
});

Deno.test("plain zone target: a lost datagram is sent again on the same socket, under the same ID", async () => {
  const seen = new Map<string, number>();
  const handler: PlainHandler = (query, reply) => {
    const name = parseMessage(query.query).question?.name ?? "";
    const count = (seen.get(name) ?? 0) + 1;
    seen.set(name, count);
    // The first datagram of each client question is "lost".
    if (query.transport === "udp" && !name.startsWith("cluster.test") && count === 1) return;
    return reply(answerFor(query.query));
  };
  // Hedging off: with it, a hedge on a socket of its own would usually come first.
  await withPlainZone(handler, { timeoutMs: 4000, hedgeDelay: 0 }, async (port, plain) => {
    const reply = await udpExchange(port, buildQuery("lossy.cluster.test"), 5000);
    assert.ok(reply);
    assert.equal(formatAnswer(reply), addressFor("lossy.cluster.test"));
    const sent = asked(plain, "udp");
    assert.equal(sent.length, 2, "sent twice");
    assert.equal(sent[0].from.port, sent[1].from.port, "on the same socket");
    assert.deepEqual(sent[0].query, sent[1].query, "the same message, the same ID");
  });
});

Deno.test("plain zone target: with two targets, one frozen, the other answers (retry within the zone, never elsewhere)", async () => {
  const frozen = PlainDnsServer.start();
  frozen.frozen = true;
  const plain = PlainDnsServer.start();
  const dot = DotServer.start();
  try {
    const config = testConfig([dot.upstream()], {
      zones: zones(
        `cluster.test=dns://127.0.0.1:${frozen.port},dns://127.0.0.1:${plain.port}`,
      ),
      strategy: "failover",
      timeoutMs: 3000,
    });
    await withProxy(config, async ({ port }) => {
      for (let i = 0; i < 5; i++) {
        const name = `svc${i}.cluster.test`;
        const reply = await udpExchange(port, buildQuery(name));
        assert.ok(reply);
        assert.equal(formatAnswer(reply), addressFor(name), name);
      }
      assert.equal(asked(plain).length, 5, "the working target answered each");
      assert.equal(dot.queries, 0, "no fall-through to the default route");
    });
  } finally {
    await frozen.close();
    await plain.close();
    await dot.close();
  }
});

Deno.test("DoT zone target: a zone's names go to its own DoT server, the rest to --upstream", async () => {
  const corp = DotServer.start();
  const dot = DotServer.start();
  try {
    const config = testConfig([dot.upstream()], {
      zones: zones(`corp.test=${corp.upstream()}`),
    });
    await withProxy(config, async ({ port, proxy }) => {
      for (const name of ["a.corp.test", "b.Corp.Test", "www.public.test"]) {
        const reply = await udpExchange(port, buildQuery(name));
        assert.ok(reply);
        assert.equal(formatAnswer(reply), addressFor(name));
      }
      assert.equal(corp.queries, 2);
      assert.equal(dot.queries, 1);
      const text = proxy.metrics.registry.render();
      assert.equal(metricValue(text, "dotproxy_routed_total", { route: "corp.test" }), 2);
      assert.equal(
        metricValue(text, "dotproxy_upstream_answers_total", { upstream: corp.upstream() }),
        2,
      );
    });
  } finally {
    await corp.close();
    await dot.close();
  }
});

Deno.test("plain zone target over IPv6: dns://[::1]:PORT, UDP and TCP", async () => {
  const plain = PlainDnsServer.start(undefined, "::1");
  const dot = DotServer.start();
  try {
    const config = testConfig([dot.upstream()], {
      zones: zones(`cluster.test=dns://[::1]:${plain.port}`),
    });
    await withProxy(config, async ({ port }) => {
      const reply = await udpExchange(port, buildQuery("v6.cluster.test"));
      assert.equal(formatAnswer(reply!), addressFor("v6.cluster.test"));
      const big = await udpExchange(port, buildQuery("big3000.cluster.test", { type: 16 }));
      assert.equal(parseMessage(big!).tc, true);
      assert.equal(asked(plain, "udp").length, 2);
      assert.equal(asked(plain, "tcp").length, 1);
      assert.equal(asked(plain)[0].from.hostname, "::1");
      assert.equal(dot.queries, 0);
    });
  } finally {
    await plain.close();
    await dot.close();
  }
});

/**
 * Open file descriptors of this process (Linux), or -1 where that cannot be read. Through
 * `ls`: Deno reads /proc/<pid> only with --allow-all.
 */
function openFds(): number {
  try {
    const out = new Deno.Command("ls", { args: [`/proc/${Deno.pid}/fd`], stderr: "null" })
      .outputSync();
    return out.success ? new TextDecoder().decode(out.stdout).trim().split("\n").length : -1;
  } catch {
    return -1;
  }
}

Deno.test("plain zone target: a question given up on closes its socket at once", async () => {
  await withPlainZone(undefined, { timeoutMs: 300, serveStaleSeconds: 0 }, async (port, plain) => {
    plain.frozen = true;
    const before = openFds();
    const replies = await Promise.all(
      Array.from({ length: 50 }, (_, i) => udpExchange(port, buildQuery(`gone${i}.cluster.test`))),
    );
    for (const reply of replies) assert.equal(parseMessage(reply!).rcode, 2, "SERVFAIL");
    if (before < 0) return; // no /proc here
    // 50 questions held 50+ sockets while waiting; all are closed once they were given up
    // (the proxy's own, and the test's client sockets: a few may still be closing).
    const after = openFds();
    assert.ok(after <= before + 5, `${before} file descriptors before, ${after} after`);
  });
});
