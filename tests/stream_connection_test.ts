/**
 * One upstream connection on real sockets: its bookkeeping over TLS (a query given up on,
 * hedged elsewhere or past its deadline, stays owed until its late answer comes or it is
 * purged), and the same class over plain TCP.
 */

import assert from "node:assert/strict";
import { tcpDialer } from "../src/upstream/dial.ts";
import { StreamConnection } from "../src/upstream/stream_connection.ts";
import { DotServer } from "./support/dot_server.ts";
import { answerFor, parseMessage } from "./support/dns.ts";
import { closeAll, exchangeFor, loopbackSpec, RecordingOwner } from "./support/connection_owner.ts";
import { waitFor } from "./support/wait.ts";

Deno.test("upstream connection: a question given up on stays owed until purged, then the connection is idle", async () => {
  // The server never answers "silent" names: their late answer never comes.
  const server = DotServer.start({
    answer: (query) =>
      parseMessage(query).question?.name.startsWith("silent") ? null : answerFor(query),
  });
  const owner = new RecordingOwner(
    loopbackSpec(server.port),
    0,
    false,
  );
  const connection = new StreamConnection(owner, owner.context);
  connection.start();
  try {
    await owner.opened;
    const silent = exchangeFor("silent.purge.test");
    connection.send(silent);
    connection.send(exchangeFor("a.purge.test"));
    await waitFor("the other question answered", () => owner.answered.length === 1);
    assert.equal(connection.load, 1);
    // Given up on: its ID stays reserved and the connection still owes its answer (which
    // counts when judging whether the server stopped answering)...
    silent.cancel();
    assert.equal(connection.load, 1);
    connection.purge(silent.sentAt);
    assert.equal(connection.load, 1, "not purged before it was written");
    // ...until the maintenance pass drops what was written before its cut-off.
    connection.purge(silent.sentAt + 1);
    assert.equal(connection.load, 0, "purged: nothing owed, the connection can idle out");
    assert.equal(connection.stalledSince, 0, "and nothing counts as a stall");
    // The connection goes on answering.
    connection.send(exchangeFor("b.purge.test"));
    await waitFor("the next question answered", () => owner.answered.length === 2);
    assert.equal(parseMessage(owner.answered[1].response).question?.name, "b.purge.test.");
    assert.deepEqual(owner.problems, []);
  } finally {
    await closeAll(connection, owner, server);
  }
});

Deno.test("upstream connection: plain DNS over TCP is the same connection without TLS (no nudge)", async () => {
  const server = DotServer.start({ plain: true, delayMs: (query) => query[13] === 0x61 ? 30 : 0 });
  const owner = new RecordingOwner(loopbackSpec(server.port), 0, false);
  const connection = new StreamConnection(owner, {
    ...owner.context,
    dial: tcpDialer(owner.context.spec),
  });
  connection.start();
  try {
    await owner.opened;
    // Pipelined: the slow one first, answered last.
    for (const name of ["a.plain.test", "b.plain.test", "c.plain.test"]) {
      connection.send(exchangeFor(name));
    }
    await waitFor("three answers", () => owner.answered.length === 3);
    const names = owner.answered.map((a) => parseMessage(a.response).question?.name);
    assert.deepEqual(names, ["b.plain.test.", "c.plain.test.", "a.plain.test."]);
    assert.equal(server.connections, 1, "one connection carried them all");
    assert.equal(server.lengthOctets, 0, "no nudge");
    assert.deepEqual(owner.problems, []);
  } finally {
    await closeAll(connection, owner, server);
  }
});

Deno.test("upstream connection: a TLS dial to a plain DNS server fails; nothing goes out in clear text", async () => {
  const server = DotServer.start({ plain: true });
  const owner = new RecordingOwner(loopbackSpec(server.port), 0, false);
  const connection = new StreamConnection(owner, { ...owner.context, connectTimeoutMs: 300 });
  connection.start();
  connection.send(exchangeFor("secret.plain.test"));
  try {
    await waitFor("the connection fails", () => connection.state === "closed");
    assert.equal(connection.opened, false);
    assert.equal(owner.problems.length, 1);
    assert.match(owner.problems[0], /connecting to .* failed: no handshake within 300 ms/);
    assert.equal(server.queries, 0, "the question never reached the plain server");
  } finally {
    await closeAll(connection, owner, server);
  }
});
