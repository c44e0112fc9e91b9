/**
 * The fault upstreams do what they promise at the socket level: each fault is observed
 * with a plain `Deno.connect` (and `Deno.startTls`, verified against `dns.test` with the
 * test CA), switched on and off on the same port; the black hole makes connects hang; a real
 * Unbound can be frozen, resumed, killed and restarted.
 *
 * Run with `deno test --allow-net --allow-read --allow-write=/tmp --allow-run
 * tests/fault_upstream_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import { answerFor, buildQuery, lengthFramed, parseMessage } from "./support/dns.ts";
import {
  BlackHole,
  type Fault,
  FAULTS,
  FaultyUpstream,
  rcodeResponse,
} from "./support/fault_upstream.ts";
import { UnboundUpstream } from "./support/unbound.ts";
import { sleep } from "./support/wait.ts";

// ---------------------------------------------------------------------------------------------
// A small DoT client that reads in the background, so a test can wait for an answer with a
// timeout without cancelling the read.

/** What `next` returns when no frame came in time. */
const TIMEOUT = Symbol("timeout");

class DotClient {
  readonly conn: Deno.TlsConn;
  readonly #frames: Uint8Array[] = [];
  #ended = false;
  #wake: (() => void) | null = null;
  readonly #reading: Promise<void>;

  private constructor(conn: Deno.TlsConn) {
    this.conn = conn;
    this.#reading = this.#read();
  }

  /** TCP connect, TLS verified against `tlsName`, handshake done. */
  static async connect(port: number, tlsName = "dns.test"): Promise<DotClient> {
    const conn = await tlsConnect(port, tlsName);
    try {
      await conn.handshake();
    } catch (error) {
      conn.close();
      throw error;
    }
    return new DotClient(conn);
  }

  async send(message: Uint8Array): Promise<void> {
    const frame = lengthFramed(message);
    for (let off = 0; off < frame.length;) off += await this.conn.write(frame.subarray(off));
  }

  /** The next frame; null once the connection ended; TIMEOUT if none within `timeoutMs`. */
  async next(timeoutMs = 2000): Promise<Uint8Array | null | typeof TIMEOUT> {
    const deadline = performance.now() + timeoutMs;
    for (let i = 0; i < 10_000; i++) {
      const frame = this.#frames.shift();
      if (frame) return frame;
      if (this.#ended) return null;
      const left = deadline - performance.now();
      if (left <= 0) return TIMEOUT;
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
    }
    return TIMEOUT;
  }

  async close(): Promise<void> {
    try {
      this.conn.close();
    } catch {
      // Already closed.
    }
    await this.#reading;
  }

  async #read(): Promise<void> {
    let buffer = new Uint8Array(0);
    const chunk = new Uint8Array(65536);
    try {
      for (let i = 0; i < 100_000; i++) {
        const n = await this.conn.read(chunk);
        if (n === null) break;
        const joined = new Uint8Array(buffer.length + n);
        joined.set(buffer);
        joined.set(chunk.subarray(0, n), buffer.length);
        buffer = joined;
        for (let f = 0; f < 10_000 && buffer.length >= 2; f++) {
          const length = (buffer[0] << 8) | buffer[1];
          if (buffer.length < 2 + length) break;
          this.#frames.push(buffer.slice(2, 2 + length));
          buffer = buffer.slice(2 + length);
        }
        this.#wake?.();
      }
    } catch {
      // Reset, or closed by us.
    }
    this.#ended = true;
    this.#wake?.();
  }
}

/** TCP connect then TLS (not yet handshaken), verified against `tlsName`. */
async function tlsConnect(port: number, tlsName = "dns.test"): Promise<Deno.TlsConn> {
  const tcp = await Deno.connect({ hostname: "127.0.0.1", port });
  return await Deno.startTls(tcp, { hostname: tlsName, caCerts: [CA_PEM] });
}

/** Resolves with the promise's outcome, or "pending" if it has none after `ms`. */
async function within<T>(
  promise: Promise<T>,
  ms: number,
): Promise<{ value: T } | { error: unknown } | "pending"> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<"pending">((resolve) => {
    timer = setTimeout(() => resolve("pending"), ms);
  });
  try {
    return await Promise.race([
      promise.then((value) => ({ value }), (error: unknown) => ({ error })),
      late,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Starts an upstream, runs `fn`, closes it however `fn` ends. */
async function withUpstream(
  options: Parameters<typeof FaultyUpstream.start>[0],
  fn: (up: FaultyUpstream) => Promise<void>,
): Promise<void> {
  const up = await FaultyUpstream.start(options);
  try {
    await fn(up);
  } finally {
    await up.close();
  }
}

/** One query on a fresh connection; the answer or what happened instead. */
async function ask(
  port: number,
  query: Uint8Array,
  timeoutMs = 1000,
): Promise<Uint8Array | null | typeof TIMEOUT> {
  const client = await DotClient.connect(port);
  try {
    await client.send(query);
    return await client.next(timeoutMs);
  } finally {
    await client.close();
  }
}

function assertAnswers(reply: Uint8Array | null | typeof TIMEOUT, query: Uint8Array): void {
  assert.ok(reply instanceof Uint8Array, `expected an answer, got ${String(reply)}`);
  assert.deepEqual(reply, answerFor(query));
}

/** Expects `Deno.connect` to the port to be refused. */
async function assertRefused(port: number): Promise<void> {
  await assert.rejects(
    Deno.connect({ hostname: "127.0.0.1", port }),
    Deno.errors.ConnectionRefused,
  );
}

// ---------------------------------------------------------------------------------------------

Deno.test("fault none: pipelined answers, counters, query log", async () => {
  await withUpstream({}, async (up) => {
    assert.equal(up.fault, "none");
    assert.equal(up.upstream(), `127.0.0.1:${up.port}#dns.test`);
    assert.ok(up.port >= 20000 && up.port < 32768, `port ${up.port} in the stable range`);
    const client = await DotClient.connect(up.port);
    try {
      const queries = ["a.test", "b.test", "C.Test"].map((name, i) =>
        buildQuery(name, { id: 10 + i })
      );
      for (const query of queries) await client.send(query);
      for (const query of queries) assertAnswers(await client.next(), query);
      const probe = buildQuery(".", { id: 99, type: 2 });
      await client.send(probe);
      await client.next();
    } finally {
      await client.close();
    }
    assert.equal(up.connections, 1);
    assert.equal(up.handshakes, 1);
    assert.equal(up.queries, 4);
    assert.equal(up.answers, 4);
    assert.deepEqual(
      up.queryLog.map((q) => [q.seq, q.id, q.name, q.type, q.connection, q.fault]),
      [
        [1, 10, "a.test.", 1, 1, "none"],
        [2, 11, "b.test.", 1, 1, "none"],
        [3, 12, "C.Test.", 1, 1, "none"],
        [4, 99, ".", 2, 1, "none"],
      ],
    );
    const ns = await up.waitForQuery((q) => q.name === "." && q.type === 2, 100);
    assert.equal(ns.id, 99);
    // A query yet to come.
    const later = up.waitForQuery((q) => q.seq > 4, 2000);
    await ask(up.port, buildQuery("later.test", { id: 5 }));
    assert.equal((await later).name, "later.test.");
    await assert.rejects(up.waitForQuery((q) => q.name === "never.", 50), /within 50 ms/);
  });
});

Deno.test("fault refuse: connection refused, established closed, same port back", async () => {
  await withUpstream({}, async (up) => {
    const port = up.port;
    const client = await DotClient.connect(port);
    try {
      await up.setFault("refuse");
      assert.equal(await client.next(1000), null, "the established connection is closed");
    } finally {
      await client.close();
    }
    await assertRefused(port);
    await assertRefused(port);
    await up.setFault("none");
    assert.equal(up.port, port);
    const query = buildQuery("back.test");
    assertAnswers(await ask(port, query), query);
    // Starting refused works too.
  });
  await withUpstream({ fault: "refuse" }, async (up) => {
    await assertRefused(up.port);
    await up.setFault("none");
    const query = buildQuery("late.test");
    assertAnswers(await ask(up.port, query), query);
  });
});

Deno.test("fault tarpit: TCP connects, TLS never finishes, then healthy again", async () => {
  await withUpstream({}, async (up) => {
    const before = await DotClient.connect(up.port);
    try {
      const query = buildQuery("before.tarpit");
      await before.send(query);
      assertAnswers(await before.next(), query);
      await up.setFault("tarpit");
      assert.equal(await before.next(1000), null, "established connections are closed");
    } finally {
      await before.close();
    }
    const tls = await tlsConnect(up.port);
    try {
      const handshake = await within(tls.handshake(), 300);
      assert.equal(handshake, "pending", "the handshake must not finish");
      assert.equal(up.connections, 2);
      assert.equal(up.handshakes, 1);
      assert.equal(up.open, 1);
      await up.setFault("none");
      const query = buildQuery("after.tarpit");
      assertAnswers(await ask(up.port, query), query);
      // The tarpitted connection stays stuck after the switch.
      assert.equal(await within(tls.handshake(), 100), "pending");
    } finally {
      tls.close();
    }
  });
});

Deno.test("fault silent: handshake completes, the query is read, never answered", async () => {
  await withUpstream({ fault: "silent" }, async (up) => {
    const client = await DotClient.connect(up.port);
    try {
      await client.send(buildQuery("quiet.test", { id: 7 }));
      const seen = await up.waitForQuery((q) => q.id === 7, 1000);
      assert.equal(seen.fault, "silent");
      assert.equal(await client.next(300), TIMEOUT);
      assert.equal(up.handshakes, 1);
      assert.equal(up.queries, 1);
      assert.equal(up.answers, 0);
      // Queries that arrive after the switch back are answered on the same connection.
      await up.setFault("none");
      const query = buildQuery("loud.test", { id: 8 });
      await client.send(query);
      assertAnswers(await client.next(), query);
    } finally {
      await client.close();
    }
  });
});

Deno.test("fault freeze: everything held, then released and answered", async () => {
  await withUpstream({ slowMs: 200, slowFraction: 1 }, async (up) => {
    const client = await DotClient.connect(up.port);
    try {
      // An answer already on its way when the freeze starts is held too.
      await up.setFault("slow");
      const queued = buildQuery("queued.test", { id: 1 });
      await client.send(queued);
      await up.waitForQuery((q) => q.id === 1, 1000);
      await up.setFault("freeze");
      const held = buildQuery("held.test", { id: 2 });
      await client.send(held);
      // A new connection: the kernel accepts it, TLS does not complete.
      const fresh = await tlsConnect(up.port);
      try {
        const handshake = fresh.handshake();
        assert.equal(await within(handshake, 400), "pending");
        assert.equal(await client.next(100), TIMEOUT);
        assert.equal(up.queries, 1, "a frozen upstream reads nothing");
        assert.equal(up.connections, 1, "nor accepts");

        await up.setFault("none");
        assertAnswers(await client.next(), queued);
        assertAnswers(await client.next(), held);
        const done = await within(handshake, 1000);
        assert.ok(typeof done === "object" && "value" in done, "held handshake completes");
        assert.equal(up.connections, 2);
        assert.equal(up.handshakes, 2);
      } finally {
        fresh.close();
      }
    } finally {
      await client.close();
    }
  });
});

Deno.test("fault slow: a deterministic fraction answered late, out of order", async () => {
  await withUpstream({ fault: "slow", slowFraction: 0.25, slowMs: 300 }, async (up) => {
    const client = await DotClient.connect(up.port);
    try {
      const started = performance.now();
      const queries = Array.from({ length: 8 }, (_, i) => buildQuery(`q${i}.test`, { id: i }));
      for (const query of queries) await client.send(query);
      const arrivals: [number, number][] = [];
      for (let i = 0; i < 8; i++) {
        const reply = await client.next(2000);
        assert.ok(reply instanceof Uint8Array);
        arrivals.push([parseMessage(reply).id, performance.now() - started]);
      }
      const fast = arrivals.filter(([, ms]) => ms < 300).map(([id]) => id);
      const slow = arrivals.filter(([, ms]) => ms >= 300).map(([id]) => id);
      // Every 4th query under `slow` (the 4th and the 8th) is the slow one.
      assert.deepEqual(fast, [0, 1, 2, 4, 5, 6]);
      assert.deepEqual(slow.sort(), [3, 7]);
    } finally {
      await client.close();
    }
  });
  // A custom choice of the slow ones.
  await withUpstream(
    { fault: "slow", slowMs: 400, isSlow: (q) => parseMessage(q).question?.name === "s.test." },
    async (up) => {
      const started = performance.now();
      const quick = buildQuery("f.test");
      assertAnswers(await ask(up.port, quick), quick);
      assert.ok(performance.now() - started < 400);
      const lazy = buildQuery("s.test");
      const before = performance.now();
      assertAnswers(await ask(up.port, lazy), lazy);
      assert.ok(performance.now() - before >= 400);
    },
  );
});

Deno.test("fault wrong_cert: verification fails; healthy again on the same port", async () => {
  await withUpstream({}, async (up) => {
    const before = await DotClient.connect(up.port);
    try {
      const query = buildQuery("before.wrong");
      await before.send(query);
      assertAnswers(await before.next(), query);
      await up.setFault("wrong_cert");
      assert.equal(await before.next(1000), null, "established connections are closed");
    } finally {
      await before.close();
    }
    const tls = await tlsConnect(up.port);
    try {
      await assert.rejects(tls.handshake(), /certificate not valid for name "dns.test"/);
    } finally {
      tls.close();
    }
    // The certificate is a real one, for wrong.test, and DNS works behind it.
    const client = await DotClient.connect(up.port, "wrong.test");
    try {
      const query = buildQuery("behind.wrong");
      await client.send(query);
      assertAnswers(await client.next(), query);
    } finally {
      await client.close();
    }
    assert.equal(up.handshakes, 2);
    await up.setFault("none");
    const query = buildQuery("right.test");
    assertAnswers(await ask(up.port, query), query);
    assert.ok(up.failedHandshakes >= 1);
  });
});

Deno.test("fault garbage, short_frames: framed nonsense with the query's ID", async () => {
  await withUpstream({ fault: "garbage" }, async (up) => {
    const query = buildQuery("junk.test", { id: 0x1234 });
    const reply = await ask(up.port, query);
    assert.ok(reply instanceof Uint8Array);
    const real = answerFor(query);
    assert.equal(reply.length, real.length);
    assert.deepEqual([...reply.subarray(0, 2)], [0x12, 0x34]);
    assert.notDeepEqual(reply, real);

    await up.setFault("short_frames");
    const short = await ask(up.port, buildQuery("short.test", { id: 0xabcd }));
    assert.ok(short instanceof Uint8Array);
    assert.equal(short.length, 3);
    assert.deepEqual([...short.subarray(0, 2)], [0xab, 0xcd]);
    assert.equal(up.answers, 2);
  });
});

Deno.test("fault reset: TLS completes, the connection closes when a query arrives", async () => {
  await withUpstream({ fault: "reset" }, async (up) => {
    const client = await DotClient.connect(up.port);
    try {
      await client.send(buildQuery("boom.test"));
      assert.equal(await client.next(1000), null);
    } finally {
      await client.close();
    }
    assert.equal(up.handshakes, 1);
    assert.equal(up.queries, 1);
    assert.equal(up.answers, 0);
    await up.setFault("none");
    const query = buildQuery("fine.test");
    assertAnswers(await ask(up.port, query), query);
  });
});

Deno.test("fault servfail, refused_rcode: error rcodes for the same question", async () => {
  await withUpstream({ fault: "servfail" }, async (up) => {
    for (const [fault, rcode] of [["servfail", 2], ["refused_rcode", 5]] as const) {
      await up.setFault(fault);
      const query = buildQuery("Err.Test", { id: 42, ednsUdpSize: 1232, dnssecOk: true });
      const reply = await ask(up.port, query);
      assert.ok(reply instanceof Uint8Array);
      const parsed = parseMessage(reply);
      assert.equal(parsed.id, 42);
      assert.equal(parsed.qr, true);
      assert.equal(parsed.rcode, rcode);
      assert.deepEqual(parsed.question, { name: "Err.Test.", type: 1, qclass: 1 });
      assert.equal(parsed.answers.length, 0);
      assert.equal(parsed.opt?.dnssecOk, true);
      assert.deepEqual(reply, rcodeResponse(query, rcode));
    }
  });
  // Without EDNS, and a header-only query.
  const plain = parseMessage(rcodeResponse(buildQuery("x.test", { rd: false }), 2));
  assert.equal(plain.opt, null);
  assert.equal(plain.rd, false);
  assert.equal(parseMessage(rcodeResponse(new Uint8Array(12), 2)).question, null);
});

Deno.test("faults: every switch works both ways on one port; flap toggles", async () => {
  await withUpstream({}, async (up) => {
    const port = up.port;
    let n = 0;
    for (const fault of FAULTS) {
      await up.setFault(fault);
      assert.equal(up.fault, fault);
      await up.setFault("none");
      const query = buildQuery(`n${n++}.after.${fault}`);
      assertAnswers(await ask(port, query), query);
    }
    // Straight from one fault to another, freeze and refuse included.
    const chain: Fault[] = ["freeze", "refuse", "freeze", "tarpit", "refuse", "wrong_cert"];
    for (const fault of chain) await up.setFault(fault);
    await up.setFault("none");
    await assert.rejects(up.setFault("nonsense" as Fault), TypeError);
    const last = buildQuery("end.test");
    assertAnswers(await ask(port, last), last);

    const flapper = up.flap(100, ["refuse", "none"]);
    const seen = new Set<string>();
    const deadline = performance.now() + 1500;
    for (let i = 0; i < 200 && seen.size < 2 && performance.now() < deadline; i++) {
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        conn.close();
        seen.add("open");
      } catch (error) {
        // A connect racing the listener's close may be reset instead: neither state.
        if (error instanceof Deno.errors.ConnectionRefused) seen.add("refused");
        else assert.ok(error instanceof Deno.errors.ConnectionReset, String(error));
      }
      await sleep(20);
    }
    await flapper.stop();
    assert.deepEqual([...seen].sort(), ["open", "refused"]);
    assert.ok(flapper.switches >= 2);
  });
});

Deno.test("faults: close() releases everything while faults hold connections", async () => {
  const up = await FaultyUpstream.start({ fault: "tarpit" });
  const stuck = await Deno.connect({ hostname: "127.0.0.1", port: up.port });
  await up.setFault("none");
  const frozenClient = await DotClient.connect(up.port);
  await up.setFault("freeze");
  await frozenClient.send(buildQuery("frozen.test"));
  const parked = await Deno.connect({ hostname: "127.0.0.1", port: up.port });
  up.flap(50, ["freeze", "slow"]);
  await sleep(120);
  const waiting = assert.rejects(up.waitForQuery(() => false, 5000), /closed/);
  await up.close();
  await waiting;
  // Flapping may have released an answer first; then the connection ends.
  let last = await frozenClient.next(1000);
  for (let i = 0; i < 5 && last instanceof Uint8Array; i++) last = await frozenClient.next(1000);
  assert.equal(last, null);
  await frozenClient.close();
  stuck.close();
  parked.close();
});

Deno.test("faults: an upstream on ::1", async () => {
  let up: FaultyUpstream;
  try {
    up = await FaultyUpstream.start({ hostname: "::1" });
  } catch (error) {
    console.log(`SKIPPING ::1: ${error}`);
    return;
  }
  try {
    assert.equal(up.upstream(), `[::1]:${up.port}#dns.test`);
    const tcp = await Deno.connect({ hostname: "::1", port: up.port });
    const tls = await Deno.startTls(tcp, { hostname: "dns.test", caCerts: [CA_PEM] });
    await tls.handshake();
    tls.close();
    await up.setFault("refuse");
    await assert.rejects(
      Deno.connect({ hostname: "::1", port: up.port }),
      Deno.errors.ConnectionRefused,
    );
  } finally {
    await up.close();
  }
});

// ---------------------------------------------------------------------------------------------

Deno.test("black hole: TCP connects hang until aborted", async () => {
  const hole = await BlackHole.start();
  try {
    assert.equal(hole.upstream("dns.test"), `127.0.0.1:${hole.port}#dns.test`);
    // Several connects at once, all hanging: no SYN-ACK, no RST.
    const aborts = [0, 1, 2].map(() => new AbortController());
    const connects = aborts.map((abort) =>
      Deno.connect({ hostname: "127.0.0.1", port: hole.port, signal: abort.signal })
    );
    const outcomes = await Promise.all(connects.map((c) => within(c, 500)));
    assert.deepEqual(outcomes, ["pending", "pending", "pending"]);
    for (const abort of aborts) abort.abort();
    for (const connect of connects) {
      await assert.rejects(connect, (e: Error) => e.name === "AbortError");
    }
  } finally {
    await hole.close();
  }
  // Closed, the port refuses (nothing else bound it in between).
  await assertRefused(hole.port);
});

// ---------------------------------------------------------------------------------------------

const hasUnbound = await UnboundUpstream.available();
if (!hasUnbound) {
  console.log("fault_upstream: SKIPPING the Unbound test: unbound is not installed or not allowed");
}

Deno.test({
  name: "unbound: stop (SIGSTOP) holds TLS and queries, resume answers, kill, restart",
  ignore: !hasUnbound,
  async fn() {
    const unbound = await UnboundUpstream.start({
      zone: "fault.test",
      localData: ["www.fault.test. 300 IN A 192.0.2.53"],
    });
    try {
      assert.equal(unbound.upstream(), `127.0.0.1:${unbound.port}#dns.test`);
      const client = await DotClient.connect(unbound.port);
      try {
        const first = await (async () => {
          await client.send(buildQuery("www.fault.test", { id: 1 }));
          return await client.next(2000);
        })();
        assert.ok(first instanceof Uint8Array);
        assert.deepEqual([...parseMessage(first).answers[0].data], [192, 0, 2, 53]);

        unbound.stop();
        assert.equal(unbound.state, "stopped");
        await client.send(buildQuery("www.fault.test", { id: 2 }));
        const fresh = await tlsConnect(unbound.port);
        try {
          const handshake = fresh.handshake();
          assert.equal(await within(handshake, 300), "pending", "no TLS while stopped");
          assert.equal(await client.next(100), TIMEOUT, "no answer while stopped");
          unbound.resume();
          const held = await client.next(2000);
          assert.ok(held instanceof Uint8Array, "the held query is answered on SIGCONT");
          assert.equal(parseMessage(held).id, 2);
          const done = await within(handshake, 2000);
          assert.ok(typeof done === "object" && "value" in done, "held handshake completes");
        } finally {
          fresh.close();
        }
      } finally {
        await client.close();
      }

      await unbound.kill();
      assert.equal(unbound.state, "dead");
      await assertRefused(unbound.port);
      await unbound.restart();
      const again = await DotClient.connect(unbound.port);
      try {
        await again.send(buildQuery("www.fault.test", { id: 3 }));
        const reply = await again.next(2000);
        assert.ok(reply instanceof Uint8Array);
        assert.equal(parseMessage(reply).rcode, 0);
      } finally {
        await again.close();
      }
    } finally {
      await unbound.close();
    }
  },
});
