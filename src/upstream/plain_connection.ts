/**
 * A plain-DNS zone target (`--zone ZONE=dns://IP[:PORT]`) as an {@linkcode UpstreamConnection},
 * so that the pool's retry, hedging, failover, strategies and health checks work for it as
 * for DoT upstreams. Each exchange is its own UDP exchange (RFC 1035 section 4.2.1):
 *
 * - a fresh socket on a port the kernel picks at random and a random ID per query, so that
 *   an off-path attacker must guess both (RFC 5452 section 9.2);
 * - an answer is accepted only from the target's address and port, with the query's ID and
 *   question; anything else is ignored and the exchange keeps waiting (RFC 5452 section 9.1);
 * - sent again on the same socket after {@linkcode RESEND_MS} without an answer (a datagram
 *   may be lost), until the pool gives the exchange up;
 * - a truncated answer (TC=1) is asked again over TCP (RFC 7766 section 5), which is also
 *   how large answers reach TCP clients in full;
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
import { HEADER_SIZE, readU16 } from "../dns/wire.ts";
import { parseIpAddress } from "../net/ip.ts";
import type { Clock } from "../timers.ts";
import {
  type ConnectionOwner,
  type ConnectionState,
  type UpstreamConnection,
} from "./dot_connection.ts";
import type { Exchange } from "./exchange.ts";
import { classifyError, UpstreamError, type UpstreamErrorReason } from "./errors.ts";

/** A UDP query unanswered this long is sent again on its socket. */
export const RESEND_MS = 1000;
/** Most queries in flight to one target at once: each holds a socket (a file descriptor). */
export const MAX_PLAIN_INFLIGHT = 4096;
/** The largest answer read over UDP (an EDNS size is at most this). */
const MAX_DATAGRAM = 65535;

/** One query on its way: its socket, its TCP connection once truncated, its timer. */
interface Leg {
  readonly exchange: Exchange;
  /** The message on the wire (its own ID, no padding). */
  readonly wire: Uint8Array;
  readonly questionEnd: number;
  socket: Deno.DatagramConn | null;
  tcp: Deno.Conn | null;
  readonly abort: AbortController;
  resend: ReturnType<typeof setTimeout> | undefined;
  done: boolean;
}

function closeQuietly(resource: { close(): void } | null): void {
  try {
    resource?.close();
  } catch {
    // Already closed.
  }
}

function randomId(): number {
  const id = new Uint16Array(1);
  crypto.getRandomValues(id);
  return id[0];
}

/**
 * Plain DNS to one target: an exchange per query, UDP first, TCP when truncated.
 *
 * @example
 * ```ts ignore
 * const pool = new UpstreamPool({ ...options, connect: (owner) =>
 *   new PlainConnection(owner, "cluster.local") });
 * ```
 */
export class PlainConnection implements UpstreamConnection {
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
  /** Never: every query has a socket of its own, so no answer waits behind another. */
  readonly dirtyUntil = 0;
  /** Answers ignored: from elsewhere, or with another ID or question (spoofed, or late). */
  ignored = 0;
  readonly #owner: ConnectionOwner;
  readonly #clock: Clock;
  readonly #probeZone: string;
  readonly #target: Uint8Array | null;
  readonly #legs = new Map<Exchange, Leg>();
  readonly #info = new ResponseInfo();
  #closeRequested = false;
  #running = 0;
  #finished: Promise<void> = Promise.resolve();
  #finish: (() => void) | null = null;

  /** A target for `owner` (its spec is `plain`), health-checked with `probeZone SOA`. */
  constructor(owner: ConnectionOwner, probeZone: string) {
    this.#owner = owner;
    this.#clock = owner.clock;
    this.#probeZone = probeZone;
    this.#target = parseIpAddress(owner.spec.address);
    this.createdAt = this.#clock.now();
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

  /** Resolves once every socket of it is closed. */
  get finished(): Promise<void> {
    return this.#finished;
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
    const label = this.#owner.spec.label;
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
    const now = this.#clock.now();
    exchange.carrier = this;
    exchange.wireId = id;
    exchange.sentAt = now;
    exchange.writes++;
    this.lastWriteAt = now;
    this.lastActive = now;
    if (this.stalledSince === 0) this.stalledSince = now;
    this.writesSinceAnswer++;
    const leg: Leg = {
      exchange,
      wire,
      questionEnd,
      socket: null,
      tcp: null,
      abort: new AbortController(),
      resend: undefined,
      done: false,
    };
    this.#legs.set(exchange, leg);
    if (this.#running++ === 0) {
      this.#finished = new Promise((resolve) => this.#finish = resolve);
    }
    this.#run(leg).finally(() => {
      if (--this.#running === 0) this.#finish?.();
    });
  }

  /** Stops waiting for `exchange`: its socket closes (a late answer is dropped unread). */
  forget(exchange: Exchange): void {
    const leg = this.#legs.get(exchange);
    if (leg !== undefined) this.#end(leg);
  }

  /** Nothing to purge: a forgotten query's socket is closed at once. */
  purge(): void {}

  /** Nothing to complete: no stream. */
  completePendingFrame(): boolean {
    return false;
  }

  /** Closes; queries in flight are handed back as orphans. */
  close(): void {
    this.#closeRequested = true;
    this.#shutdown(null);
  }

  /** Closes as a failure (the target stopped answering); queries in flight are handed back. */
  abandon(reason: UpstreamErrorReason, message: string): void {
    if (this.state === "closed") return;
    const label = this.#owner.spec.label;
    this.#owner.stats.error(reason);
    this.#closeRequested = true;
    this.#shutdown(new UpstreamError(reason, `${label}: ${message}`, label));
  }

  #shutdown(failure: UpstreamError | null): void {
    if (this.state === "closed") return;
    this.state = "closed";
    const orphans: Exchange[] = [];
    for (const leg of [...this.#legs.values()]) {
      this.#end(leg);
      if (leg.exchange.ended) continue;
      leg.exchange.carrier = null;
      orphans.push(leg.exchange);
    }
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    this.#owner.onClosed(this, orphans, failure);
  }

  #end(leg: Leg): void {
    if (leg.done) return;
    leg.done = true;
    this.#legs.delete(leg.exchange);
    clearTimeout(leg.resend);
    leg.abort.abort();
    closeQuietly(leg.socket);
    closeQuietly(leg.tcp);
    leg.socket = null;
    leg.tcp = null;
  }

  async #run(leg: Leg): Promise<void> {
    const { address, port } = this.#owner.spec;
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
      let truncated = false;
      for (let i = 0; i < 100_000 && !leg.done; i++) {
        const [data, from] = await socket.receive(buffer);
        if (leg.done) return;
        if (!this.#fromTarget(from) || !this.#answers(leg, data)) {
          this.#ignore(leg, "udp");
          continue;
        }
        if ((data[2] & 0x02) !== 0) {
          truncated = true;
          break;
        }
        this.#deliver(leg, data.slice());
        return;
      }
      if (!truncated || leg.done) return;
      clearTimeout(leg.resend);
      closeQuietly(leg.socket);
      leg.socket = null;
      await this.#overTcp(leg);
    } catch (error) {
      if (leg.done) return;
      const reason = error instanceof UpstreamError ? error.reason : classifyError(error);
      const detail = error instanceof Error ? error.message : String(error);
      this.#fail(leg, reason, detail);
    }
  }

  /** Asks again over TCP (one connection for this query), after a truncated UDP answer. */
  async #overTcp(leg: Leg): Promise<void> {
    const { address, port, label } = this.#owner.spec;
    const conn = await Deno.connect({
      hostname: address,
      port,
      transport: "tcp",
      signal: leg.abort.signal,
    });
    if (leg.done) {
      closeQuietly(conn);
      return;
    }
    leg.tcp = conn;
    const frame = new Uint8Array(2 + leg.wire.length);
    frame[0] = leg.wire.length >> 8;
    frame[1] = leg.wire.length & 0xff;
    frame.set(leg.wire, 2);
    for (let written = 0; written < frame.length;) {
      written += await conn.write(frame.subarray(written));
    }
    const buffer = new Uint8Array(2 + MAX_DATAGRAM);
    let end = 0;
    for (let i = 0; i < 100_000 && !leg.done; i++) {
      const n = await conn.read(buffer.subarray(end));
      if (n === null) throw new UpstreamError("reset", `${label} closed the TCP connection`);
      end += n;
      while (end >= 2 && end >= 2 + readU16(buffer, 0)) {
        const length = readU16(buffer, 0);
        const data = buffer.slice(2, 2 + length);
        buffer.copyWithin(0, 2 + length, end);
        end -= 2 + length;
        if (this.#answers(leg, data)) {
          this.#deliver(leg, data);
          return;
        }
        this.#ignore(leg, "tcp");
      }
    }
  }

  /** True when `from` is the target's address and port. */
  #fromTarget(from: Deno.Addr): boolean {
    if (from.transport !== "udp" || from.port !== this.#owner.spec.port) return false;
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

  #ignore(leg: Leg, transport: string): void {
    this.ignored++;
    this.#owner.log.debug("ignored an answer that is not the target's to this query", {
      upstream: this.#owner.spec.label,
      transport,
      id: leg.exchange.wireId,
    });
  }

  #deliver(leg: Leg, data: Uint8Array): void {
    const exchange = leg.exchange;
    this.#end(leg);
    // Analysed again: `#answers` may have looked at other datagrams since.
    const info = this.#info;
    analyzeResponse(data, info);
    data[3] &= ~0x20; // AD: nothing authenticated it on the way here
    const now = this.#clock.now();
    this.lastReadAt = now;
    this.lastActive = now;
    this.stalledSince = 0;
    this.writesSinceAnswer = 0;
    this.answered++;
    if (exchange.ended) return;
    this.#owner.onAnswer(this, exchange, data, info);
  }

  #fail(leg: Leg, reason: UpstreamErrorReason, detail: string): void {
    const label = this.#owner.spec.label;
    this.#end(leg);
    this.#owner.stats.error(reason);
    this.#owner.log.debug("plain-DNS query failed", { upstream: label, reason, error: detail });
    leg.exchange.fail(new UpstreamError(reason, `${label}: ${detail}`, label));
  }
}
