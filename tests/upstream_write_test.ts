/**
 * Writes to an upstream connection: a query queued at any moment, including the moment a
 * write has just completed, goes on the wire without waiting for another query to push it.
 */

import assert from "node:assert/strict";
import { StreamConnection } from "../src/upstream/stream_connection.ts";
import { CA_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { parseMessage } from "./support/dns.ts";
import { closeAll, exchangeFor, loopbackSpec, RecordingOwner } from "./support/connection_owner.ts";
import { waitFor } from "./support/wait.ts";

type Write = (this: Deno.TlsConn, bytes: Uint8Array) => Promise<number>;

/**
 * Runs `body` with every TLS write in this process reporting its completion to `afterWrite`
 * (the bytes written), just before the writer sees it.
 */
async function withWriteHook(
  port: number,
  afterWrite: (bytes: Uint8Array) => void,
  body: () => Promise<void>,
): Promise<void> {
  const tcp = await Deno.connect({ hostname: "127.0.0.1", port });
  const probe = await Deno.startTls(tcp, { hostname: "dns.test", caCerts: [CA_PEM] });
  const prototype = Object.getPrototypeOf(probe) as { write: Write };
  probe.close();
  const hadOwn = Object.hasOwn(prototype, "write");
  const original = prototype.write;
  prototype.write = async function (this: Deno.TlsConn, bytes: Uint8Array): Promise<number> {
    const written = await original.call(this, bytes);
    afterWrite(bytes);
    return written;
  };
  try {
    await body();
  } finally {
    if (hadOwn) prototype.write = original;
    else delete (prototype as { write?: Write }).write;
  }
}

Deno.test("upstream writes: a query queued as a write completes is written, whatever the microtask", async () => {
  const server = DotServer.start();
  // No nudges: nothing but the write path itself may put the second query on the wire.
  const owner = new RecordingOwner(
    loopbackSpec(server.port),
    0,
    false,
  );
  const connection = new StreamConnection(owner, owner.context);
  let queueAfter: (() => void) | null = null;
  try {
    await withWriteHook(server.port, (bytes) => {
      // Our queries (QR clear), not the in-process server's answers.
      if (queueAfter === null || bytes.length < 5 || (bytes[4] & 0x80) !== 0) return;
      const queue = queueAfter;
      queueAfter = null;
      queue();
    }, async () => {
      connection.start();
      await owner.opened;
      // The write's completion reaches the flush loop through a few promise steps; a query
      // queued k microtasks after it lands in each of them for some k.
      for (let k = 0; k < 12; k++) {
        const before = owner.answered.length;
        const second = exchangeFor(`b${k}.flush.test`);
        queueAfter = () => {
          let step = Promise.resolve();
          for (let i = 0; i < k; i++) step = step.then(() => {});
          step.then(() => connection.send(second));
        };
        connection.send(exchangeFor(`a${k}.flush.test`));
        await waitFor(
          `the query queued ${k} microtasks after a write completed is answered`,
          () => owner.answered.length === before + 2,
        );
        const names = owner.answered.slice(before).map((a) =>
          parseMessage(a.response).question?.name
        );
        assert.deepEqual(names.sort(), [`a${k}.flush.test.`, `b${k}.flush.test.`]);
      }
    });
    assert.deepEqual(owner.problems, []);
  } finally {
    await closeAll(connection, owner, server);
  }
});
