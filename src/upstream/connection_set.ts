/**
 * An upstream's connections, and which one a query goes on: the shared pipelined ones (at
 * most `maxConnections`, opened as the rules below warrant) and the connections of one
 * question each that look for a query of death (see `Upstream.sendIsolated`).
 *
 * The rules, from measurements. A server under Nagle's algorithm (Unbound's DoT) holds an
 * answer while an earlier one on the connection is unacknowledged, and Linux delays this
 * side's ACK by up to 40 ms. A query written on a clean idle connection (see `REST_MS`) is
 * answered at once, so each query goes to one, the most recently used (the others can idle
 * out); with none, another connection opens, up to the limit, and meanwhile the query goes to
 * the least loaded connection already dirty rather than dirtying a clean one. Failing that:
 * the least loaded open connection, then the least loaded of any.
 *
 * Under load what costs is the number of TLS writes: a burst of queries shares one
 * connection, and one write (measured: 2 connections at saturation 19.5k qps, 8 used in turn
 * 14.3k). The burst goes where answers were read since the last write while more are owed:
 * its write carries the ACK the server's held answers wait for (closed-loop clients with 32
 * in flight over TCP: 8-11k qps without, 15-17k with). Else to the settled connection
 * written most recently.
 *
 * @module
 */

import type { UpstreamConnection } from "./connection.ts";
import type { ExchangeCarrier } from "./exchange.ts";

/** Questions owed by an upstream from which it counts as busy (see the module doc). */
const BUSY_OUTSTANDING = 8;

/** Most questions in flight on a connection before a busy upstream spreads to another. */
const BATCH_LIMIT = 128;

/**
 * Most connections of one question each open at once: isolating costs a handshake each, and
 * a server that closes every connection with many questions on it must not be answered with
 * a handshake per question.
 */
const MAX_ISOLATED = 32;

/**
 * Under load: a connection that owes the server an ACK (the one owing longest), whose write
 * then releases the answers held on it; else the connection written most recently. Either
 * unless it carries too much already.
 */
function batchesBetter(a: UpstreamConnection, b: UpstreamConnection): boolean {
  const aFull = a.load >= BATCH_LIMIT;
  const bFull = b.load >= BATCH_LIMIT;
  if (aFull !== bFull) return bFull;
  if (aFull) return a.load < b.load;
  const aOwes = a.owesAck;
  if (aOwes !== b.owesAck) return aOwes;
  return aOwes ? a.lastWriteAt < b.lastWriteAt : a.lastWriteAt > b.lastWriteAt;
}

/** Fewer in flight, or as many and written to longer ago. */
function lessBusy(a: UpstreamConnection, b: UpstreamConnection): boolean {
  const loadA = a.load;
  const loadB = b.load;
  return loadA < loadB || (loadA === loadB && a.lastWriteAt < b.lastWriteAt);
}

/**
 * The connections of one upstream.
 *
 * @example
 * ```ts ignore
 * const set = new ConnectionSet(() => connect(owner, context), 2);
 * const connection = set.choose(outstanding, null, clock.now());
 * connection?.send(exchange);
 * ```
 */
export class ConnectionSet {
  /** Shared connections, open or opening. */
  readonly shared: UpstreamConnection[] = [];
  readonly #isolated = new Set<UpstreamConnection>();
  readonly #create: () => UpstreamConnection;
  readonly #max: number;
  /** The connection the last query under load went to (see {@linkcode #sameBatch}). */
  #batchTarget: UpstreamConnection | null = null;

  /** A set whose connections `create` makes, at most `maxConnections` shared ones. */
  constructor(create: () => UpstreamConnection, maxConnections: number) {
    this.#create = create;
    this.#max = maxConnections;
  }

  /**
   * True when no connection is open and one is being opened: a question sent now waits for
   * a handshake that may never complete (a tarpit, a black hole, a frozen server).
   */
  get connecting(): boolean {
    let connecting = false;
    for (const connection of this.shared) {
      if (connection.state === "open") return false;
      if (connection.state === "connecting") connecting = true;
    }
    return connecting;
  }

  /** True when a shared connection is open. */
  get anyOpen(): boolean {
    return this.shared.some((c) => c.state === "open");
  }

  /**
   * True when a hedge could go on a connection other than `busy`: another open or opening
   * connection exists, or there is room to open one.
   */
  hasRoomBeside(busy: ExchangeCarrier | null): boolean {
    if (this.shared.length < this.#max) return true;
    return this.shared.some((c) => c !== busy && c.state !== "closed");
  }

  /** Exchanges in flight on the shared connections (late ones included). */
  get load(): number {
    let total = 0;
    for (const connection of this.shared) total += connection.load;
    return total;
  }

  /** The shared connection `carrier` is, if it is one. */
  find(carrier: ExchangeCarrier | null): UpstreamConnection | undefined {
    return this.shared.find((c) => c === carrier);
  }

  /**
   * The connection for a query now, by the rules in the module doc, opening one when
   * warranted (`outstanding`: what the upstream owes; `avoid`: a connection the query must
   * not go on); null when there is none.
   */
  choose(
    outstanding: number,
    avoid: ExchangeCarrier | null,
    now: number,
  ): UpstreamConnection | null {
    const busy = outstanding >= BUSY_OUTSTANDING;
    const same = busy && avoid === null ? this.#sameBatch(now) : null;
    return same ?? this.#choose(busy, avoid, now);
  }

  /**
   * Under load, the connection this clock reading's batch is going to: chosen by
   * {@linkcode #choose} for an earlier query of the same run of work and written then, so still
   * the one written most recently; null when it filled up or closed (then choose again).
   */
  #sameBatch(now: number): UpstreamConnection | null {
    const last = this.#batchTarget;
    return last !== null && last.lastWriteAt === now && last.load < BATCH_LIMIT &&
        last.settled(now)
      ? last
      : null;
  }

  #choose(busy: boolean, avoid: ExchangeCarrier | null, now: number): UpstreamConnection | null {
    let clean: UpstreamConnection | null = null;
    let dirty: UpstreamConnection | null = null;
    let best: UpstreamConnection | null = null;
    for (const connection of this.shared) {
      if (connection === avoid) continue;
      if (!busy && connection.cleanIdle(now)) {
        if (clean === null || connection.lastWriteAt > clean.lastWriteAt) clean = connection;
      } else if (connection.state === "open" && connection.settled(now)) {
        if (
          dirty === null || (busy ? batchesBetter(connection, dirty) : lessBusy(connection, dirty))
        ) {
          dirty = connection;
        }
      }
      if (
        best === null || (connection.state === "open" && best.state !== "open") ||
        (connection.state === best.state && lessBusy(connection, best))
      ) best = connection;
    }
    if (
      clean === null && (!busy || dirty === null) &&
      this.shared.length < this.#max && !this.#anyConnecting(avoid)
    ) {
      // It takes queries once clean (or at once when it is the only one).
      const fresh = this.open();
      if (best === null) best = fresh;
    }
    best = clean ?? dirty ?? best;
    if (busy) this.#batchTarget = best;
    return best;
  }

  /** True while a connection (other than `except`) is still being opened. */
  #anyConnecting(except: ExchangeCarrier | null): boolean {
    for (const connection of this.shared) {
      if (connection !== except && connection.state === "connecting") return true;
    }
    return false;
  }

  /** The least busy open shared connection (a probe's), or null. */
  leastBusyOpen(): UpstreamConnection | null {
    let best: UpstreamConnection | null = null;
    for (const candidate of this.shared) {
      if (candidate.state === "open" && (best === null || lessBusy(candidate, best))) {
        best = candidate;
      }
    }
    return best;
  }

  /** Opens one more shared connection. */
  open(): UpstreamConnection {
    const fresh = this.#create();
    this.shared.push(fresh);
    fresh.start();
    return fresh;
  }

  /** True when one more connection of one question may open (see {@linkcode MAX_ISOLATED}). */
  get mayIsolate(): boolean {
    return this.#isolated.size < MAX_ISOLATED;
  }

  /** Opens a connection for one question. */
  openIsolated(): UpstreamConnection {
    const connection = this.#create();
    this.#isolated.add(connection);
    connection.start();
    return connection;
  }

  /** True when `connection` carries one question only. */
  isIsolated(connection: UpstreamConnection): boolean {
    return this.#isolated.has(connection);
  }

  /** Forgets a closed connection; true when it was one of one question. */
  remove(connection: UpstreamConnection): boolean {
    const index = this.shared.indexOf(connection);
    if (index >= 0) this.shared.splice(index, 1);
    return this.#isolated.delete(connection);
  }

  /** Closes (without judging the upstream) every open shared connection that read nothing since `at`. */
  closeSilentSince(at: number): void {
    for (const connection of [...this.shared]) {
      if (connection.state === "open" && connection.lastReadAt < at) connection.close();
    }
  }

  /**
   * Tidies: forgets late answers written before `lateBefore` that never came, completes a
   * nudge's pending frame, and closes (calling `onIdle` first) the open connections with
   * nothing in flight and no activity since `idleSince`.
   */
  maintain(now: number, idleSince: number, lateBefore: number, onIdle: () => void): void {
    for (const connection of [...this.shared]) {
      connection.purge(lateBefore);
      connection.completePendingFrame(now);
      if (
        connection.state === "open" && connection.load === 0 && connection.lastActive < idleSince
      ) {
        onIdle();
        connection.close();
      }
    }
  }

  /** Closes every connection; resolves once all are closed. */
  async close(): Promise<void> {
    const connections = [...this.shared, ...this.#isolated];
    for (const connection of connections) connection.close();
    await Promise.all(connections.map((c) => c.finished));
  }
}
