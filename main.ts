/**
 * dotproxy: forwards plain DNS (UDP and TCP) to DNS-over-TLS upstreams.
 *
 * Run with `deno task start`, or as the compiled `./dotproxy` binary. Needs only network
 * and environment permissions.
 *
 * @module
 */

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
    listen: config.listen.map((a) =>
      a.hostname.includes(":") ? `[${a.hostname}]:${a.port}` : `${a.hostname}:${a.port}`
    ).join(","),
    upstreams: config.upstreams.map((u) => u.label).join(","),
    http: config.http ? `${config.http.hostname}:${config.http.port}` : undefined,
  });
  const unknown = unknownVariables(Object.keys(Deno.env.toObject()));
  if (unknown.length > 0) {
    // A misspelt variable silently does nothing; say so (Kubernetes service links also land here).
    log.warn("ignoring unknown DOTPROXY_* environment variables", { names: unknown.join(",") });
  }

  const stopped = new Promise<string>((resolve) => {
    const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
    for (const signal of signals) Deno.addSignalListener(signal, () => resolve(signal));
  });
  const signal = await stopped;
  log.info("shutting down", { signal });
  // A second signal, or a shutdown that hangs, ends the process at once.
  const force = setTimeout(() => Deno.exit(1), 10_000);
  await proxy.close();
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
