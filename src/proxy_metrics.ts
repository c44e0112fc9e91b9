/**
 * The proxy's metric families, bound to the statistics hooks of the resolver, the
 * listeners and the upstream layer. Later parts add their own families to the same
 * {@linkcode Registry} in a line or two.
 *
 * @module
 */

import process from "node:process";
import { type Collect, Counter, Gauge, Histogram, Registry } from "./metrics.ts";
import { rcodeName } from "./dns/wire.ts";
import type { CacheStats } from "./cache/answer_cache.ts";
import type { DropReason, RefusedReason, ResolverStats, Transport } from "./resolver.ts";
import type { StreamStats } from "./server/stream.ts";
import type { DohListenerStats } from "./server/doh_listener.ts";
import { TRANSPORT_NAMES } from "./resolver/job.ts";
import type { RouterStats } from "./upstream/router.ts";
import { UPSTREAM_ERROR_REASONS, type UpstreamErrorReason } from "./upstream/errors.ts";
import { RETRY_REASONS, type RetryReason, type UpstreamStats } from "./upstream/stats.ts";
import { VERSION } from "./version.ts";

/** Live state the metrics read at scrape time. */
export interface ProxyState {
  /** Open TCP client connections. */
  tcpConnections(): number;
  /**
   * Open client connections by transport (`tcp`, `dot`, ...); a transport with no listener
   * may be left out.
   */
  clientConnections?(): { transport: string; open: number }[];
  /** Per upstream: label, healthy, queries in flight, open connections. */
  upstreams(): { label: string; healthy: boolean; inflight: number; connections: number }[];
  /** Entries in the answer cache (0 with the cache off). */
  cacheEntries(): number;
  /** Bytes of memory the answer cache holds (0 with the cache off). */
  cacheBytes(): number;
  /** Client queries waiting for an upstream answer. */
  queriesInflight(): number;
}

/** What {@linkcode ProxyState.upstreams} says of one upstream. */
type UpstreamState = ReturnType<ProxyState["upstreams"]>[number];

/**
 * One family: its kind, name, help text and label names, and for a gauge computed at scrape
 * time, how it reads the proxy's state.
 */
type FamilyRow =
  | readonly [kind: "counter" | "histogram", name: string, help: string, labels: readonly string[]]
  | readonly [
    kind: "gauge",
    name: string,
    help: string,
    labels: readonly string[],
    collect?: (state: ProxyState) => Collect,
  ];

/** A gauge with one series per upstream: `value` of what the state says of it. */
function perUpstream(value: (upstream: UpstreamState) => number): (state: ProxyState) => Collect {
  return (state) => (set) => {
    for (const u of state.upstreams()) set(value(u), u.label);
  };
}

/**
 * Every family, by the {@linkcode ProxyMetrics} field that holds it, in the order of the
 * exposition.
 */
const FAMILIES = {
  queries: [
    "counter",
    "dotproxy_queries_total",
    "Responses sent to clients, by client transport and response code.",
    ["transport", "rcode"],
  ],
  queryDuration: [
    "histogram",
    "dotproxy_query_duration_seconds",
    "Time from receiving a query to having its response, as the client sees it.",
    ["transport"],
  ],
  dropped: [
    "counter",
    "dotproxy_dropped_total",
    "Client messages dropped without a response (malformed: header unreadable or bad TCP " +
    "frame; response: QR=1 from a client; overload: too many queries in flight; " +
    "rate_limit: over --rate-limit).",
    ["transport", "reason"],
  ],
  queriesInflight: [
    "gauge",
    "dotproxy_queries_inflight",
    "Client queries waiting for an upstream answer now (each of a coalesced question's " +
    "clients counts). At --max-inflight new UDP queries are dropped (reason overload) and TCP " +
    "connections are not read until it falls.",
    [],
    (state) => (set) => set(state.queriesInflight()),
  ],
  truncated: [
    "counter",
    "dotproxy_udp_truncated_total",
    "UDP answers truncated (TC=1) because they exceeded the client's size.",
    [],
  ],
  upstreamQueries: [
    "counter",
    "dotproxy_upstream_answers_total",
    "Answers received from each upstream.",
    ["upstream"],
  ],
  upstreamDuration: [
    "histogram",
    "dotproxy_upstream_query_duration_seconds",
    "Time from writing a query to an upstream to reading its answer.",
    ["upstream"],
  ],
  upstreamErrors: [
    "counter",
    "dotproxy_upstream_errors_total",
    "Upstream failures by reason (timeout, tls, refused, unreachable, reset, bad_response, " +
    "unavailable).",
    ["upstream", "reason"],
  ],
  handshakes: [
    "counter",
    "dotproxy_upstream_tls_handshakes_total",
    "Connection attempts to upstreams (TCP connect plus TLS handshake), by result (ok, error).",
    ["upstream", "result"],
  ],
  reconnects: [
    "counter",
    "dotproxy_upstream_reconnects_total",
    "Connections reopened because an upstream closed or broke one with queries in flight.",
    ["upstream"],
  ],
  upstreamHealthy: [
    "gauge",
    "dotproxy_upstream_healthy",
    "1 while the upstream answers (or has not failed yet); 0 while it is down: a connection " +
    "failed, stopped answering or kept breaking, and no query or health check has been " +
    "answered since.",
    ["upstream"],
    perUpstream((u) => u.healthy ? 1 : 0),
  ],
  upstreamInflight: [
    "gauge",
    "dotproxy_upstream_inflight",
    "Queries written to the upstream and not yet answered.",
    ["upstream"],
    perUpstream((u) => u.inflight),
  ],
  upstreamConnections: [
    "gauge",
    "dotproxy_upstream_connections",
    "Open or opening TLS connections to the upstream.",
    ["upstream"],
    perUpstream((u) => u.connections),
  ],
  hedges: [
    "counter",
    "dotproxy_upstream_hedges_total",
    "Hedged attempts (the question also sent to this upstream because the first was slow), " +
    "by result: won (answered first) or lost.",
    ["upstream", "result"],
  ],
  retries: [
    "counter",
    "dotproxy_upstream_retries_total",
    "Questions also sent to another upstream because an attempt on this one failed (reason: " +
    "the error), was slow (slow), answered with an rcode in --failover-rcodes (rcode), or " +
    "answered with TC=1 (truncated).",
    ["upstream", "reason"],
  ],
  healthChecks: [
    "counter",
    "dotproxy_upstream_health_checks_total",
    "Health checks (. IN NS over the upstream's own TLS connection; ZONE IN SOA for a plain-DNS " +
    "zone target), by result (ok, error).",
    ["upstream", "result"],
  ],
  refused: [
    "counter",
    "dotproxy_refused_total",
    "Queries answered REFUSED by policy: acl (client not in --allow), rate_limit (over " +
    "--rate-limit, TCP).",
    ["reason"],
  ],
  slips: [
    "counter",
    "dotproxy_rate_limit_slips_total",
    "Rate-limited UDP queries answered with an empty TC=1 response (every second one).",
    [],
  ],
  cacheLookups: [
    "counter",
    "dotproxy_cache_lookups_total",
    "Answers by how the cache took part: hit (fresh entry), miss (asked upstream), stale " +
    "(expired entry served, RFC 8767), coalesced (joined an identical question in flight).",
    ["result"],
  ],
  cachePrefetches: [
    "counter",
    "dotproxy_cache_prefetches_total",
    "Background refreshes of popular entries in the last tenth of their TTL.",
    [],
  ],
  cacheEvictions: [
    "counter",
    "dotproxy_cache_evictions_total",
    "Entries evicted (least recently used first) to stay within --cache-size and " +
    "--cache-max-bytes.",
    [],
  ],
  cacheEntries: [
    "gauge",
    "dotproxy_cache_entries",
    "Entries in the answer cache.",
    [],
    (state) => (set) => set(state.cacheEntries()),
  ],
  routed: [
    "counter",
    "dotproxy_routed_total",
    "Questions sent on by route: the zone as configured (--zone), default (--upstream) or " +
    "special-use (answered here, --special-use-names). Cache hits are not routed.",
    ["route"],
  ],
  cacheBytes: [
    "gauge",
    "dotproxy_cache_bytes",
    "Bytes of memory the answer cache holds for answers (256 KiB chunks, at most " +
    "--cache-max-bytes).",
    [],
    (state) => (set) => set(state.cacheBytes()),
  ],
  tcpAccepted: [
    "counter",
    "dotproxy_tcp_connections_total",
    "TCP client connections accepted.",
    [],
  ],
  tcpRejected: [
    "counter",
    "dotproxy_tcp_connections_rejected_total",
    "TCP client connections closed on accept at the connection limit.",
    [],
  ],
  tcpOpen: [
    "gauge",
    "dotproxy_tcp_connections_open",
    "TCP client connections open now.",
    [],
    (state) => (set) => set(state.tcpConnections()),
  ],
  clientConnections: [
    "gauge",
    "dotproxy_client_connections",
    "Client connections open now, by transport (tcp, dot, doh), TLS handshakes included.",
    ["transport"],
    (state) => (set) => {
      for (const c of state.clientConnections?.() ?? []) set(c.open, c.transport);
    },
  ],
  tlsHandshakes: [
    "counter",
    "dotproxy_tls_handshakes_total",
    "TLS handshakes with clients, by listener transport (dot, doh) and result: ok, failed (not " +
    "TLS, no shared protocol or ALPN, a bad certificate) or timeout.",
    ["transport", "result"],
  ],
} as const satisfies Record<string, FamilyRow>;

/** The families of {@linkcode FAMILIES}, by field. */
type Families = {
  readonly [F in keyof typeof FAMILIES]: {
    counter: Counter;
    histogram: Histogram;
    gauge: Gauge;
  }[(typeof FAMILIES)[F][0]];
};

/**
 * The fields of {@linkcode ProxyMetrics} that hold a family (each must be in
 * {@linkcode FAMILIES}).
 */
type FamilyField = {
  [K in keyof ProxyMetrics]: ProxyMetrics[K] extends Counter | Gauge | Histogram ? K : never;
}[keyof ProxyMetrics];

/** Registers every family of {@linkcode FAMILIES} in `registry`, in order. */
function registerFamilies(registry: Registry, state: ProxyState): Families {
  const families: Record<string, Counter | Histogram | Gauge> = {};
  for (const [field, row] of Object.entries(FAMILIES) as [string, FamilyRow][]) {
    const [kind, name, help, labels] = row;
    families[field] = kind === "counter"
      ? registry.counter(name, help, labels)
      : kind === "histogram"
      ? registry.histogram(name, help, labels)
      : registry.gauge(name, help, labels, row[4]?.(state));
  }
  return families as Families;
}

const DROP_REASONS: readonly DropReason[] = ["malformed", "response", "overload", "rate_limit"];
const REFUSED_REASONS: readonly RefusedReason[] = ["acl", "rate_limit"];
const CACHE_RESULTS = ["hit", "miss", "stale", "coalesced"] as const;

/**
 * All of dotproxy's metrics.
 *
 * @example
 * ```ts ignore
 * const metrics = new ProxyMetrics(new Registry(), state);
 * const resolver = new Resolver(pool, { ...options, stats: metrics.resolver });
 * metrics.registry.render();
 * ```
 */
export class ProxyMetrics {
  /** The registry the families live in. */
  readonly registry: Registry;
  // The families are assigned from FAMILIES, the one list of them, by the constructor;
  // `declare` makes each field a type only, checked against that table.
  /** `dotproxy_queries_total{transport,rcode}`. */
  declare readonly queries: Counter;
  /** `dotproxy_query_duration_seconds{transport}`. */
  declare readonly queryDuration: Histogram;
  /** `dotproxy_dropped_total{transport,reason}`. */
  declare readonly dropped: Counter;
  /** `dotproxy_queries_inflight`, computed at scrape time. */
  declare readonly queriesInflight: Gauge;
  /** `dotproxy_udp_truncated_total`. */
  declare readonly truncated: Counter;
  /** `dotproxy_upstream_answers_total{upstream}`. */
  declare readonly upstreamQueries: Counter;
  /** `dotproxy_routed_total{route}`. */
  declare readonly routed: Counter;
  /** `dotproxy_upstream_query_duration_seconds{upstream}`. */
  declare readonly upstreamDuration: Histogram;
  /** `dotproxy_upstream_errors_total{upstream,reason}`. */
  declare readonly upstreamErrors: Counter;
  /** `dotproxy_upstream_tls_handshakes_total{upstream,result}`. */
  declare readonly handshakes: Counter;
  /** `dotproxy_upstream_reconnects_total{upstream}`. */
  declare readonly reconnects: Counter;
  /** `dotproxy_tcp_connections_total`. */
  declare readonly tcpAccepted: Counter;
  /** `dotproxy_tcp_connections_rejected_total`. */
  declare readonly tcpRejected: Counter;
  /** `dotproxy_tcp_connections_open`, computed at scrape time. */
  declare readonly tcpOpen: Gauge;
  /** `dotproxy_client_connections{transport}`, computed at scrape time. */
  declare readonly clientConnections: Gauge;
  /** `dotproxy_tls_handshakes_total{transport,result}`. */
  declare readonly tlsHandshakes: Counter;
  /** `dotproxy_upstream_healthy{upstream}`, computed at scrape time. */
  declare readonly upstreamHealthy: Gauge;
  /** `dotproxy_upstream_inflight{upstream}`, computed at scrape time. */
  declare readonly upstreamInflight: Gauge;
  /** `dotproxy_upstream_connections{upstream}`, computed at scrape time. */
  declare readonly upstreamConnections: Gauge;
  /** `dotproxy_upstream_hedges_total{upstream,result}`. */
  declare readonly hedges: Counter;
  /** `dotproxy_upstream_retries_total{upstream,reason}`. */
  declare readonly retries: Counter;
  /** `dotproxy_upstream_health_checks_total{upstream,result}`. */
  declare readonly healthChecks: Counter;
  /** `dotproxy_refused_total{reason}`. */
  declare readonly refused: Counter;
  /** `dotproxy_rate_limit_slips_total`. */
  declare readonly slips: Counter;
  /** `dotproxy_cache_lookups_total{result}`. */
  declare readonly cacheLookups: Counter;
  /** `dotproxy_cache_prefetches_total`. */
  declare readonly cachePrefetches: Counter;
  /** `dotproxy_cache_evictions_total`. */
  declare readonly cacheEvictions: Counter;
  /** `dotproxy_cache_entries`, computed at scrape time. */
  declare readonly cacheEntries: Gauge;
  /** `dotproxy_cache_bytes`, computed at scrape time. */
  declare readonly cacheBytes: Gauge;

  /** Hooks for the resolver. */
  readonly resolver: ResolverStats;
  /** Hooks for the TCP listener. */
  readonly tcp: StreamStats;
  /** Hooks for the DoT listener. */
  readonly dot: StreamStats;
  /** Hooks for the DoH listeners (their TLS handshakes). */
  readonly doh: DohListenerStats;
  /** Hooks for the answer cache. */
  readonly cache: CacheStats;
  /** Hooks for the router. */
  readonly router: RouterStats;

  /** Registers every family in `registry`. */
  constructor(registry: Registry, state: ProxyState, startTimeSeconds = Date.now() / 1000) {
    this.registry = registry;
    const families: Pick<ProxyMetrics, FamilyField | keyof Families> = registerFamilies(
      registry,
      state,
    );
    Object.assign(this, families);
    registry.gauge(
      "dotproxy_process_start_time_seconds",
      "Start time of the process since the Unix epoch, in seconds.",
    ).set(startTimeSeconds);
    registry.gauge(
      "dotproxy_build_info",
      "Always 1; labels carry the dotproxy and Deno versions.",
      ["version", "deno"],
    ).labels(VERSION, Deno.version.deno).set(1);
    // The standard process families (the names every Prometheus client library exports), so
    // that dashboards and alerts written for any exporter work; read at scrape time, with no
    // permission beyond what the proxy runs with.
    registry.counter(
      "process_cpu_seconds_total",
      "User and system CPU time the process has used, in seconds.",
      [],
      (set) => {
        const used = process.cpuUsage();
        set((used.user + used.system) / 1e6);
      },
    );
    registry.gauge(
      "process_resident_memory_bytes",
      "Resident memory of the process, in bytes.",
      [],
      (set) => set(Deno.memoryUsage().rss),
    );
    registry.gauge(
      "process_start_time_seconds",
      "Start time of the process since the Unix epoch, in seconds.",
    ).set(startTimeSeconds);
    registry.gauge(
      "dotproxy_heap_used_bytes",
      "JavaScript heap in use (V8), in bytes.",
      [],
      (set) => set(Deno.memoryUsage().heapUsed),
    );

    for (const transport of TRANSPORT_NAMES) {
      for (const rcode of [0, 1, 2, 3, 4, 5]) this.queries.labels(transport, rcodeName(rcode));
      this.queryDuration.labels(transport);
      for (const reason of DROP_REASONS) this.dropped.labels(transport, reason);
    }
    for (const reason of REFUSED_REASONS) this.refused.labels(reason);
    const lookups = CACHE_RESULTS.map((result) => this.cacheLookups.labels(result));

    const queryChildren = Object.fromEntries(
      TRANSPORT_NAMES.map((t) => [t, [] as ReturnType<Counter["labels"]>[]]),
    ) as Record<Transport, ReturnType<Counter["labels"]>[]>;
    const durations = Object.fromEntries(
      TRANSPORT_NAMES.map((t) => [t, this.queryDuration.labels(t)]),
    ) as Record<Transport, ReturnType<Histogram["labels"]>>;
    this.resolver = {
      query: (transport: Transport, rcode: number, seconds: number) => {
        const children = queryChildren[transport];
        (children[rcode] ??= this.queries.labels(transport, rcodeName(rcode))).inc();
        durations[transport].observe(seconds);
      },
      dropped: (transport: Transport, reason: DropReason) => {
        this.dropped.labels(transport, reason).inc();
      },
      truncated: () => this.truncated.inc(),
      refused: (reason: RefusedReason) => this.refused.labels(reason).inc(),
      slipped: () => this.slips.inc(),
      cacheLookup: (result) => lookups[CACHE_RESULTS.indexOf(result)].inc(),
      prefetched: () => this.cachePrefetches.inc(),
    };
    this.cache = { evicted: () => this.cacheEvictions.inc() };
    const routes = new Map<string, ReturnType<Counter["labels"]>>();
    this.router = {
      routed: (route: string) => {
        let child = routes.get(route);
        if (child === undefined) {
          child = this.routed.labels(route);
          routes.set(route, child);
        }
        child.inc();
      },
    };
    this.tcp = {
      accepted: () => this.tcpAccepted.inc(),
      rejected: () => this.tcpRejected.inc(),
      malformed: () => this.dropped.labels("tcp", "malformed").inc(),
    };
    const dotHandshakes = {
      ok: this.tlsHandshakes.labels("dot", "ok"),
      failed: this.tlsHandshakes.labels("dot", "failed"),
      timeout: this.tlsHandshakes.labels("dot", "timeout"),
    };
    this.dot = {
      accepted: () => {},
      rejected: () => {},
      malformed: () => this.dropped.labels("dot", "malformed").inc(),
      handshake: (result) => dotHandshakes[result].inc(),
    };
    const dohHandshakes = {
      ok: this.tlsHandshakes.labels("doh", "ok"),
      failed: this.tlsHandshakes.labels("doh", "failed"),
      timeout: this.tlsHandshakes.labels("doh", "timeout"),
    };
    this.doh = { handshake: (result) => dohHandshakes[result].inc(), rejected: () => {} };
  }

  /** Creates the hooks of one upstream (the {@linkcode UpstreamStatsFactory}). */
  readonly upstream = (label: string): UpstreamStats => {
    const answers = this.upstreamQueries.labels(label);
    const duration = this.upstreamDuration.labels(label);
    const errors = new Map<UpstreamErrorReason, ReturnType<Counter["labels"]>>();
    for (const reason of UPSTREAM_ERROR_REASONS) {
      errors.set(reason, this.upstreamErrors.labels(label, reason));
    }
    const handshakeOk = this.handshakes.labels(label, "ok");
    const handshakeError = this.handshakes.labels(label, "error");
    const reconnects = this.reconnects.labels(label);
    const hedgeWon = this.hedges.labels(label, "won");
    const hedgeLost = this.hedges.labels(label, "lost");
    const retries = new Map<RetryReason, ReturnType<Counter["labels"]>>();
    for (const reason of RETRY_REASONS) retries.set(reason, this.retries.labels(label, reason));
    const checkOk = this.healthChecks.labels(label, "ok");
    const checkError = this.healthChecks.labels(label, "error");
    return {
      answered(seconds: number) {
        answers.inc();
        duration.observe(seconds);
      },
      error(reason: UpstreamErrorReason) {
        errors.get(reason)?.inc();
      },
      handshake(ok: boolean) {
        (ok ? handshakeOk : handshakeError).inc();
      },
      reconnect() {
        reconnects.inc();
      },
      hedge(won: boolean) {
        (won ? hedgeWon : hedgeLost).inc();
      },
      retry(reason: RetryReason) {
        retries.get(reason)?.inc();
      },
      healthCheck(ok: boolean) {
        (ok ? checkOk : checkError).inc();
      },
    };
  };
}
