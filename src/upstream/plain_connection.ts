/**
 * A plain-DNS zone target (`--zone ZONE=dns://IP[:PORT]`) as an {@linkcode UpstreamConnection},
 * so that the pool's retry, hedging, failover, strategies and health checks work for it as
 * for DoT upstreams. Each exchange is a UDP exchange of its own (RFC 1035 section 4.2.1):
 *
 * - a fresh socket on a port the kernel picks at random and a random ID per query, so that
 *   an off-path attacker must guess both (RFC 5452 section 9.2);
 * - an answer is accepted only from the target's address and port, with the query's ID and
 *   question; anything else is ignored and the exchange keeps waiting (RFC 5452 section 9.1);
 * - sent again on the same socket after {@linkcode RESEND_MS} without an answer (a datagram
 *   may be lost), until the pool gives the exchange up, which closes the socket at once;
 * - a truncated answer (TC=1) is asked again over TCP (RFC 7766 section 5), on one pipelined
 *   plain-TCP {@linkcode StreamConnection} per target that opens when first needed and closes
 *   when idle: that is also how large answers reach TCP clients whole;
 * - no EDNS padding (it hides nothing in clear text), and the AD bit is cleared: nothing
 *   authenticated the answer on its way here (RFC 6840 section 5.8).
 *
 * Health checks ask `ZONE SOA` rather than `. NS`: a cluster DNS forwards names outside its
 * zones out of the cluster, so `. NS` would test the way out rather than the target.
 *
 * @module
 */

import { withoutPadding } from "../dns/edns.ts";
import { analyzeResponse, responseAnswersQuery, ResponseInfo } from "../dns/message.ts";
import { buildZoneProbe } from "../dns/probe.ts";
import { HEADER_SIZE } from "../dns/wire.ts";
import { parseIpAddress } from "../net/ip.ts";
import {
  type ConnectionContext,
  connectionFailure,
  type ConnectionOwner,
  type ConnectionState,
  type UpstreamConnection,
} from "./connection.ts";
import { closeQuietly, tcpDialer } from "./dial.ts";
import { classifyError, UpstreamError, type UpstreamErrorReason } from "./errors.ts";
import { Exchange, type ExchangeWaiter } from "./exchange.ts";
import { StreamConnection } from "./stream_connection.ts";

/** A UDP query unanswered this long is sent again on its socket. */
export const RESEND_MS = 1000;
/** Most queries in flight to one target at once: each holds a socket (a file descriptor). */
export const MAX_PLAIN_INFLIGHT = 4096;
/** The largest answer read over UDP (an EDNS size is at most this). */
const MAX_DATAGRAM = 65535;
/** The TCP connection to a target closes after this long without a truncated answer. */
const TCP_IDLE_MS = 10_000;

/** One query on its way: its socket, and its TCP attempt once truncated. */
interface Leg {
  readonly exchange: Exchange;
  /** The message on the wire (its own ID, no padding). */
  readonly wire: Uint8Array;
  readonly questionEnd: number;
  socket: Deno.DatagramConn | null;
  /** The same question on the TCP connection, after a truncated answer. */
  overTcp: Exchange | null;
  resend: ReturnType<typeof setTimeout> | undefined;
  done: boolean;
}

function randomId(): number {
  const id = new Uint16Array(1);
  crypto.getRandomValues(id);
  return id[0];
}

/**
 * Plain DNS to one target: a UDP exchange per query, TCP when truncated.
 *
 * @example
 * ```ts ignore
 * const pool = new UpstreamPool({ ...options, connect: (owner, context) =>
 *   new PlainConnection(owner, context, "cluster.local") });
 * ```
 */
export class PlainConnection implements UpstreamConnection, ConnectionOwner, ExchangeWaiter {
  /** See {@linkcode UpstreamConnection.state}. */
  state: ConnectionState = "connecting";
  /** See {@linkcode UpstreamConnection.answered}. */
  answered = 0;
  /** See {@linkcode UpstreamConnection.opened}. */
  opened = false;
  /** See {@linkcode UpstreamConnection.createdAt}. */
  readonly createdAt: number;
  /** See {@linkcode UpstreamConnection.lastWriteAt}. */
  lastWriteAt = 0;
  /** See {@linkcode UpstreamConnection.lastActive}. */
  lastActive: number;
  /** See {@linkcode UpstreamConnection.lastReadAt}. */
  lastReadAt = 0;
  /** See {@linkcode UpstreamConnection.stalledSince}. */
  stalledSince = 0;
  /** See {@linkcode UpstreamConnection.writesSinceAnswer}. */
  writesSinceAnswer = 0;
  /** Answers ignored: from elsewhere, or with another ID or question (spoofed, or late). */
  ignored = 0;
  readonly #owner: ConnectionOwner;
  readonly #context: ConnectionContext;
  readonly #probeZone: string;
  readonly #target: Uint8Array | null;
  readonly #legs = new Map<Exchange, Leg>();
  /** Legs asked again over TCP, by the exchange on the TCP connection. */
  readonly #overTcp = new Map<Exchange, Leg>();
  readonly #info = new ResponseInfo();
  #tcp: StreamConnection | null = null;
  #tcpUsedAt = 0;
  #closeRequested = false;
  #running = 0;
  #idle: Promise<void> = Promise.resolve();
  #wake: (() => void) | null = null;

  /** A target for `owner`, whose spec is `plain`, health-checked with `probeZone SOA`. */
  constructor(owner: ConnectionOwner, context: ConnectionContext, probeZone: string) {
    this.#owner = owner;
    this.#context = context;
    this.#probeZone = probeZone;
    this.#target = parseIpAddress(context.spec.address);
    this.createdAt = this.#context.clock.now();
    this.lastActive = this.createdAt;
  }

  /** Never owes an acknowledgement (no stream). */
  get owesAck(): boolean {
    return false;
  }

  /** True once this side asked it to close. */
  get closeRequested(): boolean {
    return this.#closeRequested;
  }

  /** Queries in flight. */
  get load(): number {
    return this.#legs.size;
  }

  /** Resolves once every socket of it, and its TCP connection, are closed. */
  get finished(): Promise<void> {
    return Promise.all([this.#idle, this.#tcp?.finished]).then(() => {});
  }

  /** Open at once: there is nothing to set up. */
  settled(): boolean {
    return this.state === "open";
  }

  /** Always clean while open: each query has its own socket. */
  cleanIdle(): boolean {
    return this.state === "open";
  }

  /** Opens (nothing to connect). */
  start(): void {
    if (this.state !== "connecting") return;
    this.state = "open";
    this.opened = true;
    this.#owner.onOpen(this, 0);
  }

  /** Sends `exchange` as a UDP query of its own (a probe asks `ZONE SOA` instead). */
  send(exchange: Exchange): void {
    const label = this.#context.spec.label;
    if (this.state === "closed") {
      exchange.fail(new UpstreamError("unavailable", `${label}: connection closed`, label));
      return;
    }
    if (this.#legs.size >= MAX_PLAIN_INFLIGHT) {
      exchange.fail(
        new UpstreamError("unavailable", `${label}: too many queries in flight`, label),
      );
      return;
    }
    const probe = exchange.kind === "probe";
    const wire = probe
      ? buildZoneProbe(this.#probeZone)
      : withoutPadding(exchange.message, exchange.questionEnd);
    const questionEnd = probe ? wire.length - 11 : exchange.questionEnd;
    const id = randomId();
    wire[0] = id >> 8;
    wire[1] = id & 0xff;
    const now = this.#context.clock.now();
    exchange.carrier = this;
    exchange.wireId = id;
    exchange.sentAt = now;
    this.lastWriteAt = now;
    this.lastActive = now;
    if (this.stalledSince === 0) this.stalledSince = now;
    this.writesSinceAnswer++;
    const leg: Leg = {
      exchange,
      wire,
      questionEnd,
      socket: null,
      overTcp: null,
      resend: undefined,
      done: false,
    };
    this.#legs.set(exchange, leg);
    if (this.#running++ === 0) this.#idle = new Promise((resolve) => this.#wake = resolve);
    this.#overUdp(leg).finally(() => {
      if (--this.#running === 0) this.#wake?.();
    });
  }

  /** `exchange` ended: its socket closes (a late answer is dropped unread). */
  release(exchange: Exchange): void {
    const leg = this.#legs.get(exchange);
    if (leg !== undefined) this.#end(leg);
  }

  /** Closes the TCP connection when no truncated answer needed it since `before`. */
  purge(before: number): void {
    const tcp = this.#tcp;
    if (tcp === null) return;
    tcp.purge(before);
    if (
      tcp.load === 0 && this.#tcpUsedAt < Math.min(before, this.#context.clock.now() - TCP_IDLE_MS)
    ) {
      tcp.close();
    }
  }

  /** Nothing to complete: no nudge on plain DNS. */
  completePendingFrame(): boolean {
    return false;
  }

  /** Closes; queries in flight are handed back as orphans. */
  close(): void {
    this.#shutdown(null);
  }

  /** Closes as a failure (the target stopped answering); queries in flight are handed back. */
  abandon(reason: UpstreamErrorReason, message: string): void {
    if (this.state !== "closed") this.#shutdown(connectionFailure(this.#context, reason, message));
  }

  /** Every close of a plain target is one this side asked for: no stream the far side ends. */
  #shutdown(failure: UpstreamError | null): void {
    this.#closeRequested = true;
    if (this.state === "closed") return;
    this.state = "closed";
    const orphans: Exchange[] = [];
    for (const leg of [...this.#legs.values()]) {
      this.#end(leg);
      if (leg.exchange.ended) continue;
      leg.exchange.carrier = null;
      orphans.push(leg.exchange);
    }
    this.#tcp?.close();
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    this.#owner.onClosed(this, orphans, failure);
  }

  #end(leg: Leg): void {
    if (leg.done) return;
    leg.done = true;
    this.#legs.delete(leg.exchange);
    clearTimeout(leg.resend);
    closeQuietly(leg.socket);
    leg.socket = null;
    if (leg.overTcp !== null) {
      this.#overTcp.delete(leg.overTcp);
      leg.overTcp.cancel();
      leg.overTcp = null;
    }
  }

  async #overUdp(leg: Leg): Promise<void> {
    const { address, port } = this.#context.spec;
    try {
      const socket = Deno.listenDatagram({
        transport: "udp",
        hostname: this.#target?.length === 16 ? "::" : "0.0.0.0",
        port: 0,
      });
      if (leg.done) {
        closeQuietly(socket);
        return;
      }
      leg.socket = socket;
      const to: Deno.NetAddr = { transport: "udp", hostname: address, port };
      await socket.send(leg.wire, to);
      const resend = () => {
        if (leg.done || leg.socket === null) return;
        leg.socket.send(leg.wire, to).catch(() => {});
        leg.resend = setTimeout(resend, RESEND_MS);
      };
      leg.resend = setTimeout(resend, RESEND_MS);
      const buffer = new Uint8Array(MAX_DATAGRAM);
      for (let i = 0; i < 100_000 && !leg.done; i++) {
        const [data, from] = await socket.receive(buffer);
        if (leg.done) return;
        if (!this.#fromTarget(from) || !this.#answers(leg, data)) {
          this.#ignore(leg);
          continue;
        }
        if ((data[2] & 0x02) !== 0) {
          this.#askOverTcp(leg);
          return;
        }
        this.#deliver(leg, data.slice(), this.#info);
        return;
      }
    } catch (error) {
      if (leg.done) return;
      const reason = error instanceof UpstreamError ? error.reason : classifyError(error);
      this.#fail(leg, new UpstreamError(reason, error instanceof Error ? error.message : ""));
    }
  }

  /** Asks the truncated question again on the target's plain-TCP connection. */
  #askOverTcp(leg: Leg): void {
    clearTimeout(leg.resend);
    closeQuietly(leg.socket);
    leg.socket = null;
    if (this.#tcp === null || this.#tcp.state === "closed") {
      this.#tcp = new StreamConnection(this, {
        ...this.#context,
        dial: tcpDialer(this.#context.spec),
        nudging: null,
      });
      this.#tcp.start();
    }
    const tcp = this.#tcp;
    // Its own exchange: the stream writes its own ID, and answers it as it answers any.
    const again = new Exchange(leg.wire, leg.questionEnd, this, "query");
    leg.overTcp = again;
    this.#overTcp.set(again, leg);
    this.#tcpUsedAt = this.#context.clock.now();
    tcp.send(again);
  }

  /** True when `from` is the target's address and port. */
  #fromTarget(from: Deno.Addr): boolean {
    if (from.transport !== "udp" || from.port !== this.#context.spec.port) return false;
    const bytes = parseIpAddress(from.hostname);
    const target = this.#target;
    if (bytes === null || target === null || bytes.length !== target.length) return false;
    for (let i = 0; i < bytes.length; i++) if (bytes[i] !== target[i]) return false;
    return true;
  }

  /** True when `data` is a well-formed response to the leg's query: its ID and question. */
  #answers(leg: Leg, data: Uint8Array): boolean {
    if (data.length < HEADER_SIZE || (data[2] & 0x80) === 0) return false;
    if (data[0] !== leg.wire[0] || data[1] !== leg.wire[1]) return false;
    const info = this.#info;
    return analyzeResponse(data, info) && info.qdcount === 1 &&
      responseAnswersQuery(data, info, leg.wire, leg.questionEnd);
  }

  #ignore(leg: Leg): void {
    this.ignored++;
    this.#context.log.debug("ignored an answer that is not the target's to this query", {
      upstream: this.#context.spec.label,
      id: leg.exchange.wireId,
    });
  }

  /** Hands the answer on, AD cleared; `info` describes `data`. */
  #deliver(leg: Leg, data: Uint8Array, info: ResponseInfo): void {
    const exchange = leg.exchange;
    this.#end(leg);
    data[3] &= ~0x20; // AD: nothing authenticated it on the way here
    const now = this.#context.clock.now();
    this.lastReadAt = now;
    this.lastActive = now;
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    this.answered++;
    if (exchange.ended) return;
    this.#owner.onAnswer(this, exchange, data, info);
  }

  #fail(leg: Leg, error: UpstreamError): void {
    const label = this.#context.spec.label;
    this.#end(leg);
    this.#context.stats.error(error.reason);
    this.#context.log.debug("plain-DNS query failed", {
      upstream: label,
      reason: error.reason,
      error: error.message,
    });
    leg.exchange.fail(new UpstreamError(error.reason, `${label}: ${error.message}`, label));
  }

  // ---- the TCP connection's events (see ConnectionOwner, ExchangeWaiter) ---------------

  /** See {@linkcode ConnectionOwner.onOpen}. */
  onOpen(): void {}

  /** See {@linkcode ConnectionOwner.onAnswer}: the TCP answer of a truncated one. */
  onAnswer(
    _connection: UpstreamConnection,
    exchange: Exchange,
    response: Uint8Array,
    info: ResponseInfo,
  ): void {
    const leg = this.#overTcp.get(exchange);
    exchange.answer(response, info);
    if (leg === undefined) return;
    this.#overTcp.delete(exchange);
    leg.overTcp = null;
    this.#deliver(leg, response, info);
  }

  /** See {@linkcode ConnectionOwner.onBadAnswer}. */
  onBadAnswer(_connection: UpstreamConnection, exchange: Exchange, reason: string): void {
    const leg = this.#overTcp.get(exchange);
    exchange.cancel();
    if (leg === undefined) return;
    this.#owner.onBadAnswer(this, leg.exchange, reason);
    this.#end(leg);
  }

  /** See {@linkcode ConnectionOwner.onClosed}: what the TCP connection still owed fails. */
  onClosed(
    connection: UpstreamConnection,
    orphans: Exchange[],
    failure: UpstreamError | null,
  ): void {
    if (connection === this.#tcp) this.#tcp = null;
    const label = this.#context.spec.label;
    for (const orphan of orphans) {
      const leg = this.#overTcp.get(orphan);
      orphan.cancel();
      if (leg === undefined) continue;
      this.#fail(leg, failure ?? new UpstreamError("reset", "closed the TCP connection", label));
    }
  }

  /** See {@linkcode ExchangeWaiter}: settled through `onAnswer` and `onClosed` instead. */
  exchangeAnswered(): void {}

  /** See {@linkcode ExchangeWaiter}. */
  exchangeFailed(): void {}
}
