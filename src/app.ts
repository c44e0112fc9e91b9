/**
 * Builds the object graph from a {@linkcode Config} and starts the listeners: the one place
 * that knows how the parts fit together. `main.ts` and the integration tests both use it.
 *
 * @module
 */

import { formatHostPort } from "./address.ts";
import { type Config, type ListenAddress, tlsListeners } from "./config.ts";
import type { Logger } from "./log.ts";
import { Registry } from "./metrics.ts";
import { ProxyMetrics } from "./proxy_metrics.ts";
import { Admission } from "./resolver/admission.ts";
import { Resolver } from "./resolver.ts";
import { type EncryptedEndpoint, ResolverArpa } from "./dns/ddr.ts";
import { DohService, registerDohMetrics } from "./server/doh.ts";
import { DohListener } from "./server/doh_listener.ts";
import { HttpServer, type Readiness } from "./server/http.ts";
import { AnswerBudget } from "./server/answer_budget.ts";
import { StreamServer } from "./server/stream.ts";
import { DOT_ALPN, listenDot } from "./server/dot.ts";
import { UdpServer } from "./server/udp.ts";
import { type Clock, SYSTEM_CLOCK, TimerQueue } from "./timers.ts";
import {
  CertificateError,
  CertificateMonitor,
  loadServerCertificate,
  registerCertificateMetrics,
  type ServerCertificate,
} from "./tls/certificate.ts";
import { primeTls } from "./upstream/dot_connection.ts";
import { UpstreamPool } from "./upstream/pool.ts";
import type { Forwarder } from "./upstream/types.ts";

/** Raised when the proxy cannot start (address in use, permission denied). */
export class StartupError extends Error {
  /** Creates an error whose message is the one line shown to the user. */
  constructor(message: string) {
    super(message);
    this.name = "StartupError";
  }
}

/** Options for {@linkcode startProxy} beyond the configuration. */
export interface StartOptions {
  /** Use this forwarder instead of a pool of DoT upstreams (tests). */
  forwarder?: Forwarder;
  /** The clock (tests). */
  clock?: Clock;
}

/** How a running proxy shuts down. */
export interface DrainOptions {
  /** Keep answering this long after readiness turned 503 (endpoints being removed). */
  delayMs: number;
  /** Then give queries in flight this long to finish before closing what is left. */
  timeoutMs: number;
}

/** A running proxy. */
export interface RunningProxy {
  /** The UDP listeners, one per listen address. */
  readonly udp: UdpServer[];
  /** The TCP listeners, one per listen address. */
  readonly tcp: StreamServer[];
  /** The answer budget all stream (TCP, DoT) connections share. */
  readonly budget: AnswerBudget;
  /** The DoT listeners, one per `--listen-dot` address. */
  readonly dot: StreamServer[];
  /** The DoH listeners: `--listen-doh` (TLS) first, then `--listen-doh-plain`. */
  readonly doh: DohListener[];
  /** The HTTP endpoint, when configured. */
  readonly http: HttpServer | null;
  /** The upstream pool (null when a forwarder was injected). */
  readonly pool: UpstreamPool | null;
  /** The core. */
  readonly resolver: Resolver;
  /** The metrics. */
  readonly metrics: ProxyMetrics;
  /** True once draining started. */
  readonly draining: boolean;
  /** Decides readiness as `/readyz` does. */
  readiness(): Promise<Readiness>;
  /**
   * Graceful shutdown: readiness turns 503 at once; listeners keep answering for
   * `delayMs`; then they stop accepting, queries in flight get `timeoutMs` to finish, and
   * everything closes.
   */
  drain(options: DrainOptions): Promise<void>;
  /** Stops at once (drain with no delay and a short timeout). */
  close(): Promise<void>;
}

function describeBindError(error: unknown, address: ListenAddress, what: string): string {
  const shown = formatHostPort(address.hostname, address.port);
  if (error instanceof Deno.errors.AddrInUse) {
    return `cannot listen on ${shown} (${what}): address already in use`;
  }
  if (error instanceof Deno.errors.PermissionDenied || error instanceof Deno.errors.NotCapable) {
    return `cannot listen on ${shown} (${what}): permission denied` +
      (address.port < 1024 ? " (ports below 1024 need CAP_NET_BIND_SERVICE)" : "");
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return `cannot listen on ${shown} (${what}): address not available on this host`;
  }
  const message = error instanceof Error ? error.message : String(error);
  return `cannot listen on ${shown} (${what}): ${message}`;
}

/** How long `/readyz` waits for the first health checks at start before answering. */
const STARTUP_READY_WAIT_MS = 3000;

/**
 * Starts a proxy for `config`. Throws {@linkcode StartupError} when a listener cannot bind,
 * after closing whatever had started.
 *
 * @example
 * ```ts ignore
 * const proxy = await startProxy(config, log);
 * console.log(proxy.udp[0].addr.port);
 * await proxy.close();
 * ```
 */
export async function startProxy(
  config: Config,
  log: Logger,
  options: StartOptions = {},
): Promise<RunningProxy> {
  const udp: UdpServer[] = [];
  const tcp: StreamServer[] = [];
  // One answer budget for every stream connection of every listener.
  const budget = new AnswerBudget();
  const dot: StreamServer[] = [];
  const doh: DohListener[] = [];
  const clock = options.clock ?? SYSTEM_CLOCK;
  const timers = new TimerQueue(clock);
  let pool: UpstreamPool | null = null;
  let resolver: Resolver | null = null;
  const metrics = new ProxyMetrics(new Registry(), {
    tcpConnections: () => tcp.reduce((sum, server) => sum + server.openConnections, 0),
    clientConnections: () => [
      { transport: "tcp", open: tcp.reduce((sum, server) => sum + server.openConnections, 0) },
      { transport: "dot", open: dot.reduce((sum, server) => sum + server.openConnections, 0) },
      { transport: "doh", open: doh.reduce((sum, server) => sum + server.openConnections, 0) },
    ],
    upstreams: () =>
      pool?.upstreams.map((u) => ({
        label: u.spec.label,
        healthy: u.usable,
        inflight: u.outstanding,
        connections: u.connections.length,
      })) ?? [],
    cacheEntries: () => resolver?.cache?.size ?? 0,
    queriesInflight: () => resolver?.inflight ?? 0,
  });
  // The certificate every TLS listener serves (config.ts checked it already; a config built
  // by hand in a test has not been).
  const tlsNeeded = tlsListeners(config);
  let certificate: ServerCertificate | null = null;
  if (tlsNeeded.length > 0) {
    try {
      certificate = loadServerCertificate(config.tlsCert, config.tlsKey);
    } catch (error) {
      if (error instanceof CertificateError) throw new StartupError(error.message);
      throw error;
    }
  }
  registerCertificateMetrics(metrics.registry, certificate);
  const dohStats = registerDohMetrics(metrics.registry);
  // resolver.arpa is answered locally (RFC 9462); the records follow the listeners' ports,
  // known once they are bound.
  let resolverArpa = new ResolverArpa(null, []);
  let certificateMonitor: CertificateMonitor | null = null;
  if (!options.forwarder) {
    await primeTls();
    pool = new UpstreamPool({
      upstreams: config.upstreams,
      caCerts: config.caCerts,
      connectionsPerUpstream: config.upstreamConnections,
      idleTimeoutMs: config.upstreamIdleTimeoutMs,
      connectTimeoutMs: config.connectTimeoutMs,
      hedgeDelay: config.hedgeDelay,
      hedgeBudgetPercent: config.hedgeBudgetPercent,
      healthCheckIntervalMs: config.healthCheckIntervalMs,
      failoverRcodes: config.failoverRcodes,
      strategy: config.strategy,
      nudge: config.upstreamNudge,
      padding: config.padding,
      log,
      stats: metrics.upstream,
      clock,
    }, timers);
  }
  const forwarder: Forwarder = options.forwarder ?? pool!;
  resolver = new Resolver(forwarder, {
    udpMaxSize: config.udpMaxSize,
    maxInflight: config.maxInflight,
    timeoutMs: config.timeoutMs,
    logQueries: config.logQueries,
    log,
    stats: metrics.resolver,
    cache: {
      maxEntries: config.cacheSize,
      minTtl: config.cacheMinTtl,
      maxTtl: config.cacheMaxTtl,
      maxNegativeTtl: config.cacheMaxNegativeTtl,
      serveStaleSeconds: config.serveStaleSeconds,
      prefetch: config.cachePrefetch,
      staleAnswerTimeoutMs: config.staleAnswerTimeoutMs,
    },
    cacheStats: metrics.cache,
    admission: new Admission({
      allow: config.allow,
      rateLimit: config.rateLimit,
      rateLimitBurst: config.rateLimitBurst,
      clock,
    }),
    refuseAny: config.refuseAny,
    padding: config.padding,
    streamIdleTimeoutMs: config.tcpIdleTimeoutMs,
    local: { answer: (query, info) => resolverArpa.answer(query, info) },
    clock,
    timers,
  });
  const core = resolver;

  let draining = false;
  const startedAt = clock.now();
  const readiness = async (): Promise<Readiness> => {
    if (draining) return { ready: false, reason: "shutting down" };
    if (pool === null) return { ready: true, reason: "forwarder injected" };
    for (let round = 0; round < 2; round++) {
      const up = pool.upstreams.find((u) => u.health.state === "up");
      if (up) {
        const how = up.health.lastAnswerWasProbe ? "answered a probe" : "answered";
        return { ready: true, reason: `${up.spec.label} ${how}` };
      }
      const unknown = pool.upstreams.some((u) => u.health.state === "unknown");
      const waited = clock.now() - startedAt;
      if (!unknown || waited >= STARTUP_READY_WAIT_MS || round > 0) break;
      // Just started: the first health checks are on their way.
      await pool.healthChange(STARTUP_READY_WAIT_MS - waited);
      if (draining) return { ready: false, reason: "shutting down" };
    }
    const reasons = pool.upstreams.map((u) => {
      const why = u.health.lastError?.message ??
        (u.health.state === "unknown" ? "not checked yet" : "down");
      // Most upstream errors name the upstream already.
      return why.includes(u.spec.label) ? why : `${u.spec.label}: ${why}`;
    });
    return { ready: false, reason: `no upstream answers: ${reasons.join("; ")}` };
  };

  let http: HttpServer | null = null;
  let closed: Promise<void> | null = null;
  const closeAll = (timeoutMs: number): Promise<void> => {
    closed ??= (async () => {
      await Promise.all(
        [...udp, ...tcp, ...dot, ...doh].map((server) => server.close(timeoutMs)),
      );
      await http?.close();
      await forwarder.close();
      certificateMonitor?.close();
      core.close();
      timers.close();
    })();
    return closed;
  };
  const drain = async ({ delayMs, timeoutMs }: DrainOptions): Promise<void> => {
    draining = true;
    if (delayMs > 0 && closed === null) {
      log.info("draining: readiness is 503; still answering", { delay_ms: delayMs });
      await new Promise((resolve) => setTimeout(resolve, delayMs));
    }
    await closeAll(timeoutMs);
  };
  try {
    const streamContext = { resolver: core, log, budget, stats: metrics.tcp };
    const dotContext = { ...streamContext, stats: metrics.dot };
    const tcpOptions = {
      maxConnections: config.maxTcpConnections,
      maxConnectionsPerClient: config.maxTcpConnectionsPerClient,
      maxQueriesPerConnection: config.maxTcpQueriesPerConnection,
      idleTimeoutMs: config.tcpIdleTimeoutMs,
    };

    for (const address of config.listen) {
      // Port 0 asks for any free port; UDP and TCP must share it, so retry until both bind.
      for (let attempt = 0;; attempt++) {
        let udpServer: UdpServer;
        try {
          udpServer = UdpServer.listen(address, core, log);
        } catch (error) {
          throw new StartupError(describeBindError(error, address, "udp"));
        }
        const tcpAddress = { hostname: address.hostname, port: udpServer.addr.port };
        try {
          tcp.push(StreamServer.listenTcp(tcpAddress, streamContext, tcpOptions));
          udp.push(udpServer);
          break;
        } catch (error) {
          await udpServer.close();
          const retry = address.port === 0 && error instanceof Deno.errors.AddrInUse &&
            attempt < 20;
          if (!retry) throw new StartupError(describeBindError(error, tcpAddress, "tcp"));
        }
      }
    }
    const service = new DohService({
      resolver: core,
      path: config.dohPath,
      trustedProxies: config.trustedProxies,
      cache: {
        minTtl: config.cacheMinTtl,
        maxTtl: config.cacheMaxTtl,
        maxNegativeTtl: config.cacheMaxNegativeTtl,
      },
      log,
      stats: dohStats,
    });
    const dohOptions = {
      maxConnections: config.maxTcpConnections,
      maxConnectionsPerClient: config.maxTcpConnectionsPerClient,
      limits: { idleTimeoutMs: config.tcpIdleTimeoutMs },
      timers,
      stats: metrics.doh,
    };
    for (const address of config.listenDot) {
      try {
        dot.push(listenDot(address, dotContext, tcpOptions, certificate!));
      } catch (error) {
        throw new StartupError(describeBindError(error, address, "dot"));
      }
    }
    for (
      const [addresses, tls] of [[config.listenDoh, certificate], [
        config.listenDohPlain,
        null,
      ]] as const
    ) {
      for (const address of addresses) {
        try {
          doh.push(DohListener.listen(address, service, log, { ...dohOptions, tls }));
        } catch (error) {
          throw new StartupError(describeBindError(error, address, tls ? "doh" : "doh-plain"));
        }
      }
    }
    if (config.http) {
      const address = config.http;
      try {
        http = HttpServer.listen(address, {
          metrics: () => metrics.registry.render(),
          readiness,
        }, log);
      } catch (error) {
        throw new StartupError(describeBindError(error, address, "http"));
      }
    }
  } catch (error) {
    // Close what started; the caller reports the error.
    await closeAll(1000).catch(() => {});
    throw error;
  }

  const encrypted: EncryptedEndpoint[] = [
    ...dot.map((listener) => ({
      alpn: [DOT_ALPN],
      port: listener.addr.port,
      address: listener.addr.hostname,
    })),
    ...doh.filter((listener) => listener.tls).map((listener) => ({
      alpn: ["h2", "http/1.1"],
      port: listener.addr.port,
      dohpath: `${config.dohPath}{?dns}`,
      address: listener.addr.hostname,
    })),
  ];
  if (certificate !== null) {
    const bound = [
      ...dot.map((listener) => `dot ${formatHostPort(listener.addr.hostname, listener.addr.port)}`),
      ...doh.filter((listener) => listener.tls).map((listener) =>
        `doh ${formatHostPort(listener.addr.hostname, listener.addr.port)}`
      ),
    ];
    certificateMonitor = new CertificateMonitor({ certificate, listeners: bound, log, timers });
    const target = certificate.dnsNames[0] ?? null;
    if (config.ddr && target === null && encrypted.length > 0) {
      log.warn("ddr off: the certificate has no DNS name to give clients as the target", {
        names: certificate.names.join(","),
      });
    }
    resolverArpa = new ResolverArpa(target, encrypted, config.ddr);
  }
  pool?.start();
  return {
    udp,
    tcp,
    budget,
    dot,
    doh,
    get http() {
      return http;
    },
    pool,
    resolver: core,
    metrics,
    get draining() {
      return draining;
    },
    readiness,
    drain,
    close: () => {
      draining = true;
      return closeAll(2000);
    },
  };
}
