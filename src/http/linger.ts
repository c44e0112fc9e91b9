/**
 * Lingering close for HTTP/1.1: after a response with `Connection: close`, half-close and
 * drain what the client still sends, briefly. Closing a socket with unread bytes resets it,
 * and a reset can destroy the response before the client reads it. Shared by the DoH
 * listener's HTTP/1.1 connections and the metrics and health endpoint.
 *
 * @module
 */

/** Unread bytes are drained this long at most... */
export const LINGER_MS = 1_000;
/** ...and this much at most. */
export const LINGER_BYTES = 64 * 1024;

/**
 * Half-closes `conn` and reads what the client still sends, up to {@linkcode LINGER_BYTES}
 * or the end of its stream. `arm(ms, reason)` is the caller's deadline, armed for
 * {@linkcode LINGER_MS} once the response is out; when it fires it must close `conn`, which
 * ends the drain. Never throws.
 *
 * @example
 * ```ts
 * import { linger } from "./linger.ts";
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const client = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
 * const server = await listener.accept();
 * client.close(); // the client goes: the drain ends at once
 * await linger(server, () => {});
 * server.close();
 * listener.close();
 * ```
 */
export async function linger(
  conn: Deno.Conn,
  arm: (ms: number, reason: string) => void,
): Promise<void> {
  try {
    await conn.closeWrite();
    arm(LINGER_MS, "");
    const sink = new Uint8Array(4096);
    for (let total = 0; total < LINGER_BYTES;) {
      const n = await conn.read(sink);
      if (n === null) return;
      total += n;
    }
  } catch {
    // Closed by the deadline or by the client: either way, done.
  }
}
