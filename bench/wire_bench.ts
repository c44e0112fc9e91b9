/**
 * Micro-benchmarks of the wire-format hot path: `deno bench bench/wire_bench.ts`
 * (or `deno task bench`). Numbers go in bench/README.md.
 */
import { inspectQuery, QueryInfo } from "../src/dns/query.ts";
import { answersQuestion, truncateResponse } from "../src/dns/response.ts";
import { getRcode, setId } from "../src/dns/wire.ts";
import { answerFor, buildQuery } from "../tests/support/dns.ts";

const query = buildQuery("www.Example.com", { id: 0x1234, ednsUdpSize: 1232 });
const answer = answerFor(query);
const big = answerFor(buildQuery("big3000.example.com", { type: 16, ednsUdpSize: 1232 }));
const info = new QueryInfo();
inspectQuery(query, info);
const questionEnd = info.questionEnd;
const frame = new Uint8Array(4096);

Deno.bench("inspectQuery (header, question, OPT)", { group: "parse", baseline: true }, () => {
  inspectQuery(query, info);
});

Deno.bench("header only: rcode + id", { group: "parse" }, () => {
  getRcode(answer);
  setId(answer, 0x1234);
});

Deno.bench("answersQuestion (case-insensitive name compare)", () => {
  answersQuestion(answer, query, questionEnd);
});

Deno.bench("frame query with new ID (copy into write buffer)", () => {
  frame[0] = query.length >> 8;
  frame[1] = query.length & 0xff;
  frame.set(query, 2);
  frame[2] = 0xab;
  frame[3] = 0xcd;
});

Deno.bench("copy answer out of read buffer (slice)", () => {
  answer.slice(0, answer.length);
});

Deno.bench("truncateResponse 3 kB answer to 1232", () => {
  truncateResponse(big, 1232);
});

Deno.bench("truncateResponse no-op (fits)", () => {
  truncateResponse(answer, 1232);
});
