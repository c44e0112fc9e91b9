/**
 * Seeded fuzzing, a fixed amount per run (a few seconds): hostile packets through every
 * wire-format function the proxy applies, then through its UDP and TCP listeners with a real
 * DoT upstream that answers some questions with fuzzed answers. The seed is printed; set
 * `FUZZ_SEED` to replay a run. `deno task fuzz` runs the same for longer.
 */
import assert from "node:assert/strict";
import {
  checkParsers,
  checkQuery,
  checkResponse,
  fromHex,
  hex,
  Rng,
  seedFromEnv,
} from "./support/fuzz.ts";
import { fuzzListeners } from "./support/fuzz_listeners.ts";
import { QueryVerdict } from "../src/dns/query.ts";
import { buildQuery } from "./support/dns.ts";

/** `query` (whose OPT is its last record and has no options) with an unknown option added. */
function withOption(query: Uint8Array, size: number): Uint8Array {
  const out = new Uint8Array(query.length + 4 + size);
  out.set(query);
  out[query.length - 2] = (4 + size) >> 8;
  out[query.length - 1] = (4 + size) & 0xff;
  out.set([0xfd, 0xe9, size >> 8, size & 0xff], query.length);
  return out;
}

const SEED = seedFromEnv();
console.log(`fuzz: FUZZ_SEED=${SEED}`);

Deno.test("fuzz: parsers hold their properties on 4,000 hostile queries and answers", () => {
  const tally = checkParsers(new Rng(SEED), 4000);
  assert.equal(tally.messages, 4000);
  // The generator reaches every verdict and makes valid answers too.
  for (const verdict of ["FORWARD", "DROP", "FORMERR", "NOTIMP", "NOTAUTH"]) {
    assert.ok((tally.verdicts[verdict] ?? 0) > 0, `no ${verdict} in ${JSON.stringify(tally)}`);
  }
  assert.ok(tally.validResponses > 100, `valid answers: ${tally.validResponses}`);
});

Deno.test("fuzz: packets found by fuzzing stay answered locally", () => {
  // Each of these was forwarded once; now each gets its local answer (or the drop).
  const www = "0001010000010000000000000377777700";
  const cases: [Uint8Array, QueryVerdict][] = [
    // A query over 512 octets upstream: Unbound with harden-large-queries closes the
    // connection on it (found by sending fuzzed queries to Unbound).
    [withOption(buildQuery("www.example", { ednsUdpSize: 1232 }), 600), QueryVerdict.FORMERR],
    // TC=1, a meta type, QTYPE 0, NOTIFY: through Unbound's error rate limit, which past
    // 100 a second drops one and so closes the connection.
    [fromHex("000103000001000000000000037777770000010001"), QueryVerdict.FORMERR],
    [fromHex(www + "00c80001"), QueryVerdict.NOTIMP],
    [fromHex(www + "00000001"), QueryVerdict.FORMERR],
    [fromHex("000121000001000000000000037777770000010001"), QueryVerdict.NOTIMP],
  ];
  for (const [query, verdict] of cases) assert.equal(checkQuery(query), verdict, hex(query));
  // An answer without a question but with records: valid as a message, never an answer.
  const qd0 = fromHex("000181830000000100000000017800000100010000003c000406060606");
  assert.equal(checkResponse(qd0, fromHex("000101000001000000000000037777770000010001")), true);
});

Deno.test("fuzz: UDP and TCP listeners survive hostile packets and keep answering", async () => {
  const tally = await fuzzListeners(new Rng(SEED ^ 0x5bd1e995), {
    batches: 6,
    udpPerBatch: 150,
    tcpPerBatch: 60,
  });
  assert.equal(tally.checks, 12);
  assert.ok(tally.replies > 0, "the proxy answered some hostile packets");
});
