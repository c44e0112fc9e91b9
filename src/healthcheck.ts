/**
 * `dotproxy healthcheck`: checks a running proxy configured by the same flags and
 * environment, so a distroless container needs no shell, curl or dig.
 *
 * @module
 */

import type { Config, ListenAddress } from "./config.ts";
import { buildProbeQuery } from "./dns/probe.ts";
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

/** How an OS or hyper error reads, and what to call it. */
const FAILURES: readonly [RegExp, string][] = [
  [/connection refused|\(os error (111|61|10061)\)/i, "connection refused"],
  [/connection reset|\(os error (104|54|10054)\)/i, "connection reset"],
  [
    /closed before message completed|connection closed|unexpected eof|incomplete message/i,
    "connection closed without an answer",
  ],
  [/timed out|\(os error (110|60|10060)\)/i, "connection timed out"],
  [/network is unreachable|\(os error (101|51|10051)\)/i, "network unreachable"],
  [/no route to host|\(os error (113|65|10065)\)/i, "no route to host"],
  [/address not available|\(os error (99|49|10049)\)/i, "address not available"],
  [/requires net access|permission denied|not capable/i, "no permission to connect"],
];

/**
 * Says in words why a request to the proxy's HTTP endpoint failed: `fetch` throws a bare
 * `TypeError: fetch failed` and hides the reason in `error.cause`.
 *
 * @example
 * ```ts
 * import { describeHttpFailure } from "./healthcheck.ts";
 * const cause = new Error("client error (Connect): Connection refused (os error 111)");
 * describeHttpFailure(new TypeError("fetch failed", { cause }), 3000, false);
 * // "connection refused"
 * ```
 */
export function describeHttpFailure(error: unknown, timeoutMs: number, timedOut: boolean): string {
  if (timedOut) return `timed out: no answer within ${timeoutMs} ms`;
  const cause = error instanceof Error && error.cause !== undefined ? error.cause : error;
  if (cause instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (cause instanceof Deno.errors.ConnectionReset) return "connection reset";
  if (cause instanceof Deno.errors.TimedOut) return "connection timed out";
  if (cause instanceof Deno.errors.NotCapable || cause instanceof Deno.errors.PermissionDenied) {
    return "no permission to connect";
  }
  const message = cause instanceof Error ? cause.message : String(cause);
  for (const [pattern, words] of FAILURES) {
    if (pattern.test(message)) return words;
  }
  // "error sending request for url (...): client error (SendRequest): invalid HTTP version
  // parsed": keep what hyper says, without the prefix that repeats the URL.
  const reason = message.replace(/^error sending request[^:]*(?:\([^)]*\))?:\s*/i, "")
    .replace(/^client error \([^)]*\):\s*/i, "").trim();
  if (/invalid|parse|malformed/i.test(reason)) return `not an HTTP answer (${reason})`;
  return reason === "" ? "request failed" : reason;
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
    const why = describeHttpFailure(error, timeoutMs, controller.signal.aborted);
    const flag = `${hostForUrl(address)}:${address.port}`;
    return { healthy: false, detail: `${url}: ${why} (is dotproxy running with --http ${flag}?)` };
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
  // Without RD, as the proxy's own health checks: the upstream answers at once, whether or not
  // it can reach the root servers (an isolated private resolver answers REFUSED).
  const query = buildProbeQuery(false);
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
        // Any answer relayed from an upstream proves the path; SERVFAIL is the proxy's own
        // "no upstream answered".
        healthy: rcode === Rcode.NOERROR || rcode === Rcode.NXDOMAIN || rcode === Rcode.REFUSED,
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
 * DNS query for `. NS` without RD to its first listen address over UDP.
 *
 * @example
 * ```ts ignore
 * const result = await healthcheck(config);
 * Deno.exit(result.healthy ? 0 : 1);
 * ```
 */
export function healthcheck(
  config: Pick<Config, "http" | "listen">,
  timeoutMs = 3000,
): Promise<HealthResult> {
  if (config.http) return checkHttp(config.http, timeoutMs);
  return checkDns(config.listen[0], timeoutMs);
}
