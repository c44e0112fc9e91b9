/**
 * Certificate rotation over DoH without a failed query: a second dotproxy starts on the same
 * addresses (SO_REUSEPORT) while the first serves; the first, sent SIGTERM, drains (HTTP/2:
 * GOAWAY; HTTP/1.1: a request already on its way is still answered, with `connection:
 * close`). Clients ask over DoH throughout (plain HTTP/1.1 keep-alive and HTTP/2 over TLS),
 * as real clients do: a request whose connection closed before any answer is sent again on
 * a new connection. None fails. The same scenario for DoT, TCP and UDP is
 * tests/rotation_test.ts.
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import { buildQuery, parseMessage } from "./support/dns.ts";
import { base64Url } from "./support/doh.ts";
import { DotServer } from "./support/dot_server.ts";
import { freeStablePort } from "./support/fault_upstream.ts";

import { keepAsking, type RotationProxy, startRotationProxy } from "./support/rotation.ts";
import { sleep, until } from "./support/wait.ts";

/** DoH queries by `fetch`, one at a time, each sent again (at most twice) if it was lost. */
class DohAsker {
  asked = 0;
  retries = 0;
  failures: string[] = [];
  #id = 0;

  constructor(
    readonly url: string,
    readonly name: string,
    readonly client: Deno.HttpClient,
  ) {}

  async ask(): Promise<void> {
    const id = this.#id = (this.#id + 1) & 0xffff;
    const query = buildQuery(`${this.name}${id}.rotation.test`, { id });
    this.asked++;
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const response = await fetch(`${this.url}?dns=${base64Url(query)}`, {
          client: this.client,
          signal: AbortSignal.timeout(3000),
        });
        const body = new Uint8Array(await response.arrayBuffer());
        if (response.status === 200 && parseMessage(body).id === id) return;
        this.failures.push(`${this.name} query ${id}: status ${response.status}`);
        return;
      } catch {
        // The connection closed before an answer: ask again.
        this.retries++;
      }
    }
    this.failures.push(`${this.name} query ${id}: no answer in 3 attempts`);
  }
}

Deno.test({
  name:
    "rotation: a new process takes over DoH (HTTP/1.1 and HTTP/2) while the old drains; no query fails",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const upstream = DotServer.start();
    const dns = freeStablePort();
    const doh = freeStablePort();
    const plain = freeStablePort();
    const args = [
      "--listen",
      `127.0.0.1:${dns}`,
      "--listen-doh",
      `127.0.0.1:${doh}`,
      "--listen-doh-plain",
      `127.0.0.1:${plain}`,
      "--upstream",
      upstream.upstream(),
      "--cache-size",
      "0",
      "--log-format",
      "json",
      "--shutdown-delay",
      "1000",
    ];
    const client = Deno.createHttpClient({ caCerts: [CA_PEM] });
    const askers = [
      new DohAsker(`http://127.0.0.1:${plain}/dns-query`, "h1", client),
      new DohAsker(`https://localhost:${doh}/dns-query`, "h2", client),
    ];
    const old = startRotationProxy(args);
    let fresh: RotationProxy | null = null;
    let running = true;
    const loops: Promise<void>[] = [];
    try {
      assert.ok(await until(() => old.stderr().includes("dotproxy started"), 15_000));
      for (const asker of askers) {
        loops.push(keepAsking(asker, () => running));
      }
      await sleep(500);
      fresh = startRotationProxy(args);
      assert.ok(await until(() => fresh!.stderr().includes("dotproxy started"), 15_000));
      await sleep(300);
      const asked = askers.map((a) => a.asked);
      assert.equal(await old.stop(), 0, old.stderr().slice(-2000));
      await sleep(700);
      running = false;
      await Promise.all(loops);
      console.log(
        `doh rotation: ${
          askers.map((a) => `${a.name} asked ${a.asked}, retried ${a.retries}`)
            .join("; ")
        }`,
      );
      assert.deepEqual(askers.flatMap((a) => a.failures), []);
      // Asked on after the old process was gone: the new one answered.
      askers.forEach((a, i) => assert.ok(a.asked > asked[i] + 5, `${a.name} kept asking`));
    } finally {
      running = false;
      await Promise.all(loops);
      client.close();
      await old.stop();
      await fresh?.stop();
      await upstream.close();
    }
  },
});
