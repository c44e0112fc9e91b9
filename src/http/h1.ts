/**
 * HTTP/1.1 (RFC 9112) for the DoH listener: keep-alive and pipelining (requests answered in
 * the order they came), bodies by `Content-Length` (with `Expect: 100-continue`), and the
 * limits of {@linkcode HttpLimits}. The request head parser is the metrics endpoint's
 * ({@linkcode parseRequestHead} in `server/http.ts`).
 *
 * A body in chunked transfer coding gets 411 (Length Required): DoH clients (curl, kdig,
 * dig, browsers, dnsdist) send `Content-Length`, and a chunked body would need its own
 * limits for a message that is at most 65,535 octets anyway.
 *
 * @module
 */

import {
  HttpRequestError,
  parseRequestHead,
  readRequestHead,
  RequestBuffer,
  type RequestHead,
  skipEmptyLines,
} from "../server/http.ts";

import { Deadline } from "./deadline.ts";
import { linger } from "./linger.ts";
import {
  type ConnectionOutcome,
  connectionOutcome,
  type HttpResponse,
  type HttpSession,
  REASONS,
} from "./types.ts";

const encoder = new TextEncoder();
const LF = 0x0a;
/** On shutdown, how long an idle keep-alive connection waits for a request already sent. */
const SHUTDOWN_GRACE_MS = 1_000;

/** How an HTTP/1.1 connection ended, for the listener's log. */
export type H1Outcome = ConnectionOutcome;

function render(response: HttpResponse, head: boolean, keepAlive: boolean): Uint8Array {
  let text = `HTTP/1.1 ${response.status} ${REASONS[response.status] ?? "Status"}\r\n`;
  for (const [name, value] of response.fields) text += `${name}: ${value}\r\n`;
  text += `content-length: ${response.body.length}\r\n`;
  if (!keepAlive) text += "connection: close\r\n";
  const headBytes = encoder.encode(text + "\r\n");
  if (head || response.body.length === 0) return headBytes;
  const out = new Uint8Array(headBytes.length + response.body.length);
  out.set(headBytes);
  out.set(response.body, headBytes.length);
  return out;
}

/**
 * Serves HTTP/1.1 on one connection. `initial` holds bytes already read from it (the
 * listener peeks at the first bytes to tell HTTP/2 prior knowledge from HTTP/1.1).
 *
 * @example
 * ```ts ignore
 * const h1 = new H1Connection({ conn, peer, service, limits, timers }, firstBytes);
 * await h1.finished;
 * ```
 */
export class H1Connection {
  /** Settles (never rejects) once the connection is closed. */
  readonly finished: Promise<H1Outcome>;
  /** The connection, its peer, the service, the limits and the timers. */
  readonly #session: HttpSession;
  readonly #deadline: Deadline;
  #closed = false;
  #reason = "";
  /** True while a request is being answered (a shutdown waits for it). */
  #busy = false;
  #lastActive: number;
  #shuttingDown = false;

  /** Starts serving. */
  constructor(session: HttpSession, initial: Uint8Array) {
    this.#session = session;
    this.#lastActive = session.timers.clock.now();
    this.#deadline = new Deadline(session.timers, (reason) => this.#close(reason));
    this.finished = connectionOutcome(this.#serve(initial), () => this.#reason).finally(() =>
      this.#close("")
    );
  }

  /** True between requests: closing the connection loses nothing. */
  get idle(): boolean {
    return !this.#busy;
  }

  /** When a request last arrived or an answer was written (the timers' clock). */
  get lastActive(): number {
    return this.#lastActive;
  }

  /** Closes the connection now. */
  abort(reason: string): void {
    this.#close(reason);
  }

  /** Closes once the request being answered (if any) is written, or after a short grace. */
  shutdown(): void {
    this.#shuttingDown = true;
    // Between requests a request may already be on its way (HTTP/1.1 has no GOAWAY): give it
    // a moment to arrive and be answered with `connection: close` rather than be lost.
    if (!this.#busy) this.#arm(SHUTDOWN_GRACE_MS, "shutting down");
  }

  #close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    if (reason !== "") this.#reason ||= reason;
    this.#deadline.disarm();
    try {
      this.#session.conn.close();
    } catch {
      // Already closed.
    }
  }

  #arm(ms: number, reason: string): void {
    if (!this.#closed) this.#deadline.arm(ms, reason);
  }

  async #serve(initial: Uint8Array): Promise<void> {
    const limits = this.#session.limits;
    // Starts small (an idle keep-alive connection holds its buffer) and grows, by doubling,
    // to the largest head plus the largest body plus what a pipelining client sends ahead.
    const cap = limits.maxHeadBytes + limits.maxBodyBytes + 4096;
    const at = new RequestBuffer(cap, Math.max(4096, initial.length), initial);
    for (let served = 0; served < limits.maxRequestsPerConnection; served++) {
      if (this.#shuttingDown) return;
      // Before the first byte of a request: the idle deadline (also for the first request:
      // the listener counts an open connection against its caps). From the first byte, the
      // request deadline, not moved by later bytes.
      const waitingForFirstByte = skipEmptyLines(at.bytes, at.start, at.end) === at.end;
      if (waitingForFirstByte) this.#arm(limits.idleTimeoutMs, "idle");
      else this.#arm(limits.requestTimeoutMs, "request timeout");
      const found = await readRequestHead(
        this.#session.conn,
        at,
        limits.maxHeadBytes,
        waitingForFirstByte ? () => this.#arm(limits.requestTimeoutMs, "request timeout") : null,
      );
      if (found === "too large") {
        // No line end at all: the request line alone is too long (a long GET target).
        const lineEnd = at.bytes.subarray(at.start, at.end).indexOf(LF);
        const status = lineEnd < 0 ? 414 : 431;
        await this.#refuse(status, status === 414 ? "request target too long" : "head too large");
        return;
      }
      if (found === "closed") {
        if (at.end > at.start) this.#reason = "client closed mid-request";
        return;
      }
      if (found === null) return;

      let head: RequestHead;
      try {
        head = parseRequestHead(at.bytes.subarray(at.start, found.headEnd));
      } catch (error) {
        if (!(error instanceof HttpRequestError)) throw error;
        await this.#refuse(error.status, error.message);
        return;
      }
      at.start = found.next;
      if (head.target.length > limits.maxTargetBytes) {
        await this.#refuse(414, "request target too long");
        return;
      }
      if (head.fields.has("transfer-encoding")) {
        await this.#refuse(411, "chunked bodies are not taken; send Content-Length");
        return;
      }
      const length = head.hasBody ? Number(head.fields.get("content-length")!.split(",")[0]) : 0;
      if (length > limits.maxBodyBytes) {
        await this.#refuse(413, `body over ${limits.maxBodyBytes} octets`);
        return;
      }
      if (
        length > 0 && at.end - at.start < length &&
        /100-continue/i.test(head.fields.get("expect") ?? "")
      ) {
        await this.#write(encoder.encode("HTTP/1.1 100 Continue\r\n\r\n"));
        // The write had its own deadline; the body has the request's again.
        this.#arm(limits.requestTimeoutMs, "request timeout");
      }
      // The body: the bytes already here, then reads until it is whole (same deadline).
      if (at.end - at.start < length && at.start + length > at.bytes.length) {
        at.compact();
        at.grow(length);
      }
      while (at.end - at.start < length) {
        const n = await this.#session.conn.read(at.bytes.subarray(at.end));
        if (n === null) {
          this.#reason = "client closed mid-body";
          return;
        }
        at.end += n;
      }
      const body = at.bytes.slice(at.start, at.start + length);
      at.start += length;
      if (at.start === at.end) at.start = at.end = 0;
      this.#deadline.disarm();

      const connection = (head.fields.get("connection") ?? "").toLowerCase();
      const keepAlive = head.version === "HTTP/1.1" && !/\bclose\b/.test(connection) &&
        served + 1 < limits.maxRequestsPerConnection;
      this.#busy = true;
      this.#lastActive = this.#session.timers.clock.now();
      let response: HttpResponse;
      try {
        response = await this.#session.service.handle({
          method: head.method,
          // Absolute form (`GET http://host/dns-query?dns=...`, RFC 9112 section 3.2.2), as a
          // forward proxy sends it, becomes origin form.
          target: head.target.replace(/^https?:\/\/[^/?#]*/i, "") || "/",
          fields: head.fields,
          body,
          version: head.version,
        }, this.#session.peer);
      } catch {
        response = this.#session.service.reject(503, "the request failed");
      }
      if (this.#closed) return;
      const last = !keepAlive || this.#shuttingDown;
      await this.#write(render(response, head.method === "HEAD", !last));
      this.#busy = false;
      this.#lastActive = this.#session.timers.clock.now();
      if (last) {
        await this.#linger();
        return;
      }
    }
  }

  async #write(bytes: Uint8Array): Promise<void> {
    this.#arm(this.#session.limits.writeTimeoutMs, "write timeout");
    for (let at = 0; at < bytes.length;) at += await this.#session.conn.write(bytes.subarray(at));
    this.#deadline.disarm();
  }

  /** Answers a request the connection will not serve, then closes. */
  async #refuse(status: number, reason: string): Promise<void> {
    this.#reason = `refused ${status}: ${reason}`;
    await this.#write(render(this.#session.service.reject(status, reason), false, false));
    await this.#linger();
  }

  /** Half-closes and drains briefly, so that closing does not reset the response away. */
  async #linger(): Promise<void> {
    if (!this.#closed) await linger(this.#session.conn, (ms, reason) => this.#arm(ms, reason));
  }
}
