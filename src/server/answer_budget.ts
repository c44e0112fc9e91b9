/**
 * The answer budget that every stream (TCP, DoT) connection of the process shares: how many
 * bytes of answers may be on their way to stream clients at once, counting both the answers
 * still being resolved (their number times an estimate of the answer size) and the answers
 * built and not yet written to the socket. It is shared per client (IPv4 address, IPv6 /64)
 * before it is shared per connection: when several clients want it, each may use its equal
 * part even while the budget is full, so one client holding many connections of slow queries
 * cannot leave every other client one query at a time (issue 21: a victim's 100 pipelined
 * queries took 929 ms instead of 53 ms behind 60 such connections).
 *
 * One object is built per process and passed to every stream listener (not module state:
 * a test builds its own).
 *
 * @module
 */

/**
 * Estimated bytes of answers in flight plus unsent, all stream connections together, above
 * which only clients under their equal share get another query in. With answers of a few
 * hundred octets it never binds (`--max-inflight` does first); with 60 KB answers it allows
 * about 140 in flight, beside the one each connection may always have. The heaviest
 * legitimate client (one connection, `--max-tcp-queries` 128, 54 kB answers) needs 7 MB.
 * Measured with 1,000 connections pipelining queries for 60 KB answers and reading none
 * (bench/memory_attacks.ts, answers copied into frame buffers): 32 MiB let the proxy peak at
 * 290-313 MiB RSS, 8 MiB at 245-291; with large answers queued uncopied, 8 MiB: 216-229.
 */
export const STREAM_ANSWER_BUDGET = 8 * 1024 * 1024;
/** The answer size the estimate decays towards. */
const TYPICAL_ANSWER = 512;
/**
 * The estimate starts at the largest answer: until answers show they are small (a few
 * hundred of them), 512 queries may be in flight. Starting low let 1,000 connections
 * opened at once have 10,000 queries for 60 KB answers in flight (measured: 270 MiB).
 */
const LARGEST_ANSWER = 65535;
/** One client's use of the budget; the connections of one client share one. */
export class ClientShare {
  /** The client: IPv4 address or IPv6 /64 (`clientKey`). */
  readonly key: string;
  /** Connections holding this share. */
  connections = 0;
  /** Queries of this client in flight. */
  inflight = 0;
  /** Bytes of answers built for this client and not yet written. */
  unsent = 0;

  /** A share for `key`; use {@linkcode AnswerBudget.share} rather than this. */
  constructor(key: string) {
    this.key = key;
  }

  /** True while the client uses some of the budget. */
  get busy(): boolean {
    return this.inflight > 0 || this.unsent > 0;
  }
}

/**
 * The shared answer budget.
 *
 * @example
 * ```ts
 * import { AnswerBudget } from "./answer_budget.ts";
 * const budget = new AnswerBudget(1024 * 1024);
 * const share = budget.share("192.0.2.1");
 * if (budget.mayAdmit(share)) budget.started(share);
 * budget.answered(share, 300); // the answer came back: 300 octets
 * budget.queued(share, 302); // framed and queued for the socket
 * budget.sent(share, 302); // written
 * budget.release(share); // the connection closed
 * ```
 */
export class AnswerBudget {
  /** The budget, in bytes. */
  readonly limit: number;
  readonly #shares = new Map<string, ClientShare>();
  /** Queries in flight, all clients. */
  #inflight = 0;
  /** Unsent answer bytes, all clients. */
  #unsent = 0;
  /** Clients with something in flight or unsent. */
  #busy = 0;
  /**
   * Size of recent answers: jumps to any larger answer, and decays by 1 % per answer (a few
   * hundred small answers forget a big one).
   */
  #estimate = LARGEST_ANSWER;

  /** A budget of `limit` bytes (default {@linkcode STREAM_ANSWER_BUDGET}). */
  constructor(limit: number = STREAM_ANSWER_BUDGET) {
    this.limit = limit;
  }

  /** Unsent answer bytes, all connections. */
  get unsent(): number {
    return this.#unsent;
  }

  /** Queries in flight, all connections. */
  get inflight(): number {
    return this.#inflight;
  }

  /**
   * True while all connections together hold a whole budget of answers unsent: then every
   * connection pauses reading at its first unsent byte, and a write that has not moved for a
   * second closes its connection.
   */
  get pressed(): boolean {
    return this.#unsent >= this.limit;
  }

  /** Bytes in use: queries in flight times the estimate, plus unsent answers. */
  get used(): number {
    return this.#inflight * this.#estimate + this.#unsent;
  }

  /** Clients using some of the budget now. */
  get busyClients(): number {
    return this.#busy;
  }

  /** The share of client `key`, for one more connection (give it back with `release`). */
  share(key: string): ClientShare {
    let share = this.#shares.get(key);
    if (share === undefined) {
      share = new ClientShare(key);
      this.#shares.set(key, share);
    }
    share.connections++;
    return share;
  }

  /** A connection holding `share` closed (after it gave back what it used). */
  release(share: ClientShare): void {
    if (--share.connections <= 0 && this.#shares.get(share.key) === share) {
      this.#shares.delete(share.key);
    }
  }

  /**
   * True when a client holding `share` may start another query: while the whole budget has
   * room, or while the client uses less than its equal part of it (the budget divided among
   * the clients using it, this one included) and the total is under twice the budget.
   */
  mayAdmit(share: ClientShare): boolean {
    const estimate = this.#estimate;
    const total = this.#inflight * estimate + this.#unsent;
    if (total < this.limit) return true;
    const clients = this.#busy + (share.busy ? 0 : 1);
    const used = share.inflight * estimate + share.unsent;
    return used < this.limit / clients && total < 2 * this.limit;
  }

  /** A query of `share` went to the resolver. */
  started(share: ClientShare): void {
    if (!share.busy) this.#busy++;
    share.inflight++;
    this.#inflight++;
  }

  /** A query of `share` was answered with `size` octets (null: no answer). */
  answered(share: ClientShare, size: number | null): void {
    share.inflight--;
    this.#inflight--;
    if (!share.busy) this.#busy--;
    if (size !== null) {
      const decayed = this.#estimate * 0.99;
      this.#estimate = size > decayed ? size : decayed > TYPICAL_ANSWER ? decayed : TYPICAL_ANSWER;
    }
  }

  /** `bytes` of answers were queued for a client of `share`. */
  queued(share: ClientShare, bytes: number): void {
    if (!share.busy) this.#busy++;
    share.unsent += bytes;
    this.#unsent += bytes;
  }

  /** `bytes` of answers queued for `share` were written, or dropped with their connection. */
  sent(share: ClientShare, bytes: number): void {
    share.unsent -= bytes;
    this.#unsent -= bytes;
    if (!share.busy) this.#busy--;
  }
}
