/**
 * The nudge on one real TLS connection to a server that holds answers the way a server under
 * Nagle's algorithm does: the lone length octet releases them and asks for nothing, and the
 * frame it starts is completed by whatever is written next, a long query included. Then the
 * nudge module's parts (budget, echoes, which exchange) without sockets.
 */

import assert from "node:assert/strict";
import { SYSTEM_CLOCK } from "../src/timers.ts";
import { SETTLE_MS } from "../src/upstream/connection.ts";
import {
  COMPLETE_FRAME_AFTER_MS,
  Echoes,
  NUDGE_BURST,
  NUDGE_MS,
  NudgeBudget,
  nudgeOnRead,
  nudgeOnTimer,
  REST_MS,
} from "../src/upstream/nudge.ts";
import { StreamConnection } from "../src/upstream/stream_connection.ts";
import { DotServer } from "./support/dot_server.ts";
import { parseMessage } from "./support/dns.ts";
import { closeAll, exchangeFor, loopbackSpec, RecordingOwner } from "./support/connection_owner.ts";
import { sleep, waitFor } from "./support/wait.ts";

/**
 * Runs `body` with one open StreamConnection to a Nagle-like server (it answers the first of two
 * queries and holds the second until it reads more), with no budget for a duplicate: only
 * octets can be sent. `outstanding` is what the upstream owes in all: above 4, a read does not
 * nudge and only the timer can.
 */
async function withNagleConnection(
  outstanding: number,
  body: (server: DotServer, owner: RecordingOwner, connection: StreamConnection) => Promise<void>,
): Promise<void> {
  const server = DotServer.start({ nagle: true });
  const owner = new RecordingOwner(
    loopbackSpec(server.port),
    0,
    true,
    outstanding,
  );
  const connection = new StreamConnection(owner, owner.context);
  connection.start();
  try {
    await owner.opened;
    await body(server, owner, connection);
    assert.deepEqual(owner.problems, []);
    assert.equal(connection.state, "open");
  } finally {
    await closeAll(connection, owner, server);
  }
}

/** Two queries go out at once at light load: the read of the first answer sends the octet. */
function withNudgedConnection(
  body: (server: DotServer, owner: RecordingOwner, connection: StreamConnection) => Promise<void>,
): Promise<void> {
  return withNagleConnection(1, async (server, owner, connection) => {
    connection.send(exchangeFor("a.octet.test"));
    connection.send(exchangeFor("b.octet.test"));
    await waitFor("both answered", () => owner.answered.length === 2);
    assert.equal(server.lengthOctets, 1, "the nudge was one octet alone");
    assert.equal(server.queries, 2, "and no query written again");
    await body(server, owner, connection);
  });
}

Deno.test("nudge: a lone length octet releases held answers; a long query then completes the frame first", async () => {
  await withNudgedConnection(async (server, owner, connection) => {
    // Over 255 octets: its length cannot follow the octet sent, so a health probe (28 octets)
    // completes that frame first, and this one goes whole.
    const long = `${"l".repeat(63)}.${"m".repeat(63)}.${"n".repeat(63)}.${"o".repeat(50)}.test`;
    const longExchange = exchangeFor(long);
    assert.ok(longExchange.message.length > 255);
    // The filler's answer comes first and holds the long query's: another octet releases it.
    connection.send(longExchange);
    await waitFor("the long query answered", () => owner.answered.length === 3);
    const reply = parseMessage(owner.answered[2].response);
    assert.equal(reply.question?.name, `${long}.`);
    assert.equal(server.queries, 3, "the long query, no duplicate");
    assert.equal(server.probes, 1, "the frame completed by a probe");
    assert.deepEqual(server.messageLengths.at(-2), { probe: true, length: 28 });
    assert.equal(server.lengthOctets, 2);
    // The filler's answer is an echo: read and ignored, no complaint, connection still open.
    connection.send(exchangeFor("c.octet.test"));
    await waitFor("one more answered", () => owner.answered.length === 4);
  });
});

Deno.test("nudge: an idle connection gets the rest of the frame its last octet began", async () => {
  await withNudgedConnection(async (server, owner, connection) => {
    const now = SYSTEM_CLOCK.now();
    assert.equal(
      connection.completePendingFrame(connection.lastWriteAt + COMPLETE_FRAME_AFTER_MS - 1),
      false,
      "not before the connection has been idle a while",
    );
    assert.equal(connection.completePendingFrame(now + COMPLETE_FRAME_AFTER_MS), true);
    // The server reads the completed frame as a health probe: no partial frame left.
    await waitFor("the frame completed", () => server.probes === 1);
    assert.equal(server.queries, 2);
    assert.equal(connection.completePendingFrame(now + 2 * COMPLETE_FRAME_AFTER_MS), false);
    // Its answer is an echo; the connection goes on answering what comes next.
    connection.send(exchangeFor("c.idle.test"));
    await waitFor("the next query answered", () => owner.answered.length === 3);
    assert.equal(parseMessage(owner.answered[2].response).question?.name, "c.idle.test.");
  });
});

/**
 * Two queries on a connection whose upstream owes many answers: a read does not nudge (the
 * stream of queries is expected to carry the ACK), so when none comes the timer must. With
 * `settleFirst`, the queries wait until the connection has settled.
 */
function timerNudge(settleFirst: boolean): Promise<void> {
  return withNagleConnection(100, async (server, owner, connection) => {
    if (settleFirst) await sleep(SETTLE_MS + 10);
    const sentAt = performance.now();
    connection.send(exchangeFor("a.timer.test"));
    connection.send(exchangeFor("b.timer.test"));
    await waitFor("both answered", () => owner.answered.length === 2);
    const took = performance.now() - sentAt;
    assert.equal(server.lengthOctets, 1, "released by one octet");
    assert.equal(server.queries, 2, "and no query written again");
    // Not at read time: after the timer (NUDGE_MS, later by the platform timer's slack).
    assert.ok(took >= NUDGE_MS, `answered after ${took.toFixed(2)} ms`);
  });
}

Deno.test("nudge: under load (no nudge at read time) the nudge timer releases a held answer", async () => {
  await timerNudge(true);
});

Deno.test("nudge: an answer held behind the session tickets does not stop the timer nudge", async () => {
  // Written at once after the handshake, the first answer may wait for the ACK of the
  // tickets (40 ms): it must not count as the connection's fastest answer, or the patience
  // (four times that) would outlast the age a query may still be nudged at.
  await timerNudge(false);
});

// ---------------------------------------------------------------------------------------------
// The nudge module's own parts, without sockets.

Deno.test("nudge: the budget earns a fifth of a nudge per query written, up to the burst", () => {
  const budget = new NudgeBudget(0);
  assert.equal(budget.available, false);
  for (let i = 0; i < 5; i++) budget.earn();
  assert.equal(budget.available, true, "five queries pay for one duplicate");
  budget.spend();
  assert.equal(budget.available, false);
  for (let i = 0; i < 1000; i++) budget.earn();
  assert.ok(budget.tokens < NUDGE_BURST + 1, `saved up ${budget.tokens}`);
});

Deno.test("nudge: echoes are taken once per expected answer; the ledger is bounded", () => {
  const echoes = new Echoes();
  echoes.expect(7);
  echoes.expect(7);
  assert.equal(echoes.has(7), true, "the ID is not free");
  assert.equal(echoes.take(7), true);
  assert.equal(echoes.take(7), true);
  assert.equal(echoes.take(7), false, "a third answer is not ours");
  assert.equal(echoes.read, 2);
  for (let id = 0; id < 2000; id++) echoes.expect(id);
  assert.ok(!echoes.has(0), "forgotten past 1,024 IDs");
});

Deno.test("nudge: which exchange the timer nudges, and when it looks again", () => {
  const at = (sentAt: number, nudgedAt = 0) => {
    const exchange = exchangeFor("x.test");
    exchange.sentAt = sentAt;
    exchange.nudgedAt = nudgedAt;
    return exchange;
  };
  // Fastest answer 1 ms: patience max(2, 4) = 4 ms.
  assert.equal(nudgeOnTimer([at(100)], 102, 1), "later", "not yet overdue");
  const overdue = at(100);
  assert.equal(nudgeOnTimer([overdue], 105, 1), overdue);
  assert.equal(nudgeOnTimer([at(100)], 100 + REST_MS, 1), null, "too old to be worth one");
  const older = at(90);
  const younger = at(95);
  assert.equal(nudgeOnRead([older, younger], 96, 97), older, "the oldest written before the read");
  assert.equal(nudgeOnRead([at(98)], 96, 99), null, "written after the read: nothing held");
});
