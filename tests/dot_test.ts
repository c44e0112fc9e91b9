/**
 * The DNS-over-TLS listener over real sockets (issue 25): pipelined queries with and without
 * ALPN, the same rules as TCP, handshake failures and the handshake deadline counted against
 * the connection caps, EDNS TCP keepalive on TCP and DoT (never UDP), padding of answers to
 * 468-octet blocks over DoT only, and the metrics.
 *
 * @module
 */

import assert from "node:assert/strict";
import { SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { buildQuery, parseMessage, withEdnsOption } from "./support/dns.ts";
import { metricValue } from "./support/prometheus.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { type Config, parseCidr } from "../src/config.ts";
import type { RunningProxy } from "../src/app.ts";
import { until } from "./support/wait.ts";
import { InstantForwarder } from "./support/forwarder.ts";

const UNUSED = ["127.0.0.1:853#dns.test"];
const KEEPALIVE = 11;
const PADDING = 12;

function dotConfig(overrides: Partial<Config> = {}): Config {
  return testConfig(UNUSED, {
    listenDot: [{ hostname: "127.0.0.1", port: 0 }],
    tlsCert: SERVER_PEM,
    tlsKey: SERVER_KEY,
    ...overrides,
  });
}

function metric(proxy: RunningProxy, name: string, labels: Record<string, string>): number {
  return metricValue(proxy.metrics.registry.render(), name, labels) ?? 0;
}

function dotPort(proxy: RunningProxy): number {
  return proxy.dot[0].addr.port;
}

/** The OPT options of `message`, by code. */
function options(message: Uint8Array): Map<number, Uint8Array> {
  const parsed = parseMessage(message);
  return new Map((parsed.opt?.options ?? []).map((o) => [o.code, o.data]));
}

Deno.test("dot: pipelined queries over TLS with ALPN dot and with no ALPN, answered in full", async () => {
  const forwarder = new InstantForwarder();
  await withProxy(dotConfig(), async ({ proxy }) => {
    for (const alpn of [["dot"], undefined]) {
      const client = await TcpDnsClient.connectTls(dotPort(proxy), "127.0.0.1", alpn);
      try {
        for (let i = 0; i < 100; i++) {
          await client.send(buildQuery(`q${i}.test`, { id: i, ednsUdpSize: 1232 }));
        }
        const ids = new Set<number>();
        for (let i = 0; i < 100; i++) {
          const reply = parseMessage((await client.receive())!);
          assert.equal(reply.rcode, 0);
          ids.add(reply.id);
        }
        assert.equal(ids.size, 100, `alpn ${alpn}`);
      } finally {
        client.close();
      }
    }
    assert.equal(
      metric(proxy, "dotproxy_tls_handshakes_total", { transport: "dot", result: "ok" }),
      2,
    );
    const queries = metric(proxy, "dotproxy_queries_total", { transport: "dot", rcode: "NOERROR" });
    assert.equal(queries, 200);
    // A client offering only another protocol fails the handshake (no overlap).
    await assert.rejects(TcpDnsClient.connectTls(dotPort(proxy), "127.0.0.1", ["h2"]));
    assert.ok(
      await until(() =>
        metric(proxy, "dotproxy_tls_handshakes_total", { transport: "dot", result: "failed" }) ===
          1
      ),
    );
  }, { forwarder });
});

Deno.test("dot: garbage, half a ClientHello and silence fail or time out; slots count meanwhile", async () => {
  const forwarder = new InstantForwarder();
  const config = dotConfig({ maxTcpConnections: 2 });
  await withProxy(config, async ({ proxy, logs }) => {
    const port = dotPort(proxy);
    const garbage = await Deno.connect({ hostname: "127.0.0.1", port });
    await garbage.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    // The server may answer with a TLS alert; then it closes.
    let closed = false;
    for (let i = 0; i < 10 && !closed; i++) {
      closed = (await garbage.read(new Uint8Array(100)).catch(() => null)) === null;
    }
    assert.ok(closed, "closed");
    garbage.close();
    assert.ok(
      await until(() =>
        metric(proxy, "dotproxy_tls_handshakes_total", { transport: "dot", result: "failed" }) ===
          1
      ),
    );
    // Two silent connections (one with half a ClientHello) hold both slots while they last.
    const silent = await Deno.connect({ hostname: "127.0.0.1", port });
    const half = await Deno.connect({ hostname: "127.0.0.1", port });
    // A TLS record header announcing 512 octets of handshake, and only 5 of them.
    await half.write(new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03]));
    assert.ok(await until(() => proxy.dot[0].openConnections === 2));
    // A third connection is closed on accept while the two handshake (Deno's TLS may finish
    // the client's handshake before the close: then the connection ends unanswered).
    const third = await TcpDnsClient.connectTls(port).catch(() => null);
    if (third !== null) {
      try {
        await third.send(buildQuery("third.test", { id: 9 })).catch(() => {});
        assert.equal(await third.receive(2000).catch(() => null), null, "closed unanswered");
      } finally {
        third.close();
      }
    }
    assert.equal(
      metric(proxy, "dotproxy_tcp_connections_rejected_total", {}),
      0,
      "DoT rejections are not TCP's",
    );
    assert.equal(
      metric(proxy, "dotproxy_client_connections", { transport: "dot" }),
      2,
      "handshakes count as open connections",
    );
    // The deadline (5 s) frees them.
    assert.ok(await until(() => proxy.dot[0].openConnections === 0, 8000));
    assert.equal(
      metric(proxy, "dotproxy_tls_handshakes_total", { transport: "dot", result: "timeout" }),
      2,
    );
    silent.close();
    half.close();
    assert.equal(logs.find("dot tls handshake timed out").length, 1, "rate limited");
    assert.equal(logs.find("dot tls handshake failed")[0].client !== undefined, true);
    const client = await TcpDnsClient.connectTls(port);
    try {
      await client.send(buildQuery("after.test", { id: 7 }));
      assert.equal(parseMessage((await client.receive())!).id, 7, "served again");
    } finally {
      client.close();
    }
  }, { forwarder });
});

Deno.test("edns keepalive: TCP and DoT answers carry the idle timeout; UDP never", async () => {
  const forwarder = new InstantForwarder();
  await withProxy(dotConfig({ tcpIdleTimeoutMs: 7000 }), async ({ proxy, port }) => {
    const query = withEdnsOption(buildQuery("k.test", { id: 3, ednsUdpSize: 1232 }), KEEPALIVE);
    for (
      const client of [
        await TcpDnsClient.connect(port),
        await TcpDnsClient.connectTls(dotPort(proxy)),
      ]
    ) {
      try {
        await client.send(query);
        const reply = (await client.receive())!;
        const keepalive = options(reply).get(KEEPALIVE);
        assert.deepEqual(keepalive && [...keepalive], [0, 70], "7 s in units of 100 ms");
        assert.equal(parseMessage(reply).id, 3);
      } finally {
        client.close();
      }
    }
    const overUdp = await udpExchange(port, query);
    assert.ok(overUdp);
    assert.equal(options(overUdp).has(KEEPALIVE), false, "never over UDP");
    // Without the option, none.
    const plain = await TcpDnsClient.connect(port);
    try {
      await plain.send(buildQuery("k.test", { id: 4, ednsUdpSize: 1232 }));
      assert.equal(options((await plain.receive())!).has(KEEPALIVE), false);
    } finally {
      plain.close();
    }
  }, { forwarder });
});

Deno.test("edns padding: DoT answers to a padded query fill 468-octet blocks; TCP and UDP not", async () => {
  const forwarder = new InstantForwarder();
  await withProxy(dotConfig(), async ({ proxy, port }) => {
    const padded = withEdnsOption(
      buildQuery("p.test", { id: 5, ednsUdpSize: 1232 }),
      PADDING,
      new Array(20).fill(0),
    );
    const dot = await TcpDnsClient.connectTls(dotPort(proxy));
    try {
      await dot.send(padded);
      const reply = (await dot.receive())!;
      assert.equal(reply.length % 468, 0, `${reply.length} octets`);
      assert.equal(parseMessage(reply).rcode, 0);
      assert.equal(parseMessage(reply).answers.length, 1);
      // A big answer: several blocks.
      await dot.send(
        withEdnsOption(
          buildQuery("big3000.test", { id: 6, type: 16, ednsUdpSize: 1232 }),
          PADDING,
        ),
      );
      const big = (await dot.receive())!;
      assert.equal(big.length % 468, 0);
      assert.ok(big.length > 3000);
      // No padding option: no padding.
      await dot.send(buildQuery("p.test", { id: 8, ednsUdpSize: 1232 }));
      assert.equal(options((await dot.receive())!).has(PADDING), false);
    } finally {
      dot.close();
    }
    const tcp = await TcpDnsClient.connect(port);
    try {
      await tcp.send(padded);
      assert.equal(options((await tcp.receive())!).has(PADDING), false, "not over plain TCP");
    } finally {
      tcp.close();
    }
    const overUdp = await udpExchange(port, padded);
    assert.equal(options(overUdp!).has(PADDING), false, "not over UDP");
  }, { forwarder });
});

Deno.test("dot: a client outside --allow gets REFUSED, then the connection closes (as over TCP)", async () => {
  const forwarder = new InstantForwarder();
  const config = dotConfig({ allow: [parseCidr("10.0.0.0/8", "--allow")] });
  await withProxy(config, async ({ proxy }) => {
    const client = await TcpDnsClient.connectTls(dotPort(proxy));
    try {
      await client.send(buildQuery("outsider.test", { id: 11 }));
      const reply = parseMessage((await client.receive())!);
      assert.equal(reply.rcode, 5, "REFUSED");
      assert.equal(await client.receive(), null, "then closed");
      assert.equal(forwarder.forwarded, 0);
    } finally {
      client.close();
    }
  }, { forwarder });
});
