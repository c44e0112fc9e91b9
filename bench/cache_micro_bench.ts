/**
 * Micro-benchmarks of the answer cache's hot path, in process, with the real metrics hooks:
 * `deno bench --allow-env bench/cache_micro_bench.ts`. What a cache hit costs in JavaScript,
 * apart from the UDP receive and send (bench/cache_bench.sh measures those end to end).
 */
import { AnswerCache } from "../src/cache/answer_cache.ts";
import { cacheKeyHash } from "../src/dns/cache_key.ts";
import { defaultConfig } from "../src/config.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { Logger } from "../src/log.ts";
import { Registry } from "../src/metrics.ts";
import { ProxyMetrics } from "../src/proxy_metrics.ts";
import { Resolver, type ResponseSink } from "../src/resolver.ts";
import { Admission } from "../src/resolver/admission.ts";
import { SYSTEM_CLOCK } from "../src/timers.ts";
import type { Forwarder, UpstreamRequest } from "../src/upstream/forwarder.ts";
import { TEST_CACHE } from "../tests/support/cache.ts";
import { answerFor, buildQuery } from "../tests/support/dns.ts";

const config = defaultConfig();
/** Answers at once with one A record: the question, then `name A 192.0.2.1`, then an OPT. */
function quickAnswer(query: Uint8Array, questionEnd: number): Uint8Array {
  const out = new Uint8Array(questionEnd + 16 + 11);
  out.set(query.subarray(0, questionEnd));
  out[2] |= 0x80;
  out[3] = 0x80;
  out[7] = 1; // ANCOUNT
  out[9] = 0;
  out[11] = 1; // ARCOUNT: the OPT
  out.set([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1], questionEnd);
  out.set([0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0], questionEnd + 16);
  return out;
}

const forwarder: Forwarder = {
  forward(request: UpstreamRequest) {
    request.settleAnswer(quickAnswer(request.query, request.questionEnd), "bench", null);
  },
  close() {},
};

function makeResolver(cacheSize: number): Resolver {
  const metrics = new ProxyMetrics(new Registry(), {
    tcpConnections: () => 0,
    upstreams: () => [],
    cacheEntries: () => 0,
    cacheBytes: () => 0,
    queriesInflight: () => 0,
  });
  return new Resolver(forwarder, {
    udpMaxSize: 1232,
    maxInflight: 10_000,
    timeoutMs: 4000,
    logQueries: false,
    log: new Logger({ level: "error", sink: () => {} }),
    stats: metrics.resolver,
    cache: { ...TEST_CACHE, maxEntries: cacheSize },
    cacheStats: metrics.cache,
    // The defaults: --allow loopback and private ranges, --rate-limit as shipped.
    admission: new Admission({
      allow: config.allow,
      rateLimit: config.rateLimit,
      rateLimitBurst: config.rateLimitBurst,
      clock: SYSTEM_CLOCK,
    }),
  });
}

const CLIENT: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port: 40000 };
let delivered = 0;
const sink: ResponseSink = {
  deliver(response) {
    if (response !== null) delivered += response.length;
  },
};

const names = Array.from({ length: 1000 }, (_, i) => `n${i}.bench.test`);
const plain = names.map((name, i) => buildQuery(name, { id: i }));
const edns = names.map((name, i) => buildQuery(name, { id: i, ednsUdpSize: 1232 }));

const cached = makeResolver(10_000);
for (const query of plain) cached.resolveWith(query, "udp", CLIENT, sink);
const uncached = makeResolver(0);

let i = 0;
Deno.bench("resolveWith: cache hit, client without EDNS (dnsperf)", {
  group: "hit",
  baseline: true,
}, () => {
  cached.resolveWith(plain[i++ % 1000], "udp", CLIENT, sink);
});

Deno.bench("resolveWith: cache hit, EDNS client", { group: "hit" }, () => {
  cached.resolveWith(edns[i++ % 1000], "udp", CLIENT, sink);
});

// Misses: unique names, answered at once by the fake upstream.
const unique = Array.from({ length: 100_000 }, (_, n) => buildQuery(`u${n}.miss.test`, { id: n }));
let u = 0;
Deno.bench("resolveWith: miss, cache on (lookup, flight, store, render)", {
  group: "miss",
  baseline: true,
}, () => {
  cached.resolveWith(unique[u++ % unique.length], "udp", CLIENT, sink);
});

Deno.bench("resolveWith: miss, --cache-size 0", { group: "miss" }, () => {
  uncached.resolveWith(unique[u++ % unique.length], "udp", CLIENT, sink);
});

// The cache alone.
const cache = new AnswerCache({
  maxEntries: 10_000,
  minTtl: 0,
  maxTtl: 86_400,
  maxNegativeTtl: 3600,
  serveStaleSeconds: 86_400,
});
const info = new ResponseInfo();
for (const query of edns) {
  const answer = answerFor(query);
  analyzeResponse(answer, info);
  cache.store(query, info.questionEnd, 9, answer, info, 0);
}
const end = edns[0].length - 11;

Deno.bench("cacheKeyHash", { group: "cache" }, () => {
  cacheKeyHash(edns[i++ % 1000], end, 9);
});

Deno.bench("AnswerCache.lookup", { group: "cache" }, () => {
  cache.lookup(edns[i++ % 1000], edns[i % 1000].length - 11, 9, 1000);
});

const entry = cache.lookup(edns[5], edns[5].length - 11, 9, 0)!;
Deno.bench("AnswerCache.render (aged TTLs, OPT kept)", { group: "cache" }, () => {
  cache.render(entry, edns[5], 5000, false, true);
});

Deno.bench("AnswerCache.render (aged TTLs, OPT removed)", { group: "cache" }, () => {
  cache.render(entry, edns[5], 5000, false, false);
});

Deno.bench("new Uint8Array(60) + set (for comparison)", { group: "cache" }, () => {
  new Uint8Array(60).set(edns[5]);
});

globalThis.addEventListener("unload", () => {
  if (delivered === 0) console.error("nothing delivered?");
});
