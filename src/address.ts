/**
 * One way to show a host and port: `1.2.3.4:53`, `[::1]:53`.
 *
 * @module
 */

/**
 * Formats `host` and `port` as `host:port`, with IPv6 literals in brackets (RFC 3986).
 *
 * @example
 * ```ts
 * import { formatHostPort } from "./address.ts";
 * formatHostPort("::1", 5300); // "[::1]:5300"
 * formatHostPort("127.0.0.1", 5300); // "127.0.0.1:5300"
 * ```
 */
export function formatHostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Formats a socket address for logs; `undefined` for anything but an IP address. */
export function formatAddr(addr: Deno.Addr | undefined): string | undefined {
  if (addr === undefined || !("hostname" in addr)) return undefined;
  return formatHostPort(addr.hostname, addr.port);
}
