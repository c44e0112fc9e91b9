/**
 * The DNS-over-TLS listener (RFC 7858): a {@linkcode StreamServer} whose connections start
 * with a TLS handshake. Everything after the handshake is the TCP listener's: the same
 * connection handler, framing, limits and answer budget.
 *
 * - TLS 1.2 and 1.3 (Deno's rustls); ALPN `dot` (RFC 7858's registered id) offered, and a
 *   client that offers no ALPN (dnsperf, kdig, Android) is served. A client offering only
 *   other protocols fails the handshake (Deno aborts when the lists do not overlap).
 * - A handshake has {@linkcode HANDSHAKE_TIMEOUT_MS} to complete, and the connection counts
 *   against `--max-tcp-connections` and the per-client cap from accept on: a client that
 *   opens connections and never completes a handshake holds at most its share of slots, for
 *   at most the deadline.
 * - Handshake failures (not TLS, half a ClientHello, no shared version or cipher) and
 *   timeouts are counted (`dotproxy_tls_handshakes_total`) and logged at most once in ten
 *   seconds each, with the client's address and the reason; they never stall the accept loop.
 * - The socket is bound with `SO_REUSEPORT`, as the TCP listener's, so that a new process with
 *   a renewed certificate can take over the address while the old one drains.
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { RateLimitedLog } from "../log.ts";
import type { AcceptedClient } from "../net/accept_loop.ts";
import { type StreamContext, StreamServer, type StreamServerOptions } from "./stream.ts";

/** A TLS handshake not done within this long closes the connection. */
export const HANDSHAKE_TIMEOUT_MS = 5000;
/** The ALPN protocol id of DNS over TLS (RFC 7858, IANA registry). */
export const DOT_ALPN = "dot";
const LOG_INTERVAL_MS = 10_000;

/** The certificate chain and key, PEM text, as `Deno.listenTls` takes them. */
export interface DotCertificate {
  /** The chain, leaf first. */
  readonly cert: string;
  /** The private key. */
  readonly key: string;
}

/**
 * Binds `address` for DNS over TLS and starts serving; throws the OS error when it cannot
 * bind.
 *
 * @example
 * ```ts ignore
 * const dot = listenDot({ hostname: "127.0.0.1", port: 853 }, { resolver, log, budget },
 *   { maxConnections: 1000, maxQueriesPerConnection: 128, idleTimeoutMs: 10000 },
 *   { cert, key });
 * await dot.close();
 * ```
 */
export function listenDot(
  address: ListenAddress,
  context: StreamContext,
  options: StreamServerOptions,
  certificate: DotCertificate,
  handshakeTimeoutMs: number = HANDSHAKE_TIMEOUT_MS,
): StreamServer {
  const listener = Deno.listenTls({
    hostname: address.hostname,
    port: address.port,
    cert: certificate.cert,
    key: certificate.key,
    alpnProtocols: [DOT_ALPN],
    reusePort: true,
  });
  const failedLog = new RateLimitedLog(context.log, LOG_INTERVAL_MS);
  const timeoutLog = new RateLimitedLog(context.log, LOG_INTERVAL_MS);
  const stats = context.stats;
  const handshake = async (conn: Deno.Conn, client: AcceptedClient): Promise<boolean> => {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), handshakeTimeoutMs);
    });
    try {
      const handshaking = (conn as Deno.TlsConn).handshake();
      // Rejects once the connection is closed after a timeout: nobody waits for it then.
      handshaking.catch(() => {});
      const outcome = await Promise.race([handshaking, timeout]);
      if (outcome === "timeout") {
        stats?.handshake?.("timeout");
        timeoutLog.warn("dot tls handshake timed out", {
          client: formatAddr(client.remote),
          timeout_ms: handshakeTimeoutMs,
        });
        return false;
      }
      stats?.handshake?.("ok");
      return true;
    } catch (error) {
      // Closed by this side (evicted, shutting down): not the client's failure.
      if (error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted) {
        return false;
      }
      stats?.handshake?.("failed");
      failedLog.warn("dot tls handshake failed", {
        client: formatAddr(client.remote),
        error: error instanceof Error ? error.message : String(error),
      });
      return false;
    } finally {
      clearTimeout(timer);
    }
  };
  return new StreamServer(listener, { ...context, transport: "dot" }, options, handshake);
}
