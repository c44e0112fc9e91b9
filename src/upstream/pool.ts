/**
 * The upstream pool: picks an upstream for each query, keeps each upstream's pipelined
 * TLS connections, re-sends queries whose connection went away while their deadline
 * allows, backs off from upstreams that refuse or fail the handshake, and fails queries
 * whose deadline passes.
 *
 * @module
 */

import type { UpstreamSpec } from "../config.ts";
import type { Logger } from "../log.ts";
import { DotConnection, MAX_QUERIES_PER_CONNECTION } from "./dot_connection.ts";
import type { ConnectionOwner } from "./dot_connection.ts";
import { PendingQuery } from "./pending_query.ts";
import {
  type Answer,
  type Forwarder,
  NO_UPSTREAM_STATS,
  UpstreamError,
  type UpstreamStats,
  type UpstreamStatsFactory,
} from "./types.ts";

/** Options of {@linkcode UpstreamPool}. */
export interface PoolOptions {
  /** The upstreams, in configured order. */
  upstreams: UpstreamSpec[];
  /** Extra trusted CA certificates (PEM). */
  caCerts: string[];
  /** Per-query deadline in milliseconds. */
  timeoutMs: number;
  /** Most TLS connections per upstream. */
  connectionsPerUpstream: number;
  /** Idle connections close after this many milliseconds. */
  idleTimeoutMs: number;
  /** Logger. */
  log: Logger;
  /** Statistics hooks per upstream. */
  stats?: UpstreamStatsFactory;
  /** First backoff after a failed connection, doubled per consecutive failure. */
  backoffBaseMs?: number;
  /** Longest backoff. */
  backoffMaxMs?: number;
}

/**
 * Queries in flight on every connection before another is opened beside them. One: a
 * server that holds small answers back under Nagle's algorithm until it sees an ACK (Unbound
 * does) stalls a connection with two queries in flight and nothing more to send for up to
 * the peer's delayed-ACK time (40 ms on Linux); spreading concurrent queries over
 * connections avoids that at low load, and at high load every connection carries writes
 * that acknowledge promptly.
 */
const SPREAD_THRESHOLD = 1;
/** How often deadlines and idle connections are checked. */
const SWEEP_INTERVAL_MS = 20;

function lessBusy(a: DotConnection, b: DotConnection): boolean {
  const loadA = a.inflight.size;
  const loadB = b.inflight.size;
  return loadA < loadB || (loadA === loadB && a.lastWriteAt < b.lastWriteAt);
}

/** One DoT upstream: its connections, health and backoff. */
export class Upstream implements ConnectionOwner {
  readonly spec: UpstreamSpec;
  readonly caCerts: string[];
  readonly log: Logger;
  readonly stats: UpstreamStats;
  readonly connectTimeoutMs: number;
  /** Open or opening connections. */
  readonly connections: DotConnection[] = [];
  /** Consecutive connection failures. */
  failures = 0;
  /** `performance.now()` before which no new connection is tried. */
  backoffUntil = 0;
  /** `performance.now()` of the last answer, or -Infinity. */
  lastAnswerAt: number = -Infinity;
  /** The last failure, for readiness reports. */
  lastError: UpstreamError | null = null;
  readonly #pool: UpstreamPool;
  readonly #maxConnections: number;
  readonly #backoffBaseMs: number;
  readonly #backoffMaxMs: number;
  #silentCloses = 0;

  /** Creates an upstream owned by `pool`. */
  constructor(pool: UpstreamPool, spec: UpstreamSpec, options: PoolOptions) {
    this.#pool = pool;
    this.spec = spec;
    this.caCerts = options.caCerts;
    this.log = options.log;
    this.stats = (options.stats ?? NO_UPSTREAM_STATS)(spec.label);
    this.connectTimeoutMs = Math.min(options.timeoutMs, 5000);
    this.#maxConnections = options.connectionsPerUpstream;
    this.#backoffBaseMs = options.backoffBaseMs ?? 250;
    this.#backoffMaxMs = options.backoffMaxMs ?? 30_000;
  }

  /** True unless backing off after a failure. */
  available(now: number): boolean {
    return now >= this.backoffUntil;
  }

  /** True unless the last connection attempt failed and none has succeeded since. */
  get healthy(): boolean {
    return this.failures === 0;
  }

  /** Queries in flight on all connections. */
  get load(): number {
    let total = 0;
    for (const connection of this.connections) total += connection.inflight.size;
    return total;
  }

  /** Sends `query` on the least loaded connection, opening one when warranted. */
  send(query: PendingQuery): void {
    const now = performance.now();
    // The least loaded settled connection; failing that, the least loaded of any. Ties go
    // to the connection written least recently, so under steady traffic every connection
    // carries writes, and each write acknowledges what a Nagle-bound server sent before on
    // it; a connection still left owing an ACK is nudged (see DotConnection).
    let best: DotConnection | null = null;
    let bestSettled: DotConnection | null = null;
    for (const connection of this.connections) {
      if (best === null || lessBusy(connection, best)) best = connection;
      if (connection.settled(now) && (bestSettled === null || lessBusy(connection, bestSettled))) {
        bestSettled = connection;
      }
    }
    if (bestSettled !== null) best = bestSettled;

    const busy = best === null || best.inflight.size >= SPREAD_THRESHOLD;
    if (busy && this.connections.length < this.#maxConnections && now >= this.backoffUntil) {
      // Open another connection beside the busy ones; it takes queries once settled.
      this.open();
    }
    if (best === null) best = this.connections[this.connections.length - 1] ?? null;
    if (best === null) {
      query.fail(
        new UpstreamError("unavailable", "no connection could be opened", this.spec.label),
      );
      return;
    }
    if (best.inflight.size >= MAX_QUERIES_PER_CONNECTION) {
      query.fail(new UpstreamError("unavailable", "too many queries in flight", this.spec.label));
      return;
    }
    query.upstream = this.spec.label;
    best.send(query);
  }

  /** Opens one more connection; it takes queries once settled (or when it is the only one). */
  open(): DotConnection {
    const fresh = new DotConnection(this);
    this.connections.push(fresh);
    fresh.start();
    return fresh;
  }

  /**
   * Closes connections idle since before `idleSince`, and abandons connections on which
   * nothing was answered or written for `stallMs` while queries waited.
   */
  maintain(now: number, idleSince: number, stallMs: number): void {
    for (const connection of [...this.connections]) {
      if (connection.stalled(now, stallMs)) {
        connection.abandon(`no answer or write progress for ${stallMs} ms`);
        continue;
      }
      if (
        connection.state === "open" && connection.inflight.size === 0 &&
        connection.lastActive < idleSince
      ) {
        this.log.debug("closing idle upstream connection", { upstream: this.spec.label });
        connection.close();
      }
    }
  }

  /** Closes every connection. */
  async close(): Promise<void> {
    const connections = [...this.connections];
    for (const connection of connections) connection.close();
    await Promise.all(connections.map((c) => c.finished));
  }

  /** A handshake completed: the upstream is reachable, so failures and backoff reset. */
  onOpen(_connection: DotConnection): void {
    if (this.failures > 0) {
      this.log.info("upstream reachable again", { upstream: this.spec.label });
    }
    this.failures = 0;
    this.backoffUntil = 0;
  }

  /** Records the answer's latency and settles `query` with `response`. */
  onAnswer(
    _connection: DotConnection,
    query: PendingQuery,
    response: Uint8Array,
    seconds: number,
  ): void {
    this.lastAnswerAt = performance.now();
    this.#silentCloses = 0;
    this.stats.answered(seconds);
    query.complete(response, this.spec.label);
  }

  /**
   * Drops `connection` and counts a failure (with backoff) when it never opened, timed out,
   * or closed silently several times in a row; then hands `orphans` back to the pool.
   */
  onClosed(
    connection: DotConnection,
    orphans: PendingQuery[],
    failure: UpstreamError | null,
  ): void {
    const index = this.connections.indexOf(connection);
    if (index >= 0) this.connections.splice(index, 1);
    // A connection that never opened is a failure. One that opened and then closed with
    // queries unanswered may be a restart or a server limiting its connections (RFC 7766
    // allows that): retry at once, but a few such closes in a row count as a failure.
    let failed = failure !== null && (!connection.opened || failure.reason === "timeout");
    if (!failed && connection.opened && connection.answered === 0 && orphans.length > 0) {
      this.#silentCloses++;
      failed = this.#silentCloses >= 3;
    }
    if (failed) {
      this.failures++;
      const error = failure ??
        new UpstreamError("reset", `${this.spec.label} closed before answering`, this.spec.label);
      if (failure === null) this.stats.error("reset");
      this.#silentCloses = 0;
      this.lastError = error;
      const delay = Math.min(this.#backoffMaxMs, this.#backoffBaseMs * 2 ** (this.failures - 1));
      this.backoffUntil = performance.now() + delay * (0.8 + Math.random() * 0.4);
      if (this.failures === 1 || this.failures % 10 === 0) {
        this.log.warn("upstream failing; backing off", {
          upstream: this.spec.label,
          reason: error.reason,
          failures: this.failures,
          backoff_ms: Math.round(delay),
        });
      }
      for (const query of orphans) query.lastError = error;
    } else if (orphans.length > 0 && failure !== null) {
      for (const query of orphans) query.lastError = failure;
    }
    if (orphans.length > 0) {
      if (!failed) this.stats.reconnect();
      this.#pool.redispatch(orphans);
    }
  }
}

/**
 * Forwards queries to a set of DoT upstreams.
 *
 * @example
 * ```ts ignore
 * const pool = new UpstreamPool({ upstreams, caCerts: [], timeoutMs: 4000,
 *   connectionsPerUpstream: 2, idleTimeoutMs: 30000, log });
 * const answer = await pool.forward(query, questionEnd);
 * await pool.close();
 * ```
 */
export class UpstreamPool implements Forwarder {
  /** The upstreams, in configured order. */
  readonly upstreams: Upstream[];
  readonly #timeoutMs: number;
  readonly #idleTimeoutMs: number;
  readonly #stallMs: number;
  readonly #log: Logger;
  /** Pending queries in deadline order (all share one timeout). */
  #queue: PendingQuery[] = [];
  #queueHead = 0;
  #sweepTimer: ReturnType<typeof setInterval> | undefined;
  #closed = false;

  /** Creates a pool; connections open on demand. */
  constructor(options: PoolOptions) {
    this.#timeoutMs = options.timeoutMs;
    // A whole deadline without any answer on a busy connection: the upstream black-holes.
    this.#stallMs = options.timeoutMs;
    this.#idleTimeoutMs = options.idleTimeoutMs;
    this.#log = options.log;
    this.upstreams = options.upstreams.map((spec) => new Upstream(this, spec, options));
  }

  forward(query: Uint8Array, questionEnd: number): Promise<Answer> {
    const pending = new PendingQuery(query, questionEnd);
    this.submit(pending);
    return pending.promise;
  }

  /** Sends `pending` upstream under the pool's deadline; it reports through its hooks. */
  submit(pending: PendingQuery): void {
    const now = performance.now();
    pending.deadline = now + this.#timeoutMs;
    if (this.#closed) {
      pending.fail(new UpstreamError("unavailable", "the proxy is shutting down"));
      return;
    }
    this.#queue.push(pending);
    this.#ensureSweep();
    this.#dispatch(pending, now);
  }

  /**
   * Opens a connection to every upstream now, so the first queries find one open and
   * settled, and a broken upstream shows in the log at start rather than at the first query.
   */
  warm(): void {
    for (const upstream of this.upstreams) {
      if (upstream.connections.length === 0) upstream.open();
    }
    this.#ensureSweep();
  }

  /** Sends queries again whose connection went away, while their deadline allows. */
  redispatch(queries: PendingQuery[]): void {
    const now = performance.now();
    for (const query of queries) {
      if (query.done) continue;
      if (now >= query.deadline || this.#closed) {
        query.fail(this.#timeoutError(query));
        continue;
      }
      this.#dispatch(query, now);
    }
  }

  #dispatch(query: PendingQuery, now: number): void {
    let chosen: Upstream | null = null;
    let chosenLoad = Infinity;
    for (const upstream of this.upstreams) {
      if (!upstream.available(now)) continue;
      const load = upstream.load;
      if (load < chosenLoad) {
        chosen = upstream;
        chosenLoad = load;
      }
    }
    if (chosen === null) {
      const last = query.lastError ?? this.upstreams.find((u) => u.lastError)?.lastError;
      this.upstreams.find((u) => u.spec.label === last?.upstream)?.stats.error("unavailable");
      query.fail(
        new UpstreamError(
          "unavailable",
          `no upstream available (all backing off${last ? ": " + last.message : ""})`,
          last?.upstream,
        ),
      );
      return;
    }
    chosen.send(query);
  }

  #timeoutError(query: PendingQuery): UpstreamError {
    const last = query.lastError;
    return new UpstreamError(
      "timeout",
      `no answer within ${this.#timeoutMs} ms${last ? " (" + last.message + ")" : ""}`,
      query.upstream || last?.upstream,
    );
  }

  #ensureSweep(): void {
    if (this.#sweepTimer !== undefined) return;
    this.#sweepTimer = setInterval(() => this.#sweep(), SWEEP_INTERVAL_MS);
  }

  #sweep(): void {
    const now = performance.now();
    // Stalls first: their queries are handed back (and fail or move) before deadlines hit.
    for (const upstream of this.upstreams) {
      upstream.maintain(now, now - this.#idleTimeoutMs, this.#stallMs);
    }
    const queue = this.#queue;
    let head = this.#queueHead;
    while (head < queue.length) {
      const query = queue[head];
      if (!query.done) {
        if (query.deadline > now) break;
        this.#log.debug("query deadline passed", {
          upstream: query.upstream,
          attempts: query.attempts,
        });
        this.#statsForTimeout(query);
        query.fail(this.#timeoutError(query));
      }
      head++;
    }
    if (head > 1024 && head * 2 > queue.length) {
      this.#queue = queue.slice(head);
      head = 0;
    }
    this.#queueHead = head;
    const idle = this.#queueHead === this.#queue.length &&
      this.upstreams.every((u) => u.connections.length === 0);
    if (idle && this.#sweepTimer !== undefined) {
      clearInterval(this.#sweepTimer);
      this.#sweepTimer = undefined;
      this.#queue = [];
      this.#queueHead = 0;
    }
  }

  #statsForTimeout(query: PendingQuery): void {
    this.upstreams.find((u) => u.spec.label === query.upstream)?.stats.error("timeout");
  }

  /** Fails what is pending, closes every connection and stops the sweep. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#sweepTimer !== undefined) {
      clearInterval(this.#sweepTimer);
      this.#sweepTimer = undefined;
    }
    for (let i = this.#queueHead; i < this.#queue.length; i++) {
      this.#queue[i].fail(new UpstreamError("unavailable", "the proxy is shutting down"));
    }
    this.#queue = [];
    this.#queueHead = 0;
    await Promise.all(this.upstreams.map((u) => u.close()));
  }
}
