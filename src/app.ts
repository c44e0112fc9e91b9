/**
 * Builds the object graph from a {@linkcode Config} and starts the listeners: the one place
 * that knows how the parts fit together. `main.ts` and the integration tests both use it.
 *
 * @module
 */

import type { Config, ListenAddress } from "./config.ts";
import { ADVERTISED_UDP_SIZE } from "./dns/response.ts";
import type { Logger } from "./log.ts";
import { Registry } from "./metrics.ts";
import { ProxyMetrics } from "./proxy_metrics.ts";
import { Resolver } from "./resolver.ts";
import { HttpServer, type Readiness } from "./server/http.ts";
import { TcpServer } from "./server/tcp.ts";
import { UdpServer } from "./server/udp.ts";
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
  /** An upstream answer younger than this counts for readiness without a probe. */
  readyWindowMs?: number;
}

/** A running proxy. */
export interface RunningProxy {
  /** The UDP listeners, one per listen address. */
  readonly udp: UdpServer[];
  /** The TCP listeners, one per listen address. */
  readonly tcp: TcpServer[];
  /** The HTTP endpoint, when configured. */
  readonly http: HttpServer | null;
  /** The upstream pool (null when a forwarder was injected). */
  readonly pool: UpstreamPool | null;
  /** The core. */
  readonly resolver: Resolver;
  /** The metrics. */
  readonly metrics: ProxyMetrics;
  /** Decides readiness as `/readyz` does. */
  readiness(): Promise<Readiness>;
  /** Stops listening, lets in-flight queries finish, closes upstream connections. */
  close(): Promise<void>;
}

function describeBindError(error: unknown, address: ListenAddress, what: string): string {
  const shown = address.hostname.includes(":")
    ? `[${address.hostname}]:${address.port}`
    : `${address.hostname}:${address.port}`;
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

/** A query for `. IN NS` with EDNS, used to probe upstreams and by the healthcheck. */
export function probeQuery(): Uint8Array {
  const query = new Uint8Array([0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 2, 0, 1]);
  const opt = new Uint8Array([
    0,
    0,
    41,
    ADVERTISED_UDP_SIZE >> 8,
    ADVERTISED_UDP_SIZE & 0xff,
    0,
    0,
    0,
    0,
    0,
    0,
  ]);
  const out = new Uint8Array(query.length + opt.length);
  out.set(query);
  out.set(opt, query.length);
  crypto.getRandomValues(out.subarray(0, 2));
  return out;
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
  const tcp: TcpServer[] = [];
  let pool: UpstreamPool | null = null;
  const metrics = new ProxyMetrics(new Registry(), {
    tcpConnections: () => tcp.reduce((sum, server) => sum + server.openConnections, 0),
    upstreams: () =>
      pool?.upstreams.map((u) => ({
        label: u.spec.label,
        healthy: u.healthy,
        inflight: u.load,
        connections: u.connections.length,
      })) ?? [],
  });
  if (!options.forwarder) {
    await primeTls();
    pool = new UpstreamPool({
      upstreams: config.upstreams,
      caCerts: config.caCerts,
      timeoutMs: config.timeoutMs,
      connectionsPerUpstream: config.upstreamConnections,
      idleTimeoutMs: config.upstreamIdleTimeoutMs,
      log,
      stats: metrics.upstream,
    });
  }
  const forwarder: Forwarder = options.forwarder ?? pool as UpstreamPool;
  const resolver = new Resolver(forwarder, {
    udpMaxSize: config.udpMaxSize,
    maxInflight: config.maxInflight,
    logQueries: config.logQueries,
    log,
    stats: metrics.resolver,
  });

  const readyWindowMs = options.readyWindowMs ?? 10_000;
  let probe: Promise<Readiness> | null = null;
  const readiness = (): Promise<Readiness> => {
    const now = performance.now();
    if (pool) {
      const fresh = pool.upstreams.find((u) => u.healthy && u.lastAnswerAt > now - readyWindowMs);
      if (fresh) return Promise.resolve({ ready: true, reason: `${fresh.spec.label} answered` });
    }
    probe ??= forwarder.forward(probeQuery(), 17).then(
      (answer) => ({ ready: true, reason: `${answer.upstream} answered a probe` }),
      (error) => ({
        ready: false,
        reason: `no upstream answers: ${error instanceof Error ? error.message : String(error)}`,
      }),
    ).finally(() => probe = null);
    return probe;
  };

  let http: HttpServer | null = null;
  const closeAll = async () => {
    await Promise.all([...udp, ...tcp].map((server) => server.close()));
    await http?.close();
    await forwarder.close();
  };
  try {
    const tcpOptions = {
      maxConnections: config.maxTcpConnections,
      maxQueriesPerConnection: config.maxTcpQueriesPerConnection,
      idleTimeoutMs: config.tcpIdleTimeoutMs,
    };
    for (const address of config.listen) {
      // Port 0 asks for any free port; UDP and TCP must share it, so retry until both bind.
      for (let attempt = 0;; attempt++) {
        let udpServer: UdpServer;
        try {
          udpServer = UdpServer.listen(address, resolver, log);
        } catch (error) {
          throw new StartupError(describeBindError(error, address, "udp"));
        }
        const tcpAddress = { hostname: address.hostname, port: udpServer.addr.port };
        try {
          tcp.push(TcpServer.listen(tcpAddress, resolver, log, tcpOptions, metrics.tcp));
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
    await closeAll().catch(() => {});
    throw error;
  }

  pool?.warm();
  return {
    udp,
    tcp,
    get http() {
      return http;
    },
    pool,
    resolver,
    metrics,
    readiness,
    close: closeAll,
  };
}
