/**
 * Scenario (issue 21): a client that pipelines many queries on one TCP connection and then
 * reads gets every answer, however large, against a real Unbound upstream. 1,000 queries, a
 * sixth of them for 54 kB TXT RRsets, the rest small answers, NXDOMAIN and wildcard-like
 * (redirect zone) answers, some with DO; written in one write or one write per query, then
 * read; over IPv4 and IPv6; with the defaults and with `--max-tcp-queries 5`.
 *
 * Before the fix the proxy closed such a connection once 128 KiB of answers were queued for
 * it: 3 to 41 of 1,000 answers arrived.
 *
 * Needs unbound (skips, saying so, without it).
 *
 * @module
 */

import assert from "node:assert/strict";
import { lengthFramed, parseMessage } from "./support/dns.ts";
import { QUERIES, queryFor, startPipeliningUpstream } from "./support/pipelining.ts";
import { TcpDnsClient, testConfig, withProxy } from "./support/proxy.ts";
import { UnboundUpstream } from "./support/unbound.ts";

const HAS_UNBOUND = await UnboundUpstream.available();

/** Pipelines the 1,000 queries, then reads; returns how many answers were right. */
async function pipeline(
  hostname: string,
  port: number,
  oneWrite: boolean,
): Promise<{ answered: number; big: number; failures: string[] }> {
  const client = await TcpDnsClient.connect(port, hostname);
  const expected = Array.from({ length: QUERIES }, (_, i) => queryFor(i));
  const failures: string[] = [];
  let answered = 0;
  let big = 0;
  try {
    if (oneWrite) {
      const frames = expected.map((e) => lengthFramed(e.query));
      const all = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
      frames.reduce((at, f) => (all.set(f, at), at + f.length), 0);
      await client.writeRaw(all);
    } else {
      for (const e of expected) await client.send(e.query);
    }
    const seen = new Set<number>();
    for (let n = 0; n < QUERIES; n++) {
      const reply = await client.receive(10_000);
      if (reply === null) {
        failures.push(`connection closed after ${n} answers`);
        break;
      }
      const message = parseMessage(reply);
      const want = expected[message.id];
      if (seen.has(message.id)) failures.push(`answer ${message.id} twice`);
      seen.add(message.id);
      if (message.rcode !== want.rcode) {
        failures.push(`answer ${message.id}: rcode ${message.rcode}`);
      } else if (want.big && reply.length < 50_000) {
        failures.push(`answer ${message.id}: ${reply.length} octets`);
      } else {
        answered++;
        if (want.big) big++;
      }
    }
  } catch (error) {
    failures.push(String(error));
  } finally {
    client.close();
  }
  return { answered, big, failures };
}

for (const hostname of ["127.0.0.1", "::1"]) {
  for (const maxTcpQueries of [128, 5]) {
    Deno.test({
      name: `tcp pipelining: 1,000 queries (a sixth for 54 kB answers) over ${hostname}, ` +
        `--max-tcp-queries ${maxTcpQueries}, one write and one write per query: all answered`,
      ignore: !HAS_UNBOUND,
      fn: async () => {
        const unbound = await startPipeliningUpstream();
        try {
          const config = testConfig([unbound.upstream()], {
            listen: [{ hostname, port: 0 }],
            maxTcpQueriesPerConnection: maxTcpQueries,
            timeoutMs: 4000,
          });
          await withProxy(config, async ({ port }) => {
            for (const oneWrite of [true, false]) {
              const result = await pipeline(hostname, port, oneWrite);
              const how = oneWrite ? "one write" : "one write per query";
              assert.deepEqual(result.failures.slice(0, 5), [], how);
              assert.equal(result.answered, QUERIES, how);
              assert.equal(result.big, Math.ceil(QUERIES / 6), how);
            }
          });
        } finally {
          await unbound.close();
        }
      },
    });
  }
}
