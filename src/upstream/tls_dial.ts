/**
 * Opening a DoT connection (RFC 7858): TCP, then TLS with the upstream's name verified
 * against the system roots and any extra CA given. And {@linkcode primeTls}, which makes
 * the first connection of a process as fast as the next.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import { closeQuietly, connectTcp, type Dialer } from "./dial.ts";
import { tlsHint } from "./tls_hint.ts";

/**
 * A dialer of TLS connections to `spec`, verified against `spec.tlsName` (also sent as SNI).
 * `Deno.connectTls` cannot be aborted; TCP is dialled with an abortable `Deno.connect` and
 * upgraded with `Deno.startTls`, and an abort during the handshake closes the socket.
 *
 * @example
 * ```ts ignore
 * const dial = tlsDialer(spec, config.caCerts);
 * const conn = await dial(AbortSignal.timeout(2000));
 * ```
 */
export function tlsDialer(spec: UpstreamSpec, caCerts: string[]): Dialer {
  return async (signal) => {
    const tcp = await connectTcp(spec, signal);
    let tls: Deno.TlsConn | null = null;
    // startTls consumes the TCP socket: after it, closing the TLS one closes both.
    const abort = () => closeQuietly(tls ?? tcp);
    signal.addEventListener("abort", abort, { once: true });
    try {
      tls = await Deno.startTls(tcp, { hostname: spec.tlsName, caCerts });
      await tls.handshake();
      if (signal.aborted) throw signal.reason;
      return tls;
    } catch (error) {
      closeQuietly(tls);
      closeQuietly(tcp);
      // rustls names the problem, not the setting that fixes it (issue 22).
      if (error instanceof Error && !signal.aborted) {
        error.message += tlsHint(error.message, caCerts.length);
      }
      throw error;
    } finally {
      signal.removeEventListener("abort", abort);
    }
  };
}

/**
 * Makes Deno build its TLS client configuration (the built-in root store) now, with a
 * handshake against a throwaway loopback socket. The first TLS connection of a process
 * otherwise spends about 35 ms on it while queries wait.
 */
export async function primeTls(): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0, transport: "tcp" });
  try {
    const accepted = listener.accept();
    const tcp = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    const peer = await accepted;
    const tls = await Deno.startTls(tcp, { hostname: "prime.invalid" });
    const handshake = tls.handshake().catch(() => {});
    peer.close();
    await handshake;
    tls.close();
  } catch {
    // Priming is an optimisation; a failure here changes nothing else.
  } finally {
    listener.close();
  }
}
