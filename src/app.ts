/**
 * Builds the object graph from a {@linkcode Config} and starts the listeners: the one place
 * that knows how the parts fit together. `main.ts` and the integration tests both use it.
 *
 * @module
 */

import { formatHostPort } from "./address.ts";
import {
  type Config,
  type ListenAddress,
  parseIpAddress,
  tlsListeners,
  type UpstreamSpec,
  type ZoneRoute,
} from "./config.ts";
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
import { primeTls } from "./upstream/tls_dial.ts";
import { VERSION } from "./version.ts";
import type { Forwarder } from "./upstream/forwarder.ts";
import { PlainConnection } from "./upstream/plain_connection.ts";
import { StreamConnection } from "./upstream/stream_connection.ts";
import { type PoolOptions, UpstreamPool } from "./upstream/pool.ts";
import { type Route, Router } from "./upstream/router.ts";
import { SpecialUseNames } from "./upstream/special_use.ts";
import {
  CertificateError,
  CertificateMonitor,
  loadServerCertificate,
  registerCertificateMetrics,
  type ServerCertificate,
} from "./tls/certificate.ts";

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
  /** The pools of the zones' targets (`--zone`), one per distinct list of targets. */
  readonly zonePools: readonly UpstreamPool[];
  /** Hands each question to the route of its zone. */
  readonly router: Router;
  /** The core. */
  readonly resolver: Resolver;
  /** The metrics. */
  readonly metrics: ProxyMetrics;
  /** True once draining started. */
  readonly draining: boolean;
  /**
   * Decides readiness as `/readyz` does: ready while the listeners serve, not ready once
   * draining. Upstream health does not enter into it (see {@linkcode upstreamHealth}).
   */
  readiness(): Promise<Readiness>;
  /** Whether an upstream answers, as `/healthz/upstreams` says (for alerting). */
  upstreamHealth(): Promise<Readiness>;
  /**
   * Graceful shutdown: readiness turns 503 at once; listeners keep answering for
   * `delayMs`; then they stop accepting, queries in flight get `timeoutMs` to finish, and
   * everything closes.
   */
  drain(options: DrainOptions): Promise<void>;
  /** Stops at once (drain with no delay and a short timeout). */
  close(): Promise<void>;
}

/** A listen address bound before `address` that takes its port: a wildcard of either family. */
function coveringListener(address: ListenAddress, before: readonly ListenAddress[]) {
  const v6 = address.hostname.includes(":");
  return before.find((other) =>
    other.port === address.port && address.port !== 0 &&
    // `::` takes the port for IPv4 too (dual-stack sockets, Linux's default), `0.0.0.0` for
    // every IPv4 address; and a specific address bound first blocks the wildcard after it.
    (other.hostname === "::" || (other.hostname === "0.0.0.0" && !v6) ||
      address.hostname === "::" ||
      (address.hostname === "0.0.0.0" && !other.hostname.includes(":")))
  );
}

function describeBindError(
  error: unknown,
  address: ListenAddress,
  what: string,
  before: readonly ListenAddress[] = [],
): string {
  const shown = formatHostPort(address.hostname, address.port);
  if (error instanceof Deno.errors.AddrInUse) {
    const other = coveringListener(address, before);
    if (other !== undefined) {
      const otherShown = formatHostPort(other.hostname, other.port);
      const dual = other.hostname === "::" || address.hostname === "::"
        ? " ([::] takes the port for IPv4 too, dual-stack)"
        : "";
      return `cannot listen on ${shown} (${what}): --listen ${otherShown} already takes this ` +
        `port${dual}; list only the wildcard address`;
    }
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

/**
 * The options of an upstream set over `upstreams` with the upstream settings of `config`
 * (connections, timeouts, hedging, retry, failover rcodes, strategy, health checks, nudge,
 * padding): the default set (`--upstream`) is built from it, and so can a route's, with its
 * own upstreams, `overrides` (`padding: false` and a `connect` for plain DNS, say) and the
 * same `shared` logger, statistics and clock.
 *
 * @example
 * ```ts ignore
 * const pool = new UpstreamPool(upstreamSetOptions(config, zoneTargets, shared, {
 *   padding: false,
 *   connect: plainDnsConnections,
 * }), timers);
 * ```
 */
export function upstreamSetOptions(
  config: Config,
  upstreams: UpstreamSpec[],
  shared: Pick<PoolOptions, "log" | "stats" | "clock">,
  overrides: Partial<PoolOptions> = {},
): PoolOptions {
  return {
    upstreams,
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
    ...shared,
    ...overrides,
  };
}

/**
 * Adds the routes of `zones` (`--zone`) to `router`: one upstream set, made by `newSet`, per
 * distinct list of targets (a zone's names go to its own targets only), `fallback` for the
 * zones routed to `default`. Returns the sets made and one line per route for the start log.
 */
function routeZones(
  zones: readonly ZoneRoute[],
  router: Router,
  fallback: Forwarder,
  newSet: (targets: UpstreamSpec[], probeZone: string) => UpstreamPool,
): { sets: UpstreamPool[]; lines: { route: string; targets: string }[] } {
  const byTargets = new Map<string, UpstreamPool>();
  const lines: { route: string; targets: string }[] = [];
  for (const entry of zones) {
    const key = entry.targets.map((target) => target.label).join(",");
    let forwarder: Forwarder = fallback;
    if (entry.targets.length > 0) {
      let set = byTargets.get(key);
      if (set === undefined) {
        set = newSet(entry.targets, entry.zones[0].name);
        byTargets.set(key, set);
      }
      forwarder = set;
    }
    const routes = new Map<string, Route>();
    for (const zone of entry.zones) {
      let route = routes.get(zone.route);
      if (route === undefined) {
        // A zone target's answers keep their TTLs; `default` is the --upstream set's route.
        route = { label: zone.route, forwarder, keepTtls: entry.targets.length > 0 };
        routes.set(zone.route, route);
        lines.push({ route: zone.route, targets: key === "" ? "default" : key });
      }
      router.addZone(zone.name, route);
    }
  }
  return { sets: [...byTargets.values()], lines };
}

/**
 * Warns when `address` is a wildcard (0.0.0.0, ::). A UDP reply from a socket bound to a
 * wildcard leaves from the address the kernel's route picks, not necessarily the one the
 * query was sent to, and a client drops a reply from another address (measured: a query to
 * 127.0.0.2 answered from 127.0.0.1, `dig` timed out). Servers bound to one address avoid
 * it with IP_PKTINFO; Deno's UDP socket offers no such option, nor (without --allow-sys) a
 * list of the host's addresses to bind each one. Harmless where the host (a pod, a
 * container on a bridge network) has one address per family besides loopback.
 */
function warnIfWildcard(address: ListenAddress, log: Logger): void {
  const bytes = parseIpAddress(address.hostname);
  if (bytes === null || bytes.some((b) => b !== 0)) return;
  log.warn(
    "listening for UDP on a wildcard address: a reply leaves from the address the route " +
      "picks, which clients drop when they asked another address of this host; list each " +
      "address clients use with --listen where the host has several",
    { listen: formatHostPort(address.hostname, address.port) },
  );
}

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
  const zonePools: UpstreamPool[] = [];
  let resolver: Resolver | null = null;
  const metrics = new ProxyMetrics(new Registry(), {
    tcpConnections: () => tcp.reduce((sum, server) => sum + server.openConnections, 0),
    upstreams: () => {
      // A target in two sets (or a zone target that is also an --upstream) is one series.
      const seen = new Set<string>();
      const sets = pool === null ? zonePools : [pool, ...zonePools];
      return sets.flatMap((set) => set.snapshot()).filter((u) =>
        !seen.has(u.label) && seen.add(u.label)
      );
    },
    clientConnections: () => [
      { transport: "tcp", open: tcp.reduce((sum, server) => sum + server.openConnections, 0) },
      { transport: "dot", open: dot.reduce((sum, server) => sum + server.openConnections, 0) },
      { transport: "doh", open: doh.reduce((sum, server) => sum + server.openConnections, 0) },
    ],
    cacheEntries: () => resolver?.cache?.size ?? 0,
    cacheBytes: () => resolver?.cache?.bytes ?? 0,
    queriesInflight: () => resolver?.inflight ?? 0,
  });
  const shared = { log, stats: metrics.upstream, clock };
  const needsTls = !options.forwarder ||
    config.zones.some((zone) => zone.targets.some((target) => !target.plain));
  if (needsTls) await primeTls();
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
    pool = new UpstreamPool(upstreamSetOptions(config, config.upstreams, shared), timers);
  }
  const fallback: Forwarder = options.forwarder ?? pool!;
  const special = config.specialUseNames ? new SpecialUseNames() : null;
  const router = new Router({ label: "default", forwarder: fallback, keepTtls: false }, special, {
    routed: (route) => metrics.router.routed(route),
  });
  // Logged once the listeners are up: a proxy that cannot start says only why.
  const routeLines: { route: string; targets: string }[] = [{
    route: "default",
    targets: pool?.upstreams.map((u) => u.spec.label).join(",") ?? "injected",
  }];
  const zoneRoutes = routeZones(
    config.zones,
    router,
    fallback,
    (targets, probeZone) =>
      new UpstreamPool(
        upstreamSetOptions(config, targets, shared, {
          // Padding hides nothing in clear text; a DoT target among them is padded.
          padding: config.padding && targets.some((target) => !target.plain),
          connect: (owner, context) =>
            context.spec.plain
              ? new PlainConnection(owner, context, probeZone)
              : new StreamConnection(owner, context),
        }),
        timers,
      ),
  );
  zonePools.push(...zoneRoutes.sets);
  routeLines.push(...zoneRoutes.lines);
  if (special !== null) {
    routeLines.push({
      route: "special-use",
      targets: "answered here (localhost, invalid, onion, local, home.arpa, private reverse zones)",
    });
  }
  const forwarder: Forwarder = router;
  resolver = new Resolver(forwarder, {
    udpMaxSize: config.udpMaxSize,
    maxInflight: config.maxInflight,
    timeoutMs: config.timeoutMs,
    logQueries: config.logQueries,
    log,
    stats: metrics.resolver,
    cache: {
      maxEntries: config.cacheSize,
      maxBytes: config.cacheMaxBytes,
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
    streamIdleTimeoutMs: config.tcpIdleTimeoutMs,
    local: { answer: (query, info) => resolverArpa.answer(query, info) },
    clock,
    timers,
  });
  const core = resolver;

  /** Wildcard listen addresses, warned about once every listener is bound. */
  const wildcards: ListenAddress[] = [];
  let draining = false;
  // Readiness is about this replica, never about what every replica shares: when all the
  // upstreams are down (a provider outage, port 853 blocked), failing /readyz would take every
  // replica out of the Service at once, and serve-stale could answer no one (issue 22). As
  // CoreDNS's `ready`: ready once it serves, until it drains. Upstream health is reported by
  // /healthz/upstreams and the dotproxy_upstream_healthy metric, for alerts.
  const readiness = (): Promise<Readiness> =>
    Promise.resolve(
      draining ? { ready: false, reason: "shutting down" } : { ready: true, reason: "serving" },
    );
  const upstreamHealth = async (): Promise<Readiness> => {
    if (draining) return { ready: false, reason: "shutting down" };
    if (pool === null) return { ready: true, reason: "forwarder injected" };
    // The default upstream set decides; it waits for its first health checks at start.
    // Zone targets do not (a cluster DNS that is down must not take the proxy out of service
    // for public names), but their state is in the body.
    const ready = await pool.readiness();
    if (draining) return { ready: false, reason: "shutting down" };
    const zoneTargets = zonePools.flatMap((set) => set.upstreams);
    if (zoneTargets.length === 0) return ready;
    const states = zoneTargets.map((u) => `${u.spec.label} ${u.health.state}`).join(", ");
    return { ready: ready.ready, reason: `${ready.reason}; zone targets: ${states}` };
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
    for (const [index, address] of config.listen.entries()) {
      const before = config.listen.slice(0, index);
      // Port 0 asks for any free port; UDP and TCP must share it, so retry until both bind.
      for (let attempt = 0;; attempt++) {
        let udpServer: UdpServer;
        try {
          udpServer = UdpServer.listen(address, core, log);
        } catch (error) {
          throw new StartupError(describeBindError(error, address, "udp", before));
        }
        const tcpAddress = { hostname: address.hostname, port: udpServer.addr.port };
        try {
          tcp.push(StreamServer.listenTcp(tcpAddress, streamContext, tcpOptions));
          udp.push(udpServer);
          wildcards.push(tcpAddress);
          break;
        } catch (error) {
          await udpServer.close();
          const retry = address.port === 0 && error instanceof Deno.errors.AddrInUse &&
            attempt < 20;
          if (!retry) {
            throw new StartupError(describeBindError(error, tcpAddress, "tcp", before));
          }
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
      budget,
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
          upstreams: upstreamHealth,
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
  // Logged once every listener is bound: a start that fails says one line, and the started
  // line comes first.
  log.info("dotproxy started", {
    version: VERSION,
    listen: config.listen.map((a) => formatHostPort(a.hostname, a.port)).join(","),
    upstreams: config.upstreams.map((u) => u.label).join(","),
    http: config.http ? formatHostPort(config.http.hostname, config.http.port) : undefined,
    strategy: config.strategy,
    dot: config.listenDot.length > 0
      ? config.listenDot.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    doh: config.listenDoh.length > 0
      ? config.listenDoh.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    doh_plain: config.listenDohPlain.length > 0
      ? config.listenDohPlain.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    cache: config.cacheSize,
  });
  for (const address of wildcards) warnIfWildcard(address, log);
  for (const line of routeLines) {
    log.info("route", line);
    // Every route's series exists from start-up at 0, so rate() sees its first question.
    metrics.routed.labels(line.route);
  }
  pool?.start();
  for (const zonePool of zonePools) zonePool.start();
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
    zonePools,
    router,
    resolver: core,
    metrics,
    get draining() {
      return draining;
    },
    readiness,
    upstreamHealth,
    drain,
    close: () => {
      draining = true;
      return closeAll(2000);
    },
  };
}
