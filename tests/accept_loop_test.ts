import assert from "node:assert/strict";
import { Logger } from "../src/log.ts";
import {
  AcceptLoop,
  isConnectionGone,
  isDescriptorExhaustion,
  type Served,
} from "../src/net/accept_loop.ts";
import { sleep } from "./support/wait.ts";

Deno.test("accept loop: isDescriptorExhaustion knows EMFILE and ENFILE, nothing else", () => {
  assert.ok(isDescriptorExhaustion(new Error("Too many open files (os error 24)")));
  assert.ok(isDescriptorExhaustion(new Error("Too many open files in system (os error 23)")));
  assert.ok(isDescriptorExhaustion(Object.assign(new Error("x"), { code: "EMFILE" })));
  assert.ok(isDescriptorExhaustion(Object.assign(new Error("x"), { code: "ENFILE" })));
  assert.ok(!isDescriptorExhaustion(new Error("Software caused connection abort (os error 103)")));
  assert.ok(!isDescriptorExhaustion(new Error("Connection reset by peer (os error 104)")));
  assert.ok(!isDescriptorExhaustion(new Error("x (os error 240)")));
  assert.ok(!isDescriptorExhaustion("Too many open files"));
  assert.ok(isConnectionGone(new Error("Software caused connection abort (os error 103)")));
  assert.ok(!isConnectionGone(new Error("Too many open files (os error 24)")));
});

/** A connection served by doing nothing until aborted; `idle` as the test sets it. */
class Held implements Served {
  readonly finished: Promise<void>;
  idle = false;
  readonly lastActive: number;
  #done: () => void = () => {};
  constructor(readonly conn: Deno.Conn, lastActive: number) {
    this.lastActive = lastActive;
    this.finished = new Promise((resolve) => this.#done = resolve);
  }
  abort(): void {
    try {
      this.conn.close();
    } catch {
      // Already closed.
    }
    this.#done();
  }
}

/** True when the peer closed `conn` within `ms`. */
async function closedByPeer(conn: Deno.Conn, ms: number): Promise<boolean> {
  const timer = setTimeout(() => conn.close(), ms);
  try {
    return (await conn.read(new Uint8Array(16))) === null;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("accept loop: caps in all and per client; the longest-idle connection makes room", async () => {
  const served: Held[] = [];
  let clock = 0;
  const loop = new AcceptLoop(Deno.listen({ hostname: "127.0.0.1", port: 0 }), {
    name: "test",
    maxConnections: 4,
    maxConnectionsPerClient: 2,
    log: new Logger({ level: "error" }),
    serve: (conn) => {
      const held = new Held(conn, clock++);
      served.push(held);
      return held;
    },
  });
  const port = (loop.addr as Deno.NetAddr).port;
  const clients: Deno.Conn[] = [];
  try {
    const connect = async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      clients.push(conn);
      return conn;
    };
    await connect();
    await connect();
    for (let i = 0; i < 100 && served.length < 2; i++) await sleep(5);
    // At the per-client cap with nothing idle: the new connection is closed.
    assert.equal(await closedByPeer(await connect(), 2000), true);
    assert.equal(loop.open, 2);
    // One idle: it goes (the older of two idle ones), the new one stays.
    served[0].idle = true;
    served[1].idle = true;
    const third = await connect();
    for (let i = 0; i < 100 && served.length < 3; i++) await sleep(5);
    assert.equal(await closedByPeer(clients[0], 2000), true, "the longest-idle one closed");
    assert.equal(served.length, 3);
    assert.equal(loop.open, 2);
    third.close();
  } finally {
    await loop.close();
    for (const held of served) held.abort();
    for (const conn of clients) {
      try {
        conn.close();
      } catch {
        // Closed already.
      }
    }
  }
});
