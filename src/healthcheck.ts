/**
 * `dotproxy healthcheck`: checks a running proxy configured by the same flags and
 * environment, so a distroless container needs no shell, curl or dig.
 *
 * Healthy means that this dotproxy answered a question it was meant to answer (issue 22): it
 * asks `version.bind. CH TXT`, which dotproxy answers itself for loopback clients and never
 * forwards (src/dns/identity.ts), and wants `dotproxy ...` back. Another DNS server on the
 * address answers with its own name, REFUSED or NOTIMP; a REFUSED from dotproxy's own access
 * list is unhealthy too, with the fix in the detail. Upstream health does not enter into it
 * (as for `/readyz`): a fault every replica shares must not mark every container unhealthy.
 * With `--http`, `/readyz` must say `ready` as well (not while draining).
 *
 * @module
 */

import { cidrContains, type Config, type ListenAddress, parseIpAddress } from "./config.ts";
import { CLASS_CH } from "./dns/identity.ts";
import {
  getAncount,
  getId,
  getQdcount,
  getRcode,
  HEADER_SIZE,
  isResponse,
  Rcode,
  rcodeName,
  readU16,
  RRType,
  skipName,
  writeU16,
} from "./dns/wire.ts";

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

/** Errors that say the loopback address itself is missing here, not that nothing answers. */
const NO_SUCH_ADDRESS =
  /address not available|AddrNotAvailable|Cannot assign requested address|network unreachable/i;

/**
 * Runs `check` against the loopback form of `address`; for `[::]`, when `[::1]` does not
 * exist (IPv6 disabled in the container: Docker's default on networks without IPv6), again
 * through 127.0.0.1, which the dual-stack socket takes too. Measured in a network namespace
 * with `disable_ipv6=1`: `[::]` binds, `::1` is "Cannot assign requested address" (os error
 * 99), 127.0.0.1 arrives as ::ffff:127.0.0.1.
 */
async function viaLoopback(
  address: ListenAddress,
  check: (local: ListenAddress) => Promise<HealthResult>,
): Promise<HealthResult> {
  const first = await check(localAddress(address));
  if (first.healthy || address.hostname !== "::" || !NO_SUCH_ADDRESS.test(first.detail)) {
    return first;
  }
  return check({ hostname: "127.0.0.1", port: address.port });
}

async function checkHttp(
  address: ListenAddress,
  local: ListenAddress,
  timeoutMs: number,
): Promise<HealthResult> {
  const url = `http://${hostForUrl(local)}:${local.port}/readyz`;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  try {
    const response = await fetch(url, { signal: controller.signal });
    const body = (await response.text()).trim().slice(0, 200);
    // dotproxy's /readyz says "ready: ..." or "not ready: ..."; any other 200 is someone else.
    const ours = /^(not )?ready: /.test(body);
    const detail = `${url}: ${response.status} ${body}` +
      (ours ? "" : " (not dotproxy's /readyz: is another server on this port?)");
    return { healthy: response.status === 200 && ours, detail };
  } catch (error) {
    const why = describeHttpFailure(error, timeoutMs, controller.signal.aborted);
    const flag = `${hostForUrl(address)}:${address.port}`;
    return { healthy: false, detail: `${url}: ${why} (is dotproxy running with --http ${flag}?)` };
  } finally {
    clearTimeout(timer);
  }
}

/** `version.bind. CH TXT` without RD and without EDNS, with a random ID. */
function identityQuery(): Uint8Array {
  const name = [7, ..."version".split("").map((c) => c.charCodeAt(0)), 4, 98, 105, 110, 100, 0];
  const query = new Uint8Array(HEADER_SIZE + name.length + 4);
  crypto.getRandomValues(query.subarray(0, 2));
  writeU16(query, 4, 1); // QDCOUNT
  query.set(name, HEADER_SIZE);
  writeU16(query, HEADER_SIZE + name.length, RRType.TXT);
  writeU16(query, HEADER_SIZE + name.length + 2, CLASS_CH);
  return query;
}

/** The first character-string of the first TXT answer, or null when there is none. */
function firstTxt(response: Uint8Array): string | null {
  if (getQdcount(response) !== 1 || getAncount(response) < 1) return null;
  const questionEnd = skipName(response, HEADER_SIZE, response.length);
  if (questionEnd < 0) return null;
  const owner = skipName(response, questionEnd + 4, response.length);
  if (owner < 0 || owner + 10 > response.length) return null;
  if (readU16(response, owner) !== RRType.TXT) return null;
  const rdlength = readU16(response, owner + 8);
  const rdata = owner + 10;
  if (rdlength < 1 || rdata + rdlength > response.length) return null;
  const length = Math.min(response[rdata], rdlength - 1);
  return new TextDecoder().decode(response.subarray(rdata + 1, rdata + 1 + length));
}

/** The words for a REFUSED answer: dotproxy's own access list, most likely. */
function describeRefusal(source: string, allow: Config["allow"] | undefined): string {
  const bytes = parseIpAddress(source)!;
  if (allow !== undefined && !allow.some((cidr) => cidrContains(cidr, bytes))) {
    const cidr = source.includes(":") ? `${source}/128` : `${source}/32`;
    return `answered REFUSED: the check comes from ${source}, which --allow does not ` +
      `include, so dotproxy refuses it (add ${cidr} to --allow, or check with --http)`;
  }
  return "answered REFUSED (the rate limit, or another DNS server on this address?)";
}

async function checkDns(
  local: ListenAddress,
  allow: Config["allow"] | undefined,
  timeoutMs: number,
): Promise<HealthResult> {
  const shown = `${hostForUrl(local)}:${local.port}`;
  // From loopback: dotproxy answers its identity to loopback clients only (on Linux a socket
  // bound to loopback reaches the host's other addresses too, with a loopback source).
  const source = local.hostname.includes(":") ? "::1" : "127.0.0.1";
  let socket: Deno.DatagramConn;
  try {
    socket = Deno.listenDatagram({ transport: "udp", hostname: source, port: 0 });
  } catch (error) {
    return { healthy: false, detail: `${shown}: ${String(error)}` };
  }
  const query = identityQuery();
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
      if (rcode === Rcode.REFUSED) {
        return { healthy: false, detail: `${shown}: ${describeRefusal(source, allow)}` };
      }
      const text = rcode === Rcode.NOERROR ? firstTxt(response) : null;
      if (text !== null && /^dotproxy /.test(text)) {
        return { healthy: true, detail: `${shown}: ${text} answered` };
      }
      const said = text === null ? rcodeName(rcode) : `${rcodeName(rcode)} ${JSON.stringify(text)}`;
      return {
        healthy: false,
        detail: `${shown}: answered ${said} to version.bind, not as dotproxy does ` +
          `(is another DNS server listening there?)`,
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
 * Checks the proxy described by `config`: asks its first listen address over UDP for
 * `version.bind. CH TXT` (healthy when dotproxy itself answers) and, when `--http` is set,
 * `GET /readyz` too (healthy on `200 ready: ...`). `allow` words a REFUSED.
 *
 * @example
 * ```ts ignore
 * const result = await healthcheck(config);
 * Deno.exit(result.healthy ? 0 : 1);
 * ```
 */
export async function healthcheck(
  config: Pick<Config, "http" | "listen"> & Partial<Pick<Config, "allow">>,
  timeoutMs = 3000,
): Promise<HealthResult> {
  // No listen address (a caller that checks only the HTTP side): /readyz alone.
  const http = config.http;
  const checkReadyz = (address: ListenAddress) =>
    viaLoopback(address, (local) => checkHttp(address, local, timeoutMs));
  if (config.listen.length === 0 && http) return checkReadyz(http);
  const dns = await viaLoopback(
    config.listen[0],
    (local) => checkDns(local, config.allow, timeoutMs),
  );
  if (!dns.healthy || !http) return dns;
  const readyz = await checkReadyz(http);
  return { healthy: readyz.healthy, detail: `${dns.detail}; ${readyz.detail}` };
}
