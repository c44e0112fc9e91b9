/**
 * `dotproxy healthcheck`: checks a running proxy configured by the same flags and
 * environment, so a distroless container needs no shell, curl or dig.
 *
 * @module
 */

import { probeQuery } from "./app.ts";
import type { Config, ListenAddress } from "./config.ts";
import { getId, getRcode, isResponse, Rcode, rcodeName } from "./dns/wire.ts";

/** The outcome of a health check. */
export interface HealthResult {
  /** True when the proxy answered as a healthy proxy does. */
  healthy: boolean;
  /** One line for the operator. */
  detail: string;
}

/** Maps a wildcard listen address to the loopback address a local client should use. */
export function localAddress(address: ListenAddress): ListenAddress {
  if (address.hostname === "0.0.0.0") return { hostname: "127.0.0.1", port: address.port };
  if (address.hostname === "::") return { hostname: "::1", port: address.port };
  return address;
}

function hostForUrl(address: ListenAddress): string {
  return address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
}

async function checkHttp(address: ListenAddress, timeoutMs: number): Promise<HealthResult> {
  const local = localAddress(address);
  const url = `http://${hostForUrl(local)}:${local.port}/readyz`;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(url, { signal: controller.signal });
    const body = (await response.text()).trim();
    return { healthy: response.status === 200, detail: `${url}: ${response.status} ${body}` };
  } catch (error) {
    const why = controller.signal.aborted ? `no answer within ${timeoutMs} ms` : String(error);
    return { healthy: false, detail: `${url}: ${why}` };
  } finally {
    clearTimeout(timer);
  }
}

async function checkDns(address: ListenAddress, timeoutMs: number): Promise<HealthResult> {
  const local = localAddress(address);
  const shown = `${hostForUrl(local)}:${local.port}`;
  const socket = Deno.listenDatagram({
    transport: "udp",
    hostname: local.hostname.includes(":") ? "::1" : "127.0.0.1",
    port: 0,
  });
  const query = probeQuery();
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await socket.send(query, { transport: "udp", hostname: local.hostname, port: local.port });
    const timeout = new Promise<null>((resolve) =>
      timer = setTimeout(() => resolve(null), timeoutMs)
    );
    for (;;) {
      const received = await Promise.race([socket.receive(), timeout]);
      if (received === null) {
        return { healthy: false, detail: `${shown}: no answer within ${timeoutMs} ms` };
      }
      const [response] = received;
      if (response.length < 12 || !isResponse(response) || getId(response) !== getId(query)) {
        continue;
      }
      const rcode = getRcode(response);
      return {
        healthy: rcode === Rcode.NOERROR || rcode === Rcode.NXDOMAIN,
        detail: `${shown}: answered ${rcodeName(rcode)}`,
      };
    }
  } catch (error) {
    return { healthy: false, detail: `${shown}: ${String(error)}` };
  } finally {
    clearTimeout(timer);
    socket.close();
  }
}

/**
 * Checks the proxy described by `config`: `GET /readyz` when `--http` is set, otherwise a
 * DNS query for `. NS` to its first listen address over UDP.
 *
 * @example
 * ```ts ignore
 * const result = await healthcheck(config);
 * Deno.exit(result.healthy ? 0 : 1);
 * ```
 */
export function healthcheck(config: Config, timeoutMs = 3000): Promise<HealthResult> {
  if (config.http) return checkHttp(config.http, timeoutMs);
  return checkDns(config.listen[0], timeoutMs);
}
