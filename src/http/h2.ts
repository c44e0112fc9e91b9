/**
 * A server side of HTTP/2 (RFC 9113) for requests with small bodies and small answers (DNS
 * over HTTPS): frames, HPACK ({@linkcode HpackDecoder}), flow control both ways, many
 * streams answered out of order, and the limits the DNS listeners keep everywhere.
 *
 * Written here rather than taken from `Deno.serve` (hyper), which serves HTTP/2 well but
 * cannot be held to limits: measured on Deno 2.9.6, its accept loop ends for good on EMFILE
 * (`serve finished with error Http: Error: Too many open files`, and the runtime then
 * panicked in `ext/signals` under the same ulimit), and it has no handshake, request or idle
 * deadline and no connection cap. Piping each connection into an internal `Deno.serve` on
 * loopback would keep our own accept loop, but costs two more descriptors and two more
 * copies per client connection and still needs a restart when that inner loop dies. What it
 * costs to own it, measured (h2load, one core; bench/listeners.sh measures it now): 132k cached requests/s
 * over TLS at 6.4 CPU ms per 1,000, against dnsdist's DoH (h2o) at 6.9 and Unbound's (nghttp2)
 * at 15.7; 22 KiB of RSS per idle HTTP/2 connection over TLS. Interoperability is tested with
 * curl, kdig, dig, python3-h2, dnsdist and nginx (tests/doh_*_test.ts).
 *
 * Hostile input: a frame over 16,384 octets, a bad preface, HPACK that does not decode, ids
 * going backwards and the like end the connection with GOAWAY and the RFC's error code; a
 * client that mostly opens streams to reset them ("rapid reset", CVE-2023-44487) and an
 * endless header block of CONTINUATION frames (CVE-2024-27316) get ENHANCE_YOUR_CALM.
 *
 * Limits (see {@linkcode HttpLimits}), each costing a well-behaved client nothing:
 * - SETTINGS_MAX_CONCURRENT_STREAMS: a HEADERS frame beyond it gets RST_STREAM
 *   REFUSED_STREAM (the client retries it, RFC 9113 section 8.7);
 * - a stream's receive window is the body limit plus one frame, and is never replenished:
 *   a body over the limit is seen (413) without buffering more; the connection window is
 *   replenished only while the bodies held stay under {@linkcode BODY_BUDGET};
 * - a request's head and body must be complete within `requestTimeoutMs` of its HEADERS;
 *   a connection with no stream open closes after `idleTimeoutMs` (GOAWAY first);
 * - output: while more than {@linkcode OUTPUT_BUDGET} octets wait for a client that does not
 *   read, no more frames are read from it; a write that makes no progress for
 *   `writeTimeoutMs` closes the connection;
 * - answers: with a {@linkcode ResponseBudget} (DoH: the stream listeners' answer budget,
 *   shared per client), a request goes to the service only while the budget has room or the
 *   connection has nothing being answered and nothing unsent, and not while 64 KiB of bodies
 *   wait for the client; meanwhile the HEADERS of new streams stay unread.
 *
 * @module
 */

import { Deadline } from "./deadline.ts";
import { encodeHeaders, type HeaderField, HpackDecoder, HpackError } from "./hpack.ts";
import {
  type ConnectionOutcome,
  connectionOutcome,
  type HttpRequest,
  type HttpResponse,
  type HttpSession,
} from "./types.ts";

/** The client connection preface (RFC 9113 section 3.4). */
export const PREFACE: Uint8Array = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

const FRAME_HEADER = 9;
/** SETTINGS_MAX_FRAME_SIZE we keep (the default): the largest frame payload we read. */
const MAX_FRAME = 16_384;
/** Octets of request bodies held per connection before the connection window stops growing. */
export const BODY_BUDGET = 256 * 1024;
/** Octets of output waiting for the client beyond which reading pauses. */
export const OUTPUT_BUDGET = 512 * 1024;
/** Streams a client may reset before their answer, past which resets must stay a minority. */
const RESET_ALLOWANCE = 200;
/** Most CONTINUATION frames in one header block. */
const MAX_CONTINUATIONS = 64;
/**
 * Before our SETTINGS are out the client may send only the default 65,535 octets of DATA:
 * past half of it, held control frames go out even with streams open (see `#release`).
 */
const HOLD_DATA_LIMIT = 32_768;

const enum Frame {
  DATA = 0,
  HEADERS = 1,
  PRIORITY = 2,
  RST_STREAM = 3,
  SETTINGS = 4,
  PUSH_PROMISE = 5,
  PING = 6,
  GOAWAY = 7,
  WINDOW_UPDATE = 8,
  CONTINUATION = 9,
}

const END_STREAM = 0x1;
const ACK = 0x1;
const END_HEADERS = 0x4;
const PADDED = 0x8;
const PRIORITY_FLAG = 0x20;

/**
 * The error codes of RFC 9113 section 7, in the RFC's order: each one's code is its index
 * (0x0 NO_ERROR to 0xd HTTP_1_1_REQUIRED).
 */
export const H2_ERROR_NAMES = [
  "NO_ERROR",
  "PROTOCOL_ERROR",
  "INTERNAL_ERROR",
  "FLOW_CONTROL_ERROR",
  "SETTINGS_TIMEOUT",
  "STREAM_CLOSED",
  "FRAME_SIZE_ERROR",
  "REFUSED_STREAM",
  "CANCEL",
  "COMPRESSION_ERROR",
  "CONNECT_ERROR",
  "ENHANCE_YOUR_CALM",
  "INADEQUATE_SECURITY",
  "HTTP_1_1_REQUIRED",
] as const;

/** The name of an HTTP/2 error code. */
export type H2ErrorName = (typeof H2_ERROR_NAMES)[number];

/** Error codes (RFC 9113 section 7) by name: `H2Error.REFUSED_STREAM` is 7. */
export const H2Error: Readonly<Record<H2ErrorName, number>> = Object.freeze(
  Object.fromEntries(H2_ERROR_NAMES.map((name, code) => [name, code])) as Record<
    H2ErrorName,
    number
  >,
);

const MAX_WINDOW = 0x7fffffff;
/**
 * Response body octets unsent on a connection past which no more requests are handed on (as
 * the stream listener pauses reading at 64 KiB unsent): 1,000 non-reading connections x 100
 * streams, 405 -> 353-356 MiB RSS (dohprobe, same session).
 */
const UNSENT_PAUSE = 64 * 1024;
/** The body of every request without one (a GET): one shared, empty, never written to. */
const NO_BODY = new Uint8Array(0);

/** A connection error: GOAWAY with `code`, then close. */
class ConnectionError extends Error {
  readonly code: number;
  constructor(code: number, message: string) {
    super(message);
    this.code = code;
  }
}

/** One stream: a request being received, handled, or its response being sent. */
interface Stream {
  readonly id: number;
  /** When its HEADERS arrived (the timers' clock). */
  readonly started: number;
  /** True until END_STREAM from the client. */
  receiving: boolean;
  method: string;
  target: string;
  fields: Map<string, string>;
  /** Body chunks received. */
  chunks: Uint8Array[];
  bodyBytes: number;
  /** The client's flow-control window for this stream (what it may still send). */
  recvWindow: number;
  /** Our send window on this stream. */
  sendWindow: number;
  /** Response body octets waiting for window. */
  pending: Uint8Array | null;
  /** The response was decided (handled or refused): later DATA is ignored. */
  answered: boolean;
  /** Closed or reset: nothing more is sent. */
  closed: boolean;
  /** A HEAD request: no body is sent. */
  head: boolean;
  /** The whole response is queued. */
  sent: boolean;
  /** Handed to the service under the {@linkcode ResponseBudget}, and not yet answered. */
  budgeted: boolean;
}

function u32(bytes: Uint8Array, at: number): number {
  return ((bytes[at] << 24) >>> 0) + (bytes[at + 1] << 16) + (bytes[at + 2] << 8) + bytes[at + 3];
}

function u32Payload(...values: number[]): Uint8Array {
  const out = new Uint8Array(values.length * 4);
  values.forEach((value, i) => {
    out[i * 4] = value >>> 24;
    out[i * 4 + 1] = (value >>> 16) & 0xff;
    out[i * 4 + 2] = (value >>> 8) & 0xff;
    out[i * 4 + 3] = value & 0xff;
  });
  return out;
}

/**
 * The answer budget an HTTP/2 connection asks before it hands a request to the service (for
 * DoH: the answer budget of the stream listeners, shared per client). It counts the requests
 * being answered (at an estimated answer size) and the response bodies queued and not yet
 * written, so that answers are not made faster than the client takes them.
 *
 * Why: a client that opens its 100 streams on each of its 64 connections and reads nothing
 * made the proxy hold 64 x 100 answers of 60 KB: 398 MiB RSS (bench/memory_attacks.ts
 * `doh-no-read-64`), over the Kubernetes manifest's 256 MiB; {@linkcode OUTPUT_BUDGET} stops
 * reading, but every stream already read was answered.
 */
export interface ResponseBudget {
  /** True when one more request may be handed to the service now. */
  mayStart(): boolean;
  /** A request was handed to the service. */
  started(): void;
  /** The service answered a request with a body of `bytes` octets (null: no answer). */
  answered(bytes: number | null): void;
  /** `bytes` octets of response bodies were queued for the client. */
  queued(bytes: number): void;
  /** `bytes` octets of queued response bodies were written or dropped. */
  sent(bytes: number): void;
}

/** How an HTTP/2 connection ended, for the listener's log. */
export type H2Outcome = ConnectionOutcome;

/**
 * Serves HTTP/2 on one connection whose bytes start with the client preface (after ALPN
 * `h2`, or prior knowledge on a plain listener). `initial` holds bytes already read from it.
 *
 * @example
 * ```ts ignore
 * const h2 = new H2Connection({ conn, peer, service, limits, timers }, new Uint8Array(0));
 * await h2.finished;
 * ```
 */
export class H2Connection {
  /** Settles (never rejects) once the connection is closed. */
  readonly finished: Promise<H2Outcome>;
  /** The connection, its peer, the service, the limits and the timers. */
  readonly #session: HttpSession;
  readonly #decoder = new HpackDecoder();
  readonly #streams = new Map<number, Stream>();
  #lastStream = 0;
  /** The stream whose header block continues in CONTINUATION frames, and the block so far. */
  #continuing: {
    stream: number;
    flags: number;
    parts: Uint8Array[];
    bytes: number;
    started: number;
  } | null = null;
  /** Streams opened, and those the client reset before their answer was sent. */
  #opened = 0;
  #resetByClient = 0;
  #lastActive: number;
  #peerInitialWindow = 65_535;
  #peerMaxFrame = 16_384;
  #sendWindow = 65_535;
  /** Octets of DATA received and not yet given back to the connection window. */
  #credit = 0;
  #bodyBytes = 0;
  /**
   * Frames queued and not yet handed to a write, back to back; and the buffer of the write
   * in progress, reused for the next batch. Two buffers, each growing by doubling, instead of
   * an array per frame and a concatenation per write (the output path was 12% of the CPU of
   * a cached DoH request over HTTP/2, V8 profile).
   */
  #out: Uint8Array = new Uint8Array(1024);
  #outLength = 0;
  #spare: Uint8Array = new Uint8Array(1024);
  /** Octets queued or being written. */
  #outBytes = 0;
  #writing: Promise<void> | null = null;
  /**
   * True when the queued output must go now (a response, a reset, GOAWAY, a PING answer);
   * false while it holds only control frames that can wait for the next response (see
   * `#release`).
   */
  #urgent = false;
  /** Our SETTINGS (the server preface) were handed to a write. */
  #prefaceWritten = false;
  /** Octets of DATA received before our SETTINGS were written. */
  #earlyData = 0;
  /** The client's preface was read (until then our SETTINGS wait: see `#release`). */
  #prefaceSeen = false;
  #drained: (() => void) | null = null;
  readonly #deadline: Deadline;
  readonly #writeDeadline: Deadline;
  #closed = false;
  #goingAway = false;
  #reason = "";
  #stop: () => void = () => {};
  readonly #stopped: Promise<void>;
  readonly #budget: ResponseBudget | null;
  /** Whole requests waiting for the budget, oldest first. */
  #waiting: { stream: Stream; request: HttpRequest }[] = [];
  /** Requests handed to the service and not yet answered. */
  #handling = 0;
  /** Response body octets queued (pending or in `#out`) and not yet written. */
  #unsentBodies = 0;
  /** DATA payload octets in `#out` (the batch not yet handed to a write). */
  #outData = 0;
  /** Wakes the frame loop held at a HEADERS frame while a request waits for the budget. */
  #streamsHeld: (() => void) | null = null;

  /** Starts serving; `initial` are bytes already read (at least part of the preface). */
  constructor(session: HttpSession, initial: Uint8Array, budget: ResponseBudget | null = null) {
    this.#budget = budget;
    this.#session = session;
    this.#lastActive = session.timers.clock.now();
    this.#deadline = new Deadline(session.timers, (reason) => this.#expired(reason));
    this.#writeDeadline = new Deadline(session.timers, (reason) => this.#close(reason));
    this.#stopped = new Promise((resolve) => this.#stop = resolve);
    this.finished = connectionOutcome(this.#run(initial), () => this.#reason).finally(async () => {
      // A GOAWAY queued on the way out is written first (or the write deadline ends it).
      await this.#writing;
      this.#close("");
    });
  }

  /** Streams open now. */
  get openStreams(): number {
    return this.#streams.size;
  }

  /** True with no stream open: closing the connection loses nothing. */
  get idle(): boolean {
    return this.#streams.size === 0 && this.#continuing === null;
  }

  /** When a stream last opened or finished (the timers' clock: `performance.now()`). */
  get lastActive(): number {
    return this.#lastActive;
  }

  /** Closes the connection now. */
  abort(reason: string): void {
    this.#close(reason);
  }

  /**
   * Graceful end: GOAWAY (no new streams), the open ones are answered, then the connection
   * closes.
   */
  shutdown(): void {
    if (this.#closed || this.#goingAway) return;
    this.#goingAway = true;
    this.#send(Frame.GOAWAY, 0, 0, u32Payload(this.#lastStream, H2Error.NO_ERROR));
    if (this.#streams.size === 0) this.#closeAfterFlush("shutting down");
  }

  #close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    if (reason !== "") this.#reason = reason;
    this.#budget?.sent(this.#unsentBodies);
    this.#unsentBodies = 0;
    this.#waiting = [];
    this.#deadline.disarm();
    this.#writeDeadline.disarm();
    this.#stop();
    this.#drained?.();
    try {
      this.#session.conn.close();
    } catch {
      // Already closed.
    }
  }

  async #closeAfterFlush(reason: string): Promise<void> {
    this.#reason ||= reason;
    await this.#writing;
    this.#close(reason);
  }

  /** Arms the one deadline the connection has now. */
  #arm(): void {
    if (this.#closed) return;
    let oldest = Infinity;
    for (const stream of this.#streams.values()) {
      if (stream.receiving && stream.started < oldest) oldest = stream.started;
    }
    if (this.#continuing !== null && this.#continuing.started < oldest) {
      oldest = this.#continuing.started;
    }
    let ms: number;
    let reason: string;
    if (oldest !== Infinity) {
      ms = Math.max(
        0,
        oldest + this.#session.limits.requestTimeoutMs - this.#session.timers.clock.now(),
      );
      reason = "request timeout";
    } else if (this.#streams.size === 0) {
      ms = this.#session.limits.idleTimeoutMs;
      reason = "idle";
    } else {
      // Streams being answered: the resolver's deadline bounds them, writes have their own.
      this.#deadline.disarm();
      return;
    }
    this.#deadline.arm(ms, reason);
  }

  #expired(reason: string): void {
    if (this.#closed) return;
    if (reason === "idle") {
      this.#goingAway = true;
      this.#send(Frame.GOAWAY, 0, 0, u32Payload(this.#lastStream, H2Error.NO_ERROR));
      this.#closeAfterFlush(reason);
    } else {
      this.#fail(new ConnectionError(H2Error.CANCEL, reason), reason);
    }
  }

  async #run(initial: Uint8Array): Promise<void> {
    const conn = this.#session.conn;
    // Small while idle; grows by doubling to hold a whole frame (at most 32 KiB).
    let buffer = new Uint8Array(Math.max(4096, initial.length));
    buffer.set(initial);
    let start = 0;
    let end = Math.min(initial.length, buffer.length);
    // Our SETTINGS first (the server preface): the stream cap, a stream window of the body
    // limit plus a frame, and the header list limit. Held (lazy) until the client's preface
    // is read: they then leave with the first answer in one write (see `#release`).
    this.#send(
      Frame.SETTINGS,
      0,
      0,
      Uint8Array.from([
        ...[0, 3, ...u32Payload(this.#session.limits.maxStreams)],
        ...[0, 4, ...u32Payload(this.#streamWindow())],
        ...[0, 6, ...u32Payload(this.#session.limits.maxHeadBytes)],
      ]),
      true,
    );
    const connectionCredit = this.#streamWindow() * 2;
    if (connectionCredit > 65_535) {
      this.#send(Frame.WINDOW_UPDATE, 0, 0, u32Payload(connectionCredit - 65_535), true);
    }
    this.#deadline.arm(this.#session.limits.requestTimeoutMs, "preface timeout");
    // Each pass consumes a frame or reads at least one byte: the loop ends with the stream.
    for (;;) {
      if (this.#closed) return;
      if (!this.#prefaceSeen && end - start >= PREFACE.length) {
        for (let i = 0; i < PREFACE.length; i++) {
          if (buffer[start + i] !== PREFACE[i]) {
            throw this.#fail(new ConnectionError(H2Error.PROTOCOL_ERROR, "bad preface"), "");
          }
        }
        start += PREFACE.length;
        this.#prefaceSeen = true;
        this.#arm();
        continue;
      }
      if (this.#prefaceSeen && end - start >= FRAME_HEADER) {
        const length = (buffer[start] << 16) | (buffer[start + 1] << 8) | buffer[start + 2];
        if (length > MAX_FRAME) {
          throw this.#fail(
            new ConnectionError(H2Error.FRAME_SIZE_ERROR, `frame of ${length} octets`),
            "",
          );
        }
        if (end - start >= FRAME_HEADER + length) {
          const type = buffer[start + 3];
          if (type === Frame.HEADERS && this.#holdNewStreams()) {
            // The frame stays in the buffer, unread past it, until the budget has room.
            await Promise.race([
              new Promise<void>((resolve) => this.#streamsHeld = resolve),
              this.#stopped,
            ]);
            this.#streamsHeld = null;
            continue;
          }
          const flags = buffer[start + 4];
          const stream = u32(buffer, start + 5) & 0x7fffffff;
          const payload = buffer.subarray(start + FRAME_HEADER, start + FRAME_HEADER + length);
          start += FRAME_HEADER + length;
          try {
            this.#frame(type, flags, stream, payload);
          } catch (error) {
            if (error instanceof ConnectionError) throw this.#fail(error, "");
            throw error;
          }
          if (start === end) start = end = 0;
          continue;
        }
      }
      // Need more bytes: compact, then read (after the output drained below its budget).
      if (start > 0 && (end === buffer.length || start === end)) {
        buffer.copyWithin(0, start, end);
        end -= start;
        start = 0;
      }
      if (end === buffer.length) {
        const bigger = new Uint8Array(buffer.length * 2);
        bigger.set(buffer.subarray(0, end));
        buffer = bigger;
      }
      if (this.#outBytes > OUTPUT_BUDGET) {
        await Promise.race([
          new Promise<void>((resolve) => this.#drained = resolve),
          this.#stopped,
        ]);
        continue;
      }
      // Everything read is handled: control frames held for a response go now unless one
      // is on its way.
      this.#release();
      const n = await conn.read(buffer.subarray(end));
      if (n === null) {
        this.#reason ||= "client closed";
        // Answers still owed are abandoned with the connection.
        return;
      }
      end += n;
    }
  }

  #streamWindow(): number {
    return this.#session.limits.maxBodyBytes + MAX_FRAME;
  }

  /** Sends GOAWAY for `error` and closes after it is written; returns `error` to throw. */
  #fail(error: ConnectionError, reason: string): ConnectionError {
    if (!this.#closed) {
      this.#reason ||= reason || `protocol error: ${error.message}`;
      const message = new TextEncoder().encode(error.message.slice(0, 100));
      const payload = new Uint8Array(8 + message.length);
      payload.set(u32Payload(this.#lastStream, error.code));
      payload.set(message, 8);
      this.#goingAway = true;
      this.#send(Frame.GOAWAY, 0, 0, payload);
      this.#closeAfterFlush(this.#reason);
    }
    return error;
  }

  #frame(type: number, flags: number, id: number, payload: Uint8Array): void {
    if (this.#continuing !== null && type !== Frame.CONTINUATION) {
      throw new ConnectionError(H2Error.PROTOCOL_ERROR, "frame inside a header block");
    }
    switch (type) {
      case Frame.DATA:
        return this.#data(flags, id, payload);
      case Frame.HEADERS:
        return this.#headers(flags, id, payload);
      case Frame.PRIORITY:
        if (id === 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "PRIORITY on stream 0");
        if (payload.length !== 5) this.#reset(id, H2Error.FRAME_SIZE_ERROR);
        return;
      case Frame.RST_STREAM: {
        if (id === 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "RST_STREAM on 0");
        if (payload.length !== 4) {
          throw new ConnectionError(H2Error.FRAME_SIZE_ERROR, "RST_STREAM size");
        }
        if (id > this.#lastStream) {
          throw new ConnectionError(H2Error.PROTOCOL_ERROR, "RST_STREAM on an idle stream");
        }
        const stream = this.#streams.get(id);
        if (stream !== undefined) {
          // Opening streams only to reset them makes the server work for nothing (the
          // "rapid reset" attack, CVE-2023-44487): past a few hundred, when they are most
          // of what a connection does, it ends.
          if (!stream.sent && ++this.#resetByClient > RESET_ALLOWANCE) {
            if (this.#resetByClient * 2 > this.#opened) {
              throw new ConnectionError(H2Error.ENHANCE_YOUR_CALM, "too many streams reset");
            }
          }
          this.#forget(stream);
        }
        return;
      }
      case Frame.SETTINGS:
        return this.#settings(flags, id, payload);
      case Frame.PUSH_PROMISE:
        throw new ConnectionError(H2Error.PROTOCOL_ERROR, "PUSH_PROMISE from a client");
      case Frame.PING:
        if (id !== 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "PING on a stream");
        if (payload.length !== 8) throw new ConnectionError(H2Error.FRAME_SIZE_ERROR, "PING size");
        if ((flags & ACK) === 0) this.#send(Frame.PING, ACK, 0, payload.slice());
        return;
      case Frame.GOAWAY:
        if (id !== 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "GOAWAY on a stream");
        // The client leaves: answer what is open, then close.
        this.#goingAway = true;
        if (this.#streams.size === 0) this.#closeAfterFlush("client sent GOAWAY");
        return;
      case Frame.WINDOW_UPDATE:
        return this.#windowUpdate(id, payload);
      case Frame.CONTINUATION: {
        const block = this.#continuing;
        if (block === null || block.stream !== id) {
          throw new ConnectionError(H2Error.PROTOCOL_ERROR, "unexpected CONTINUATION");
        }
        block.parts.push(payload.slice());
        block.bytes += payload.length;
        // Bounded in octets and in frames (empty CONTINUATION frames cost nothing to send;
        // CVE-2024-27316).
        if (
          block.bytes > 2 * this.#session.limits.maxHeadBytes + MAX_FRAME ||
          block.parts.length > MAX_CONTINUATIONS
        ) {
          throw new ConnectionError(H2Error.ENHANCE_YOUR_CALM, "header block too large");
        }
        if (flags & END_HEADERS) {
          this.#continuing = null;
          const whole = new Uint8Array(block.bytes);
          let at = 0;
          for (const part of block.parts) {
            whole.set(part, at);
            at += part.length;
          }
          this.#headerBlock(id, block.flags, whole);
        }
        return;
      }
      default:
        // Unknown frame types are ignored (RFC 9113 section 4.1).
        return;
    }
  }

  #settings(flags: number, id: number, payload: Uint8Array): void {
    if (id !== 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "SETTINGS on a stream");
    if (flags & ACK) {
      if (payload.length !== 0) throw new ConnectionError(H2Error.FRAME_SIZE_ERROR, "SETTINGS ack");
      return;
    }
    if (payload.length % 6 !== 0) throw new ConnectionError(H2Error.FRAME_SIZE_ERROR, "SETTINGS");
    for (let at = 0; at < payload.length; at += 6) {
      const key = (payload[at] << 8) | payload[at + 1];
      const value = u32(payload, at + 2);
      if (key === 2 && value > 1) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "ENABLE_PUSH");
      if (key === 4) {
        if (value > MAX_WINDOW) {
          throw new ConnectionError(H2Error.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE");
        }
        const delta = value - this.#peerInitialWindow;
        this.#peerInitialWindow = value;
        for (const stream of this.#streams.values()) {
          stream.sendWindow += delta;
          if (stream.sendWindow > MAX_WINDOW) {
            throw new ConnectionError(H2Error.FLOW_CONTROL_ERROR, "window overflow");
          }
        }
      }
      if (key === 5) {
        if (value < 16_384 || value > 16_777_215) {
          throw new ConnectionError(H2Error.PROTOCOL_ERROR, "MAX_FRAME_SIZE");
        }
        this.#peerMaxFrame = value;
      }
    }
    this.#send(Frame.SETTINGS, ACK, 0, new Uint8Array(0), true);
    this.#pump();
  }

  #windowUpdate(id: number, payload: Uint8Array): void {
    if (payload.length !== 4) throw new ConnectionError(H2Error.FRAME_SIZE_ERROR, "WINDOW_UPDATE");
    const increment = u32(payload, 0) & 0x7fffffff;
    if (id === 0) {
      if (increment === 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "window +0");
      this.#sendWindow += increment;
      if (this.#sendWindow > MAX_WINDOW) {
        throw new ConnectionError(H2Error.FLOW_CONTROL_ERROR, "window overflow");
      }
    } else {
      if (id > this.#lastStream) {
        throw new ConnectionError(H2Error.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream");
      }
      const stream = this.#streams.get(id);
      if (stream === undefined) return;
      if (increment === 0) {
        this.#reset(id, H2Error.PROTOCOL_ERROR);
        this.#forget(stream);
        return;
      }
      stream.sendWindow += increment;
      if (stream.sendWindow > MAX_WINDOW) {
        this.#reset(id, H2Error.FLOW_CONTROL_ERROR);
        this.#forget(stream);
        return;
      }
    }
    this.#pump();
  }

  #data(flags: number, id: number, payload: Uint8Array): void {
    if (id === 0) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "DATA on stream 0");
    // The whole frame, padding included, counts against the windows.
    const length = payload.length;
    this.#credit += length;
    if (!this.#prefaceWritten) this.#earlyData += length;
    let data = payload;
    if (flags & PADDED) {
      const pad = payload[0] ?? 0;
      if (length === 0 || pad >= length) {
        throw new ConnectionError(H2Error.PROTOCOL_ERROR, "DATA padding");
      }
      data = payload.subarray(1, length - pad);
    }
    const stream = this.#streams.get(id);
    if (stream === undefined || !stream.receiving) {
      if (id > this.#lastStream) {
        throw new ConnectionError(H2Error.PROTOCOL_ERROR, "DATA on an idle stream");
      }
      // A stream we reset or answered: credit the connection, tell the client it is closed.
      if (stream === undefined) this.#reset(id, H2Error.STREAM_CLOSED);
      this.#giveCredit();
      return;
    }
    stream.recvWindow -= length;
    if (stream.recvWindow < 0) {
      this.#reset(id, H2Error.FLOW_CONTROL_ERROR);
      this.#forget(stream);
      this.#giveCredit();
      return;
    }
    if (!stream.answered) {
      if (stream.bodyBytes + data.length > this.#session.limits.maxBodyBytes) {
        this.#reject(stream, 413, `body over ${this.#session.limits.maxBodyBytes} octets`);
      } else if (data.length > 0) {
        stream.chunks.push(data.slice());
        stream.bodyBytes += data.length;
        this.#bodyBytes += data.length;
      }
    }
    if (flags & END_STREAM) {
      stream.receiving = false;
      this.#complete(stream);
    }
    if (stream.sent) {
      // Answered early (413): the rest of the body is read and dropped while the client's
      // window lasts; past it, RST_STREAM NO_ERROR (RFC 9113 section 8.1).
      if (!stream.receiving) this.#forget(stream);
      else if (stream.recvWindow <= 0) {
        this.#reset(stream.id, H2Error.NO_ERROR);
        this.#forget(stream);
      }
    }
    this.#giveCredit();
    this.#arm();
  }

  /**
   * Gives received octets back to the connection window while bodies stay in budget, once
   * they reach a stream window: the connection window is two stream windows, so a whole
   * body still fits meanwhile, and a small POST costs no WINDOW_UPDATE of its own (a write
   * before the answer's that Nagle's algorithm then makes the answer wait behind, for the
   * client's delayed ACK: 40 ms on Linux).
   */
  #giveCredit(): void {
    // Bodies over budget, every one still incomplete: with no credit given back, none could
    // ever complete (ten 60 KB POSTs at once waited for the request deadline). Refuse the
    // newest (the client may retry it, RFC 9113 section 8.7) until the rest fit.
    while (this.#bodyBytes > BODY_BUDGET) {
      let newest: Stream | undefined;
      for (const stream of this.#streams.values()) {
        if (stream.receiving && !stream.answered && stream.bodyBytes > 0) {
          if (newest === undefined || stream.id > newest.id) newest = stream;
        }
      }
      if (newest === undefined) break;
      this.#reset(newest.id, H2Error.REFUSED_STREAM);
      this.#forget(newest);
    }
    if (this.#credit < this.#streamWindow() || this.#bodyBytes > BODY_BUDGET) return;
    this.#send(Frame.WINDOW_UPDATE, 0, 0, u32Payload(this.#credit));
    this.#credit = 0;
  }

  #headers(flags: number, id: number, payload: Uint8Array): void {
    if (id === 0 || (id & 1) === 0) {
      throw new ConnectionError(H2Error.PROTOCOL_ERROR, "HEADERS on an even stream");
    }
    let block = payload;
    let pad = 0;
    let at = 0;
    if (flags & PADDED) {
      pad = payload[0] ?? 0;
      at = 1;
    }
    if (flags & PRIORITY_FLAG) at += 5;
    if (at + pad > payload.length) throw new ConnectionError(H2Error.PROTOCOL_ERROR, "padding");
    block = payload.subarray(at, payload.length - pad);
    if (flags & END_HEADERS) {
      this.#headerBlock(id, flags, block);
    } else {
      this.#continuing = {
        stream: id,
        flags,
        parts: [block.slice()],
        bytes: block.length,
        started: this.#session.timers.clock.now(),
      };
      this.#arm();
    }
  }

  #headerBlock(id: number, flags: number, block: Uint8Array): void {
    let decoded: { fields: HeaderField[]; tooLarge: boolean };
    try {
      decoded = this.#decoder.decode(block, this.#session.limits.maxHeadBytes);
    } catch (error) {
      if (error instanceof HpackError) {
        throw new ConnectionError(H2Error.COMPRESSION_ERROR, error.message);
      }
      throw error;
    }
    const existing = this.#streams.get(id);
    if (id <= this.#lastStream) {
      // Trailers end a stream that is still receiving; anything else is an error.
      if (existing === undefined || !existing.receiving) {
        // A stream id not above the last is closed (or was never opened, which closes it:
        // RFC 9113 section 5.1.1).
        throw new ConnectionError(H2Error.STREAM_CLOSED, "HEADERS on a closed stream");
      }
      if ((flags & END_STREAM) === 0) {
        this.#reset(id, H2Error.PROTOCOL_ERROR);
        this.#forget(existing);
        return;
      }
      existing.receiving = false;
      this.#complete(existing);
      this.#arm();
      return;
    }
    this.#lastStream = id;
    this.#opened++;
    this.#lastActive = this.#session.timers.clock.now();
    if (this.#goingAway) {
      this.#reset(id, H2Error.REFUSED_STREAM);
      return;
    }
    if (this.#streams.size >= this.#session.limits.maxStreams) {
      this.#reset(id, H2Error.REFUSED_STREAM);
      return;
    }
    const stream: Stream = {
      id,
      started: this.#session.timers.clock.now(),
      receiving: (flags & END_STREAM) === 0,
      method: "",
      target: "",
      fields: new Map(),
      chunks: [],
      bodyBytes: 0,
      recvWindow: this.#streamWindow(),
      sendWindow: this.#peerInitialWindow,
      pending: null,
      answered: false,
      closed: false,
      head: false,
      sent: false,
      budgeted: false,
    };
    this.#streams.set(id, stream);
    const problem = decoded.tooLarge ? 431 : this.#readFields(stream, decoded.fields);
    if (problem === 431) this.#reject(stream, 431, "header list too large");
    else if (problem === 414) {
      this.#reject(
        stream,
        414,
        `request target over ${this.#session.limits.maxTargetBytes} octets`,
      );
    } else if (problem !== 0) this.#reject(stream, 400, "malformed request header fields");
    if (!stream.receiving) this.#complete(stream);
    this.#arm();
  }

  /** Fills the stream's request from decoded fields; returns 0, or the status to refuse. */
  #readFields(stream: Stream, fields: HeaderField[]): number {
    let regular = false;
    let scheme = "";
    for (const [name, value] of fields) {
      if (name.startsWith(":")) {
        // Pseudo-fields come first, each once (RFC 9113 section 8.3).
        if (regular) return 400;
        if (name === ":method" && stream.method === "") stream.method = value;
        else if (name === ":path" && stream.target === "") stream.target = value;
        else if (name === ":scheme" && scheme === "") scheme = value;
        else if (name !== ":authority") return 400;
        continue;
      }
      regular = true;
      if (/[A-Z]/.test(name) || name === "connection" || name === "transfer-encoding") return 400;
      const previous = stream.fields.get(name);
      stream.fields.set(name, previous === undefined ? value : `${previous}, ${value}`);
    }
    if (stream.method === "" || scheme === "" || stream.target === "") return 400;
    if (stream.target.length > this.#session.limits.maxTargetBytes) return 414;
    stream.head = stream.method === "HEAD";
    return 0;
  }

  /** The request is whole: hand it to the service, unless it was refused already. */
  #complete(stream: Stream): void {
    if (stream.answered) {
      this.#releaseBody(stream);
      return;
    }
    stream.answered = true;
    const body = stream.bodyBytes === 0 ? NO_BODY : new Uint8Array(stream.bodyBytes);
    let at = 0;
    for (const chunk of stream.chunks) {
      body.set(chunk, at);
      at += chunk.length;
    }
    this.#releaseBody(stream);
    const request: HttpRequest = {
      method: stream.method,
      target: stream.target,
      fields: stream.fields,
      body,
      version: "HTTP/2",
    };
    if (this.#waiting.length > 0 || !this.#mayStart()) {
      this.#waiting.push({ stream, request });
      return;
    }
    this.#dispatch(stream, request);
  }

  /**
   * True when the budget lets one more request go to the service; a connection with nothing
   * being answered and nothing unsent may always have one.
   */
  #mayStart(): boolean {
    const budget = this.#budget;
    if (budget === null) return true;
    if (this.#handling === 0 && this.#unsentBodies === 0) return true;
    return this.#unsentBodies < UNSENT_PAUSE && budget.mayStart();
  }

  #dispatch(stream: Stream, request: HttpRequest): void {
    if (this.#budget !== null) {
      stream.budgeted = true;
      this.#handling++;
      this.#budget.started();
    }
    this.#session.service.handle(request, this.#session.peer).then(
      (response) => this.#respond(stream, response),
      () => this.#respond(stream, this.#session.service.reject(503, "the request failed")),
    );
  }

  /** Hands waiting requests to the service while the budget has room. */
  #admitWaiting(): void {
    while (this.#waiting.length > 0 && !this.#closed && this.#mayStart()) {
      const next = this.#waiting.shift()!;
      if (!next.stream.closed) this.#dispatch(next.stream, next.request);
    }
    if (!this.#holdNewStreams()) this.#releaseStreams();
  }

  /**
   * True while a new stream's HEADERS should stay unread: a request already waits for the
   * budget, and no response waits for the client's flow-control window (its WINDOW_UPDATE
   * may be behind that HEADERS frame; holding it then could wait for ever). Why: 1,000
   * connections that each open 100 streams and read nothing held 100,000 parsed requests
   * waiting for the budget, about 75 MiB of the heap (snapshot, `doh-no-read-1000`); unread,
   * a request is its 90 octets of HPACK in the read buffer.
   */
  #holdNewStreams(): boolean {
    if (this.#waiting.length === 0 || this.#closed) return false;
    for (const stream of this.#streams.values()) if (stream.pending !== null) return false;
    return true;
  }

  #releaseStreams(): void {
    const wake = this.#streamsHeld;
    this.#streamsHeld = null;
    wake?.();
  }

  #releaseBody(stream: Stream): void {
    this.#bodyBytes -= stream.bodyBytes;
    stream.chunks = [];
    stream.bodyBytes = 0;
    this.#giveCredit();
  }

  /** Answers a stream the connection refuses itself (the client may still be sending). */
  #reject(stream: Stream, status: number, reason: string): void {
    if (stream.answered) return;
    stream.answered = true;
    this.#releaseBody(stream);
    this.#respond(stream, this.#session.service.reject(status, reason));
  }

  #respond(stream: Stream, response: HttpResponse): void {
    if (stream.budgeted) {
      stream.budgeted = false;
      this.#handling--;
      const gone = stream.closed || this.#closed;
      this.#budget!.answered(gone ? null : response.body.length);
      if (gone) this.#admitWaiting();
    }
    if (stream.closed || this.#closed) return;
    const fields: HeaderField[] = [[":status", String(response.status)]];
    for (const [name, value] of response.fields) fields.push([name.toLowerCase(), value]);
    fields.push(["content-length", String(response.body.length)]);
    const block = encodeHeaders(fields);
    const body = stream.head ? new Uint8Array(0) : response.body;
    const endWithHeaders = body.length === 0 ? END_STREAM : 0;
    // A header block larger than a frame continues in CONTINUATION frames.
    const max = this.#peerMaxFrame;
    if (block.length <= max) {
      this.#send(Frame.HEADERS, END_HEADERS | endWithHeaders, stream.id, block);
    } else {
      this.#send(Frame.HEADERS, endWithHeaders, stream.id, block.subarray(0, max));
      for (let at = max; at < block.length; at += max) {
        const last = at + max >= block.length;
        this.#send(
          Frame.CONTINUATION,
          last ? END_HEADERS : 0,
          stream.id,
          block.subarray(at, Math.min(block.length, at + max)),
        );
      }
    }
    if (body.length === 0) {
      this.#finishStream(stream);
      return;
    }
    stream.pending = body;
    this.#unsentBodies += body.length;
    this.#budget?.queued(body.length);
    this.#pump();
    this.#admitWaiting();
  }

  /** Sends what the flow-control windows allow of every pending response body. */
  #pump(): void {
    for (const stream of this.#streams.values()) {
      const pending = stream.pending;
      if (pending === null || stream.closed) continue;
      let at = 0;
      while (at < pending.length && this.#sendWindow > 0 && stream.sendWindow > 0) {
        const size = Math.min(
          pending.length - at,
          this.#peerMaxFrame,
          this.#sendWindow,
          stream.sendWindow,
        );
        const last = at + size === pending.length;
        this.#send(
          Frame.DATA,
          last ? END_STREAM : 0,
          stream.id,
          pending.subarray(at, at + size),
        );
        at += size;
        this.#outData += size;
        this.#sendWindow -= size;
        stream.sendWindow -= size;
      }
      if (at === pending.length) {
        stream.pending = null;
        this.#finishStream(stream);
      } else {
        stream.pending = pending.subarray(at);
      }
      if (this.#sendWindow <= 0) break;
    }
    if (this.#streamsHeld !== null && !this.#holdNewStreams()) this.#releaseStreams();
  }

  /** The response is queued in full. */
  #finishStream(stream: Stream): void {
    stream.sent = true;
    stream.pending = null;
    // Answered before the client finished sending (413 and the like): the stream stays
    // until its END_STREAM (see #data), within the request deadline.
    if (!stream.receiving) this.#forget(stream);
  }

  #forget(stream: Stream): void {
    if (stream.closed) return;
    stream.closed = true;
    if (stream.pending !== null && !this.#closed) {
      // Reset with part of its body never queued: that part is dropped.
      this.#unsentBodies -= stream.pending.length;
      this.#budget?.sent(stream.pending.length);
    }
    stream.pending = null;
    this.#releaseBody(stream);
    this.#streams.delete(stream.id);
    this.#lastActive = this.#session.timers.clock.now();
    if (this.#streams.size === 0 && this.#goingAway) this.#closeAfterFlush("done");
    this.#release();
    this.#arm();
  }

  #reset(id: number, code: number): void {
    this.#send(Frame.RST_STREAM, 0, id, u32Payload(code));
  }

  /**
   * Writes held control frames unless a response will carry them: while a stream is open
   * (its answer is being made, or its body is coming), they wait to leave in the answer's
   * write; before the client's preface, our SETTINGS wait for it. Why: the DoH listener's
   * TLS connections cannot turn Nagle's algorithm off (`Deno.TlsConn` has no `setNoDelay`),
   * and a SETTINGS ACK or our SETTINGS written alone just before an answer made the answer
   * wait for the client's delayed ACK of that small segment: 40-50 ms per new connection and
   * per POST (curl, h2load; issue 26). A stream stays open at most the request deadline or
   * the resolver's; the client never waits for these frames to send (RFC 9113 section 3.4),
   * except for window: before our SETTINGS are out it may send 65,535 octets of DATA, so
   * they go once half of that came.
   */
  #release(): void {
    if (this.#outLength === 0 || this.#urgent || this.#closed || !this.#prefaceSeen) return;
    if (
      (this.#streams.size > 0 || this.#continuing !== null) &&
      (this.#prefaceWritten || this.#earlyData < HOLD_DATA_LIMIT)
    ) {
      return;
    }
    this.#urgent = true;
    this.#writing ??= this.#flush();
  }

  /**
   * Queues a frame: its 9-octet header and a copy of its payload. A `lazy` frame (SETTINGS,
   * its ACK, the first WINDOW_UPDATE) waits for the next urgent one or for `#release`.
   */
  #send(type: number, flags: number, stream: number, payload: Uint8Array, lazy = false): void {
    if (this.#closed) return;
    const size = FRAME_HEADER + payload.length;
    let out = this.#out;
    const at = this.#outLength;
    if (at + size > out.length) {
      const bigger = new Uint8Array(Math.max(2 * out.length, at + size));
      bigger.set(out.subarray(0, at));
      this.#out = out = bigger;
    }
    out[at] = payload.length >>> 16;
    out[at + 1] = (payload.length >>> 8) & 0xff;
    out[at + 2] = payload.length & 0xff;
    out[at + 3] = type;
    out[at + 4] = flags;
    out[at + 5] = (stream >>> 24) & 0x7f;
    out[at + 6] = (stream >>> 16) & 0xff;
    out[at + 7] = (stream >>> 8) & 0xff;
    out[at + 8] = stream & 0xff;
    out.set(payload, at + FRAME_HEADER);
    this.#outLength = at + size;
    this.#outBytes += size;
    if (lazy) return;
    this.#urgent = true;
    this.#writing ??= this.#flush();
  }

  async #flush(): Promise<void> {
    // Let the frames of this turn (a batch of answers) join one write.
    await Promise.resolve();
    try {
      while (this.#outLength > 0 && this.#urgent && !this.#closed) {
        // Frames queued during the write go to the other buffer.
        const full = this.#out;
        const bytes = full.subarray(0, this.#outLength);
        this.#out = this.#spare;
        this.#outLength = 0;
        this.#urgent = false;
        this.#prefaceWritten = true;
        const data = this.#outData;
        this.#outData = 0;
        try {
          for (let at = 0; at < bytes.length;) {
            this.#writeDeadline.arm(this.#session.limits.writeTimeoutMs, "write timeout");
            at += await this.#session.conn.write(bytes.subarray(at));
          }
        } finally {
          this.#writeDeadline.disarm();
        }
        this.#outBytes -= bytes.length;
        if (data > 0 && !this.#closed) {
          const written = Math.min(data, this.#unsentBodies);
          this.#unsentBodies -= written;
          this.#budget?.sent(written);
          this.#admitWaiting();
        }
        // A buffer grown for a burst is not kept past it.
        this.#spare = full.length > 64 * 1024 ? new Uint8Array(1024) : full;
        if (this.#outBytes <= OUTPUT_BUDGET && this.#drained !== null) {
          const wake = this.#drained;
          this.#drained = null;
          wake();
        }
      }
    } catch (error) {
      this.#reason ||= `write failed: ${error instanceof Error ? error.message : error}`;
      this.#close("");
    } finally {
      this.#writing = null;
    }
  }
}
