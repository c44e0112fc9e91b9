/**
 * One upstream connection's bookkeeping on a real TLS connection: a query given up on (hedged
 * elsewhere, or past its deadline) stays owed until its late answer comes or it is purged.
 */

import assert from "node:assert/strict";
import { DotConnection } from "../src/upstream/dot_connection.ts";
import { DotServer } from "./support/dot_server.ts";
import { answerFor, parseMessage } from "./support/dns.ts";
import {
  closeAll,
  exchangeFor,
  loopbackSpec,
  RecordingOwner,
  until,
} from "./support/connection_owner.ts";

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
  const connection = new DotConnection(owner);
  connection.start();
  try {
    await owner.opened;
    const silent = exchangeFor("silent.purge.test");
    connection.send(silent);
    connection.send(exchangeFor("a.purge.test"));
    await until("the other question answered", () => owner.answered.length === 1);
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
    await until("the next question answered", () => owner.answered.length === 2);
    assert.equal(parseMessage(owner.answered[1].response).question?.name, "b.purge.test.");
    assert.deepEqual(owner.problems, []);
  } finally {
    await closeAll(connection, owner, server);
  }
});
