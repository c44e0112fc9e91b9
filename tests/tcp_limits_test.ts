/**
 * TCP limits that cost a well-behaved client nothing (issue 21), over real sockets:
 *
 * - a client at `--max-tcp-connections-per-client` that opens one more loses its
 *   longest-idle connection instead of the new one; with none idle, the new one is closed;
 * - a drain answers every frame already read from the socket;
 * - one client holding many connections of slow queries cannot leave another client one
 *   query at a time (the answer budget is shared per client before per connection);
 * - a client that stops reading is closed by time without write progress, not by bytes.
 *
 * @module
 */

import assert from "node:assert/strict";
import { answerFor, buildQuery, parseMessage } from "./support/dns.ts";
import { bigAnswersThenHeldQueries, pythonAvailable, tcpPipelineFrom } from "./support/hostile.ts";
import { TcpDnsClient, testConfig, withProxy } from "./support/proxy.ts";
import type { UpstreamRequest } from "../src/upstream/forwarder.ts";
import { STREAM_ANSWER_BUDGET } from "../src/server/answer_budget.ts";
import { sleep, until } from "./support/wait.ts";
import { FakeForwarder, InstantForwarder } from "./support/forwarder.ts";

const UNUSED = ["127.0.0.1:853#dns.test"];
const HAS_PYTHON = await pythonAvailable();

/** Holds questions whose name starts with `hold`, answers the rest at once. */
const holdSome = () => new FakeForwarder({ hold: (name) => name.startsWith("hold") });

async function ask(client: TcpDnsClient, name: string, id: number): Promise<void> {
  await client.send(buildQuery(name, { id }));
  const reply = await client.receive();
  assert.ok(reply, `answer for ${name}`);
  assert.equal(parseMessage(reply).id, id);
}

Deno.test("tcp per-client cap: one more connection closes the client's longest-idle one", async () => {
  const forwarder = holdSome();
  const config = testConfig(UNUSED, { maxTcpConnectionsPerClient: 3, tcpIdleTimeoutMs: 60_000 });
  await withProxy(config, async ({ proxy, port }) => {
    const clients: TcpDnsClient[] = [];
    try {
      for (let i = 0; i < 3; i++) clients.push(await TcpDnsClient.connect(port));
      const [oldest, recent, busy] = clients;
      await ask(oldest, "a.test", 1);
      await sleep(30);
      await ask(recent, "b.test", 2);
      await busy.send(buildQuery("hold.test", { id: 3 }));
      assert.ok(await until(() => forwarder.pending.length === 1));
      // One more: the longest-idle connection makes room.
      const newer = await TcpDnsClient.connect(port);
      clients.push(newer);
      await ask(newer, "c.test", 4);
      assert.equal(await oldest.closedByPeer(2000), true, "the longest-idle one is closed");
      await ask(recent, "d.test", 5);
      forwarder.release();
      assert.equal(parseMessage((await busy.receive())!).id, 3, "the busy one keeps its query");
      assert.equal(proxy.tcp[0].openConnections, 3);
    } finally {
      for (const client of clients) client.close();
    }
  }, { forwarder });
});

Deno.test("tcp per-client cap: with none of its connections idle, the new one is closed", async () => {
  const forwarder = holdSome();
  const config = testConfig(UNUSED, { maxTcpConnectionsPerClient: 3, tcpIdleTimeoutMs: 60_000 });
  await withProxy(config, async ({ proxy, port, logs }) => {
    const clients: TcpDnsClient[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        const client = await TcpDnsClient.connect(port);
        clients.push(client);
        await client.send(buildQuery(`hold${i}.test`, { id: i }));
      }
      assert.ok(await until(() => forwarder.pending.length === 3));
      const extra = await TcpDnsClient.connect(port);
      clients.push(extra);
      assert.equal(await extra.closedByPeer(2000), true, "the new connection is closed");
      assert.equal(logs.find("tcp connection limit reached").length, 1);
      forwarder.release();
      for (let i = 0; i < 3; i++) {
        assert.equal(parseMessage((await clients[i].receive())!).id, i, "busy ones served");
      }
      assert.equal(proxy.tcp[0].openConnections, 3);
    } finally {
      for (const client of clients) client.close();
    }
  }, { forwarder });
});

Deno.test("tcp drain: every frame already read is answered before the connection closes", async () => {
  const forwarder = new FakeForwarder();
  // Five in flight at a time: the other frames wait in the connection's read buffer.
  const config = testConfig(UNUSED, { maxTcpQueriesPerConnection: 5 });
  const logs: string[] = [];
  await withProxy(config, async ({ proxy, port }) => {
    const client = await TcpDnsClient.connect(port);
    try {
      // 150 frames of 26 octets: all fit the first read of the connection (4 KiB).
      const frames: number[] = [];
      for (let i = 0; i < 150; i++) {
        const query = buildQuery(`q${String(i).padStart(3, "0")}.t`, { id: i });
        frames.push(query.length >> 8, query.length & 0xff, ...query);
      }
      assert.ok(frames.length <= 4096);
      await client.writeRaw(new Uint8Array(frames));
      assert.ok(await until(() => forwarder.pending.length === 5));
      const drained = proxy.drain({ delayMs: 0, timeoutMs: 10_000 });
      // The upstream answers slowly, five at a time.
      const releasing = (async () => {
        for (let round = 0; round < 100 && forwarder.forwarded < 150; round++) {
          await sleep(5);
          forwarder.release();
        }
        forwarder.release();
      })();
      const ids = new Set<number>();
      for (let n = 0; n < 150; n++) {
        const reply = await client.receive(5000);
        if (reply === null) {
          logs.push(`closed after ${n}`);
          break;
        }
        ids.add(parseMessage(reply).id);
      }
      await releasing;
      await drained;
      assert.deepEqual(logs, []);
      assert.equal(ids.size, 150, "every query read was answered");
      assert.equal(await client.receive(1000), null, "then the connection closes");
    } finally {
      client.close();
    }
  }, { forwarder });
});

Deno.test({
  name: "tcp fairness: one client's 60 connections of slow queries leave another its window",
  ignore: !HAS_PYTHON,
  fn: async () => {
    // The hog's questions are held; the victim's are answered after 20 ms, as from upstream.
    const hog = new FakeForwarder();
    let victimInflight = 0;
    let victimMost = 0;
    const forwarder = {
      forward(request: UpstreamRequest) {
        const name = parseMessage(request.query).question?.name ?? "";
        if (name === "big60000.test.") {
          queueMicrotask(() => request.settleAnswer(answerFor(request.query), "big", null));
        } else if (name.includes(".victim")) {
          victimMost = Math.max(victimMost, ++victimInflight);
          setTimeout(() => {
            victimInflight--;
            request.settleAnswer(answerFor(request.query), "slow", null);
          }, 20);
        } else hog.forward(request);
      },
      close: () => hog.close(),
    };
    const config = testConfig(UNUSED, { cacheSize: 0, maxTcpConnections: 200 });
    await withProxy(config, async ({ port }) => {
      const clients: TcpDnsClient[] = [];
      try {
        // Big answers about (the estimate of an answer's size is 60 KB), then 60 connections x
        // 16 slow queries: more than the whole budget (about 140).
        await bigAnswersThenHeldQueries(port, clients, 60, 16);
        assert.ok(await until(() => hog.pending.length >= STREAM_ANSWER_BUDGET / 60_000));
        // The victim asks for big answers too (the estimate stays at 60 KB).
        const queries = Array.from(
          { length: 100 },
          (_, i) => buildQuery(`big60000.victim${i}.test`, { type: 16 }),
        );
        const answered = await tcpPipelineFrom("127.0.0.2", port, queries);
        assert.equal(answered, 100);
        // Budget shared per connection only: one at a time. Per client: a window's worth.
        assert.ok(victimMost >= 32, `the victim had ${victimMost} queries in flight at most`);
      } finally {
        for (const client of clients) client.close();
        hog.release();
      }
    }, { forwarder });
  },
});

Deno.test("tcp: a client that stops reading is closed after 2 s without write progress, not before", async () => {
  const forwarder = new InstantForwarder();
  const config = testConfig(UNUSED, { cacheSize: 0, tcpIdleTimeoutMs: 60_000 });
  await withProxy(config, async ({ proxy, port, logs }) => {
    const client = await TcpDnsClient.connect(port);
    try {
      // 300 answers of 60 KB (18 MB): far more than the socket buffers hold.
      const frames: number[] = [];
      for (let i = 0; i < 300; i++) {
        const query = buildQuery(`big60000.n${i}.test`, { id: i, type: 16 });
        frames.push(query.length >> 8, query.length & 0xff, ...query);
      }
      await client.writeRaw(new Uint8Array(frames));
      const started = performance.now();
      assert.ok(await until(() => logs.find("not reading its answers").length > 0, 10_000));
      const waited = performance.now() - started;
      assert.ok(waited >= 1500, `closed after ${Math.round(waited)} ms`);
      assert.ok(await until(() => proxy.tcp[0].openConnections === 0));
      assert.ok(forwarder.forwarded < 300, `reading paused: ${forwarder.forwarded} of 300`);
    } finally {
      client.close();
    }
  }, { forwarder });
});
