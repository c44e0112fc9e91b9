/**
 * Scenario (issue 21, every stream listener): the heaviest legitimate client (1,000 queries
 * on one connection, a sixth of them for 54 kB answers, read at a normal pace) gets 1,000 of
 * 1,000 answers over DoT (`--listen-dot`) and over DoH with HTTP/2 (`--listen-doh`: curl
 * multiplexing 1,000 GETs over one connection, as many streams at once as the stream cap
 * allows and the rest queued by the client), against a real Unbound upstream. The TCP case is
 * tests/tcp_pipelining_test.ts.
 *
 * Needs unbound, and curl for the DoH case (each skips, saying so, without them).
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { base64Url, hasTool, named } from "./support/doh.ts";
import {
  pipelineFramed,
  QUERIES,
  queryFor,
  startPipeliningUpstream,
  Tally,
} from "./support/pipelining.ts";
import { testConfig, withProxy } from "./support/proxy.ts";
import { UnboundUpstream } from "./support/unbound.ts";

const HAS_UNBOUND = await UnboundUpstream.available();
const HAS_CURL = await hasTool("curl");

Deno.test({
  name: named(
    "dot pipelining: 1,000 queries (a sixth for 54 kB answers) on one DoT connection, " +
      "one write and one write per query, read as they come: all answered",
    HAS_UNBOUND,
    "unbound",
  ),
  ignore: !HAS_UNBOUND,
  fn: async () => {
    const unbound = await startPipeliningUpstream();
    try {
      const config = testConfig([unbound.upstream()], {
        listenDot: [{ hostname: "127.0.0.1", port: 0 }],
        tlsCert: SERVER_PEM,
        tlsKey: SERVER_KEY,
        timeoutMs: 4000,
      });
      await withProxy(config, async ({ proxy }) => {
        const port = proxy.dot[0].addr.port;
        for (const oneWrite of [true, false]) {
          const conn = await Deno.connectTls({
            hostname: "127.0.0.1",
            port,
            caCerts: [CA_PEM],
            alpnProtocols: ["dot"],
          });
          let tally: Tally;
          try {
            tally = await pipelineFramed(conn, oneWrite);
          } finally {
            conn.close();
          }
          const how = oneWrite ? "one write" : "one write per query";
          assert.deepEqual(tally.failures.slice(0, 5), [], how);
          assert.equal(tally.answered, QUERIES, how);
          assert.equal(tally.big, Math.ceil(QUERIES / 6), how);
        }
      });
    } finally {
      await unbound.close();
    }
  },
});

Deno.test({
  name: named(
    named(
      "doh pipelining: 1,000 GETs (a sixth for 54 kB answers) multiplexed on one HTTP/2 " +
        "connection (curl --parallel, streams up to the cap): all answered",
      HAS_UNBOUND,
      "unbound",
    ),
    HAS_CURL,
    "curl",
  ),
  ignore: !HAS_UNBOUND || !HAS_CURL,
  fn: async () => {
    const unbound = await startPipeliningUpstream();
    const dir = await Deno.makeTempDir({ prefix: "dotproxy-doh-pipelining-" });
    try {
      const config = testConfig([unbound.upstream()], {
        listenDoh: [{ hostname: "127.0.0.1", port: 0 }],
        tlsCert: SERVER_PEM,
        tlsKey: SERVER_KEY,
        timeoutMs: 4000,
      });
      await Deno.writeTextFile(`${dir}/ca.pem`, CA_PEM);
      await withProxy(config, async ({ proxy }) => {
        const port = proxy.doh[0].addr.port;
        const lines: string[] = [];
        for (let i = 0; i < QUERIES; i++) {
          lines.push(
            `url = "https://127.0.0.1:${port}/dns-query?dns=${base64Url(queryFor(i).query)}"`,
          );
          lines.push(`output = "${dir}/${i}.bin"`);
        }
        await Deno.writeTextFile(`${dir}/urls.conf`, lines.join("\n") + "\n");
        const out = await new Deno.Command("curl", {
          args: [
            "--silent",
            "--http2",
            "--cacert",
            `${dir}/ca.pem`,
            "--parallel",
            // The stream cap (SETTINGS_MAX_CONCURRENT_STREAMS, 100): curl queues the rest. Past
            // it, curl opens more connections instead.
            "--parallel-max",
            "100",
            "--max-time",
            "60",
            "--write-out",
            "%{http_code} %{num_connects} %{http_version}\\n",
            "--config",
            `${dir}/urls.conf`,
          ],
          stdout: "piped",
          stderr: "piped",
        }).output();
        const results = new TextDecoder().decode(out.stdout).trim().split("\n");
        const ok = results.filter((line) => line.startsWith("200 ")).length;
        const connects = results.reduce((n, line) => n + Number(line.split(" ")[1] ?? 0), 0);
        const tally = new Tally();
        for (let i = 0; i < QUERIES; i++) {
          let body: Uint8Array;
          try {
            body = await Deno.readFile(`${dir}/${i}.bin`);
          } catch {
            tally.failures.push(`no answer ${i}`);
            continue;
          }
          tally.check(body, i);
        }
        assert.deepEqual(tally.failures.slice(0, 5), [], new TextDecoder().decode(out.stderr));
        assert.equal(ok, QUERIES, "HTTP 200 responses");
        assert.equal(tally.answered, QUERIES);
        assert.equal(tally.big, Math.ceil(QUERIES / 6));
        assert.ok(results.every((line) => line.endsWith(" 2")), "all over HTTP/2");
        assert.equal(connects, 1, "one connection");
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
      await unbound.close();
    }
  },
});
