/**
 * Opening the byte stream under an upstream connection: a {@linkcode Dialer} returns a
 * connected `Deno.Conn` or throws, and gives up when its signal aborts (the connect
 * timeout, or the connection closed meanwhile). {@linkcode tcpDialer} is plain DNS over TCP;
 * `tls_dial.ts` adds TLS for DoT.
 *
 * @module
 */

/** Opens a connection; rejects when `signal` aborts first. */
export type Dialer = (signal: AbortSignal) => Promise<Deno.Conn>;

/** Where a dialer connects. */
export interface DialTarget {
  /** IP literal (no brackets). */
  address: string;
  /** TCP port. */
  port: number;
}

/**
 * Connects over TCP to `target`, with Nagle off on this side (queries are written whole,
 * coalesced per turn of the event loop) and keepalives on.
 */
export async function connectTcp(target: DialTarget, signal: AbortSignal): Promise<Deno.TcpConn> {
  const tcp = await Deno.connect({
    hostname: target.address,
    port: target.port,
    transport: "tcp",
    signal,
  });
  if (signal.aborted) {
    closeQuietly(tcp);
    throw signal.reason;
  }
  tcp.setNoDelay(true);
  tcp.setKeepAlive(true);
  return tcp;
}

/**
 * A dialer of plain TCP connections to `target` (plain DNS: only where the user named it).
 *
 * @example
 * ```ts ignore
 * const connection = new StreamConnection(owner, { ...context, dial: tcpDialer(spec) });
 * ```
 */
export function tcpDialer(target: DialTarget): Dialer {
  return (signal) => connectTcp(target, signal);
}

/** Closes `resource`, ignoring that it may be closed already. */
export function closeQuietly(resource: { close(): void } | null): void {
  try {
    resource?.close();
  } catch {
    // Already closed (by the peer, or consumed by startTls).
  }
}
