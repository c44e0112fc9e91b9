/**
 * dotproxy: forwards plain DNS (UDP and TCP) to DNS-over-TLS upstreams.
 *
 * Run with `deno task start`, or as the compiled `./dotproxy` binary. Needs only network
 * and environment permissions.
 *
 * @module
 */

import { formatHostPort } from "./src/address.ts";
import { startProxy, StartupError } from "./src/app.ts";
import { ConfigError, helpText, parseConfig, unknownVariables } from "./src/config.ts";
import { healthcheck } from "./src/healthcheck.ts";
import { Logger } from "./src/log.ts";
import { VERSION } from "./src/version.ts";

function fail(message: string, code: number): never {
  console.error(`dotproxy: ${message}`);
  Deno.exit(code);
}

/** Parses configuration and runs the requested command; returns the exit code. */
async function main(args: string[]): Promise<number> {
  let request;
  try {
    request = parseConfig(args, (name) => Deno.env.get(name));
  } catch (error) {
    if (error instanceof ConfigError) fail(error.message, 2);
    throw error;
  }
  if (request.kind === "help") {
    console.log(helpText());
    return 0;
  }
  if (request.kind === "version") {
    console.log(`dotproxy ${VERSION} (deno ${Deno.version.deno})`);
    return 0;
  }
  const config = request.config;
  if (config.command === "healthcheck") {
    const result = await healthcheck(config);
    console.log(`${result.healthy ? "healthy" : "unhealthy"}: ${result.detail}`);
    return result.healthy ? 0 : 1;
  }

  const log = new Logger({ level: config.logLevel, format: config.logFormat });
  let proxy;
  try {
    proxy = await startProxy(config, log);
  } catch (error) {
    if (error instanceof StartupError) fail(error.message, 1);
    throw error;
  }
  log.info("dotproxy started", {
    version: VERSION,
    listen: config.listen.map((a) => formatHostPort(a.hostname, a.port)).join(","),
    upstreams: config.upstreams.map((u) => u.label).join(","),
    http: config.http ? formatHostPort(config.http.hostname, config.http.port) : undefined,
    dot: config.listenDot.length > 0
      ? config.listenDot.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    doh: config.listenDoh.length > 0
      ? config.listenDoh.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    doh_plain: config.listenDohPlain.length > 0
      ? config.listenDohPlain.map((a) => formatHostPort(a.hostname, a.port)).join(",")
      : undefined,
    strategy: config.strategy,
    cache: config.cacheSize,
  });
  const unknown = unknownVariables(Object.keys(Deno.env.toObject()));
  if (unknown.length > 0) {
    // A misspelt variable silently does nothing; say so (Kubernetes service links also land here).
    log.warn("ignoring unknown DOTPROXY_* environment variables", { names: unknown.join(",") });
  }
  // A bug must cost one query, never the process: log it and carry on.
  globalThis.addEventListener("unhandledrejection", (event) => {
    event.preventDefault();
    const reason = event.reason;
    log.error("unhandled rejection (a bug; please report it)", {
      error: reason instanceof Error ? reason.stack ?? reason.message : String(reason),
    });
  });
  globalThis.addEventListener("error", (event) => {
    event.preventDefault();
    log.error("uncaught exception (a bug; please report it)", {
      error: event.error instanceof Error
        ? event.error.stack ?? event.error.message
        : String(event.message),
    });
  });

  const isWindows = Deno.build.os === "windows";
  if (!isWindows) {
    // SIGHUP never kills the process: it flushes the cache.
    Deno.addSignalListener("SIGHUP", () => {
      const flushed = proxy.resolver.flushCache();
      log.info("SIGHUP: cache flushed", { entries: flushed });
    });
  }
  const stopped = new Promise<string>((resolve) => {
    const signals: Deno.Signal[] = isWindows ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
    let received = 0;
    for (const signal of signals) {
      Deno.addSignalListener(signal, () => {
        if (++received > 1) {
          // A second signal: the operator means it. Stop now.
          log.warn("second signal; exiting at once", { signal });
          Deno.exit(1);
        }
        resolve(signal);
      });
    }
  });
  const signal = await stopped;
  log.info("shutting down", {
    signal,
    delay_ms: config.shutdownDelayMs,
    timeout_ms: config.shutdownTimeoutMs,
  });
  // Past the delay and the timeout, whatever still hangs is abandoned and the exit is clean.
  const force = setTimeout(() => {
    log.warn("shutdown took too long; exiting");
    log.info("stopped");
    Deno.exit(0);
  }, config.shutdownDelayMs + config.shutdownTimeoutMs + 2000);
  await proxy.drain({ delayMs: config.shutdownDelayMs, timeoutMs: config.shutdownTimeoutMs });
  clearTimeout(force);
  log.info("stopped");
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args));
  } catch (error) {
    fail(`unexpected error: ${error instanceof Error ? error.message : String(error)}`, 1);
  }
}
