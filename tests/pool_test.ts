/**
 * Unit tests of the upstream pool (`src/upstream/pool.ts`, `upstream.ts`, `health.ts`,
 * `policy.ts`) with fake connections and a manual clock: no sockets, no real time. Each
 * fake upstream decides per connection whether it opens, hangs or is refused, and per query
 * whether and when it answers, with which rcode, or whether it hangs up.
 *
 * What is checked: attempt deadlines (answer time, handshake time), retry on error, hedge
 * timing and budget, failover on rcodes, health transitions and the probe schedule (500 ms
 * with jitter while down, backoff for servers that misbehave after the handshake, idle
 * checks), stragglers, stalls only hedges saw, query-of-death isolation, each strategy's
 * spread, and the statistics hooks (hedges, retries, health checks).
 *
 * Run with `deno test tests/pool_test.ts` (no permissions needed).
 *
 * @module
 */

import assert from "node:assert/strict";
import type { Strategy, UpstreamSpec } from "../src/config.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { Logger } from "../src/log.ts";
import { ManualClock } from "../src/timers.ts";
import {
  type ConnectionContext,
  type ConnectionOwner,
  type ConnectionState,
  SETTLE_MS,
  type UpstreamConnection,
} from "../src/upstream/connection.ts";
import type { Exchange } from "../src/upstream/exchange.ts";
import {
  ATTEMPT_TIMEOUT_MAX_MS,
  ATTEMPT_TIMEOUT_MIN_MS,
  DOWN_PROBE_MS,
} from "../src/upstream/health.ts";
import { type PoolOptions, UpstreamPool } from "../src/upstream/pool.ts";
import { UpstreamError, type UpstreamErrorReason } from "../src/upstream/errors.ts";
import type { UpstreamRequest } from "../src/upstream/forwarder.ts";
import type { RetryReason, UpstreamStats } from "../src/upstream/stats.ts";
import { answerFor, buildQuery, encodeName, parseMessage } from "./support/dns.ts";
import { rcodeResponse } from "./support/fault_upstream.ts";

// ---------------------------------------------------------------------------------------------
// Fakes.

/** What a fake upstream does with a query: answer after `ms` (with `rcode`), or not. */
type Reply =
  | { kind: "answer"; ms: number; rcode?: number }
  | { kind: "never" }
  | { kind: "hangup"; ms?: number }
  | { kind: "garbage"; ms?: number };

/** How a fake upstream behaves; tests change it at any time. */
interface Behaviour {
  /** New connections: open after `handshakeMs`, never open, or are refused. */
  connect: "open" | "hang" | "refuse";
  handshakeMs: number;
  /** The reply to a query (probes included, `name` "." for them). */
  reply: (name: string) => Reply;
}

const HEALTHY: Behaviour = {
  connect: "open",
  handshakeMs: 2,
  reply: () => ({ kind: "answer", ms: 1 }),
};

interface Seen {
  name: string;
  /** Octets of the message as written. */
  length: number;
  at: number;
  connection: FakeConnection;
  probe: boolean;
}

class FakeServer {
  behaviour: Behaviour = { ...HEALTHY };
  readonly connections: FakeConnection[] = [];
  readonly seen: Seen[] = [];
  handshakes = 0;

  constructor(readonly label: string, readonly clock: ManualClock) {}

  /** Client questions (probes left out) by name, in arrival order. */
  queries(): string[] {
    return this.seen.filter((s) => !s.probe).map((s) => s.name);
  }

  probeTimes(): number[] {
    return this.seen.filter((s) => s.probe).map((s) => s.at);
  }
}

let nextWireId = 1;

/** A connection as an upstream sees it, driven by its {@linkcode FakeServer}. */
class FakeConnection implements UpstreamConnection {
  state: ConnectionState = "connecting";
  readonly inflight = new Map<number, Exchange>();
  answered = 0;
  opened = false;
  openedAt = 0;
  readonly createdAt: number;
  lastWriteAt = 0;
  lastActive: number;
  lastReadAt = 0;
  stalledSince = 0;
  writesSinceAnswer = 0;
  closeRequested = false;
  /** Set by a test: the server reads what comes on this connection and answers none of it. */
  silent = false;
  readonly finished: Promise<void> = Promise.resolve();
  readonly #timers = new Set<number>();

  constructor(
    readonly owner: ConnectionOwner,
    readonly context: ConnectionContext,
    readonly server: FakeServer,
  ) {
    this.createdAt = server.clock.now();
    this.lastActive = this.createdAt;
  }

  get load(): number {
    return this.inflight.size;
  }

  get owesAck(): boolean {
    return this.lastReadAt > this.lastWriteAt && this.inflight.size > 0;
  }

  get dirtyUntil(): number {
    return this.state === "open" ? this.openedAt + SETTLE_MS : Infinity;
  }
  cleanIdle(now: number): boolean {
    return this.state === "open" && this.load === 0 && now >= this.dirtyUntil;
  }
  settled(now: number): boolean {
    return this.state === "open" && now - this.openedAt >= SETTLE_MS;
  }

  #later(ms: number, fn: () => void): void {
    const handle = this.server.clock.schedule(() => {
      this.#timers.delete(handle);
      fn();
    }, ms);
    this.#timers.add(handle);
  }

  start(): void {
    this.server.connections.push(this);
    const behaviour = this.server.behaviour;
    if (behaviour.connect === "hang") {
      // Like StreamConnection: the connect timeout ends it.
      this.#later(this.context.connectTimeoutMs, () => {
        if (this.state !== "connecting") return;
        this.context.stats.handshake(false);
        this.#shutdown(new UpstreamError("timeout", "no handshake", this.server.label));
      });
      return;
    }
    if (behaviour.connect === "refuse") {
      this.#later(0, () => {
        this.context.stats.handshake(false);
        this.#shutdown(new UpstreamError("refused", "connection refused", this.server.label));
      });
      return;
    }
    this.#later(behaviour.handshakeMs, () => {
      if (this.state !== "connecting") return;
      this.state = "open";
      this.opened = true;
      this.openedAt = this.server.clock.now();
      this.server.handshakes++;
      this.context.stats.handshake(true);
      for (const exchange of this.inflight.values()) exchange.sentAt = this.openedAt;
      if (this.inflight.size > 0) this.stalledSince = this.openedAt;
      this.owner.onOpen(this, behaviour.handshakeMs);
      for (const exchange of [...this.inflight.values()]) this.#deliver(exchange);
    });
  }

  send(exchange: Exchange): void {
    const id = nextWireId++ & 0xffff;
    const now = this.server.clock.now();
    exchange.wireId = id;
    exchange.carrier = this;
    exchange.sentAt = now;
    if (this.stalledSince === 0) this.stalledSince = now;
    this.writesSinceAnswer++;
    this.inflight.set(id, exchange);
    this.lastWriteAt = now;
    this.lastActive = now;
    if (this.state === "open") this.#deliver(exchange);
  }

  /** The server reads `exchange` and acts on it. */
  #deliver(exchange: Exchange): void {
    const name = parseMessage(exchange.message).question?.name ?? "";
    const probe = exchange.kind === "probe";
    const length = exchange.message.length;
    this.server.seen.push({ name, length, at: this.server.clock.now(), connection: this, probe });
    const reply = this.server.behaviour.reply(name);
    if (reply.kind === "never" || this.silent) return;
    const id = exchange.wireId;
    this.#later(reply.ms ?? 0, () => {
      if (this.state !== "open" || this.silent || this.inflight.get(id) !== exchange) return;
      if (reply.kind === "hangup") {
        this.#shutdown(null);
        return;
      }
      this.inflight.delete(id);
      this.stalledSince = 0;
      this.writesSinceAnswer = 0;
      const now = this.server.clock.now();
      this.lastActive = now;
      if (reply.kind === "garbage") {
        this.owner.onBadAnswer(this, exchange, "garbage");
        return;
      }
      const rcode = reply.rcode ?? 0;
      const response = rcode === 0 ? answerFor(exchange.message) : rcodeResponse(
        exchange.message,
        rcode,
      );
      const info = new ResponseInfo();
      assert.ok(analyzeResponse(response, info), "the fake's answer is valid");
      this.lastReadAt = now;
      this.answered++;
      this.owner.onAnswer(this, exchange, response, info);
    });
  }

  close(): void {
    this.closeRequested = true;
    this.#shutdown(null);
  }

  abandon(reason: UpstreamErrorReason, message: string): void {
    if (this.state === "closed") return;
    this.context.stats.error(reason);
    this.closeRequested = true;
    this.#shutdown(new UpstreamError(reason, message, this.server.label));
  }

  purge(before: number): void {
    for (const [id, exchange] of this.inflight) {
      if (exchange.ended && exchange.sentAt < before) this.inflight.delete(id);
    }
    if (this.inflight.size === 0) this.stalledSince = 0;
  }

  /** When the maintenance pass asked it to complete a begun frame. */
  readonly completeAsked: number[] = [];

  /** The fake server reads whole frames only: no nudge leaves one begun. */
  completePendingFrame(now: number): boolean {
    this.completeAsked.push(now);
    return false;
  }

  #shutdown(failure: UpstreamError | null): void {
    if (this.state === "closed") return;
    this.state = "closed";
    for (const handle of this.#timers) this.server.clock.cancel(handle);
    this.#timers.clear();
    const orphans = [...this.inflight.values()].filter((e) => !e.ended);
    for (const exchange of orphans) exchange.carrier = null;
    this.inflight.clear();
    this.stalledSince = 0;
    this.owner.onClosed(this, orphans, failure);
  }
}

/** Counts of every statistics hook call, by upstream. */
class Counts {
  readonly hedges = new Map<string, { won: number; lost: number }>();
  readonly retries = new Map<string, Map<RetryReason, number>>();
  readonly checks = new Map<string, { ok: number; error: number }>();
  readonly errors = new Map<string, Map<UpstreamErrorReason, number>>();

  factory = (label: string): UpstreamStats => {
    const hedges = { won: 0, lost: 0 };
    const checks = { ok: 0, error: 0 };
    const retries = new Map<RetryReason, number>();
    const errors = new Map<UpstreamErrorReason, number>();
    this.hedges.set(label, hedges);
    this.checks.set(label, checks);
    this.retries.set(label, retries);
    this.errors.set(label, errors);
    return {
      answered() {},
      error: (reason) => errors.set(reason, (errors.get(reason) ?? 0) + 1),
      handshake() {},
      reconnect() {},
      hedge: (won) => won ? hedges.won++ : hedges.lost++,
      retry: (reason) => retries.set(reason, (retries.get(reason) ?? 0) + 1),
      healthCheck: (ok) => ok ? checks.ok++ : checks.error++,
    };
  };

  retry(label: string, reason: RetryReason): number {
    return this.retries.get(label)?.get(reason) ?? 0;
  }

  totalHedges(): number {
    let total = 0;
    for (const h of this.hedges.values()) total += h.won + h.lost;
    return total;
  }
}

/** A question as the resolver would hand it over, recording how it settled. */
class Question implements UpstreamRequest {
  readonly query: Uint8Array;
  readonly questionEnd: number;
  readonly deadline: number;
  answer: Uint8Array | null = null;
  upstream = "";
  error: UpstreamError | null = null;
  settledAt = -1;
  /** Times settled: the pool settles each question exactly once. */
  settled = 0;

  constructor(readonly name: string, readonly clock: ManualClock, timeoutMs = 4000, edns = false) {
    // With EDNS: an OPT record after the question, as the resolver's messages have.
    this.query = buildQuery(name, edns ? { id: 0x1234, ednsUdpSize: 1232 } : { id: 0x1234 });
    this.questionEnd = 12 + encodeName(name).length + 4;
    this.deadline = clock.now() + timeoutMs;
  }

  get rcode(): number {
    return this.answer === null ? -1 : this.answer[3] & 0xf;
  }

  settleAnswer(response: Uint8Array, upstream: string): void {
    if (this.settled++ > 0) return;
    this.answer = response;
    this.upstream = upstream;
    this.settledAt = this.clock.now();
  }

  settleFailure(error: UpstreamError): void {
    if (this.settled++ > 0) return;
    this.error = error;
    this.settledAt = this.clock.now();
  }
}

/** A pool over fake upstreams "a", "b", ... on a manual clock. */
class Harness {
  readonly clock = new ManualClock(10_000);
  readonly servers: FakeServer[];
  readonly counts = new Counts();
  readonly pool: UpstreamPool;
  readonly logLines: string[] = [];
  #random = 0.5;

  constructor(upstreams: number, options: Partial<PoolOptions> = {}) {
    this.servers = Array.from(
      { length: upstreams },
      (_, i) => new FakeServer(String.fromCharCode(97 + i), this.clock),
    );
    const specs: UpstreamSpec[] = this.servers.map((server, i) => ({
      address: "192.0.2." + (i + 1),
      port: 853,
      tlsName: "dns.test",
      label: server.label,
    } as UpstreamSpec));
    const byLabel = new Map(this.servers.map((s) => [s.label, s]));
    this.pool = new UpstreamPool({
      upstreams: specs,
      caCerts: [],
      connectionsPerUpstream: 2,
      idleTimeoutMs: 30_000,
      connectTimeoutMs: 1000,
      hedgeDelay: "auto",
      hedgeBudgetPercent: 10,
      healthCheckIntervalMs: 0,
      failoverRcodes: [2, 5],
      strategy: "least-outstanding",
      nudge: false,
      log: new Logger({
        level: "debug",
        format: "json",
        sink: (line) => this.logLines.push(line),
      }),
      stats: this.counts.factory,
      clock: this.clock,
      connect: (owner, context) =>
        new FakeConnection(owner, context, byLabel.get(context.spec.label)!),
      random: () => this.#random,
      ...options,
    });
  }

  /** Sets what `random()` returns from now on. */
  set random(value: number) {
    this.#random = value;
  }

  server(label: string): FakeServer {
    return this.servers.find((s) => s.label === label)!;
  }

  upstream(label: string) {
    return this.pool.upstreams.find((u) => u.spec.label === label)!;
  }

  /** Starts the pool (connect and probe everything) and lets the probes settle. */
  start(): this {
    this.pool.start();
    this.clock.advance(SETTLE_MS + 10);
    return this;
  }

  ask(name: string, timeoutMs = 4000, edns = false): Question {
    const question = new Question(name, this.clock, timeoutMs, edns);
    this.pool.forward(question);
    return question;
  }

  /** Asks `count` questions spaced `gapMs` apart, advancing the clock. */
  askMany(prefix: string, count: number, gapMs: number): Question[] {
    const out: Question[] = [];
    for (let i = 0; i < count; i++) {
      out.push(this.ask(`${prefix}${i}.example`));
      this.clock.advance(gapMs);
    }
    return out;
  }

  /** Answers enough questions on every upstream that their answer times are known. */
  warm(count = 20): void {
    this.askMany("warm", count, 2);
    this.clock.advance(20);
  }

  log(text: string): Record<string, unknown>[] {
    return this.logLines.map((l) => JSON.parse(l)).filter((r) => String(r.msg).includes(text));
  }

  async close(): Promise<void> {
    await this.pool.close();
    this.pool.timers.close();
  }
}

async function withHarness(
  upstreams: number,
  options: Partial<PoolOptions>,
  fn: (h: Harness) => void | Promise<void>,
): Promise<void> {
  const harness = new Harness(upstreams, options);
  try {
    await fn(harness);
  } finally {
    await harness.close();
  }
}

function gaps(times: number[]): number[] {
  return times.slice(1).map((t, i) => t - times[i]);
}

// ---------------------------------------------------------------------------------------------
// Attempt deadlines and retry.

Deno.test("attempt deadline: a silent upstream's question also goes to the next one", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.warm();
    const timeout = h.upstream("a").attemptTimeout();
    assert.ok(
      timeout >= ATTEMPT_TIMEOUT_MIN_MS && timeout <= ATTEMPT_TIMEOUT_MAX_MS,
      `attempt timeout ${timeout}`,
    );
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    const question = h.ask("silent.example");
    h.clock.advance(timeout - 1);
    assert.deepEqual(h.server("b").queries().filter((n) => n.startsWith("silent")), []);
    assert.equal(question.settledAt, -1);
    h.clock.advance(1);
    assert.equal(h.server("b").queries().at(-1), "silent.example.");
    h.clock.advance(5);
    assert.equal(question.upstream, "b", "answered by the other upstream");
    assert.equal(question.rcode, 0);
    assert.equal(h.counts.retry("a", "slow"), 1);
    assert.ok(h.upstream("a").slow, "the silent upstream counts as slow");
  });
});

Deno.test("attempt deadline: an upstream that never answered is judged by the others' times", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.server("a").behaviour.reply = (name) =>
      name === "." ? { kind: "answer", ms: 1 } : { kind: "answer", ms: 1 };
    h.start();
    h.warm();
    // b answers everything; a is fresh (no answer time of its own).
    h.upstream("a").latency.reset();
    const reference = h.upstream("b").attemptTimeout();
    assert.equal(h.upstream("a").attemptTimeout(), reference);
  });
});

Deno.test("attempt deadline while connecting: four times the fastest handshake, within the connect timeout", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.server("b").behaviour.handshakeMs = 30;
    h.start();
    const a = h.upstream("a");
    h.server("a").behaviour.connect = "hang";
    a.handshakeMs = 0;
    const connection = a.open();
    const exchange = { carrier: connection, sentAt: h.clock.now() } as unknown as Exchange;
    // a never completed a handshake: b's (30 ms) is the reference.
    assert.equal(a.attemptDeadline(exchange), connection.createdAt + 120);
    a.handshakeMs = 10;
    assert.equal(a.attemptDeadline(exchange), connection.createdAt + 100, "at least 100 ms");
    a.handshakeMs = 400;
    assert.equal(a.attemptDeadline(exchange), connection.createdAt + 1000, "the connect timeout");
    connection.close();
  });
});

Deno.test("retry: a connection reset moves its questions to the other upstream at once", async () => {
  await withHarness(2, { hedgeDelay: 0, strategy: "failover" }, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "hangup", ms: 1 });
    const asked = h.clock.now();
    const question = h.ask("reset.example");
    const other = h.ask("reset2.example");
    h.clock.advance(1);
    assert.deepEqual(h.server("a").queries().slice(-2), ["reset.example.", "reset2.example."]);
    h.clock.advance(20);
    // The oldest goes alone on a fresh connection (a handshake: 2 ms), the other at once.
    assert.equal(question.upstream, "b");
    assert.equal(other.upstream, "b");
    assert.ok(question.settledAt - asked <= 5, `answered after ${question.settledAt - asked} ms`);
    assert.ok(other.settledAt - asked <= 3, `answered after ${other.settledAt - asked} ms`);
    assert.equal(h.counts.retry("a", "reset"), 2);
  });
});

Deno.test("retry: no upstream usable fails at once with 'unavailable'", async () => {
  await withHarness(2, {}, (h) => {
    for (const server of h.servers) server.behaviour.connect = "refuse";
    h.start();
    assert.equal(h.upstream("a").usable, false);
    assert.equal(h.upstream("b").usable, false);
    const question = h.ask("nothing.example");
    assert.equal(question.error?.reason, "unavailable");
    assert.match(question.error!.message, /no upstream available/);
  });
});

Deno.test("the connecting tier: no question waits on a handshake while another upstream is open", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.server("a").behaviour.connect = "hang";
    h.start();
    // a is still connecting (its connect timeout is 1000 ms); b is open.
    assert.ok(h.upstream("a").connecting);
    const questions = h.askMany("q", 10, 5);
    h.clock.advance(10);
    assert.ok(questions.every((q) => q.upstream === "b"));
    assert.deepEqual(h.server("a").queries(), []);
  });
});

// ---------------------------------------------------------------------------------------------
// Hedging.

Deno.test("hedge: after the delay the question also goes to the other upstream; first answer wins", async () => {
  await withHarness(2, {}, (h) => {
    h.start();
    h.warm();
    const delay = h.pool.hedgeDelay(h.upstream("a"));
    assert.equal(delay, 10, "the fastest upstream's p95 (1 ms), at least 10 ms");
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("slow") ? { kind: "answer", ms: 300 } : { kind: "answer", ms: 1 };
    const question = h.ask("slow.example");
    h.clock.advance(delay - 1);
    assert.ok(!h.server("b").queries().includes("slow.example."));
    h.clock.advance(1);
    assert.ok(h.server("b").queries().includes("slow.example."), "hedged to b");
    h.clock.advance(2);
    assert.equal(question.upstream, "b");
    assert.equal(question.settledAt - (h.clock.now() - 2), 1);
    assert.deepEqual(h.counts.hedges.get("b"), { won: 1, lost: 0 });
    // The loser's late answer still teaches a its answer time, and changes nothing else.
    h.clock.advance(400);
    assert.equal(question.upstream, "b");
  });
});

Deno.test("hedge: a hedge beaten by the first answer counts as lost; 0 turns hedging off", async () => {
  await withHarness(2, {}, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 15 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 50 });
    const question = h.ask("race.example");
    h.clock.advance(20);
    assert.equal(question.upstream, "a");
    assert.deepEqual(h.counts.hedges.get("b"), { won: 0, lost: 1 });
  });
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 80 });
    const question = h.ask("nohedge.example");
    h.clock.advance(90);
    assert.equal(question.upstream, "a");
    assert.ok(!h.server("b").queries().includes("nohedge.example."));
    assert.equal(h.counts.totalHedges(), 0);
  });
});

Deno.test("hedge: one upstream hedges on a second connection to it", async () => {
  await withHarness(1, {}, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("slow") ? { kind: "answer", ms: 300 } : { kind: "answer", ms: 1 };
    h.ask("slow.example");
    h.clock.advance(15);
    const seen = h.server("a").seen.filter((s) => s.name === "slow.example.");
    assert.equal(seen.length, 2, "asked twice");
    assert.notEqual(seen[0].connection, seen[1].connection, "on two connections");
  });
  await withHarness(1, { connectionsPerUpstream: 1 }, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 300 });
    h.ask("slow.example");
    h.clock.advance(50);
    assert.equal(h.server("a").queries().filter((n) => n === "slow.example.").length, 1);
    assert.equal(h.counts.totalHedges(), 0, "no second connection: no hedge");
  });
});

Deno.test("hedge budget: at most the burst plus --hedge-budget percent of questions", async () => {
  await withHarness(2, { hedgeDelay: 5, hedgeBudgetPercent: 10 }, (h) => {
    h.start();
    for (const server of h.servers) server.behaviour.reply = () => ({ kind: "answer", ms: 40 });
    const questions = h.askMany("b", 300, 2);
    h.clock.advance(100);
    assert.ok(questions.every((q) => q.rcode === 0));
    const hedges = h.counts.totalHedges();
    // 10 to start with, then one per ten questions.
    assert.ok(hedges <= 10 + 300 * 0.1, `${hedges} hedges for 300 questions`);
    assert.ok(hedges >= 300 * 0.1, `${hedges} hedges: the budget is spent`);
  });
  await withHarness(2, { hedgeDelay: 5, hedgeBudgetPercent: 0 }, (h) => {
    h.start();
    for (const server of h.servers) server.behaviour.reply = () => ({ kind: "answer", ms: 40 });
    h.askMany("z", 50, 2);
    h.clock.advance(100);
    assert.equal(h.counts.totalHedges(), 0, "a budget of 0 allows no hedge");
  });
});

Deno.test("hedge delay (auto): the fastest usable upstream's p95, within 10..1000 ms", async () => {
  await withHarness(2, {}, (h) => {
    h.start();
    h.upstream("a").latency.reset();
    h.upstream("b").latency.reset();
    assert.equal(h.pool.hedgeDelay(h.upstream("a")), 100, "nothing measured yet");
    for (let i = 0; i < 100; i++) h.upstream("a").latency.record(i % 10 === 0 ? 300 : 30);
    assert.equal(h.pool.hedgeDelay(h.upstream("a")), 300, "a alone: its p95");
    for (let i = 0; i < 100; i++) h.upstream("b").latency.record(40);
    assert.equal(h.pool.hedgeDelay(h.upstream("a")), 40, "b answers 95% within 40 ms");
    for (let i = 0; i < 200; i++) h.upstream("b").latency.record(2);
    assert.equal(h.pool.hedgeDelay(h.upstream("a")), 10, "at least 10 ms");
    for (let i = 0; i < 200; i++) h.upstream("a").latency.record(5000);
    h.upstream("b").latency.reset();
    assert.equal(h.pool.hedgeDelay(h.upstream("a")), 1000, "at most 1000 ms");
  });
});

// ---------------------------------------------------------------------------------------------
// Failover on rcodes.

Deno.test("failover rcodes: SERVFAIL and REFUSED are asked once more elsewhere; NXDOMAIN is not", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("sf")
        ? { kind: "answer", ms: 1, rcode: 2 }
        : name.startsWith("rf")
        ? { kind: "answer", ms: 1, rcode: 5 }
        : name.startsWith("nx")
        ? { kind: "answer", ms: 1, rcode: 3 }
        : { kind: "answer", ms: 1 };
    const servfail = h.ask("sf.example");
    h.clock.advance(5);
    assert.equal(servfail.upstream, "b");
    assert.equal(servfail.rcode, 0, "b's answer");
    const refused = h.ask("rf.example");
    h.clock.advance(5);
    assert.equal(refused.upstream, "b");
    assert.equal(h.counts.retry("a", "rcode"), 2);
    const nx = h.ask("nx.example");
    h.clock.advance(5);
    assert.equal(nx.upstream, "a");
    assert.equal(nx.rcode, 3);
    assert.ok(!h.server("b").queries().includes("nx.example."));
  });
});

Deno.test("failover rcodes: when every upstream gives one, the client gets the last answer", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 1, rcode: 2 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 1, rcode: 5 });
    const question = h.ask("both.example");
    h.clock.advance(5);
    assert.equal(question.upstream, "b");
    assert.equal(question.rcode, 5, "the last answer (REFUSED from b)");
    assert.equal(h.server("a").queries().length + h.server("b").queries().length, 2);
    // A failed retry does not lose the answer at hand.
    h.server("b").behaviour.reply = () => ({ kind: "hangup", ms: 1 });
    const kept = h.ask("kept.example");
    h.clock.advance(5);
    assert.equal(kept.upstream, "a");
    assert.equal(kept.rcode, 2);
  });
});

Deno.test("failover rcodes: asked once more, not of every upstream in turn", async () => {
  await withHarness(3, { hedgeDelay: 0 }, (h) => {
    h.start();
    for (const name of ["a", "b", "c"]) {
      h.server(name).behaviour.reply = (q) =>
        q === "." ? { kind: "answer", ms: 1 } : { kind: "answer", ms: 1, rcode: 2 };
    }
    const question = h.ask("all.example");
    h.clock.advance(10);
    assert.equal(question.rcode, 2, "SERVFAIL, the last answer");
    const asked = ["a", "b", "c"].filter((n) => h.server(n).queries().includes("all.example."));
    assert.equal(asked.length, 2, `asked of ${asked.join(", ")}`);
  });
});

Deno.test("health: three invalid answers in a row mark an upstream down; its questions go elsewhere", async () => {
  await withHarness(2, { hedgeDelay: 0, strategy: "failover" }, (h) => {
    h.start();
    h.warm();
    // a answers every question with a frame that is not an answer (probes are answered).
    h.server("a").behaviour.reply = (q) =>
      q === "." ? { kind: "answer", ms: 1 } : { kind: "garbage", ms: 1 };
    const questions = h.askMany("bad", 3, 5);
    h.clock.advance(20);
    assert.ok(questions.every((q) => q.rcode === 0 && q.upstream === "b"), "answered by b");
    assert.equal(h.upstream("a").health.state, "down", "a run of bad answers is a broken server");
  });
});

// ---------------------------------------------------------------------------------------------
// Health.

Deno.test("health: refused goes down, probed every 500 ms with jitter, back on the first answer", async () => {
  await withHarness(2, {}, async (h) => {
    h.server("a").behaviour.connect = "refuse";
    h.random = 0;
    h.start();
    const a = h.upstream("a");
    const state = () => a.health.state as string;
    assert.equal(state(), "down");
    const wait = h.pool.healthChange(60_000);
    h.clock.advance(2000);
    h.random = 0.999;
    h.clock.advance(8000);
    const times = h.server("a").connections.map((c) => c.createdAt);
    const spacing = gaps(times);
    assert.deepEqual(spacing.slice(0, 4), Array(4).fill(DOWN_PROBE_MS * 0.8), "500 ms - 20%");
    for (const gap of spacing.slice(6)) assert.ok(gap > 590 && gap <= 600, `gap ${gap}`);
    assert.ok(times.length >= 16, `${times.length} probes in 10 s`);
    // Back: the next probe finds it, however long it was down.
    h.server("a").behaviour.connect = "open";
    const backAt = h.clock.now();
    for (let i = 0; i < 100 && state() !== "up"; i++) h.clock.advance(10);
    assert.equal(state(), "up");
    assert.ok(h.clock.now() - backAt <= 620, `back after ${h.clock.now() - backAt} ms`);
    await wait;
    assert.equal(h.counts.checks.get("a")!.ok, 1);
    assert.ok(h.counts.checks.get("a")!.error >= 16);
    assert.equal(h.log("upstream answering again").length, 1);
  });
});

Deno.test("health: a server that hangs up after the handshake is probed less and less often", async () => {
  await withHarness(2, {}, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "hangup", ms: 1 });
    // Three connections closed without an answer: down.
    for (let i = 0; i < 20 && h.upstream("a").usable; i++) {
      h.ask(`r${i}.example`);
      h.clock.advance(60);
    }
    assert.equal(h.upstream("a").health.state, "down");
    const from = h.clock.now();
    const before = h.server("a").handshakes;
    h.clock.advance(10_000);
    const handshakes = h.server("a").handshakes - before;
    // 0.5, 1, 2, 4 s apart (jitter 20%): at most 5 in 10 s, not 20.
    assert.ok(handshakes <= 5, `${handshakes} handshakes in 10 s`);
    const probes = h.server("a").probeTimes().filter((t) => t > from);
    const spacing = gaps(probes);
    for (let i = 1; i < spacing.length; i++) {
      assert.ok(spacing[i] > spacing[i - 1] * 1.3, `backoff grows: ${spacing.join(", ")}`);
    }
    // Once fixed, the next probe brings it back.
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 1 });
    h.clock.advance(20_000);
    assert.equal(h.upstream("a").health.state, "up");
  });
});

Deno.test("health: a probe answered with garbage keeps it down and backs off", async () => {
  await withHarness(2, {}, (h) => {
    h.server("a").behaviour.reply = () => ({ kind: "garbage", ms: 1 });
    h.start();
    assert.equal(h.upstream("a").health.state, "down");
    const before = h.server("a").seen.length;
    h.clock.advance(10_000);
    const probes = h.server("a").seen.length - before;
    assert.ok(probes >= 3 && probes <= 5, `${probes} probes in 10 s`);
    assert.ok(h.server("a").handshakes <= 2, "the connection stays; no reconnects");
  });
});

Deno.test("health: idle upstreams are checked every --health-check-interval; busy ones are not", async () => {
  await withHarness(2, { healthCheckIntervalMs: 2000 }, (h) => {
    h.start();
    const probes = () => h.server("a").probeTimes().length;
    const start = probes();
    h.clock.advance(10_000);
    const idle = probes() - start;
    assert.ok(idle >= 4 && idle <= 6, `${idle} checks in 10 s at 2 s`);
    for (const gap of gaps(h.server("a").probeTimes().slice(start))) {
      assert.ok(gap >= 1800 && gap <= 2200, `check gap ${gap}`);
    }
    // Questions answered count as checks.
    h.pool.upstreams[1].health.state = "down"; // everything to a
    const before = probes();
    for (let i = 0; i < 50; i++) {
      h.ask(`busy${i}.example`);
      h.clock.advance(200);
    }
    assert.ok(probes() - before <= 1, "answers keep it known up");
    assert.ok(h.counts.checks.get("a")!.ok >= idle);
  });
});

Deno.test("health: a failed idle check is asked again on a new connection, then puts it down", async () => {
  await withHarness(1, { healthCheckIntervalMs: 1000 }, (h) => {
    h.start();
    const a = h.upstream("a");
    assert.equal(a.health.state, "up");
    const first = h.server("a").connections.filter((c) => c.state === "open");
    assert.equal(first.length, 1);
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    h.clock.advance(1200);
    // The check is out on the open connection; 500 ms later it has timed out. The silence
    // may be that connection's alone, so the connection is closed and the check asked again
    // on a new one, before anything is judged.
    h.clock.advance(600);
    assert.equal(a.health.state, "up");
    assert.equal(first[0].state, "closed");
    assert.equal(h.server("a").probeTimes().length, 3, "start-up, idle, and again");
    assert.equal(h.server("a").probeTimes().at(-1)!, h.server("a").connections.at(-1)!.openedAt);
    // Unanswered on the new connection too: down.
    h.clock.advance(600);
    assert.equal(a.health.state, "down");
    assert.equal(h.counts.checks.get("a")!.error, 2);
  });
});

Deno.test("health: an idle check unanswered on an old connection, answered on a new one: never down", async () => {
  await withHarness(1, { healthCheckIntervalMs: 1000 }, (h) => {
    h.start();
    const a = h.upstream("a");
    const old = h.server("a").connections.find((c) => c.state === "open")!;
    old.silent = true; // a NAT or firewall forgot the idle flow
    let wentDown = false;
    for (let i = 0; i < 40; i++) {
      h.clock.advance(100);
      wentDown ||= !a.usable;
    }
    assert.ok(!wentDown, "never down");
    assert.equal(old.state, "closed");
    assert.equal(h.counts.checks.get("a")!.error, 1);
    assert.ok(h.counts.checks.get("a")!.ok >= 2, "checks answered on the new connection");
    assert.equal(h.log("checking again on a new connection").length, 1);
    const question = h.ask("after.example");
    h.clock.advance(5);
    assert.equal(question.rcode, 0);
  });
});

Deno.test("a frozen upstream is noticed within an attempt timeout plus a probe timeout", async () => {
  await withHarness(2, {}, (h) => {
    h.start();
    h.warm();
    const a = h.upstream("a");
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    const frozenAt = h.clock.now();
    const questions: Question[] = [];
    for (let i = 0; i < 200 && a.usable; i++) {
      questions.push(h.ask(`f${i}.example`));
      h.clock.advance(10);
    }
    assert.equal(a.health.state, "down");
    const noticed = h.clock.now() - frozenAt;
    assert.ok(noticed <= a.latency.attemptTimeout() + 500 + 20, `down after ${noticed} ms`);
    h.clock.advance(1000);
    assert.ok(questions.every((q) => q.rcode === 0), "every question answered");
    assert.ok(questions.every((q) => q.settledAt - (q.deadline - 4000) <= 220), "none waited long");
  });
});

Deno.test("a stall that only hedged questions saw still makes the upstream slow and probed", async () => {
  await withHarness(2, { strategy: "round-robin" }, (h) => {
    h.start();
    h.warm();
    const a = h.upstream("a");
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    // Each question to a is hedged to b after 10 ms and answered there; nobody waits on a.
    for (let i = 0; i < 30; i++) {
      h.ask(`h${i}.example`);
      h.clock.advance(20);
    }
    assert.ok(a.slow || !a.usable, "a counts as slow or down");
    assert.ok(h.server("a").probeTimes().length >= 2, "a was probed on its stalled connection");
  });
});

Deno.test("a burst of unanswered queries marks an upstream slow within 50 ms", async () => {
  await withHarness(2, { strategy: "failover", hedgeDelay: 0 }, (h) => {
    h.start();
    h.warm();
    const a = h.upstream("a");
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    const frozenAt = h.clock.now();
    for (let i = 0; i < 100 && !a.slow; i++) {
      h.ask(`burst${i}.example`);
      h.clock.advance(1);
    }
    assert.ok(a.slow, "a is slow");
    const noticed = h.clock.now() - frozenAt;
    assert.ok(noticed >= 50 && noticed <= 52, `noticed after ${noticed} ms`);
    // From then on questions go to b at once.
    const after = h.ask("after.example");
    h.clock.advance(5);
    assert.equal(after.upstream, "b");
  });
});

Deno.test("a health check left unanswered by a server that answers questions is not a failure", async () => {
  // A resolver that cannot reach the root servers answers `. NS` late, or never.
  await withHarness(1, { healthCheckIntervalMs: 1000 }, (h) => {
    h.server("a").behaviour.reply = (name) =>
      name === "." ? { kind: "never" } : { kind: "answer", ms: 1 };
    h.start();
    for (let i = 0; i < 300; i++) {
      h.ask(`busy${i}.example`);
      h.clock.advance(20);
    }
    assert.equal(h.upstream("a").health.state, "up", "questions answered: up");
    assert.ok(h.counts.checks.get("a")!.error >= 1, "the unanswered checks count as errors");
    // Idle, the same unanswered check is all there is to go by: down.
    h.clock.advance(5000);
    assert.equal(h.upstream("a").health.state, "down");
  });
});

Deno.test("one late answer is not a dead upstream: others are answered, no failure", async () => {
  await withHarness(1, { healthCheckIntervalMs: 0 }, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("late") ? { kind: "answer", ms: 5000 } : { kind: "answer", ms: 1 };
    const late = h.ask("late.example", 2000);
    const others: Question[] = [];
    for (let i = 0; i < 300; i++) {
      if (i % 10 === 0) others.push(h.ask(`o${i}.example`));
      h.clock.advance(10);
    }
    assert.equal(late.error?.reason, "timeout", "the straggler's own client times out");
    assert.ok(others.every((q) => q.rcode === 0), "everyone else is answered");
    assert.equal(h.upstream("a").health.state, "up");
    assert.ok(h.server("a").probeTimes().length <= 2, "at most a probe or two");
  });
});

Deno.test("a connection that stops answering while the upstream answers on another is closed, not the upstream taken down", async () => {
  await withHarness(1, { healthCheckIntervalMs: 1000 }, (h) => {
    h.start();
    h.warm();
    const a = h.upstream("a");
    // The connection the next question goes to loses its path (a middlebox forgot it): what
    // is written on it is read by nobody. New connections work.
    const questions = [h.ask("first.example")];
    const dead = h.server("a").seen.at(-1)!.connection;
    assert.equal(h.server("a").seen.at(-1)!.name, "first.example.");
    dead.silent = true;
    let wentDown = false;
    for (let i = 0; i < 300 && dead.state !== "closed"; i++) {
      questions.push(h.ask(`q${i}.example`));
      h.clock.advance(10);
      wentDown ||= !a.usable;
    }
    assert.equal(dead.state, "closed", "the silent connection is closed");
    assert.ok(!wentDown, "the upstream was never taken down");
    assert.equal(h.log("closing an upstream connection that stopped answering").length, 1);
    // Then idle: the health checks go over a working connection and are answered.
    for (let i = 0; i < 50; i++) {
      h.clock.advance(100);
      wentDown ||= !a.usable;
    }
    assert.ok(!wentDown, "nor by an idle health check");
    assert.ok(h.server("a").probeTimes().at(-1)! > h.clock.now() - 1500, "idle checks went on");
    assert.ok(questions.every((q) => q.rcode === 0), "every question answered");
  });
});

Deno.test("a straggler past its attempt deadline makes its upstream slow until it answers again", async () => {
  await withHarness(2, { strategy: "failover", hedgeDelay: 0, healthCheckIntervalMs: 0 }, (h) => {
    h.start();
    h.warm();
    const a = h.upstream("a");
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("late") ? { kind: "answer", ms: 1000 } : { kind: "answer", ms: 1 };
    const timeout = a.attemptTimeout();
    const probes = h.server("a").probeTimes().length;
    const late = h.ask("late.example");
    h.clock.advance(5);
    // Answered after the straggler was written: the connection is not stalled, so only the
    // straggler's own deadline can say that a is slow now.
    const beside = h.ask("beside.example");
    h.clock.advance(5);
    assert.equal(beside.upstream, "a");
    h.clock.advance(timeout - 10);
    assert.equal(h.server("b").queries().at(-1), "late.example.", "the straggler also went to b");
    assert.ok(a.slow, "a counts as slow");
    const during = h.ask("during.example");
    h.clock.advance(5);
    assert.equal(during.upstream, "b", "the first upstream is passed over while slow");
    assert.equal(late.upstream, "b");
    // Its late answer comes: a is itself again and the first choice.
    h.clock.advance(1000);
    assert.ok(!a.slow, "no longer slow once it answered");
    const after = h.ask("after.example");
    h.clock.advance(5);
    assert.equal(after.upstream, "a");
    assert.equal(h.server("a").probeTimes().length, probes, "a straggler is not probed");
  });
});

// ---------------------------------------------------------------------------------------------
// Query of death.

Deno.test("query of death: isolated on a connection of its own, then not sent again", async () => {
  await withHarness(1, { connectionsPerUpstream: 1, hedgeDelay: 0 }, (h) => {
    h.start();
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("qod") ? { kind: "hangup", ms: 1 } : { kind: "answer", ms: 3 };
    const qod = h.ask("qod.example");
    const others = [h.ask("x1.example"), h.ask("x2.example")];
    h.clock.advance(100);
    assert.equal(qod.settledAt >= 0, true);
    assert.ok(qod.error !== null, "the query of death fails");
    assert.ok(others.every((q) => q.rcode === 0), "the others on its connection are answered");
    assert.equal(h.server("a").queries().filter((n) => n === "qod.example.").length, 2);
    assert.equal(h.log("a question closed two upstream connections").length, 1);
    assert.equal(h.upstream("a").health.state, "up", "the upstream is not blamed");
  });
  await withHarness(2, { connectionsPerUpstream: 1, hedgeDelay: 0 }, (h) => {
    h.start();
    for (const server of h.servers) {
      server.behaviour.reply = (name) =>
        name.startsWith("qod") ? { kind: "hangup", ms: 1 } : { kind: "answer", ms: 3 };
    }
    const qod = h.ask("qod.example");
    h.clock.advance(100);
    assert.ok(qod.error !== null);
    const asked = h.servers.map((s) => s.queries().filter((n) => n === "qod.example.").length);
    assert.deepEqual(asked, [1, 1], "once on a shared connection, once alone on the other");
    const alone = h.server("b").seen.find((s) => s.name === "qod.example.")!.connection;
    assert.equal(h.server("b").seen.filter((s) => s.connection === alone).length, 1, "alone");
    assert.equal(h.upstream("b").health.state, "up", "b is not blamed");
  });
});

Deno.test("an upstream that hangs up on everything is not a query of death: the other answers", async () => {
  await withHarness(2, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.warm();
    h.server("a").behaviour.reply = () => ({ kind: "hangup", ms: 1 });
    const questions: Question[] = [];
    for (let i = 0; i < 20; i++) {
      questions.push(h.ask(`e${i}.example`));
      h.clock.advance(10);
    }
    h.clock.advance(100);
    assert.ok(questions.every((q) => q.rcode === 0), "every question answered by b");
  });
});

Deno.test("query of death, one upstream: a server that hangs up on everything still goes down", async () => {
  await withHarness(1, { hedgeDelay: 0 }, (h) => {
    h.start();
    h.warm();
    // Every question and every probe closes its connection: what re-sent questions close is
    // not counted, but the closes new questions and probes cause are.
    h.server("a").behaviour.reply = () => ({ kind: "hangup", ms: 1 });
    for (let i = 0; i < 10 && h.upstream("a").health.state !== "down"; i++) {
      h.ask(`crash${i}.example`);
      h.clock.advance(10);
    }
    assert.equal(h.upstream("a").health.state, "down");
  });
});

// ---------------------------------------------------------------------------------------------
// Strategies.

function spread(h: Harness, count: number, gapMs = 5): Record<string, number> {
  const out: Record<string, number> = {};
  for (const q of h.askMany("s", count, gapMs)) out[q.upstream] = (out[q.upstream] ?? 0) + 1;
  return out;
}

Deno.test("strategy round-robin: an even spread", async () => {
  await withHarness(3, { strategy: "round-robin", hedgeDelay: 0 }, (h) => {
    h.start();
    assert.deepEqual(spread(h, 300), { a: 100, b: 100, c: 100 });
  });
});

Deno.test("strategy random: every upstream gets a share", async () => {
  let seed = 1;
  const random = () => {
    seed = (seed * 16807) % 2147483647;
    return (seed - 1) / 2147483646;
  };
  await withHarness(2, { strategy: "random", hedgeDelay: 0, random }, (h) => {
    h.start();
    const counts = spread(h, 400);
    assert.ok(counts.a > 120 && counts.b > 120, JSON.stringify(counts));
  });
});

Deno.test("strategy failover: the first upstream; the second while it is down; back when it recovers", async () => {
  await withHarness(2, { strategy: "failover", hedgeDelay: 0 }, (h) => {
    h.start();
    assert.deepEqual(spread(h, 50), { a: 50 });
    h.server("a").behaviour.connect = "refuse";
    h.server("a").behaviour.reply = () => ({ kind: "hangup", ms: 0 });
    for (let i = 0; i < 20 && h.upstream("a").usable; i++) {
      h.ask(`down${i}.example`);
      h.clock.advance(50);
    }
    assert.equal(h.upstream("a").usable, false);
    assert.deepEqual(spread(h, 50), { b: 50 });
    h.server("a").behaviour = { ...HEALTHY };
    h.clock.advance(2000);
    assert.equal(h.upstream("a").health.state, "up");
    h.clock.advance(SETTLE_MS);
    assert.deepEqual(spread(h, 50), { a: 50 }, "back to the first");
  });
});

Deno.test("strategy fastest: the lower answer time, with an occasional look at the other", async () => {
  await withHarness(2, { strategy: "fastest", hedgeDelay: 0 }, (h) => {
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 20 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 2 });
    h.start();
    spread(h, 20, 30);
    const counts = spread(h, 320, 30);
    assert.ok(counts.b >= 300, JSON.stringify(counts));
    assert.ok(counts.a >= 5, `exploration: ${JSON.stringify(counts)}`);
    // a gets faster: the exploration notices and the traffic moves.
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 1 });
    spread(h, 1000, 30);
    const after = spread(h, 100, 30);
    assert.ok(after.a >= 90, JSON.stringify(after));
  });
});

Deno.test("strategy least-outstanding: away from the upstream that owes answers", async () => {
  await withHarness(2, { strategy: "least-outstanding", hedgeDelay: 0 }, (h) => {
    h.start();
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 100 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 1 });
    const counts = spread(h, 100, 5);
    assert.ok(counts.b >= 80, JSON.stringify(counts));
    assert.ok(counts.a >= 1, JSON.stringify(counts));
  });
});

Deno.test("every strategy: a down upstream gets no question", async () => {
  for (const strategy of ["least-outstanding", "fastest", "round-robin", "failover", "random"]) {
    await withHarness(2, { strategy: strategy as Strategy, hedgeDelay: 0 }, (h) => {
      h.server("a").behaviour.connect = "refuse";
      h.start();
      assert.deepEqual(spread(h, 40), { b: 40 }, strategy);
    });
  }
});

Deno.test("strategy least-outstanding: idle, the clearly faster upstream; about as fast, the first", async () => {
  await withHarness(2, { strategy: "least-outstanding", hedgeDelay: 0 }, (h) => {
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 30 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 5 });
    h.start();
    // Questions one at a time (nothing owed when the next comes): a is tried first, then b
    // is timed when a owes an answer, and from then on b is the clearly faster one.
    spread(h, 10, 40);
    const counts = spread(h, 50, 40);
    assert.deepEqual(counts, { b: 50 }, JSON.stringify(counts));
  });
  await withHarness(2, { strategy: "least-outstanding", hedgeDelay: 0 }, (h) => {
    h.server("a").behaviour.reply = () => ({ kind: "answer", ms: 5 });
    h.server("b").behaviour.reply = () => ({ kind: "answer", ms: 4 });
    h.start();
    spread(h, 10, 40);
    const counts = spread(h, 50, 40);
    assert.deepEqual(counts, { a: 50 }, "about as fast: the first, every time");
  });
});

Deno.test("maintenance asks every connection, once a second, to complete a frame a nudge began", async () => {
  await withHarness(1, { hedgeDelay: 0, connectionsPerUpstream: 2 }, (h) => {
    h.start();
    h.warm();
    const connections = h.server("a").connections.filter((c) => c.state === "open");
    assert.ok(connections.length >= 1);
    const asked = connections.map((c) => c.completeAsked.length);
    h.clock.advance(1000);
    // A server with a short read timeout for a begun message (dnsdist: 2 s) would close a
    // connection left holding a nudge's lone octet.
    connections.forEach((c, i) => assert.ok(c.completeAsked.length > asked[i], `connection ${i}`));
  });
});

Deno.test("under load the next burst goes where answers were read since the last write and more are owed", async () => {
  await withHarness(1, { hedgeDelay: 0, connectionsPerUpstream: 3 }, (h) => {
    h.start();
    // Only "quick" questions are answered; the rest stay owed: a busy upstream.
    h.server("a").behaviour.reply = (name) =>
      name.startsWith("quick") ? { kind: "answer", ms: 5 } : { kind: "never" };
    h.askMany("open", 8, 1);
    h.clock.advance(SETTLE_MS + 10);
    const connections = h.server("a").connections;
    assert.equal(connections.length, 3);
    const carrier = (name: string) =>
      connections.indexOf(h.server("a").seen.find((s) => s.name === `${name}.`)?.connection!);
    // One batch: quick questions, then owed ones until their connection is full (128)...
    for (let i = 0; i < 4; i++) h.ask(`quick${i}.example`);
    for (let i = 0; i < 128; i++) h.ask(`fill${i}.example`);
    const owing = carrier("quick0.example");
    assert.equal(carrier("quick3.example"), owing);
    assert.equal(connections[owing].load, 128);
    // ...and a millisecond later one more, which goes to another connection, written last.
    h.clock.advance(1);
    h.ask("spill.example");
    const writtenLast = carrier("spill.example");
    assert.notEqual(owing, writtenLast);
    // The quick answers are read: their connection owes the server an ACK, and 124 answers.
    h.clock.advance(5);
    assert.equal(connections[owing].load, 124);
    assert.ok(connections[writtenLast].lastWriteAt > connections[owing].lastWriteAt);
    assert.ok(connections[owing].lastReadAt > connections[owing].lastWriteAt);
    // A server under Nagle holds the answers behind the one read until this side's next
    // segment: the next batch's write carries it, rather than going where it wrote last.
    h.ask("next.example");
    h.ask("next2.example");
    assert.equal(carrier("next.example"), owing);
    assert.equal(carrier("next2.example"), owing, "its batch stays there");
    // Written to now, it owes nothing: the rule falls back to the connection written last.
    h.clock.advance(1);
    h.ask("after.example");
    assert.equal(carrier("after.example"), owing);
  });
});

Deno.test("under load a burst shares the connection written most recently, up to 128 owed on each", async () => {
  await withHarness(1, { hedgeDelay: 0, connectionsPerUpstream: 3 }, (h) => {
    h.start();
    // Nothing is answered: every question stays owed, so the upstream is busy from the 8th on.
    h.server("a").behaviour.reply = () => ({ kind: "never" });
    h.askMany("open", 8, 1);
    h.clock.advance(SETTLE_MS + 10);
    const connections = h.server("a").connections;
    assert.equal(connections.length, 3, "light load opened every connection");
    assert.ok(connections.every((c) => c.state === "open"));
    const burst = 300;
    for (let i = 0; i < burst; i++) h.ask(`burst${i}.example`);
    const carriers = h.server("a").seen.filter((s) => s.name.startsWith("burst")).map((s) =>
      connections.indexOf(s.connection)
    );
    assert.equal(carriers.length, burst);
    let switches = 0;
    for (let i = 1; i < burst; i++) if (carriers[i] !== carriers[i - 1]) switches++;
    assert.equal(switches, 2, "one connection until it owes 128, then the next");
    // The burst used each connection once, in turn, the first two until they owed 128 (health
    // probes sent on a connection that stopped answering count as owed too).
    const order = [...new Set(carriers)];
    assert.equal(order.length, 3);
    assert.deepEqual(order.slice(0, 2).map((c) => connections[c].load), [128, 128]);
    assert.ok(connections[order[2]].load < 128);
  });
});

// ---------------------------------------------------------------------------------------------
// Padding: an option of the upstream set, not of the question.

Deno.test("padding: the pool pads queries and probes to 128-octet blocks; without it, as given", async () => {
  for (const padding of [true, false]) {
    await withHarness(1, { padding, hedgeDelay: 0 }, (h) => {
      h.start();
      const question = h.ask("padded.example", 4000, true);
      h.clock.advance(10);
      assert.equal(question.rcode, 0);
      const seen = h.server("a").seen;
      const query = seen.find((s) => s.name === "padded.example.")!;
      const probe = seen.find((s) => s.probe)!;
      if (padding) {
        assert.equal(query.length, 128, "the query");
        assert.equal(probe.length, 128, "the probe");
      } else {
        assert.equal(query.length, question.query.length, "the query as the resolver built it");
        assert.ok(probe.length < 128, "the probe");
      }
    });
  }
});
