/**
 * The proxy's metric families, bound to the statistics hooks of the resolver, the
 * listeners and the upstream layer. Later parts add their own families to the same
 * {@linkcode Registry} in a line or two.
 *
 * @module
 */

import { Counter, Gauge, Histogram, Registry } from "./metrics.ts";
import { rcodeName } from "./dns/wire.ts";
import type { DropReason, ResolverStats, Transport } from "./resolver.ts";
import type { TcpStats } from "./server/tcp.ts";
import {
  UPSTREAM_ERROR_REASONS,
  type UpstreamErrorReason,
  type UpstreamStats,
} from "./upstream/types.ts";
import { VERSION } from "./version.ts";

/** Live state the metrics read at scrape time. */
export interface ProxyState {
  /** Open TCP client connections. */
  tcpConnections(): number;
  /** Per upstream: label, healthy, queries in flight, open connections. */
  upstreams(): { label: string; healthy: boolean; inflight: number; connections: number }[];
}

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
  /** `dotproxy_queries_total{transport,rcode}`. */
  readonly queries: Counter;
  /** `dotproxy_query_duration_seconds{transport}`. */
  readonly queryDuration: Histogram;
  /** `dotproxy_dropped_total{transport,reason}`. */
  readonly dropped: Counter;
  /** `dotproxy_udp_truncated_total`. */
  readonly truncated: Counter;
  /** `dotproxy_upstream_queries_total{upstream}`. */
  readonly upstreamQueries: Counter;
  /** `dotproxy_upstream_query_duration_seconds{upstream}`. */
  readonly upstreamDuration: Histogram;
  /** `dotproxy_upstream_errors_total{upstream,reason}`. */
  readonly upstreamErrors: Counter;
  /** `dotproxy_upstream_tls_handshakes_total{upstream,result}`. */
  readonly handshakes: Counter;
  /** `dotproxy_upstream_reconnects_total{upstream}`. */
  readonly reconnects: Counter;
  /** `dotproxy_tcp_connections_total`. */
  readonly tcpAccepted: Counter;
  /** `dotproxy_tcp_connections_rejected_total`. */
  readonly tcpRejected: Counter;
  /** `dotproxy_tcp_connections_open`, computed at scrape time. */
  readonly tcpOpen: Gauge;
  /** `dotproxy_upstream_healthy{upstream}`, computed at scrape time. */
  readonly upstreamHealthy: Gauge;
  /** `dotproxy_upstream_inflight{upstream}`, computed at scrape time. */
  readonly upstreamInflight: Gauge;
  /** `dotproxy_upstream_connections{upstream}`, computed at scrape time. */
  readonly upstreamConnections: Gauge;

  /** Hooks for the resolver. */
  readonly resolver: ResolverStats;
  /** Hooks for the TCP listener. */
  readonly tcp: TcpStats;

  /** Registers every family in `registry`. */
  constructor(registry: Registry, state: ProxyState, startTimeSeconds = Date.now() / 1000) {
    this.registry = registry;
    this.queries = registry.counter(
      "dotproxy_queries_total",
      "Responses sent to clients, by client transport and response code.",
      ["transport", "rcode"],
    );
    this.queryDuration = registry.histogram(
      "dotproxy_query_duration_seconds",
      "Time from receiving a query to having its response, as the client sees it.",
      ["transport"],
    );
    this.dropped = registry.counter(
      "dotproxy_dropped_total",
      "Client messages dropped without a response (malformed: header unreadable or bad TCP " +
        "frame; response: QR=1 from a client; overload: too many queries in flight).",
      ["transport", "reason"],
    );
    this.truncated = registry.counter(
      "dotproxy_udp_truncated_total",
      "UDP answers truncated (TC=1) because they exceeded the client's size.",
    );
    this.upstreamQueries = registry.counter(
      "dotproxy_upstream_answers_total",
      "Answers received from each upstream.",
      ["upstream"],
    );
    this.upstreamDuration = registry.histogram(
      "dotproxy_upstream_query_duration_seconds",
      "Time from writing a query to an upstream to reading its answer.",
      ["upstream"],
    );
    this.upstreamErrors = registry.counter(
      "dotproxy_upstream_errors_total",
      "Upstream failures by reason (timeout, tls, refused, reset, bad_response, unavailable).",
      ["upstream", "reason"],
    );
    this.handshakes = registry.counter(
      "dotproxy_upstream_tls_handshakes_total",
      "Connection attempts to upstreams (TCP connect plus TLS handshake), by result (ok, error).",
      ["upstream", "result"],
    );
    this.reconnects = registry.counter(
      "dotproxy_upstream_reconnects_total",
      "Connections reopened because an upstream closed or broke one with queries in flight.",
      ["upstream"],
    );
    this.upstreamHealthy = registry.gauge(
      "dotproxy_upstream_healthy",
      "0 when the last connection to the upstream failed (refused, TLS error, stalled) and none " +
        "has succeeded since; 1 otherwise.",
      ["upstream"],
      (set) => {
        for (const u of state.upstreams()) set(u.healthy ? 1 : 0, u.label);
      },
    );
    this.upstreamInflight = registry.gauge(
      "dotproxy_upstream_inflight",
      "Queries written to the upstream and not yet answered.",
      ["upstream"],
      (set) => {
        for (const u of state.upstreams()) set(u.inflight, u.label);
      },
    );
    this.upstreamConnections = registry.gauge(
      "dotproxy_upstream_connections",
      "Open or opening TLS connections to the upstream.",
      ["upstream"],
      (set) => {
        for (const u of state.upstreams()) set(u.connections, u.label);
      },
    );
    this.tcpAccepted = registry.counter(
      "dotproxy_tcp_connections_total",
      "TCP client connections accepted.",
    );
    this.tcpRejected = registry.counter(
      "dotproxy_tcp_connections_rejected_total",
      "TCP client connections closed on accept at the connection limit.",
    );
    this.tcpOpen = registry.gauge(
      "dotproxy_tcp_connections_open",
      "TCP client connections open now.",
      [],
      (set) => set(state.tcpConnections()),
    );
    registry.gauge(
      "dotproxy_process_start_time_seconds",
      "Start time of the process since the Unix epoch, in seconds.",
    ).set(startTimeSeconds);
    registry.gauge(
      "dotproxy_build_info",
      "Always 1; labels carry the dotproxy and Deno versions.",
      ["version", "deno"],
    ).labels(VERSION, Deno.version.deno).set(1);

    for (const transport of ["udp", "tcp"] as const) {
      for (const rcode of [0, 1, 2, 3, 4, 5]) this.queries.labels(transport, rcodeName(rcode));
      this.queryDuration.labels(transport);
      for (const reason of ["malformed", "response", "overload"]) {
        this.dropped.labels(transport, reason);
      }
    }

    const queryChildren = {
      udp: [] as ReturnType<Counter["labels"]>[],
      tcp: [] as ReturnType<Counter["labels"]>[],
    };
    const durations = {
      udp: this.queryDuration.labels("udp"),
      tcp: this.queryDuration.labels("tcp"),
    };
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
    };
    this.tcp = {
      accepted: () => this.tcpAccepted.inc(),
      rejected: () => this.tcpRejected.inc(),
      malformed: () => this.dropped.labels("tcp", "malformed").inc(),
    };
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
    };
  };
}
