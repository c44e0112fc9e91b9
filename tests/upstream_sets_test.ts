/**
 * Upstream sets as values, over real loopback sockets: one whose upstreams speak plain DNS
 * over TCP (`transport: "tcp"`, the seam a zone's plain targets use: the same pool and
 * connections as DoT, without TLS), and a DoT set beside a plain one.
 */

import assert from "node:assert/strict";
import { Logger } from "../src/log.ts";
import { SYSTEM_CLOCK, TimerQueue } from "../src/timers.ts";
import { CA_PEM } from "./fixtures/certs.ts";
import type { ResponseInfo } from "../src/dns/message.ts";
import type { UpstreamError } from "../src/upstream/errors.ts";
import type { UpstreamRequest } from "../src/upstream/forwarder.ts";
import { type PoolOptions, UpstreamPool } from "../src/upstream/pool.ts";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery, encodeName, parseMessage } from "./support/dns.ts";
import { loopbackSpec } from "./support/connection_owner.ts";
import { waitFor } from "./support/wait.ts";

/** A question with an OPT record, recording how it settled. */
class Question implements UpstreamRequest {
  readonly query: Uint8Array;
  readonly questionEnd: number;
  readonly deadline: number;
  answer: Uint8Array | null = null;
  error: UpstreamError | null = null;

  constructor(name: string) {
    this.query = buildQuery(name, { id: 7, ednsUdpSize: 1232 });
    this.questionEnd = 12 + encodeName(name).length + 4;
    this.deadline = performance.now() + 2000;
  }

  settleAnswer(response: Uint8Array, _upstream: string, _info: ResponseInfo | null): void {
    this.answer = response;
  }

  settleFailure(error: UpstreamError): void {
    this.error = error;
  }
}

/** The options of a set of one plain DNS-over-TCP upstream on loopback `port`. */
function plainOptions(port: number, options: Partial<PoolOptions> = {}): PoolOptions {
  return {
    upstreams: [loopbackSpec(port)],
    transport: "tcp",
    caCerts: [],
    connectionsPerUpstream: 2,
    idleTimeoutMs: 10_000,
    connectTimeoutMs: 1000,
    hedgeDelay: 0,
    hedgeBudgetPercent: 0,
    healthCheckIntervalMs: 0,
    failoverRcodes: [],
    strategy: "failover",
    nudge: true,
    padding: false,
    log: new Logger({ level: "error", sink: () => {} }),
    ...options,
  };
}

/** A set of one plain DNS-over-TCP upstream on loopback `port`. */
function plainPool(port: number, options: Partial<PoolOptions> = {}): UpstreamPool {
  return new UpstreamPool(plainOptions(port, options));
}

Deno.test("plain upstream set: questions answered and health checked over plain TCP, unpadded", async () => {
  const server = DotServer.start({ plain: true });
  const pool = plainPool(server.port);
  try {
    pool.start();
    const ready = await pool.readiness();
    assert.equal(ready.ready, true, ready.reason);
    assert.equal(server.probes, 1, "the health check went over plain TCP");
    const questions = ["a.plain.test", "b.plain.test"].map((name) => new Question(name));
    for (const question of questions) pool.forward(question);
    await waitFor("both answered", () => questions.every((q) => q.answer !== null));
    assert.deepEqual(
      questions.map((q) => parseMessage(q.answer!).question?.name),
      ["a.plain.test.", "b.plain.test."],
    );
    assert.ok(
      server.messageLengths.filter((m) => !m.probe).every((m) => m.length % 128 !== 0),
      "no padding",
    );
    assert.equal(server.lengthOctets, 0, "no nudge on plain TCP");
  } finally {
    await pool.close();
    await server.close();
  }
});

Deno.test("plain upstream set: the health check asks the question the set names (ZONE SOA), not . NS", async () => {
  const server = DotServer.start({ plain: true });
  const soa = buildQuery("cluster.test", { id: 0, type: 6 });
  const pool = plainPool(server.port, { probeQuery: soa, nudge: false });
  try {
    pool.start();
    const ready = await pool.readiness();
    assert.equal(ready.ready, true, ready.reason);
    assert.equal(server.probes, 0, "no . NS");
    assert.deepEqual(server.messageLengths, [{ probe: false, length: soa.length }]);
  } finally {
    await pool.close();
    await server.close();
  }
});

Deno.test("upstream sets are values: a DoT set and a plain set side by side, sharing one timer queue, closed apart", async () => {
  const plain = DotServer.start({ plain: true });
  const dot = DotServer.start();
  const timers = new TimerQueue(SYSTEM_CLOCK);
  const plainSet = new UpstreamPool(plainOptions(plain.port), timers);
  const dotSet = new UpstreamPool(
    plainOptions(dot.port, { transport: "tls", caCerts: [CA_PEM], padding: true }),
    timers,
  );
  try {
    plainSet.start();
    dotSet.start();
    assert.equal((await plainSet.readiness()).ready, true);
    assert.equal((await dotSet.readiness()).ready, true);
    const viaPlain = new Question("a.sets.test");
    const viaDot = new Question("b.sets.test");
    plainSet.forward(viaPlain);
    dotSet.forward(viaDot);
    await waitFor("both answered", () => viaPlain.answer !== null && viaDot.answer !== null);
    assert.equal(plain.queries, 1);
    assert.equal(dot.queries, 1);
    assert.ok(dot.messageLengths.every((m) => m.length % 128 === 0), "the DoT set pads");
    await plainSet.close();
    const after = new Question("c.sets.test");
    dotSet.forward(after);
    await waitFor("the other set still answers", () => after.answer !== null);
    const refused = new Question("d.sets.test");
    plainSet.forward(refused);
    assert.equal(refused.error?.reason, "unavailable", "the closed set refuses at once");
  } finally {
    await plainSet.close();
    await dotSet.close();
    timers.close();
    await plain.close();
    await dot.close();
  }
});
