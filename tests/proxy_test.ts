/**
 * Integration tests over real sockets: clients on UDP and TCP, the proxy in-process, and
 * an in-process DoT upstream. Every test runs with network and environment permission
 * only, which proves the proxy needs nothing else.
 */
import assert from "node:assert/strict";
import { WRONG_KEY, WRONG_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import {
  addressFor,
  answerFor,
  buildQuery,
  formatA,
  type ParsedMessage,
  parseMessage,
} from "./support/dns.ts";
import { startProxy } from "../src/app.ts";
import { LogCapture, TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

const NET_AND_ENV_ONLY: Deno.PermissionOptions = {
  net: true,
  env: true,
  read: false,
  write: false,
  run: false,
  ffi: false,
  sys: false,
  import: false,
};

function netTest(name: string, fn: () => Promise<void>): void {
  Deno.test({ name, permissions: NET_AND_ENV_ONLY, fn });
}

async function withUpstream(
  options: Parameters<typeof DotServer.start>[0],
  fn: (server: DotServer) => Promise<void>,
): Promise<void> {
  const server = DotServer.start(options);
  try {
    await fn(server);
  } finally {
    await server.close();
  }
}

function nameOf(query: Uint8Array): string {
  return parseMessage(query).question?.name ?? "";
}

function expectAnswer(reply: Uint8Array | null, id: number, name: string): ParsedMessage {
  assert.ok(reply, `no reply for ${name}`);
  const parsed = parseMessage(reply);
  assert.equal(parsed.id, id, `id for ${name}`);
  assert.equal(parsed.rcode, 0, `rcode for ${name}`);
  assert.equal(parsed.question?.name.toLowerCase(), name.toLowerCase() + ".");
  assert.equal(formatA(parsed.answers[0].data), addressFor(name), `address for ${name}`);
  return parsed;
}

netTest("udp: answer passes through byte for byte apart from the ID", async () => {
  await withUpstream({}, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      for (const name of ["Example.COM", "a.b.c.test", "nx.missing.test"]) {
        const query = buildQuery(name, { id: 0xabcd, ednsUdpSize: 1232 });
        const reply = await udpExchange(port, query);
        assert.ok(reply);
        assert.deepEqual(reply, answerFor(query), name);
      }
      const upstreamIds = upstream.idsPerConnection.flat();
      assert.equal(upstreamIds.length, 3);
    });
  });
});

netTest("tcp: answer passes through byte for byte apart from the ID", async () => {
  await withUpstream({}, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      const client = await TcpDnsClient.connect(port);
      try {
        const query = buildQuery("big3000.example", { id: 99, type: 16 });
        await client.send(query);
        const reply = await client.receive();
        assert.ok(reply);
        assert.deepEqual(reply, answerFor(query));
        assert.ok(reply.length > 3000, "TCP answers are never truncated");
      } finally {
        client.close();
      }
    });
  });
});

netTest("udp: a slow answer does not hold up others", async () => {
  const slow = DotServer.start({
    delayMs: (q) => nameOf(q).startsWith("slow") ? 800 : 0,
  });
  try {
    await withProxy(testConfig([slow.upstream()]), async ({ port }) => {
      const order: string[] = [];
      const slowReply = udpExchange(port, buildQuery("slow.test", { id: 1 })).then((r) => {
        order.push("slow");
        return r;
      });
      const fastReply = udpExchange(port, buildQuery("fast.test", { id: 2 })).then((r) => {
        order.push("fast");
        return r;
      });
      expectAnswer(await fastReply, 2, "fast.test");
      expectAnswer(await slowReply, 1, "slow.test");
      assert.deepEqual(order, ["fast", "slow"]);
    });
  } finally {
    await slow.close();
  }
});

netTest("tcp: pipelined queries are answered as they complete, out of order", async () => {
  // The upstream answers later queries sooner.
  const names = Array.from({ length: 8 }, (_, i) => `q${i}.pipeline.test`);
  await withUpstream({
    delayMs: (q) => (8 - Number(nameOf(q).slice(1, 2))) * 60,
  }, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      const client = await TcpDnsClient.connect(port);
      try {
        // All queries in one write: the proxy must read them all before answering any.
        const frames = names.map((name, i) => {
          const query = buildQuery(name, { id: 100 + i });
          return new Uint8Array([query.length >> 8, query.length & 0xff, ...query]);
        });
        await client.writeRaw(new Uint8Array(frames.flatMap((f) => [...f])));
        const seen: number[] = [];
        for (let i = 0; i < names.length; i++) {
          const reply = await client.receive();
          const id = parseMessage(reply as Uint8Array).id;
          expectAnswer(reply, id, names[id - 100]);
          seen.push(id);
        }
        assert.deepEqual(seen, [107, 106, 105, 104, 103, 102, 101, 100]);
        assert.ok(upstream.connections <= 2, "at most --upstream-connections connections");
      } finally {
        client.close();
      }
    });
  });
});

netTest("clients using the same ID at the same time each get their own answer", async () => {
  await withUpstream({ delayMs: () => 20 }, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      const names = Array.from({ length: 60 }, (_, i) => `client${i}.collide.test`);
      const replies = await Promise.all(
        names.map((name) => udpExchange(port, buildQuery(name, { id: 0x1234 }))),
      );
      replies.forEach((reply, i) => expectAnswer(reply, 0x1234, names[i]));
      // On the upstream side, the IDs in flight together were all different.
      for (const ids of upstream.idsPerConnection) {
        assert.equal(new Set(ids).size, ids.length, "upstream IDs unique per connection");
      }
      // And two queries with the same ID on one TCP connection are both answered.
      const client = await TcpDnsClient.connect(port);
      try {
        await client.send(buildQuery("first.same-id.test", { id: 7 }));
        await client.send(buildQuery("second.same-id.test", { id: 7 }));
        const got = [await client.receive(), await client.receive()].map((r) =>
          parseMessage(r as Uint8Array).question?.name
        ).sort();
        assert.deepEqual(got, ["first.same-id.test.", "second.same-id.test."]);
      } finally {
        client.close();
      }
    });
  });
});

netTest("udp truncation: 512 without EDNS, advertised size with it, capped", async () => {
  await withUpstream({}, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      // 700 bytes of TXT: too big for 512, fits 1232.
      const plain = parseMessage(
        (await udpExchange(port, buildQuery("big700.test", { type: 16, id: 5 })))!,
      );
      assert.equal(plain.tc, true);
      assert.equal(plain.answers.length, 0);
      assert.equal(plain.question?.name, "big700.test.");
      assert.equal(plain.id, 5);

      const withEdns = parseMessage(
        (await udpExchange(port, buildQuery("big700.test", { type: 16, ednsUdpSize: 1232 })))!,
      );
      assert.equal(withEdns.tc, false);
      assert.equal(withEdns.answers.length, 1);

      // A client advertising 4096 still gets at most the cap (1232).
      const capped = await udpExchange(
        port,
        buildQuery("big2000.test", { type: 16, ednsUdpSize: 4096 }),
      );
      const cappedParsed = parseMessage(capped!);
      assert.equal(cappedParsed.tc, true);
      assert.ok(cappedParsed.opt, "the OPT record survives truncation");
      assert.ok(capped!.length <= 1232);

      // A small advertised size is raised to 512.
      const tiny = parseMessage(
        (await udpExchange(port, buildQuery("big300.test", { type: 16, ednsUdpSize: 100 })))!,
      );
      assert.equal(tiny.tc, false);
    });
  });
});

netTest("a query whose deadline passes gets SERVFAIL with an Extended DNS Error", async () => {
  await withUpstream({ answer: () => null }, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()], { timeoutMs: 300 }), async ({ port }) => {
      const reply = await udpExchange(port, buildQuery("never.test", { id: 3, ednsUdpSize: 1232 }));
      const parsed = parseMessage(reply!);
      assert.equal(parsed.id, 3);
      assert.equal(parsed.rcode, 2);
      assert.equal(parsed.question?.name, "never.test.");
      const ede = parsed.opt?.options.find((o) => o.code === 15);
      assert.ok(ede, "EDE attached");
      assert.equal((ede.data[0] << 8) | ede.data[1], 22);
      const client = await TcpDnsClient.connect(port);
      try {
        await client.send(buildQuery("never-tcp.test", { id: 4 }));
        const tcpReply = parseMessage((await client.receive())!);
        assert.equal(tcpReply.rcode, 2);
        assert.equal(tcpReply.id, 4);
      } finally {
        client.close();
      }
    });
  });
});

netTest("queries in flight on a connection that breaks are re-sent and answered", async () => {
  let swallow = true;
  const upstream = DotServer.start({ answer: (q) => swallow ? null : answerFor(q) });
  try {
    await withProxy(testConfig([upstream.upstream()], { timeoutMs: 3000 }), async ({ port }) => {
      const names = Array.from({ length: 10 }, (_, i) => `retry${i}.test`);
      const replies = Promise.all(
        names.map((name, i) => udpExchange(port, buildQuery(name, { id: i }))),
      );
      for (let i = 0; i < 100 && upstream.queries < names.length; i++) {
        await sleep(10);
      }
      assert.equal(upstream.queries, names.length, "all queries reached the upstream");
      swallow = false;
      upstream.dropConnections();
      (await replies).forEach((reply, i) => expectAnswer(reply, i, names[i]));
      assert.ok(upstream.connections >= 2, "a fresh connection was opened");
    });
  } finally {
    await upstream.close();
  }
});

netTest(
  "an upstream closing after every 3 answers still answers 200 queries in flight",
  async () => {
    await withUpstream({ closeAfterAnswers: 3 }, async (upstream) => {
      await withProxy(testConfig([upstream.upstream()], { timeoutMs: 4000 }), async ({ port }) => {
        const names = Array.from({ length: 200 }, (_, i) => `n${i}.closing.test`);
        const client = await TcpDnsClient.connect(port);
        try {
          for (let i = 0; i < names.length; i++) await client.send(buildQuery(names[i], { id: i }));
          let answered = 0;
          for (let i = 0; i < names.length; i++) {
            const reply = parseMessage((await client.receive(5000))!);
            assert.equal(reply.rcode, 0, `query ${reply.id} answered ${reply.rcode}`);
            expectAnswer(
              answerFor(buildQuery(names[reply.id], { id: reply.id })),
              reply.id,
              names[reply.id],
            );
            answered++;
          }
          assert.equal(answered, 200);
          assert.ok(upstream.connections >= 200 / 3, `connections: ${upstream.connections}`);
        } finally {
          client.close();
        }
      });
    });
  },
);

netTest("an upstream that closes idle connections is not reconnected to in a loop", async () => {
  await withUpstream({ idleCloseMs: 100 }, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      const reply = parseMessage((await udpExchange(port, buildQuery("a.idle.test", { id: 1 })))!);
      assert.equal(reply.rcode, 0);
      // The server closes each connection 100 ms after the last bytes it read, and for a
      // second no client asks anything.
      await sleep(1000);
      // The start-up probe's connection (the query's too, or one more for it), and one probe
      // after the first idle close: not one more handshake every 100 ms.
      assert.ok(upstream.connections <= 3, `connections opened: ${upstream.connections}`);
      const again = parseMessage((await udpExchange(port, buildQuery("b.idle.test", { id: 2 })))!);
      assert.equal(again.rcode, 0, "and the next question is answered on a new connection");
    });
  });
});

netTest("a certificate for the wrong name is refused: SERVFAIL and an error log", async () => {
  await withUpstream({}, async (upstream) => {
    const config = testConfig([upstream.upstream("not-the-server.test")]);
    await withProxy(config, async ({ port, logs }) => {
      const reply = parseMessage((await udpExchange(port, buildQuery("a.test", { id: 11 })))!);
      assert.equal(reply.rcode, 2);
      assert.equal(reply.answers.length, 0);
      const errors = logs.find("upstream connection failed");
      assert.ok(errors.length >= 1);
      assert.equal(errors[0].level, "error");
      assert.equal(errors[0].reason, "tls");
      assert.equal(upstream.queries, 0, "no query was sent over an unverified connection");
    });
  });
});

netTest("a certificate from an untrusted CA is refused", async () => {
  await withUpstream({ cert: WRONG_PEM, key: WRONG_KEY }, async (upstream) => {
    // The test CA is not trusted here, and the name matches the certificate.
    const config = testConfig([upstream.upstream("wrong.test")], { caCerts: [] });
    await withProxy(config, async ({ port }) => {
      const reply = parseMessage((await udpExchange(port, buildQuery("a.test")))!);
      assert.equal(reply.rcode, 2);
      assert.equal(upstream.queries, 0);
    });
  });
});

netTest("an upstream that fails the handshake is not hammered", async () => {
  await withUpstream({}, async (upstream) => {
    const config = testConfig([upstream.upstream("wrong.name.test")], { timeoutMs: 500 });
    await withProxy(config, async ({ port }) => {
      const replies = [];
      for (let i = 0; i < 30; i++) {
        replies.push(udpExchange(port, buildQuery(`q${i}.test`)));
        await sleep(5);
      }
      for (const reply of await Promise.all(replies)) assert.equal(parseMessage(reply!).rcode, 2);
      assert.ok(upstream.connections <= 3, `${upstream.connections} handshakes for 30 queries`);
    });
  });
});

netTest("failover: a refusing upstream is skipped for a working one", async () => {
  const dead = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const deadPort = dead.addr.port;
  dead.close();
  await withUpstream({}, async (upstream) => {
    const config = testConfig([`127.0.0.1:${deadPort}#dns.test`, upstream.upstream()]);
    await withProxy(config, async ({ port }) => {
      for (let i = 0; i < 5; i++) {
        expectAnswer(
          await udpExchange(port, buildQuery(`fo${i}.test`, { id: i })),
          i,
          `fo${i}.test`,
        );
      }
    });
  });
});

netTest("malformed udp input: FORMERR when the header is readable, dropped otherwise", async () => {
  await withUpstream({}, async (upstream) => {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      assert.equal(await udpExchange(port, new Uint8Array([1, 2, 3]), 300), null);
      assert.equal(await udpExchange(port, new Uint8Array(0), 300), null);
      const response = answerFor(buildQuery("reflect.test"));
      assert.equal(await udpExchange(port, response, 300), null, "responses are dropped");
      const garbage = new Uint8Array([0x55, 0x66, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
      const formerr = parseMessage((await udpExchange(port, garbage))!);
      assert.equal(formerr.id, 0x5566);
      assert.equal(formerr.rcode, 1);
      const notify = buildQuery("zone.test", { id: 8 });
      notify[2] = 4 << 3;
      const notimp = parseMessage((await udpExchange(port, notify))!);
      assert.equal(notimp.rcode, 4);
      assert.equal(notimp.id, 8);
      const random = crypto.getRandomValues(new Uint8Array(300));
      random[2] &= 0x7f;
      random[5] = 1; // one question; the rest is noise
      const reply = await udpExchange(port, random, 500);
      if (reply !== null) assert.notEqual(parseMessage(reply).rcode, 0);
      assert.equal(upstream.queries, 0, "nothing malformed reached the upstream");
      expectAnswer(await udpExchange(port, buildQuery("still.ok", { id: 1 })), 1, "still.ok");
    });
  });
});

netTest("tcp abuse costs only that connection", async () => {
  await withUpstream({}, async (upstream) => {
    const config = testConfig([upstream.upstream()], { tcpIdleTimeoutMs: 300 });
    await withProxy(config, async ({ port, logs }) => {
      // A zero length prefix, or a frame too short for a DNS header, closes the connection at
      // once (not when it idles out): the stream cannot be answered or resynchronised.
      for (const frame of [[0, 0], [0, 5, 1, 2, 3, 4, 5]]) {
        const short = await TcpDnsClient.connect(port);
        await short.writeRaw(new Uint8Array(frame));
        assert.equal(await short.closedByPeer(2000), true);
        short.close();
      }
      assert.equal(logs.find("frame too short").length, 2);
      // A frame cut short, then the client vanishes.
      const cut = await TcpDnsClient.connect(port);
      const query = buildQuery("cut.test");
      await cut.writeRaw(new Uint8Array([0, query.length, ...query.slice(0, 5)]));
      cut.close();
      // A client that trickles half a frame is closed when idle.
      const slow = await TcpDnsClient.connect(port);
      await slow.writeRaw(new Uint8Array([0, query.length, ...query.slice(0, 3)]));
      assert.equal(await slow.closedByPeer(3000), true);
      slow.close();
      // An oversized length prefix with a short body is just an incomplete frame.
      const huge = await TcpDnsClient.connect(port);
      await huge.writeRaw(new Uint8Array([0xff, 0xff, 1, 2, 3]));
      assert.equal(await huge.closedByPeer(3000), true);
      huge.close();
      // A malformed but framed query gets FORMERR and the connection stays usable.
      const framed = await TcpDnsClient.connect(port);
      try {
        await framed.send(new Uint8Array([0, 9, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 7]));
        assert.equal(parseMessage((await framed.receive())!).rcode, 1);
        await framed.send(buildQuery("after.formerr", { id: 2 }));
        expectAnswer(await framed.receive(), 2, "after.formerr");
      } finally {
        framed.close();
      }
      expectAnswer(await udpExchange(port, buildQuery("alive.test", { id: 1 })), 1, "alive.test");
    });
  });
});

netTest("tcp connection limit closes connections beyond it", async () => {
  await withUpstream({}, async (upstream) => {
    const config = testConfig([upstream.upstream()], { maxTcpConnections: 2 });
    await withProxy(config, async ({ port, proxy }) => {
      const a = await TcpDnsClient.connect(port);
      const b = await TcpDnsClient.connect(port);
      try {
        await a.send(buildQuery("a.limit", { id: 1 }));
        expectAnswer(await a.receive(), 1, "a.limit");
        await b.send(buildQuery("b.limit", { id: 2 }));
        expectAnswer(await b.receive(), 2, "b.limit");
        const c = await TcpDnsClient.connect(port);
        assert.equal(await c.closedByPeer(2000), true);
        c.close();
        assert.equal(proxy.metrics.tcpRejected.get(), 1);
      } finally {
        a.close();
        b.close();
      }
    });
  });
});

netTest("per-connection in-flight limit pauses reading but loses nothing", async () => {
  await withUpstream({ delayMs: () => 30 }, async (upstream) => {
    const config = testConfig([upstream.upstream()], { maxTcpQueriesPerConnection: 4 });
    await withProxy(config, async ({ port }) => {
      const client = await TcpDnsClient.connect(port);
      try {
        const names = Array.from({ length: 40 }, (_, i) => `p${i}.limit.test`);
        for (let i = 0; i < names.length; i++) await client.send(buildQuery(names[i], { id: i }));
        const ids = new Set<number>();
        for (let i = 0; i < names.length; i++) {
          const reply = parseMessage((await client.receive())!);
          ids.add(reply.id);
          assert.equal(reply.question?.name, names[reply.id] + ".");
        }
        assert.equal(ids.size, 40);
      } finally {
        client.close();
      }
    });
  });
});

netTest(
  "global in-flight limit drops excess queries instead of queueing without bound",
  async () => {
    await withUpstream({ delayMs: () => 300 }, async (upstream) => {
      const config = testConfig([upstream.upstream()], { maxInflight: 5 });
      await withProxy(config, async ({ port, proxy }) => {
        const replies = await Promise.all(
          Array.from({ length: 12 }, (_, i) => udpExchange(port, buildQuery(`o${i}.test`), 1500)),
        );
        const answered = replies.filter((r) => r !== null).length;
        assert.equal(answered, 5);
        assert.equal(proxy.metrics.dropped.get("udp", "overload"), 7);
      });
    });
  },
);

netTest("listens on IPv6 loopback too", async () => {
  await withUpstream({}, async (upstream) => {
    const config = testConfig([upstream.upstream()], {
      listen: [{ hostname: "::1", port: 0 }],
    });
    await withProxy(config, async ({ port }) => {
      expectAnswer(
        await udpExchange(port, buildQuery("v6.test", { id: 6 }), 3000, "::1"),
        6,
        "v6.test",
      );
      const client = await TcpDnsClient.connect(port, "::1");
      try {
        await client.send(buildQuery("v6tcp.test", { id: 7 }));
        expectAnswer(await client.receive(), 7, "v6tcp.test");
      } finally {
        client.close();
      }
    });
  });
});

netTest("idle upstream connections are closed, and reopened on demand", async () => {
  await withUpstream({}, async (upstream) => {
    // No hedging: a hedge on the only upstream would open a second connection.
    const config = testConfig([upstream.upstream()], { upstreamIdleTimeoutMs: 150, hedgeDelay: 0 });
    await withProxy(config, async ({ port, proxy }) => {
      const open = (): number => proxy.pool?.upstreams[0].connections.length ?? -1;
      expectAnswer(await udpExchange(port, buildQuery("one.idle", { id: 1 })), 1, "one.idle");
      assert.equal(open(), 1);
      for (let i = 0; i < 100 && open() !== 0; i++) {
        await sleep(20);
      }
      assert.equal(open(), 0, "idle connection closed");
      expectAnswer(await udpExchange(port, buildQuery("two.idle", { id: 2 })), 2, "two.idle");
      assert.equal(upstream.connections, 2, "a new connection was opened on demand");
    });
  });
});

netTest("graceful shutdown answers queries already in flight", async () => {
  await withUpstream({ delayMs: () => 200 }, async (upstream) => {
    const config = testConfig([upstream.upstream()]);
    const proxy = await startProxy(config, new LogCapture().logger());
    const port = proxy.udp[0].addr.port;
    const pending = udpExchange(port, buildQuery("inflight.shutdown", { id: 5 }));
    for (let i = 0; i < 100 && upstream.queries === 0; i++) {
      await sleep(5);
    }
    await proxy.close();
    expectAnswer(await pending, 5, "inflight.shutdown");
  });
});

netTest("an upstream that stops answering is abandoned for one that answers", async () => {
  const silent = DotServer.start({ answer: () => null });
  try {
    await withUpstream({}, async (working) => {
      const config = testConfig([silent.upstream(), working.upstream()], { timeoutMs: 300 });
      await withProxy(config, async ({ port, proxy, logs }) => {
        // Fill the silent upstream first: the pool prefers it while both are idle.
        const first = await Promise.all(
          Array.from({ length: 4 }, (_, i) => udpExchange(port, buildQuery(`s${i}.test`))),
        );
        assert.ok(first.every((r) => r !== null), "every query got some answer");
        for (let i = 0; i < 100 && logs.find("upstream down").length === 0; i++) {
          await sleep(20);
        }
        assert.ok(logs.find("upstream down").length >= 1, "the silent connection was noticed");
        assert.equal(proxy.pool?.upstreams[0].usable, false, "the silent upstream is down");
        expectAnswer(await udpExchange(port, buildQuery("after.test", { id: 9 })), 9, "after.test");
      });
    });
  } finally {
    await silent.close();
  }
});

netTest("answers held back by a Nagle-bound upstream are released by a nudge", async () => {
  // The upstream writes one answer, then holds the rest until the proxy sends more bytes.
  await withUpstream({ nagle: true }, async (upstream) => {
    const config = testConfig([upstream.upstream()], { upstreamConnections: 1, timeoutMs: 3000 });
    await withProxy(config, async ({ port, logs }) => {
      const names = ["a.nagle.test", "b.nagle.test", "c.nagle.test", "d.nagle.test"];
      const replies = await Promise.all(
        names.map((name, i) => udpExchange(port, buildQuery(name, { id: i }), 2500)),
      );
      replies.forEach((reply, i) => expectAnswer(reply, i, names[i]));
      // A nudge is the first octet of the next frame's length alone (nothing to answer), or,
      // with that octet out already, a query written again (its echo absorbed).
      assert.ok(upstream.lengthOctets >= 1, "a lone length octet released the held answers");
      const nudges = upstream.lengthOctets + (upstream.queries - names.length);
      assert.ok(nudges >= 1 && nudges <= 3 * names.length, `${nudges} nudges`);
      // The echoes of the nudges are absorbed quietly.
      await sleep(50);
      assert.equal(logs.find("does not match").length, 0);
      assert.equal(logs.find("stalled").length, 0);
    });
  });
});
netTest(
  "after nudges (a lone length octet among them), a query of 256 octets or more goes out whole",
  async () => {
    await withUpstream({ nagle: true }, async (upstream) => {
      const config = testConfig([upstream.upstream()], { upstreamConnections: 1, timeoutMs: 3000 });
      await withProxy(config, async ({ port, logs }) => {
        // Two at once: the second answer is held until a nudge sends the lone length octet.
        const first = await Promise.all(
          ["a.octet.test", "b.octet.test"].map((name, i) =>
            udpExchange(port, buildQuery(name, { id: i }), 2500)
          ),
        );
        first.forEach((reply, i) => expectAnswer(reply, i, ["a", "b"][i] + ".octet.test"));
        assert.ok(upstream.lengthOctets >= 1, "a lone length octet was sent");
        // Over 255 octets: if the octet is still pending, its frame is completed first.
        const long = `${"l".repeat(63)}.${"m".repeat(63)}.${"n".repeat(63)}.${
          "o".repeat(40)
        }.octet.test`;
        const query = buildQuery(long, { id: 77 });
        const queriesBefore = upstream.queries;
        expectAnswer(await udpExchange(port, query, 2500), 77, long);
        // One more question, and, when the octet was still pending, the header-only query that
        // completed its frame (its answer ignored as an echo).
        assert.ok(upstream.queries - queriesBefore <= 2);
        expectAnswer(
          await udpExchange(port, buildQuery("c.octet.test", { id: 5 })),
          5,
          "c.octet.test",
        );
        assert.equal(logs.find("does not match").length, 0);
        assert.equal(logs.find("malformed").length, 0);
      });
    });
  },
);

netTest(
  "padding: queries and health probes reach the upstream in 128-octet blocks; with --padding false, unpadded",
  async () => {
    for (const padding of [true, false]) {
      await withUpstream({}, async (upstream) => {
        await withProxy(testConfig([upstream.upstream()], { padding }), async ({ port }) => {
          const names = ["a.pad.test", `${"long-label.".repeat(10)}pad.test`];
          for (const [i, name] of names.entries()) {
            expectAnswer(await udpExchange(port, buildQuery(name, { id: 70 + i })), 70 + i, name);
          }
          // The pool probes each upstream at start.
          for (let i = 0; i < 100 && upstream.probes === 0; i++) {
            await sleep(20);
          }
          const probes = upstream.messageLengths.filter((m) => m.probe);
          const queries = upstream.messageLengths.filter((m) => !m.probe);
          assert.ok(probes.length >= 1, "a health probe reached the upstream");
          assert.equal(queries.length, 2);
          if (padding) {
            assert.deepEqual(probes.map((m) => m.length % 128), probes.map(() => 0));
            assert.deepEqual(queries.map((m) => m.length), [128, 256]);
          } else {
            assert.deepEqual(probes.map((m) => m.length), probes.map(() => 28));
            assert.ok(queries.every((m) => m.length % 128 !== 0), JSON.stringify(queries));
          }
        });
      });
    }
  },
);

Deno.test("proxy: a UDP listener on a wildcard address warns at start (replies leave from the route's address)", async () => {
  const dot = DotServer.start();
  try {
    for (const [hostname, warned] of [["0.0.0.0", 1], ["127.0.0.1", 0]] as const) {
      const config = testConfig([dot.upstream()], { listen: [{ hostname, port: 0 }] });
      await withProxy(config, async ({ logs, port }) => {
        const lines = logs.find("listening for UDP on a wildcard address");
        assert.equal(lines.length, warned, hostname);
        if (warned > 0) {
          assert.equal(lines[0].level, "warn");
          assert.equal(lines[0].listen, `0.0.0.0:${port}`);
        }
        assert.ok(await udpExchange(port, buildQuery("wildcard.test")), "and it serves");
      });
    }
  } finally {
    await dot.close();
  }
});

Deno.test("proxy: an upstream TTL with the top bit set is relayed as 0 and not cached (RFC 2181 section 8)", async () => {
  const dot = DotServer.start({
    answer: (query) => {
      const response = answerFor(query);
      let at = 12;
      while (response[at] !== 0) at += response[at] + 1;
      // Question end, then the answer's pointer, type and class: its TTL, 2^31 + 1.
      response.set([0x80, 0, 0, 1], at + 5 + 6);
      return response;
    },
  });
  try {
    await withProxy(testConfig([dot.upstream()]), async ({ port }) => {
      for (const [id, transport] of [[1, "udp"], [2, "tcp"]] as const) {
        const query = buildQuery("highbit.test", { id });
        let reply: Uint8Array | null;
        if (transport === "udp") {
          reply = await udpExchange(port, query);
        } else {
          const client = await TcpDnsClient.connect(port);
          try {
            await client.send(query);
            reply = await client.receive();
          } finally {
            client.close();
          }
        }
        assert.ok(reply, transport);
        const parsed = parseMessage(reply);
        assert.equal(parsed.answers[0].ttl, 0, `${transport}: TTL 0, not 2,147,483,649`);
        assert.equal(formatA(parsed.answers[0].data), addressFor("highbit.test"));
      }
      assert.equal(dot.queries, 2, "a TTL of 0 is not cached: each asked upstream");
    });
  } finally {
    await dot.close();
  }
});
