/**
 * The UDP listener: receives datagrams, hands each to the resolver concurrently, and sends
 * back what it returns. Owns the socket and nothing else.
 *
 * @module
 */

import type { ListenAddress } from "../config.ts";
import type { Logger } from "../log.ts";
import type { Resolver, ResponseSink } from "../resolver.ts";
import { SlabCopier } from "../slab.ts";

/** Largest datagram read; anything longer is cut by the kernel and fails validation. */
const RECEIVE_BUFFER_SIZE = 65535;
/**
 * Receives kept outstanding at once: each event-loop turn delivers at most this many
 * datagrams, and a burst arrives in one turn and its queries leave in one TLS write. While a
 * turn is busy (a read of many upstream answers), the kernel queues new queries in the
 * socket's receive buffer, which by its accounting holds only ~160 small datagrams (~208 KB
 * by default, and Deno cannot raise SO_RCVBUF); with 4 receives the backlog of a client with
 * 256 queries outstanding overflowed it (about 1 query in 1,000 lost at saturation, each
 * costing the client a timeout); with 32 none was lost and a query cost 20% less CPU.
 */
const PARALLEL_RECEIVES = 32;
/**
 * Answers handed to the socket and not yet sent, past which receiving pauses until half of
 * them went out. Why: under a flood of cache misses (150k q/s from three senders,
 * bench/memory_attacks.ts `udp-flood-misses`) sends fell behind the answers (SERVFAILs and
 * NXDOMAINs come back as fast as queries arrive): a heap snapshot taken in the flood held
 * 22,425 pending `send` calls (each a generator, promises and the answer, 2.8 KB), and the
 * proxy died of a full V8 heap at 364 MiB RSS. With receiving paused, the kernel drops the
 * excess at the socket's receive buffer, which costs the process nothing; no answer already
 * made is lost.
 */
export const MAX_PENDING_SENDS = 1024;

/**
 * Serves DNS over UDP on one address.
 *
 * @example
 * ```ts ignore
 * const server = UdpServer.listen({ hostname: "127.0.0.1", port: 5300 }, resolver, log);
 * // ... later
 * await server.close();
 * ```
 */
export class UdpServer implements ResponseSink {
  readonly #socket: Deno.DatagramConn;
  readonly #resolver: Resolver;
  readonly #log: Logger;
  readonly #done: Promise<void>;
  /** Every receive loop copies its queries out of the same slabs. */
  readonly #copier = new SlabCopier();
  #inflight = 0;
  /** Sends handed to the socket and not yet settled. */
  #sending = 0;
  /** The most sends pending at once so far. */
  #sendingPeak = 0;
  /** Resolves the receive loops paused at {@linkcode MAX_PENDING_SENDS}. */
  #resume: (() => void) | undefined;
  #paused: Promise<void> | undefined;
  #drained: (() => void) | undefined;
  #closing = false;
  #socketClosed = false;

  /** Starts serving on an already bound socket. */
  constructor(socket: Deno.DatagramConn, resolver: Resolver, log: Logger) {
    this.#socket = socket;
    this.#resolver = resolver;
    this.#log = log;
    const loops = [];
    for (let i = 0; i < PARALLEL_RECEIVES; i++) loops.push(this.#serve());
    this.#done = Promise.all(loops).then(() => {});
  }

  /**
   * Binds `address` and starts serving; throws the OS error when it cannot bind. The socket
   * has `SO_REUSEADDR`, so that a new process can bind the address while this one drains: on
   * Linux the socket bound last then receives every datagram (measured), and this one answers
   * what it had already received (see docs/dot.md, rotation).
   */
  static listen(address: ListenAddress, resolver: Resolver, log: Logger): UdpServer {
    const socket = Deno.listenDatagram({
      transport: "udp",
      hostname: address.hostname,
      port: address.port,
      reuseAddress: true,
    });
    return new UdpServer(socket, resolver, log);
  }

  /** The bound address (useful with port 0). */
  get addr(): Deno.NetAddr {
    return this.#socket.addr as Deno.NetAddr;
  }

  /** The most answers that waited for the socket at once (sends pending). */
  get pendingSendsPeak(): number {
    return this.#sendingPeak;
  }

  async #serve(): Promise<void> {
    const buffer = new Uint8Array(RECEIVE_BUFFER_SIZE);
    const copier = this.#copier;
    for (;;) {
      if (this.#paused !== undefined) await this.#paused;
      if (this.#socketClosed) break;
      let received: [Uint8Array, Deno.Addr];
      try {
        received = await this.#socket.receive(buffer);
      } catch (error) {
        if (
          this.#socketClosed || error instanceof Deno.errors.BadResource ||
          error instanceof Deno.errors.Interrupted
        ) break;
        // ICMP errors and the like surface here; they concern one peer, not the socket.
        this.#log.debug("udp receive error", { error: String(error) });
        continue;
      }
      const [data, addr] = received;
      if (this.#closing) continue;
      // The receive buffer is reused, so the query needs its own bytes while in flight.
      this.#handle(copier.copy(data, 0, data.length), addr);
    }
  }

  #handle(query: Uint8Array, addr: Deno.Addr): void {
    this.#inflight++;
    this.#resolver.resolveWith(query, "udp", addr, this);
  }

  /** Sends a response back to `addr` (the {@linkcode ResponseSink} side of this server). */
  deliver(response: Uint8Array | null, addr: Deno.Addr | undefined): void {
    if (response === null || addr === undefined || this.#socketClosed) {
      this.#sent();
      return;
    }
    if (++this.#sending > this.#sendingPeak) this.#sendingPeak = this.#sending;
    if (this.#sending >= MAX_PENDING_SENDS && this.#paused === undefined) {
      this.#paused = new Promise<void>((resolve) => this.#resume = resolve);
    }
    this.#socket.send(response, addr).then(this.#sendDone, this.#sendFailed);
  }

  readonly #sent = (): void => {
    if (--this.#inflight === 0) this.#drained?.();
  };

  readonly #sendDone = (): void => {
    if (--this.#sending <= MAX_PENDING_SENDS / 2) this.#unpause();
    this.#sent();
  };

  readonly #sendFailed = (error: unknown): void => {
    if (!this.#socketClosed) this.#log.debug("udp send failed", { error: String(error) });
    this.#sendDone();
  };

  #unpause(): void {
    const resume = this.#resume;
    this.#resume = undefined;
    this.#paused = undefined;
    resume?.();
  }

  /**
   * Stops taking queries, lets in-flight answers go out (for at most `timeoutMs`), and
   * closes the socket.
   */
  async close(timeoutMs = 10_000): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    if (this.#inflight > 0) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
        timer = setTimeout(resolve, timeoutMs);
      });
      clearTimeout(timer);
    }
    this.#socketClosed = true;
    this.#unpause();
    this.#socket.close();
    await this.#done;
  }
}
