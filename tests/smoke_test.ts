import assert from "node:assert/strict";
import { DotServer } from "./support/dot_server.ts";
import { addressFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";

Deno.test("smoke: udp and tcp answered through DoT", async () => {
  const upstream = DotServer.start();
  try {
    await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
      const reply = await udpExchange(port, buildQuery("example.com", { id: 4242 }));
      assert.ok(reply);
      const parsed = parseMessage(reply);
      assert.equal(parsed.id, 4242);
      assert.equal(formatA(parsed.answers[0].data), addressFor("example.com"));
      const tcp = await TcpDnsClient.connect(port);
      await tcp.send(buildQuery("tcp.example", { id: 7 }));
      const r2 = await tcp.receive();
      assert.ok(r2);
      assert.equal(parseMessage(r2).id, 7);
      tcp.close();
    });
  } finally {
    await upstream.close();
  }
});
