/**
 * Readiness over real sockets (issue 22): `/readyz` says whether this replica should get
 * traffic, so it must not fail for a fault every replica shares. With every upstream stopped,
 * `/readyz` stays 200 and a cached name is still answered (stale, RFC 8767) through the
 * listener; `/healthz/upstreams` is the endpoint that reports the outage, for alerting.
 */

import assert from "node:assert/strict";
import { DotServer } from "./support/dot_server.ts";
import { addressFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

async function get(port: number, path: string): Promise<{ status: number; body: string }> {
  const response = await fetch(`http://127.0.0.1:${port}${path}`, {
    signal: AbortSignal.timeout(5000),
  });
  return { status: response.status, body: await response.text() };
}

function addresses(reply: Uint8Array): { ttl: number; address: string }[] {
  return parseMessage(reply).answers.filter((r) => r.type === 1).map((r) => ({
    ttl: r.ttl,
    address: formatA(r.data),
  }));
}

Deno.test("readiness: every upstream stopped: /readyz stays 200 and a cached name is answered stale", async () => {
  const a = DotServer.start();
  const b = DotServer.start();
  const stopped = { a: false, b: false };
  try {
    const config = testConfig([a.upstream(), b.upstream()], {
      http: { hostname: "127.0.0.1", port: 0 },
      // Entries expire after 1 s, so the answer below can only come from serve-stale.
      cacheMaxTtl: 1,
      staleAnswerTimeoutMs: 200,
      timeoutMs: 1000,
      healthCheckIntervalMs: 200,
    });
    await withProxy(config, async ({ proxy, port }) => {
      const web = proxy.http!.addr.port;
      const name = "cached.readiness.test";
      const fresh = await udpExchange(port, buildQuery(name, { id: 1 }));
      assert.ok(fresh);
      assert.deepEqual(addresses(fresh), [{ ttl: 1, address: addressFor(name) }]);
      assert.deepEqual(await get(web, "/readyz"), { status: 200, body: "ready: serving\n" });
      assert.equal((await get(web, "/healthz/upstreams")).status, 200);

      await a.close();
      stopped.a = true;
      await b.close();
      stopped.b = true;

      // The outage is seen (by health checks and by a query for a name not cached) ...
      let failing = { status: 0, body: "" };
      for (let i = 0; i < 100; i++) {
        await udpExchange(port, buildQuery(`uncached${i}.readiness.test`), 300);
        failing = await get(web, "/healthz/upstreams");
        if (failing.status === 503) break;
        await sleep(50);
      }
      assert.equal(failing.status, 503, failing.body);
      assert.match(failing.body, /^failing: no upstream answers: /);
      assert.ok(failing.body.includes(a.upstream()) && failing.body.includes(b.upstream()));
      assert.equal(
        proxy.pool!.upstreams.filter((u) => u.usable).length,
        0,
        "every upstream is down",
      );

      // ... and yet the replica stays in the Service, where the cache can still answer.
      await sleep(1100);
      assert.deepEqual(await get(web, "/readyz"), { status: 200, body: "ready: serving\n" });
      const stale = await udpExchange(port, buildQuery(name, { id: 2 }), 4000);
      assert.ok(stale, "an answer, not silence");
      assert.equal(parseMessage(stale).rcode, 0, "NOERROR from the cache");
      // RFC 8767 section 4: a stale answer carries a TTL of 30 s.
      assert.deepEqual(addresses(stale), [{ ttl: 30, address: addressFor(name) }]);
      assert.equal((await get(web, "/readyz")).status, 200);

      // Draining is what takes a replica out.
      const draining = proxy.drain({ delayMs: 200, timeoutMs: 200 });
      assert.deepEqual(await get(web, "/readyz"), {
        status: 503,
        body: "not ready: shutting down\n",
      });
      await draining;
    });
  } finally {
    if (!stopped.a) await a.close();
    if (!stopped.b) await b.close();
  }
});
