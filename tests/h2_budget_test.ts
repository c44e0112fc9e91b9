/**
 * Scenario (issue 21, DoH): an HTTP/2 client that opens its 100 streams with the windows wide
 * open and reads nothing. The connection hands a request to the service only while the
 * answer budget has room (the answers being made at an estimated size, and the bodies
 * queued and not yet written), and leaves the HEADERS of new streams unread while a request
 * waits for it; so the answers made for such a client stop at what the budget and the
 * kernel's socket buffers hold, instead of one per stream (with 60 KB DoH answers, 64 such
 * connections held 398 MiB before, bench/memory_attacks.ts `doh-no-read-64`).
 *
 * Real loopback sockets, the HTTP/2 connection of the DoH listener, a service answering
 * 1 MiB bodies (larger than the kernel buffers take, so the budget is what binds).
 *
 * @module
 */

import assert from "node:assert/strict";
import { H2Connection, type ResponseBudget } from "../src/http/h2.ts";
import type { HttpResponse, HttpService } from "../src/http/types.ts";
import { DOH_LIMITS } from "../src/server/doh_listener.ts";
import { AnswerBudget } from "../src/server/answer_budget.ts";
import { TimerQueue } from "../src/timers.ts";
import { h2NoReadClientBytes, hpackLiteral } from "./support/h2_frames.ts";

const BODY = 1024 * 1024;
const STREAMS = 100;

/** Preface, SETTINGS (largest stream window), the connection window opened, 100 GETs. */
function hostileClientBytes(): Uint8Array {
  const block = new Uint8Array([
    0x82,
    0x86,
    0x04,
    ...hpackLiteral("/dns-query"),
    0x01,
    ...hpackLiteral("x"),
  ]);
  return h2NoReadClientBytes(block, STREAMS);
}

Deno.test("h2: a client that reads nothing gets no more answers made than the budget holds", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const timers = new TimerQueue();
  const budget = new AnswerBudget();
  const share = budget.share("127.0.0.1");
  // The budget has seen an answer of this size (its estimate jumps to the largest recent).
  budget.started(share);
  budget.answered(share, BODY);
  const responseBudget: ResponseBudget = {
    mayStart: () => budget.mayAdmit(share),
    started: () => budget.started(share),
    answered: (bytes) => budget.answered(share, bytes),
    queued: (bytes) => budget.queued(share, bytes),
    sent: (bytes) => budget.sent(share, bytes),
  };
  let handled = 0;
  const service: HttpService = {
    handle(): Promise<HttpResponse> {
      handled++;
      return Promise.resolve({ status: 200, fields: [], body: new Uint8Array(BODY) });
    },
    reject: (status) => ({ status, fields: [], body: new Uint8Array(0) }),
  };
  const client = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
  const server = await listener.accept();
  const h2 = new H2Connection(
    {
      conn: server,
      peer: { address: server.remoteAddr as Deno.NetAddr },
      service,
      limits: { ...DOH_LIMITS, writeTimeoutMs: 60_000 },
      timers,
    },
    new Uint8Array(0),
    responseBudget,
  );
  try {
    await client.write(hostileClientBytes());
    // Let the connection do all it will: answers are made at once, writes stop when the
    // kernel's buffers are full.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const limitAnswers = Math.ceil(budget.limit / BODY);
    // What the kernel took (a few MB on loopback) was written, and frees its budget; what
    // is left unsent stays within about twice the budget.
    assert.ok(budget.unsent <= 2 * budget.limit + BODY, `unsent ${budget.unsent}`);
    assert.ok(handled < STREAMS / 2, `${handled} of ${STREAMS} answers made`);
    assert.ok(handled >= Math.min(STREAMS, limitAnswers) / 2, `only ${handled} answers made`);
    // Requests waiting for the budget stop the reading of new streams: at most one waits.
    assert.ok(h2.openStreams <= handled + 1, `${h2.openStreams} streams open`);
  } finally {
    client.close();
    await h2.finished;
    listener.close();
    timers.close();
  }
  assert.equal(budget.unsent, 0, "everything queued was released with the connection");
  assert.equal(budget.inflight, 0);
});
