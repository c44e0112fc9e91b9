/**
 * DNS-over-TLS upstreams for tests that break on command, on a real loopback port, and a
 * black hole where connections hang.
 *
 * {@linkcode FaultyUpstream} serves DoT like `DotServer` (pipelined, answers out of
 * order when delayed) until a test switches on a {@linkcode Fault}; it switches back on the
 * SAME port, so a test can watch a client notice the fault and recover from it.
 *
 * Design: the public port is a plain TCP listener (`Deno.listen`) that this module owns
 * completely. Every accepted connection is relayed byte for byte to one of two internal
 * `Deno.listenTls` listeners on other loopback ports (the test certificate for `dns.test`,
 * or the wrong one). Deno has no server-side `startTls`, and closing a TLS listener to open
 * a plain one on the same port races with the port being taken; the relay avoids both. Owning
 * the TCP side is what makes the transport faults exact: "refuse" closes the public listener
 * (the kernel answers SYNs with RST), "tarpit" accepts and never relays, "freeze" stops
 * relaying in both directions and stops accepting, and resuming relays what was held. The
 * DNS faults ("silent", "slow", "garbage", ...) are decided by the internal TLS server per
 * query, from the fault in effect when the query arrives.
 *
 * {@linkcode BlackHole} is a listener with an accept backlog of 0 whose one queue slot is
 * taken by a connection nobody accepts: Linux drops every further SYN (`tcp_conn_request`
 * drops when the accept queue is full, whatever `tcp_syncookies` says; with
 * `tcp_abort_on_overflow=0`, the default, nothing is sent back), so a connect hangs until
 * the caller gives up. No root, iptables or routes needed.
 *
 * @module
 */

import { SERVER_KEY, SERVER_PEM, WRONG_KEY, WRONG_PEM } from "../fixtures/certs.ts";
import { answerFor, appendChunk, lengthFramed } from "./dns.ts";
import { sleep } from "./wait.ts";

/** What a {@linkcode FaultyUpstream} does wrong. See {@linkcode FAULTS} for each one. */
export type Fault =
  | "none"
  | "refuse"
  | "tarpit"
  | "silent"
  | "freeze"
  | "slow"
  | "wrong_cert"
  | "garbage"
  | "short_frames"
  | "reset"
  | "servfail"
  | "refused_rcode";

/**
 * Every fault, with what it does on the wire:
 *
 * - `none`: healthy DoT; answers at once.
 * - `refuse`: the port is closed: new connections are refused (RST, `ConnectionRefused`);
 *   established connections are closed (FIN, no TLS close_notify).
 * - `tarpit`: TCP connections are accepted, nothing is ever read or sent, TLS never starts.
 *   Established connections are closed when the fault is switched on (so a client has to
 *   reconnect into the tarpit); tarpitted connections stay stuck until the client closes
 *   them, {@linkcode FaultyUpstream.dropConnections} or `refuse`.
 * - `silent`: TLS completes, queries are read (and logged), nothing is answered.
 * - `freeze`: like SIGSTOP: no connection is accepted (the kernel still completes TCP
 *   handshakes into the backlog), nothing is relayed either way on established connections
 *   (TLS handshakes stall, queries and answers already on their way are held). Switching to
 *   any other fault releases everything held: held handshakes complete, held queries are
 *   answered (under the new fault), held answers are delivered.
 * - `slow`: a deterministic fraction of queries is answered after `slowMs`, the rest at once.
 * - `wrong_cert`: new connections get a TLS server presenting the certificate for
 *   `wrong.test` (signed by the test CA), which fails verification for `dns.test`.
 *   Established connections are closed when the fault is switched on.
 * - `garbage`: TLS completes; each answer is replaced by a frame of the same length holding
 *   the query's ID and then random bytes.
 * - `short_frames`: each answer is replaced by a 3-byte frame (the query's ID and 1 random
 *   byte), shorter than a DNS header.
 * - `reset`: TLS completes; the TCP connection is closed (no TLS close_notify) as soon as a
 *   query arrives, without answering.
 * - `servfail` / `refused_rcode`: every query gets rcode SERVFAIL (2) / REFUSED (5) with the
 *   same ID and question (and an OPT record when the query had one).
 */
export const FAULTS: readonly Fault[] = [
  "none",
  "refuse",
  "tarpit",
  "silent",
  "freeze",
  "slow",
  "wrong_cert",
  "garbage",
  "short_frames",
  "reset",
  "servfail",
  "refused_rcode",
];

/** One query as the upstream saw it. */
export interface QueryLogEntry {
  /** 1-based arrival number over the server's life (equals `queries` right after it). */
  seq: number;
  /** Message ID. */
  id: number;
  /** Question name in presentation form, case as sent, "." for the root; "" if unreadable. */
  name: string;
  /** Question type (1 A, 2 NS, ...); -1 if unreadable. */
  type: number;
  /** Number of the public TCP connection it came on (see `connections`); 0 if unknown. */
  connection: number;
  /** The fault in effect when it arrived, which decides how it is treated. */
  fault: Fault;
  /** `performance.now()` at arrival. */
  at: number;
}

/** Options of {@linkcode FaultyUpstream.start}. */
export interface FaultyUpstreamOptions {
  /** Address to listen on: "127.0.0.1" (default) or "::1". */
  hostname?: "127.0.0.1" | "::1";
  /**
   * Port to listen on. Default: a free port below Linux's ephemeral range (20000-32767), so
   * nothing else takes it while the upstream is in `refuse`; 0 lets the kernel choose.
   */
  port?: number;
  /** The fault to start with (default "none"). */
  fault?: Fault;
  /** Builds the answer to a query; `null` means no answer. Defaults to `answerFor`. */
  answer?: (query: Uint8Array) => Uint8Array | null;
  /** Fraction of queries that `slow` delays (default 0.1). */
  slowFraction?: number;
  /** Delay of a slow answer in milliseconds (default 300). */
  slowMs?: number;
  /**
   * Decides which queries `slow` delays, overriding `slowFraction`. `index` counts the
   * queries that arrived under `slow` so far (0-based).
   */
  isSlow?: (query: Uint8Array, index: number) => boolean;
  /**
   * A query this accepts closes its connection on arrival, unanswered, whatever the fault (a
   * query of death: the `reset` fault for one question only).
   */
  hangUpOn?: (query: Uint8Array) => boolean;
  /** Seed of the random bytes of `garbage` and `short_frames` (default 1). */
  seed?: number;
  /** Entries kept in `queryLog` (default 1000; the oldest are dropped). */
  queryLogLimit?: number;
  /** Certificate chain (PEM) of the healthy server; default the test certificate. */
  cert?: string;
  /** Its private key. */
  key?: string;
  /** Certificate chain (PEM) for `wrong_cert`; default the test CA's one for `wrong.test`. */
  wrongCert?: string;
  /** Its private key. */
  wrongKey?: string;
}

/** A running {@linkcode FaultyUpstream.flap}. */
export interface Flapper {
  /** Fault switches done so far (the first one included). */
  readonly switches: number;
  /** Stops flapping and waits for a switch under way; the last fault stays in effect. */
  stop(): Promise<void>;
}

// Loop bounds: every loop ends when its socket or the server closes; these caps only make
// the bound explicit.
const MAX_ACCEPTS = 1_000_000;
const MAX_CHUNKS = 10_000_000;
const MAX_GATE_WAITS = 100_000;
/** Re-binding the port after `refuse`: attempts, and the pause between them. */
const REBIND_ATTEMPTS = 100;
const REBIND_PAUSE_MS = 20;
/** Ports tried for a default `port`: below Linux's default ip_local_port_range. */
const STABLE_PORT_MIN = 20000;
const STABLE_PORT_MAX = 32767;
const STABLE_PORT_ATTEMPTS = 64;

function closeQuietly(resource: { close(): void }): void {
  try {
    resource.close();
  } catch {
    // Already closed.
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let off = 0; off < bytes.length;) off += await conn.write(bytes.subarray(off));
}

/** `[host]:port` for IPv6, `host:port` otherwise. */
function hostPort(hostname: string, port: number): string {
  return hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
}

/** A small seeded PRNG (mulberry32): the same seed gives the same bytes. */
function randomBytes(seed: number): (length: number) => Uint8Array {
  let state = seed >>> 0;
  return (length) => {
    const out = new Uint8Array(length);
    for (let i = 0; i < length; i++) {
      state = (state + 0x6d2b79f5) >>> 0;
      let t = state;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      out[i] = ((t ^ (t >>> 14)) >>> 0) & 0xff;
    }
    return out;
  };
}

/**
 * Listens on `hostname` at `port`, or when `port` is undefined at a free port below Linux's
 * default ephemeral range (32768-60999), where neither outgoing connections nor `port: 0`
 * listeners land: such a port stays ours while we close and re-open it.
 */
export function listenStable(hostname: string, port?: number): Deno.TcpListener {
  if (port !== undefined) return Deno.listen({ hostname, port, transport: "tcp" });
  for (let attempt = 0; attempt < STABLE_PORT_ATTEMPTS; attempt++) {
    const candidate = STABLE_PORT_MIN +
      Math.floor(Math.random() * (STABLE_PORT_MAX - STABLE_PORT_MIN + 1));
    try {
      return Deno.listen({ hostname, port: candidate, transport: "tcp" });
    } catch (error) {
      if (!(error instanceof Deno.errors.AddrInUse)) throw error;
    }
  }
  return Deno.listen({ hostname, port: 0, transport: "tcp" });
}

/** A free port from {@linkcode listenStable}'s range, for a server another process binds. */
export function freeStablePort(hostname = "127.0.0.1"): number {
  const listener = listenStable(hostname);
  const port = listener.addr.port;
  listener.close();
  return port;
}

/**
 * The end of the question section of `query` (12 when it has none), or -1 when the
 * question is unreadable.
 */
function questionEnd(query: Uint8Array): number {
  if (query.length < 12) return -1;
  const qdcount = (query[4] << 8) | query[5];
  if (qdcount === 0) return 12;
  if (qdcount !== 1) return -1;
  let at = 12;
  for (let labels = 0; labels < 128; labels++) {
    const length = query[at];
    if (length === undefined) return -1;
    if (length === 0) return at + 5 <= query.length ? at + 5 : -1;
    if ((length & 0xc0) === 0xc0) return at + 6 <= query.length ? at + 6 : -1;
    if ((length & 0xc0) !== 0) return -1;
    at += 1 + length;
  }
  return -1;
}

/** Name (presentation, case kept) and type of the question, without throwing. */
function describe(query: Uint8Array): { name: string; type: number } {
  const end = questionEnd(query);
  if (end <= 12) return { name: "", type: -1 };
  const labels: string[] = [];
  let at = 12;
  for (let i = 0; i < 128 && query[at] !== 0; i++) {
    const length = query[at];
    if ((length & 0xc0) !== 0) return { name: "", type: -1 };
    labels.push(new TextDecoder().decode(query.subarray(at + 1, at + 1 + length)));
    at += 1 + length;
  }
  return {
    name: labels.length === 0 ? "." : labels.join(".") + ".",
    type: (query[end - 4] << 8) | query[end - 3],
  };
}

/**
 * A response to `query` with rcode `rcode` and nothing but the query's own ID, opcode, RD,
 * CD and question (case kept), RA set, plus a minimal OPT record (1232 bytes, DO echoed)
 * when the query carried one right after its question. An unreadable query gets a bare
 * header with its ID.
 */
export function rcodeResponse(query: Uint8Array, rcode: number): Uint8Array {
  const end = questionEnd(query);
  const header = end < 0 ? 12 : end;
  let opt: number[] = [];
  if (end >= 12 && query.length >= end + 11 && query[end] === 0 && query[end + 2] === 41) {
    opt = [0, 0, 41, 0x04, 0xd0, 0, 0, query[end + 7] & 0x80, 0, 0, 0];
  }
  const out = new Uint8Array(header + opt.length);
  out.set(query.subarray(0, Math.min(header, query.length)));
  out[2] = 0x80 | (out[2] & 0x79);
  out[3] = 0x80 | (out[3] & 0x10) | (rcode & 0xf);
  out[4] = 0;
  out[5] = end > 12 ? 1 : 0;
  out.fill(0, 6, 10);
  out[10] = 0;
  out[11] = opt.length > 0 ? 1 : 0;
  out.set(opt, header);
  return out;
}

/** One public TCP connection and, when relayed, its connection to an internal listener. */
class Link {
  readonly id: number;
  readonly client: Deno.TcpConn;
  inner: Deno.TcpConn | null = null;
  closed = false;

  constructor(id: number, client: Deno.TcpConn) {
    this.id = id;
    this.client = client;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    closeQuietly(this.client);
    if (this.inner) closeQuietly(this.inner);
  }
}

interface Waiter {
  match: (entry: QueryLogEntry) => boolean;
  resolve: (entry: QueryLogEntry) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * A DoT upstream on a real port whose fault tests switch at run time with
 * {@linkcode FaultyUpstream.setFault}. Close it at the end of the test.
 *
 * @example
 * ```ts
 * const up = await FaultyUpstream.start();
 * try {
 *   // --upstream up.upstream() ... queries are answered
 *   await up.setFault("freeze"); // ... held
 *   await up.setFault("none"); // ... released and answered
 * } finally {
 *   await up.close();
 * }
 * ```
 */
export class FaultyUpstream {
  /** Address the public port listens on. */
  readonly hostname: string;
  /** The public port; it stays the same whatever the fault. */
  readonly port: number;
  /** Fraction of queries `slow` delays (settable). */
  slowFraction: number;
  /** Delay of a slow answer in milliseconds (settable). */
  slowMs: number;
  /** Queries read, over all connections (under every fault, `silent` and `reset` included). */
  queries = 0;
  /**
   * Response frames written to the TLS connections (answers, rcode answers, garbage and
   * short frames alike). Under `freeze` a written frame is held by the relay until release.
   */
  answers = 0;
  /** TCP connections accepted on the public port (tarpitted ones included). */
  connections = 0;
  /** TLS handshakes completed (server side). */
  handshakes = 0;
  /**
   * TLS handshakes that did not complete: the client rejected the certificate
   * (`wrong_cert`), or the connection was closed first (by either side).
   */
  failedHandshakes = 0;
  /** The most recent queries, oldest first (at most `queryLogLimit`). */
  readonly queryLog: QueryLogEntry[] = [];

  #fault: Fault;
  #listener: Deno.TcpListener | null;
  #accepting: Promise<void> = Promise.resolve();
  readonly #good: Deno.TlsListener;
  readonly #wrong: Deno.TlsListener;
  readonly #tlsAccepting: Promise<void>[];
  readonly #links = new Set<Link>();
  readonly #byInnerPort = new Map<number, Link>();
  readonly #parked = new Set<Deno.TcpConn>();
  readonly #tlsConns = new Set<Deno.TlsConn>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #timers = new Set<ReturnType<typeof setTimeout>>();
  readonly #waiters = new Set<Waiter>();
  readonly #answer: (query: Uint8Array) => Uint8Array | null;
  readonly #isSlow: ((query: Uint8Array, index: number) => boolean) | undefined;
  readonly #hangUpOn: ((query: Uint8Array) => boolean) | undefined;
  readonly #random: (length: number) => Uint8Array;
  readonly #logLimit: number;
  #slowIndex = 0;
  #gate: PromiseWithResolvers<void> | null = null;
  #switching: Promise<void> = Promise.resolve();
  #flappers = new Set<Flapper>();
  #closed = false;
  #closing: Promise<void> | null = null;

  private constructor(listener: Deno.TcpListener, options: FaultyUpstreamOptions) {
    this.hostname = listener.addr.hostname;
    this.port = listener.addr.port;
    this.#listener = listener;
    this.#fault = options.fault ?? "none";
    this.slowFraction = options.slowFraction ?? 0.1;
    this.slowMs = options.slowMs ?? 300;
    this.#answer = options.answer ?? answerFor;
    this.#isSlow = options.isSlow;
    this.#hangUpOn = options.hangUpOn;
    this.#random = randomBytes(options.seed ?? 1);
    this.#logLimit = options.queryLogLimit ?? 1000;
    this.#good = Deno.listenTls({
      hostname: "127.0.0.1",
      port: 0,
      cert: options.cert ?? SERVER_PEM,
      key: options.key ?? SERVER_KEY,
    });
    this.#wrong = Deno.listenTls({
      hostname: "127.0.0.1",
      port: 0,
      cert: options.wrongCert ?? WRONG_PEM,
      key: options.wrongKey ?? WRONG_KEY,
    });
    this.#tlsAccepting = [this.#acceptTls(this.#good), this.#acceptTls(this.#wrong)];
    if (this.#fault === "freeze") this.#gate = Promise.withResolvers<void>();
    if (this.#fault === "refuse") {
      listener.close();
      this.#listener = null;
    } else {
      this.#accepting = this.#accept(listener);
    }
  }

  /** Starts an upstream listening now (in `options.fault`, default "none"). */
  static start(options: FaultyUpstreamOptions = {}): Promise<FaultyUpstream> {
    const listener = listenStable(options.hostname ?? "127.0.0.1", options.port);
    return Promise.resolve(new FaultyUpstream(listener, options));
  }

  /** The fault in effect. */
  get fault(): Fault {
    return this.#fault;
  }

  /** Public TCP connections open now (tarpitted ones included). */
  get open(): number {
    return this.#links.size;
  }

  /** `--upstream` text for this upstream, verified against `tlsName`. */
  upstream(tlsName = "dns.test"): string {
    return `${hostPort(this.hostname, this.port)}#${tlsName}`;
  }

  /**
   * Switches the fault; resolves once it is in effect (for `refuse` once the port is closed
   * and every connection with it, for leaving `refuse` once the port listens again).
   * Switches are applied in call order. Switching to the fault in effect does nothing.
   */
  setFault(fault: Fault): Promise<void> {
    if (!FAULTS.includes(fault)) return Promise.reject(new TypeError(`unknown fault ${fault}`));
    const run = this.#switching.then(() => this.#apply(fault));
    this.#switching = run.catch(() => {});
    return run;
  }

  /**
   * Cycles through `faults`: the first now, the next every `periodMs`, at most
   * `maxSwitches` switches in all. Stop it with {@linkcode Flapper.stop} (`close` stops it
   * too).
   */
  flap(periodMs: number, faults: readonly Fault[], maxSwitches = 10_000): Flapper {
    if (faults.length === 0) throw new RangeError("flap needs at least one fault");
    let switches = 0;
    let stopped = false;
    const pause = { wake: () => {}, timer: undefined as ReturnType<typeof setTimeout> | undefined };
    const loop = (async () => {
      for (let i = 0; i < maxSwitches && !stopped && !this.#closed; i++) {
        try {
          await this.setFault(faults[i % faults.length]);
        } catch {
          return;
        }
        switches++;
        if (stopped) return;
        await new Promise<void>((resolve) => {
          pause.wake = resolve;
          pause.timer = setTimeout(resolve, periodMs);
        });
        clearTimeout(pause.timer);
      }
    })();
    const flapper: Flapper = {
      get switches() {
        return switches;
      },
      stop: async () => {
        stopped = true;
        clearTimeout(pause.timer);
        pause.wake();
        this.#flappers.delete(flapper);
        await loop;
      },
    };
    this.#flappers.add(flapper);
    return flapper;
  }

  /** Closes every public connection now (FIN; the client sees them break). */
  dropConnections(): void {
    for (const link of this.#links) link.close();
    for (const conn of this.#parked) closeQuietly(conn);
    this.#parked.clear();
  }

  /**
   * Resolves with the first logged query (already in `queryLog` or yet to come) that
   * `match` accepts; rejects after `timeoutMs`. Use `entry.seq` to look only at queries
   * after a point: `waitForQuery((q) => q.seq > before && q.type === 2)`.
   */
  waitForQuery(
    match: (entry: QueryLogEntry) => boolean,
    timeoutMs = 2000,
  ): Promise<QueryLogEntry> {
    const found = this.queryLog.find(match);
    if (found) return Promise.resolve(found);
    if (this.#closed) return Promise.reject(new Error("upstream closed"));
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        match,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#waiters.delete(waiter);
          reject(new Error(`no matching query within ${timeoutMs} ms`));
        }, timeoutMs),
      };
      this.#waiters.add(waiter);
    });
  }

  /**
   * Stops everything (listeners, connections, timers, flapping, pending `waitForQuery`) and
   * waits for it. Calling it again returns the same promise.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    await Promise.all([...this.#flappers].map((flapper) => flapper.stop()));
    this.#closed = true;
    await this.#switching;
    if (this.#listener) closeQuietly(this.#listener);
    this.#listener = null;
    closeQuietly(this.#good);
    closeQuietly(this.#wrong);
    this.dropConnections();
    for (const conn of this.#tlsConns) closeQuietly(conn);
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    this.#release();
    for (const waiter of this.#waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(new Error("upstream closed"));
    }
    this.#waiters.clear();
    await this.#accepting;
    await Promise.all(this.#tlsAccepting);
    for (let i = 0; i < 100 && this.#tasks.size > 0; i++) await Promise.all([...this.#tasks]);
  }

  // ------------------------------------------------------------------------------------------
  // Switching.

  async #apply(next: Fault): Promise<void> {
    if (this.#closed) throw new Error("upstream closed");
    const previous = this.#fault;
    if (previous === next) return;
    this.#fault = next;
    if (next === "refuse") {
      const listener = this.#listener;
      this.#listener = null;
      if (listener) closeQuietly(listener);
      this.dropConnections();
      this.#release();
      // The port is free only once the pending accept has let go of the listener.
      await this.#accepting;
      return;
    }
    if (previous === "refuse") await this.#relisten();
    if (next === "tarpit" || next === "wrong_cert") this.dropConnections();
    if (next === "freeze") {
      this.#gate ??= Promise.withResolvers<void>();
      return;
    }
    this.#release();
  }

  async #relisten(): Promise<void> {
    for (let attempt = 0; attempt < REBIND_ATTEMPTS; attempt++) {
      try {
        const listener = Deno.listen({ hostname: this.hostname, port: this.port });
        this.#listener = listener;
        this.#accepting = this.#accept(listener);
        return;
      } catch (error) {
        if (!(error instanceof Deno.errors.AddrInUse)) throw error;
        await sleep(REBIND_PAUSE_MS);
      }
    }
    throw new Error(`port ${this.port} stayed in use; cannot listen on it again`);
  }

  #release(): void {
    const gate = this.#gate;
    this.#gate = null;
    gate?.resolve();
  }

  /** Waits while frozen. */
  async #thawed(): Promise<void> {
    for (let i = 0; i < MAX_GATE_WAITS && this.#gate; i++) await this.#gate.promise;
  }

  // ------------------------------------------------------------------------------------------
  // The public port: accept, then relay or tarpit.

  async #accept(listener: Deno.TcpListener): Promise<void> {
    for (let i = 0; i < MAX_ACCEPTS; i++) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      if (this.#gate) {
        // A stopped process accepts nothing: hold the one accept already made.
        this.#parked.add(conn);
        await this.#thawed();
        if (!this.#parked.delete(conn)) continue;
      }
      if (this.#closed || listener !== this.#listener) {
        closeQuietly(conn);
        continue;
      }
      this.#open(conn);
    }
  }

  #open(conn: Deno.TcpConn): void {
    const link = new Link(++this.connections, conn);
    this.#links.add(link);
    const fault = this.#fault;
    const work = fault === "tarpit"
      ? this.#tarpit(link)
      : this.#relay(link, fault === "wrong_cert" ? this.#wrong.addr.port : this.#good.addr.port);
    this.#track(work.finally(() => {
      link.close();
      this.#links.delete(link);
    }));
  }

  #track(task: Promise<void>): void {
    const tracked = task.catch(() => {}).finally(() => this.#tasks.delete(tracked));
    this.#tasks.add(tracked);
  }

  /** Reads and discards until the client leaves; never answers. */
  async #tarpit(link: Link): Promise<void> {
    const chunk = new Uint8Array(4096);
    for (let i = 0; i < MAX_CHUNKS && !link.closed; i++) {
      const n = await link.client.read(chunk).catch(() => null);
      if (n === null) return;
    }
  }

  async #relay(link: Link, port: number): Promise<void> {
    let inner: Deno.TcpConn;
    try {
      inner = await Deno.connect({ hostname: "127.0.0.1", port });
    } catch {
      return;
    }
    const innerPort = inner.localAddr.port;
    link.inner = inner;
    if (link.closed) {
      closeQuietly(inner);
      return;
    }
    this.#byInnerPort.set(innerPort, link);
    try {
      await Promise.all([
        this.#pump(link, link.client, inner),
        this.#pump(link, inner, link.client),
      ]);
    } finally {
      this.#byInnerPort.delete(innerPort);
    }
  }

  /** Copies `from` to `to` until either side ends, holding bytes while frozen. */
  async #pump(link: Link, from: Deno.Conn, to: Deno.Conn): Promise<void> {
    const chunk = new Uint8Array(16384);
    try {
      for (let i = 0; i < MAX_CHUNKS && !link.closed; i++) {
        const n = await from.read(chunk);
        if (n === null) break;
        await this.#thawed();
        if (link.closed) break;
        await writeAll(to, chunk.subarray(0, n));
      }
    } catch {
      // Either side broke: that ends the link.
    }
    link.close();
  }

  // ------------------------------------------------------------------------------------------
  // The internal TLS servers: DNS over the relayed connections.

  async #acceptTls(listener: Deno.TlsListener): Promise<void> {
    for (let i = 0; i < MAX_ACCEPTS; i++) {
      let conn: Deno.TlsConn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      if (this.#closed) {
        closeQuietly(conn);
        continue;
      }
      this.#tlsConns.add(conn);
      this.#track(
        this.#serve(conn).finally(() => {
          closeQuietly(conn);
          this.#tlsConns.delete(conn);
        }),
      );
    }
  }

  async #serve(conn: Deno.TlsConn): Promise<void> {
    try {
      await conn.handshake();
    } catch {
      this.failedHandshakes++;
      return;
    }
    this.handshakes++;
    const link = this.#byInnerPort.get(conn.remoteAddr.port);
    let closed = false;
    let writing = Promise.resolve();
    const send = (response: Uint8Array) => {
      const frame = lengthFramed(response);
      writing = writing.then(async () => {
        if (closed) return;
        try {
          await writeAll(conn, frame);
          this.answers++;
        } catch {
          closed = true;
        }
      });
    };
    let buffer = new Uint8Array(0);
    const chunk = new Uint8Array(65536);
    try {
      for (let i = 0; i < MAX_CHUNKS && !closed; i++) {
        const n = await conn.read(chunk);
        if (n === null) break;
        buffer = appendChunk(buffer, chunk, n);
        for (let f = 0; f < MAX_CHUNKS && buffer.length >= 2 && !closed; f++) {
          const length = (buffer[0] << 8) | buffer[1];
          if (buffer.length < 2 + length) break;
          const query = buffer.slice(2, 2 + length);
          buffer = buffer.slice(2 + length);
          if (!this.#onQuery(query, link, send)) {
            closed = true;
            link?.close();
          }
        }
      }
    } catch {
      // A client breaking the connection is part of what tests do.
    }
    await writing;
  }

  /** Logs and treats one query; false means close the connection now. */
  #onQuery(query: Uint8Array, link: Link | undefined, send: (r: Uint8Array) => void): boolean {
    const fault = this.#fault;
    this.queries++;
    const { name, type } = describe(query);
    const id = query.length >= 2 ? (query[0] << 8) | query[1] : -1;
    this.#log({
      seq: this.queries,
      id,
      name,
      type,
      connection: link?.id ?? 0,
      fault,
      at: performance.now(),
    });
    if (this.#hangUpOn?.(query)) return false;
    switch (fault) {
      case "silent":
        return true;
      case "reset":
        return false;
      case "servfail":
        send(rcodeResponse(query, 2));
        return true;
      case "refused_rcode":
        send(rcodeResponse(query, 5));
        return true;
      case "short_frames": {
        const frame = this.#random(3);
        frame.set(query.subarray(0, 2));
        send(frame);
        return true;
      }
      case "garbage": {
        const answer = this.#answer(query);
        const garbage = this.#random(Math.max(answer?.length ?? 32, 2));
        garbage.set(query.subarray(0, 2));
        send(garbage);
        return true;
      }
      case "slow": {
        const index = this.#slowIndex++;
        const slow = this.#isSlow
          ? this.#isSlow(query, index)
          : Math.floor((index + 1) * this.slowFraction) > Math.floor(index * this.slowFraction);
        const answer = this.#answer(query);
        if (answer === null) return true;
        if (!slow) {
          send(answer);
          return true;
        }
        const timer = setTimeout(() => {
          this.#timers.delete(timer);
          send(answer);
        }, this.slowMs);
        this.#timers.add(timer);
        return true;
      }
      default: {
        const answer = this.#answer(query);
        if (answer !== null) send(answer);
        return true;
      }
    }
  }

  #log(entry: QueryLogEntry): void {
    this.queryLog.push(entry);
    if (this.queryLog.length > this.#logLimit) this.queryLog.shift();
    for (const waiter of this.#waiters) {
      if (!waiter.match(entry)) continue;
      clearTimeout(waiter.timer);
      this.#waiters.delete(waiter);
      waiter.resolve(entry);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A black hole.

/** Options of {@linkcode BlackHole.start}. */
export interface BlackHoleOptions {
  /** "127.0.0.1" (default) or "::1". */
  hostname?: "127.0.0.1" | "::1";
  /** How long a probe connect may take before it counts as hanging (default 100 ms). */
  probeMs?: number;
}

/**
 * An address:port where TCP connects hang: SYNs are dropped without an answer, so a
 * connect waits until its own timeout (Linux retries the SYN after 1, 3, 7, 15... s and
 * gives up after about 2 minutes).
 *
 * How: a listener with an accept backlog of 0 and one connection in its accept queue that is
 * never accepted. Linux then drops every new SYN (the accept queue is full) and sends
 * nothing back. {@linkcode BlackHole.start} proves it before returning: it keeps connecting
 * until a probe connect hangs for `probeMs`.
 *
 * Closing it does not wake connects already waiting: each fails with `ConnectionRefused` at
 * its next SYN retransmission (1, 3, 7... s after it started). Abort them yourself:
 * `Deno.connect({ signal })` is abortable, `Deno.connectTls` is not (dial with
 * `Deno.connect` and upgrade with `Deno.startTls`).
 */
export class BlackHole {
  readonly #listener: Deno.TcpListener;
  readonly #fillers: Deno.TcpConn[];

  private constructor(listener: Deno.TcpListener, fillers: Deno.TcpConn[]) {
    this.#listener = listener;
    this.#fillers = fillers;
  }

  /** Opens a black hole and checks that a connect to it hangs. */
  static async start(options: BlackHoleOptions = {}): Promise<BlackHole> {
    const hostname = options.hostname ?? "127.0.0.1";
    const probeMs = options.probeMs ?? 100;
    const listener = Deno.listen({ hostname, port: 0, tcpBacklog: 0 });
    const port = listener.addr.port;
    const fillers: Deno.TcpConn[] = [];
    try {
      // Each connect that completes takes a queue slot; the first one that hangs proves
      // the queue full. Backlog 0 means one slot on Linux; allow a few more elsewhere.
      for (let attempt = 0; attempt < 16; attempt++) {
        const abort = new AbortController();
        const timer = setTimeout(() => abort.abort(), probeMs);
        try {
          fillers.push(await Deno.connect({ hostname, port, signal: abort.signal }));
        } catch (error) {
          if (abort.signal.aborted) return new BlackHole(listener, fillers);
          throw error;
        } finally {
          clearTimeout(timer);
        }
      }
      throw new Error("could not fill the accept queue: connects keep succeeding");
    } catch (error) {
      for (const conn of fillers) closeQuietly(conn);
      closeQuietly(listener);
      throw error;
    }
  }

  /** The address connects hang on. */
  get hostname(): string {
    return this.#listener.addr.hostname;
  }

  /** The port connects hang on. */
  get port(): number {
    return this.#listener.addr.port;
  }

  /** `--upstream` text pointing at the hole. */
  upstream(tlsName = "dns.test"): string {
    return `${hostPort(this.hostname, this.port)}#${tlsName}`;
  }

  /** Closes the hole (the port then refuses connections until something else binds it). */
  close(): Promise<void> {
    for (const conn of this.#fillers) closeQuietly(conn);
    closeQuietly(this.#listener);
    return Promise.resolve();
  }
}
