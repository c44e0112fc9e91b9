/**
 * Special-use names over real sockets (`--special-use-names`, on by default): answered by
 * the proxy from the query's own bytes, never sent to the DoT upstream, with an SOA in every
 * negative answer so caches keep the denial as long as it says.
 */

import assert from "node:assert/strict";
import { buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { DotServer } from "./support/dot_server.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy, zones } from "./support/proxy.ts";

const A = 1;
const SOA = 6;
const MX = 15;
const PTR = 12;
const AAAA = 28;

Deno.test("special-use names: answered here from the query's bytes; none reaches the upstream", async () => {
  const dot = DotServer.start();
  try {
    await withProxy(testConfig([dot.upstream()]), async ({ port }) => {
      const ask = async (name: string, type: number, ednsUdpSize?: number) => {
        const id = Math.floor(Math.random() * 65536);
        const reply = await udpExchange(port, buildQuery(name, { id, type, ednsUdpSize }));
        assert.ok(reply, name);
        const parsed = parseMessage(reply);
        assert.equal(parsed.id, id, `${name}: the query's ID`);
        assert.equal(parsed.question?.name, name.endsWith(".") ? name : `${name}.`, "casing");
        assert.equal(parsed.qr && parsed.ra && parsed.rd, true);
        return parsed;
      };
      const localhost = await ask("LocalHost", A);
      assert.equal(localhost.rcode, 0);
      assert.equal(formatA(localhost.answers[0].data), "127.0.0.1");
      const six = await ask("db.localhost", AAAA, 1232);
      assert.deepEqual([...six.answers[0].data], [...new Array(15).fill(0), 1]);
      assert.ok(six.opt, "EDNS answered with EDNS");
      const mx = await ask("localhost", MX);
      assert.equal(mx.rcode, 0);
      assert.equal(mx.answers.length, 0, "NODATA for other types");
      assert.equal(mx.authority[0].type, SOA);
      for (
        const [name, zone, type] of [
          ["Hidden.Onion", "Onion.", A],
          ["x.invalid", "invalid.", A],
          ["printer.local", "local.", AAAA],
          ["nas.home.arpa", "home.arpa.", A],
          ["1.0.168.192.in-addr.arpa", "168.192.in-addr.arpa.", PTR],
          ["7.0.64.100.in-addr.arpa", "64.100.in-addr.arpa.", PTR],
          ["1.0.0.127.in-addr.arpa", "127.in-addr.arpa.", PTR],
        ] as const
      ) {
        const parsed = await ask(name, type);
        assert.equal(parsed.rcode, 3, `${name}: NXDOMAIN`);
        assert.equal(parsed.aa, true);
        assert.equal(parsed.authority.length, 1, `${name}: an SOA for negative caching`);
        assert.equal(parsed.authority[0].type, SOA);
        assert.equal(parsed.authority[0].name, zone, `${name}: the zone's SOA`);
        assert.equal(parsed.authority[0].ttl, 3600, "at most --cache-max-negative-ttl");
      }
      const apex = await ask("home.arpa", SOA);
      assert.equal(apex.rcode, 0);
      assert.equal(apex.answers[0].type, SOA, "the apex has its SOA");
      const tcp = await TcpDnsClient.connect(port);
      try {
        await tcp.send(buildQuery("tor.onion", { id: 7 }));
        const viaTcp = parseMessage((await tcp.receive())!);
        assert.equal(viaTcp.rcode, 3);
        assert.equal(viaTcp.id, 7);
      } finally {
        tcp.close();
      }
      assert.equal(dot.queries, 0, "nothing reached the DoT upstream");
      const publicName = await ask("www.test", A);
      assert.equal(publicName.rcode, 0, "test is not special-use");
      assert.equal(dot.queries, 1);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("special-use names: --special-use-names false sends them upstream", async () => {
  const dot = DotServer.start();
  try {
    await withProxy(testConfig([dot.upstream()], { specialUseNames: false }), async ({ port }) => {
      const reply = await udpExchange(port, buildQuery("printer.local"));
      assert.ok(reply);
      assert.equal(parseMessage(reply).answers.length, 1, "the upstream's answer");
      assert.equal(dot.queries, 1);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("special-use names: --zone ...=default carves a zone out of the list", async () => {
  const dot = DotServer.start();
  try {
    const config = testConfig([dot.upstream()], { zones: zones("192.168.0.0/16=default") });
    await withProxy(config, async ({ port }) => {
      const carved = parseMessage(
        (await udpExchange(port, buildQuery("1.0.168.192.in-addr.arpa", { type: PTR })))!,
      );
      assert.equal(carved.rcode, 0, "the upstream's answer");
      assert.equal(dot.queries, 1);
      const still = parseMessage(
        (await udpExchange(port, buildQuery("1.0.0.10.in-addr.arpa", { type: PTR })))!,
      );
      assert.equal(still.rcode, 3, "10/8 is still answered here");
      assert.equal(dot.queries, 1);
    });
  } finally {
    await dot.close();
  }
});
