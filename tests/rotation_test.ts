/**
 * Scenario (issue 25): certificate rotation without a failed query. A second dotproxy with
 * the same addresses starts while the first serves (SO_REUSEPORT on the TCP-based listeners,
 * SO_REUSEADDR on UDP); the first, sent SIGTERM, drains. Clients ask over DoT, TCP and UDP
 * throughout, as real clients do: a stream client whose connection closes with a query
 * unanswered asks again on a new connection (RFC 7766 section 6.2.1), a UDP client asks again
 * after a second. None fails.
 *
 * Also measured and printed: which process answered UDP during the overlap (on Linux the
 * socket bound last receives every datagram, so the new process takes UDP at once).
 *
 * Needs `--allow-run` (it runs `deno run main.ts` twice).
 *
 * @module
 */

import assert from "node:assert/strict";
import { buildQuery, parseMessage } from "./support/dns.ts";
import { DotServer } from "./support/dot_server.ts";
import { freeStablePort } from "./support/fault_upstream.ts";

import { TcpDnsClient, udpExchange } from "./support/proxy.ts";
import { keepAsking, type RotationProxy, startRotationProxy } from "./support/rotation.ts";
import { sleep, until } from "./support/wait.ts";

/** Query lines (`--log-queries`) of `transport` in `stderr` logged at or after `since`. */
function answered(stderr: string, transport: string, since: number): number {
  let n = 0;
  for (const line of stderr.split("\n")) {
    if (!line.includes('"msg":"query"') || !line.includes(`"transport":"${transport}"`)) continue;
    const time = Date.parse(JSON.parse(line).time);
    if (time >= since) n++;
  }
  return n;
}

/** A stream client that asks one query at a time, reconnecting once when a query is lost. */
class StreamAsker {
  #client: TcpDnsClient | null = null;
  #id = 0;
  reconnects = 0;
  failures: string[] = [];
  asked = 0;

  constructor(readonly connect: () => Promise<TcpDnsClient>, readonly name: string) {}

  async ask(): Promise<void> {
    const id = this.#id = (this.#id + 1) & 0xffff;
    const query = buildQuery(`${this.name}${id}.rotation.test`, { id });
    this.asked++;
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        this.#client ??= await this.connect();
        await this.#client.send(query);
        const reply = await this.#client.receive(3000);
        if (reply !== null && parseMessage(reply).id === id) return;
      } catch {
        // Closed under the query: ask again on a new connection.
      }
      this.#client?.close();
      this.#client = null;
      this.reconnects++;
    }
    this.failures.push(`${this.name} query ${id}`);
  }

  close(): void {
    this.#client?.close();
  }
}

Deno.test({
  name: "rotation: a new process takes over DoT, TCP and UDP while the old drains; no query fails",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const upstream = DotServer.start();
    const dns = freeStablePort();
    const dot = freeStablePort();
    const http = freeStablePort();
    const args = [
      "--listen",
      `127.0.0.1:${dns}`,
      "--listen-dot",
      `127.0.0.1:${dot}`,
      "--http",
      `127.0.0.1:${http}`,
      "--upstream",
      upstream.upstream(),
      "--cache-size",
      "0",
      "--log-format",
      "json",
      "--log-queries",
      "--shutdown-delay",
      "1000",
    ];
    const old = startRotationProxy(args);
    let fresh: RotationProxy | null = null;
    const tcp = new StreamAsker(() => TcpDnsClient.connect(dns), "tcp");
    const tls = new StreamAsker(() => TcpDnsClient.connectTls(dot), "dot");
    let udpAsked = 0;
    const udpFailures: string[] = [];
    let running = true;
    const loops: Promise<void>[] = [];
    try {
      assert.ok(
        await until(() => old.stderr().includes("dotproxy started"), 15_000),
        old.stderr(),
      );
      for (const asker of [tcp, tls]) {
        loops.push(keepAsking(asker, () => running));
      }
      loops.push((async () => {
        for (let id = 1; running; id++) {
          udpAsked++;
          const query = buildQuery(`udp${id}.rotation.test`, { id: id & 0xffff });
          let reply: Uint8Array | null = null;
          for (let attempt = 0; attempt < 3 && reply === null; attempt++) {
            reply = await udpExchange(dns, query, 1000);
          }
          if (reply === null) udpFailures.push(`udp query ${id}`);
          await sleep(5);
        }
      })());
      await sleep(500);
      // The hand-over: the new process binds the same addresses, then the old one drains.
      const overlapStart = Date.now();
      fresh = startRotationProxy(args);
      assert.ok(
        await until(() => fresh!.stderr().includes("dotproxy started"), 15_000),
        fresh.stderr(),
      );
      await sleep(500);
      const termAt = Date.now();
      const code = await old.stop("SIGTERM");
      assert.equal(code, 0, old.stderr().slice(-2000));
      await sleep(700);
      running = false;
      await Promise.all(loops);
      const oldUdp = answered(old.stderr(), "udp", overlapStart);
      const freshUdp = answered(fresh.stderr(), "udp", overlapStart);
      const oldStream = answered(old.stderr(), "tcp", overlapStart) +
        answered(old.stderr(), "dot", overlapStart);
      const freshStream = answered(fresh.stderr(), "tcp", termAt) +
        answered(fresh.stderr(), "dot", termAt);
      console.log(
        `rotation: asked ${udpAsked} over UDP, ${tcp.asked} over TCP, ${tls.asked} over DoT; ` +
          `reconnects TCP ${tcp.reconnects}, DoT ${tls.reconnects}; from the new process's ` +
          `start, UDP answered by old ${oldUdp}, by new ${freshUdp}; stream queries after the ` +
          `SIGTERM answered by new ${freshStream} (by old since the new started: ${oldStream})`,
      );
      assert.deepEqual([...udpFailures, ...tcp.failures, ...tls.failures], []);
      assert.ok(freshUdp > 0 && freshStream > 0, "the new process took over");
      assert.ok(tcp.asked > 20 && tls.asked > 20 && udpAsked > 20);
    } finally {
      running = false;
      await Promise.all(loops);
      tcp.close();
      tls.close();
      if (!old.exited()) await old.stop("SIGKILL");
      if (fresh !== null) await fresh.stop("SIGTERM");
      await upstream.close();
    }
  },
});
