/**
 * The one accept loop every connection-oriented listener uses (DNS over TCP, the HTTP
 * endpoint, and next DNS over TLS and DNS over HTTPS): it survives every accept error, pauses
 * only when the process is out of file descriptors, and holds the connection caps.
 *
 * - Errors: running out of descriptors (EMFILE, ENFILE) pauses accepting for `pauseMinMs`,
 *   doubling up to `pauseMaxMs` while it lasts (the client waits in the kernel's backlog);
 *   a connection reset before `accept()` costs nothing and never pauses; any other error
 *   pauses once per {@linkcode SPIN_GUARD_ERRORS} in a row so that an unforeseen persistent
 *   error cannot spin a core. Each kind is logged at most once per ten seconds. `Deno.serve`
 *   ends its accept loop for good on EMFILE: this one never does.
 * - Caps: `maxConnections` in all; `maxConnectionsPerClient` per client (IPv4 address, IPv6
 *   /64). A client at its cap that opens one more loses its longest-idle connection (one
 *   whose {@linkcode Served.idle} is true) instead; only when none is idle is the new one
 *   closed. Optionally, clients that a predicate calls outsiders (outside `--allow`) share a
 *   small cap of their own and do not count towards the others'.
 *
 * A slot is taken at `accept()` and given back when the connection's
 * {@linkcode Served.finished} settles. A TLS listener gets its handshake deadline counted
 * against the caps by doing the handshake inside `serve`: pass the `Deno.TlsListener` as
 * the acceptor (its `accept()` returns before the handshake) and, in `serve`, race
 * `conn.handshake()` against a timer that aborts the connection; a client that opens
 * connections and never completes a handshake then holds at most its share of slots, for at
 * most the deadline.
 *
 * @example
 * ```ts ignore
 * const loop = new AcceptLoop(Deno.listen({ hostname: "127.0.0.1", port: 5300 }), {
 *   name: "tcp",
 *   maxConnections: 1000,
 *   maxConnectionsPerClient: 64,
 *   log,
 *   serve: (conn, client) => new MyConnection(conn, client.key), // a Served
 * });
 * loop.open; // connections open now
 * await loop.close(); // stops accepting; the connections are the caller's to close
 * ```
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import { errorMessage, type Logger, RateLimitedLog } from "../log.ts";
import { clientKey } from "../resolver/admission.ts";

/** What the loop accepts connections from: `Deno.Listener` and `Deno.TlsListener` fit. */
export interface Acceptor<C extends Deno.Conn = Deno.Conn> {
  /** The bound address. */
  readonly addr: Deno.Addr;
  /** Waits for the next connection. */
  accept(): Promise<C>;
  /** Stops listening; a pending `accept()` rejects. */
  close(): void;
}

/** A connection being served, as the loop sees it. */
export interface Served {
  /** Settles (never rejects) once the connection is closed and its work is over. */
  readonly finished: Promise<void>;
  /** True when closing it loses nothing (no query in flight, nothing unsent). */
  readonly idle: boolean;
  /** When it last read or wrote (`performance.now()` time), to find the longest idle. */
  readonly lastActive: number;
  /** Closes it now. */
  abort(): void;
  /**
   * Stops taking new work and closes once what is in hand is done (optional; see
   * {@linkcode AcceptLoop.drain}).
   */
  shutdown?(): void;
}

/** What the loop knows about an accepted client, handed to `serve`. */
export interface AcceptedClient {
  /** The client's address (undefined for a non-IP socket). */
  readonly remote: Deno.NetAddr | undefined;
  /** The client for the per-client caps: IPv4 address or IPv6 /64. */
  readonly key: string;
  /** True when `outsiders.test` said so: counted apart, with their own cap. */
  readonly outsider: boolean;
}

/** Statistics hooks of an accept loop. */
export interface AcceptStats {
  /** A connection was accepted and is being served. */
  accepted(): void;
  /** A connection was closed on accept, at a cap. */
  rejected(): void;
}

/** Options of {@linkcode AcceptLoop}. */
export interface AcceptLoopOptions<C extends Deno.Conn> {
  /** The listener's name at the start of its log lines: "tcp", "http", "dot". */
  name: string;
  /** Most connections open at once (outsiders apart). */
  maxConnections: number;
  /** Most connections open at once per client (default: no such cap). */
  maxConnectionsPerClient?: number;
  /**
   * At `maxConnections`, let a new client take the place of an idle connection of the client
   * holding the most, when that one holds at least two more than the new client (so shares
   * even out, and a probe from a new address always gets in: the HTTP endpoint's kubelet
   * probe against one client holding every connection, issue 23). Needs
   * `maxConnectionsPerClient`, whose groups it reads.
   */
  reclaimAtCap?: boolean;
  /** Clients counted apart, with a cap of their own (clients outside `--allow`). */
  outsiders?: { test(remote: Deno.NetAddr): boolean; max: number };
  /** First pause when out of descriptors (default 5 ms). */
  pauseMinMs?: number;
  /** Longest pause when out of descriptors (default 100 ms). */
  pauseMaxMs?: number;
  /** Level of the line about connections reset before accept (default "debug"). */
  resetLogLevel?: "debug" | "warn";
  /** The logger. */
  log: Logger;
  /** Statistics hooks. */
  stats?: AcceptStats;
  /** Starts serving an admitted connection; must not throw. */
  serve(conn: C, client: AcceptedClient): Served;
}

/** Other accept errors in a row after which the loop pauses once anyway. */
export const SPIN_GUARD_ERRORS = 100;
/** Accept failures and the connection caps are logged at most once per this interval. */
const LOG_INTERVAL_MS = 10_000;

/**
 * True for the errors of a process (EMFILE, os error 24) or system (ENFILE, 23) out of file
 * descriptors, on which accepting must pause rather than spin.
 *
 * @example
 * ```ts
 * import { isDescriptorExhaustion } from "./accept_loop.ts";
 * isDescriptorExhaustion(new Error("Too many open files (os error 24)")); // true
 * ```
 */
export function isDescriptorExhaustion(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const code = "code" in error ? error.code : undefined;
  if (code === "EMFILE" || code === "ENFILE") return true;
  return /\(os error (23|24|10024)\)|too many open files/i.test(error.message);
}

/**
 * True for accept errors about one connection that is already gone (ECONNABORTED,
 * ECONNRESET, ENOTCONN: a client that reset before accept), as opposed to the listener's.
 *
 * @example
 * ```ts
 * import { isConnectionGone } from "./accept_loop.ts";
 * isConnectionGone(new Error("Software caused connection abort (os error 103)")); // true
 * ```
 */
export function isConnectionGone(error: unknown): boolean {
  if (
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.ConnectionReset || error instanceof Deno.errors.NotConnected
  ) return true;
  return error instanceof Error && /\(os error (103|104|107)\)/.test(error.message);
}

/**
 * Closes `conn`, ignoring that it is closed already.
 *
 * @example
 * ```ts
 * import { closeQuietly } from "./accept_loop.ts";
 * const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
 * const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
 * closeQuietly(conn);
 * closeQuietly(conn); // no error
 * listener.close();
 * ```
 */
export function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // Already closed.
  }
}

/** Accepts connections from one listener until closed, within the caps. */
export class AcceptLoop<C extends Deno.Conn = Deno.Conn> {
  readonly #listener: Acceptor<C>;
  readonly #options: AcceptLoopOptions<C>;
  readonly #served = new Set<Served>();
  /** Open connections of each client inside the caps (only with a per-client cap). */
  readonly #perClient = new Map<string, Set<Served>>();
  #outsiders = 0;
  readonly #exhaustedLog: RateLimitedLog;
  readonly #errorLog: RateLimitedLog;
  readonly #limitLog: RateLimitedLog;
  readonly #done: Promise<void>;
  #closing = false;
  #wakeFromPause: (() => void) | undefined;

  /** Starts accepting from `listener`, which the loop then owns and closes. */
  constructor(listener: Acceptor<C>, options: AcceptLoopOptions<C>) {
    this.#listener = listener;
    this.#options = options;
    this.#exhaustedLog = new RateLimitedLog(options.log, LOG_INTERVAL_MS);
    this.#errorLog = new RateLimitedLog(options.log, LOG_INTERVAL_MS);
    this.#limitLog = new RateLimitedLog(options.log, LOG_INTERVAL_MS);
    this.#done = this.#run().catch((error) => {
      options.log.error(`${options.name} accept loop failed; no longer serving`, {
        error: errorMessage(error),
      });
    });
  }

  /** The bound address. */
  get addr(): Deno.Addr {
    return this.#listener.addr;
  }

  /** Connections open now (outsiders included). */
  get open(): number {
    return this.#served.size;
  }

  /** The connections open now. */
  connections(): IterableIterator<Served> {
    return this.#served.values();
  }

  /**
   * Stops accepting (closes the listener) and resolves once the loop has ended. The open
   * connections are left to the caller (see {@linkcode AcceptLoop.connections}).
   */
  async close(): Promise<void> {
    if (!this.#closing) {
      this.#closing = true;
      try {
        this.#listener.close();
      } catch {
        // Already closed.
      }
      this.#wakeFromPause?.();
    }
    await this.#done;
  }

  /**
   * Closes the loop, asks every open connection to {@linkcode Served.shutdown} (finish what
   * it has in hand), and waits up to `timeoutMs` for them all to finish; whatever is still
   * open then is aborted. Returns the connections that were open when it started.
   */
  async drain(timeoutMs: number): Promise<Served[]> {
    await this.close();
    const connections = [...this.#served];
    for (const connection of connections) connection.shutdown?.();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const forced = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        for (const connection of this.#served) connection.abort();
        resolve();
      }, timeoutMs);
    });
    await Promise.race([Promise.all(connections.map((c) => c.finished)), forced]);
    clearTimeout(timer);
    return connections;
  }

  async #run(): Promise<void> {
    const name = this.#options.name;
    const pauseMin = this.#options.pauseMinMs ?? 5;
    const pauseMax = this.#options.pauseMaxMs ?? 100;
    let pauseMs = 0;
    let failures = 0;
    while (!this.#closing) {
      let conn: C;
      try {
        conn = await this.#listener.accept();
      } catch (error) {
        if (this.#closing) break;
        if (error instanceof Deno.errors.BadResource) {
          this.#options.log.error(`${name} listener closed unexpectedly; no longer serving`, {
            error: errorMessage(error),
          });
          break;
        }
        if (isDescriptorExhaustion(error)) {
          // The connection waits in the kernel's backlog; retry once descriptors free up.
          pauseMs = pauseMs === 0 ? pauseMin : Math.min(pauseMs * 2, pauseMax);
          this.#exhaustedLog.warn(`${name} accept failed: out of file descriptors; pausing`, {
            error: errorMessage(error),
            pause_ms: pauseMs,
            open: this.#served.size,
          });
          await this.#pause(pauseMs);
        } else if (isConnectionGone(error)) {
          // A client that reset before accept: next one at once, and nothing worth more than
          // a line now and then (such resets cost an attacker nothing).
          const fields = { error: errorMessage(error) };
          if (this.#options.resetLogLevel === "warn") {
            this.#errorLog.warn(`${name} accept failed`, fields);
          } else this.#errorLog.debug(`${name} accept failed`, fields);
        } else {
          this.#errorLog.warn(`${name} accept failed`, { error: errorMessage(error) });
          if (++failures % SPIN_GUARD_ERRORS === 0) await this.#pause(pauseMax);
        }
        continue;
      }
      pauseMs = 0;
      failures = 0;
      this.#admit(conn);
    }
  }

  #pause(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.#wakeFromPause = undefined;
        resolve();
      }, ms);
      this.#wakeFromPause = () => {
        clearTimeout(timer);
        this.#wakeFromPause = undefined;
        resolve();
      };
    });
  }

  #admit(conn: C): void {
    if (this.#closing) {
      closeQuietly(conn);
      return;
    }
    const options = this.#options;
    let remote: Deno.NetAddr | undefined;
    try {
      const addr = conn.remoteAddr;
      remote = "hostname" in addr ? addr : undefined;
    } catch {
      // Gone already; serving it will find out.
    }
    const key = remote === undefined ? "" : clientKey(remote.hostname);
    const outsider = remote !== undefined && options.outsiders !== undefined &&
      options.outsiders.test(remote);
    const perClientCap = options.maxConnectionsPerClient;
    let mine = perClientCap === undefined || outsider ? undefined : this.#perClient.get(key);
    if (mine !== undefined && mine.size >= perClientCap!) this.#evictIdle(mine, remote);
    const atClientCap = mine !== undefined && mine.size >= perClientCap!;
    let insiders = this.#served.size - this.#outsiders;
    if (
      !outsider && !atClientCap && insiders >= options.maxConnections && options.reclaimAtCap &&
      this.#reclaimFor(mine?.size ?? 0)
    ) insiders--;
    const full = outsider
      ? this.#outsiders >= options.outsiders!.max
      : insiders >= options.maxConnections || atClientCap;
    if (full) {
      options.stats?.rejected();
      this.#limitLog.warn(`${options.name} connection limit reached; closing new connection`, {
        limit: outsider
          ? options.outsiders!.max
          : atClientCap
          ? perClientCap
          : options.maxConnections,
        per: outsider ? "outside --allow" : atClientCap ? "client" : "proxy",
        client: formatAddr(remote) ?? "unknown",
      });
      closeQuietly(conn);
      return;
    }
    options.stats?.accepted();
    const served = options.serve(conn, { remote, key, outsider });
    this.#served.add(served);
    if (outsider) this.#outsiders++;
    else if (perClientCap !== undefined) {
      if (mine === undefined) this.#perClient.set(key, mine = new Set());
      mine.add(served);
    }
    const group = mine;
    served.finished.then(() => {
      this.#served.delete(served);
      if (outsider) {
        this.#outsiders--;
        return;
      }
      if (group === undefined) return;
      group.delete(served);
      if (group.size === 0 && this.#perClient.get(key) === group) this.#perClient.delete(key);
    });
  }

  /**
   * At the cap, closes an idle connection of the client holding the most, for a new client
   * holding `held`, if that client holds at least two more; true when one was closed.
   */
  #reclaimFor(held: number): boolean {
    let largest: Set<Served> | undefined;
    for (const group of this.#perClient.values()) {
      if (largest === undefined || group.size > largest.size) largest = group;
    }
    if (largest === undefined || largest.size < held + 2) return false;
    for (const served of largest) {
      if (!served.idle) continue;
      // Out of the counts at once: its `finished` settles later.
      largest.delete(served);
      this.#served.delete(served);
      served.abort();
      this.#options.log.debug(
        `${this.#options.name} connection limit reached; closed an idle connection of the ` +
          "client holding the most",
        { limit: this.#options.maxConnections, held: largest.size + 1 },
      );
      return true;
    }
    return false;
  }

  /** Closes the longest-idle connection of `connections`, if one is idle. */
  #evictIdle(connections: Set<Served>, remote: Deno.NetAddr | undefined): void {
    let oldest: Served | undefined;
    for (const served of connections) {
      if (served.idle && (oldest === undefined || served.lastActive < oldest.lastActive)) {
        oldest = served;
      }
    }
    if (oldest === undefined) return;
    // Out of the counts at once: its `finished` settles later.
    connections.delete(oldest);
    this.#served.delete(oldest);
    oldest.abort();
    this.#options.log.debug(
      `${this.#options.name} connections per client reached; closed its longest-idle one`,
      { limit: this.#options.maxConnectionsPerClient, client: formatAddr(remote) },
    );
  }
}
