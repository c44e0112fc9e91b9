/**
 * The HTTP endpoint for operators: `GET /metrics` (Prometheus text format 0.0.4),
 * `GET /healthz` (the process is alive), `GET /readyz` (it serves DNS: not while draining)
 * and `GET /healthz/upstreams` (an upstream answers: for alerting, not for traffic).
 *
 * A small HTTP/1.1 server of its own on `Deno.listen`, not `Deno.serve`, because the endpoint
 * must outlive the abuse the DNS side is built to survive. Measured with `Deno.serve`: with
 * the process out of file descriptors (1,000 idle DNS-over-TCP clients under
 * `ulimit -n 1024`), one request to /healthz ended the process with an uncaught
 * `Http: Error: Too many open files`; and 3,000 idle HTTP connections were held for over 40 s.
 * Here every accept error is logged and survived (running out of descriptors pauses accepting
 * for 10–50 ms), open connections are capped (8 per client address; at the cap a new address
 * takes the place of an idle connection of the client holding the most, so a hog cannot keep
 * the kubelet's probe out), and every phase of a connection has a deadline:
 * the request head, an idle keep-alive connection, the handler and the response write.
 * Measured with this server and the defaults: the same 1,000 DNS clients, and /healthz answers
 * 200 once descriptors free up; 3,000 idle HTTP connections (before the per-client cap), 2,936
 * closed on accept and the last of the other 64 after 5.0 s (tests/http_test.ts checks both,
 * on a smaller scale).
 *
 * It serves what Prometheus, the kubelet and curl send: GET and HEAD, HTTP/1.0 and
 * HTTP/1.1, keep-alive and pipelining (RFC 9112). A request with a body is answered and its
 * connection closed; nothing here needs one.
 *
 * @module
 */

import { formatAddr } from "../address.ts";
import type { ListenAddress } from "../config.ts";
import { linger } from "../http/linger.ts";
import { AcceptLoop, type Acceptor, closeQuietly, type Served } from "../net/accept_loop.ts";
import { errorMessage, type LogFields, type Logger, RateLimitedLog } from "../log.ts";

/** A verdict of `/readyz` or `/healthz/upstreams`. */
export interface Readiness {
  /** True when ready (`/readyz`) or when an upstream answers (`/healthz/upstreams`). */
  ready: boolean;
  /** Why, in a few words, shown in the response body. */
  reason: string;
}

/** What the endpoint serves. */
export interface HttpHandlers {
  /** The metrics exposition text. */
  metrics(): string;
  /**
   * Decides readiness: whether this replica should get traffic. It must not fail for a fault
   * every replica shares (all upstreams down), or every replica leaves the load balancer at
   * once and the cache (serve-stale) can answer no one.
   */
  readiness(): Promise<Readiness>;
  /**
   * Whether an upstream answers, possibly probing one; served at `/healthz/upstreams` for
   * alerts and dashboards (404 when absent).
   */
  upstreams?(): Promise<Readiness>;
}

/** The path that reports whether the upstreams answer. */
export const UPSTREAMS_PATH = "/healthz/upstreams";

/** Limits of the HTTP endpoint; each one left out takes its value from {@linkcode HTTP_DEFAULTS}. */
export interface HttpServerOptions {
  /**
   * Most connections open at once. At the cap, a client holding fewer connections than the
   * client holding the most takes the place of one of that client's connections still
   * waiting for a request; otherwise the new connection is closed on accept.
   */
  maxConnections?: number;
  /** Most connections open at once from one client address; more are closed on accept. */
  maxConnectionsPerClient?: number;
  /** The whole request head must arrive within this long of its first byte (slowloris). */
  headTimeoutMs?: number;
  /** Largest request head (request line and header fields); larger gets 431. */
  maxHeadBytes?: number;
  /** A keep-alive connection with no new request for this long is closed. */
  idleTimeoutMs?: number;
  /** A response not written within this long (the client does not read) is abandoned. */
  writeTimeoutMs?: number;
  /** A handler that has not answered within this long gets 503. */
  handlerTimeoutMs?: number;
  /** Requests served on one connection before it is closed. */
  maxRequestsPerConnection?: number;
}

/**
 * The default limits. 64 connections are plenty for a few scrapers and probes; each holds at
 * most one head buffer (8 KiB), so the endpoint's memory stays under a megabyte. 8 per client:
 * a scraper keeps one connection, the kubelet opens one per probe. Without a per-client cap,
 * one client holding all 64 with partial heads made 11 of 11 `/healthz` probes fail (issue 23).
 */
export const HTTP_DEFAULTS: Readonly<Required<HttpServerOptions>> = Object.freeze({
  maxConnections: 64,
  maxConnectionsPerClient: 8,
  headTimeoutMs: 5_000,
  maxHeadBytes: 8 * 1024,
  idleTimeoutMs: 5_000,
  writeTimeoutMs: 10_000,
  handlerTimeoutMs: 10_000,
  maxRequestsPerConnection: 100,
});

/** A response, before it is written. */
export interface HttpReply {
  /** The status code. */
  status: number;
  /** The Content-Type field. */
  contentType: string;
  /** The body (also what Content-Length counts for a HEAD request). */
  body: string;
  /** Further header fields, such as `Allow`. */
  headers?: Readonly<Record<string, string>>;
}

const TEXT = "text/plain; charset=utf-8";
const PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8";

/**
 * Answers one request by method and path (the request target without its query). Handler
 * errors propagate; {@linkcode HttpServer} turns them into 500.
 *
 * @example
 * ```ts
 * import { respond } from "./http.ts";
 * const handlers = { metrics: () => "", readiness: async () => ({ ready: true, reason: "" }) };
 * const reply = await respond("GET", "/healthz", handlers);
 * reply.status; // 200
 * ```
 */
export async function respond(
  method: string,
  path: string,
  handlers: HttpHandlers,
): Promise<HttpReply> {
  const known = path === "/metrics" || path === "/healthz" || path === "/readyz" ||
    (path === UPSTREAMS_PATH && handlers.upstreams !== undefined);
  if (!known) return { status: 404, contentType: TEXT, body: "not found\n" };
  if (method !== "GET" && method !== "HEAD") {
    return {
      status: 405,
      contentType: TEXT,
      body: "method not allowed\n",
      headers: { Allow: "GET, HEAD" },
    };
  }
  if (path === "/healthz") return { status: 200, contentType: TEXT, body: "ok\n" };
  if (path === "/metrics") {
    return { status: 200, contentType: PROMETHEUS, body: handlers.metrics() };
  }
  if (path === UPSTREAMS_PATH) {
    const upstreams = await handlers.upstreams!();
    return {
      status: upstreams.ready ? 200 : 503,
      contentType: TEXT,
      body: `${upstreams.ready ? "ok" : "failing"}: ${upstreams.reason}\n`,
    };
  }
  const readiness = await handlers.readiness();
  return {
    status: readiness.ready ? 200 : 503,
    contentType: TEXT,
    body: `${readiness.ready ? "ready" : "not ready"}: ${readiness.reason}\n`,
  };
}

/**
 * Routes one `Request` with {@linkcode respond}; for callers that hold a `Request`.
 *
 * @example
 * ```ts ignore
 * const response = await route(new Request("http://x/healthz"), handlers);
 * response.status; // 200
 * ```
 */
export async function route(request: Request, handlers: HttpHandlers): Promise<Response> {
  const reply = await respond(request.method, new URL(request.url).pathname, handlers);
  return new Response(reply.body, {
    status: reply.status,
    headers: { "content-type": reply.contentType, ...reply.headers },
  });
}

// ---------------------------------------------------------------------------------------------
// Request heads (RFC 9112 sections 2 to 5).

/** A request the server will not serve, with the status that says why. */
export class HttpRequestError extends Error {
  /** The response status: 400, 431 or 505. */
  readonly status: number;

  /** `message` is a short reason, safe to show the client (it quotes none of its bytes). */
  constructor(status: number, message: string) {
    super(message);
    this.name = "HttpRequestError";
    this.status = status;
  }
}

/** A parsed request head. */
export interface RequestHead {
  /** The method, case-sensitive as sent (`GET`, `HEAD`, ...). */
  method: string;
  /** The request target as sent. */
  target: string;
  /** The path: the target without query, and without scheme and authority in absolute form. */
  path: string;
  /** The protocol version. */
  version: "HTTP/1.0" | "HTTP/1.1";
  /** Header fields by lower-case name; repeated fields joined with `, `. */
  fields: Map<string, string>;
  /** True when a body follows (Content-Length above 0, or any Transfer-Encoding). */
  hasBody: boolean;
}

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const TARGET = /^[\x21-\x7e]+$/;
const ABSOLUTE_TARGET = /^https?:\/\/[^/?#]*([^?#]*)/i;
const LF = 0x0a;
const CR = 0x0d;

/** Control characters other than HTAB are not allowed in field values (RFC 9110 5.5). */
function hasControlCharacter(value: string): boolean {
  for (let i = 0; i < value.length; i++) {
    const c = value.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09) || c === 0x7f) return true;
  }
  return false;
}

const asciiDecoder = new TextDecoder();

/**
 * The octets as Latin-1 text. Heads are ASCII but for rare obs-text: then one native decode,
 * not a spread of a thousand arguments (12.7% of the CPU of a DoH request over HTTP/1.1,
 * V8 profile).
 */
function latin1(bytes: Uint8Array): string {
  let ascii = true;
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] >= 0x80) {
      ascii = false;
      break;
    }
  }
  if (ascii) return asciiDecoder.decode(bytes);
  let out = "";
  for (let i = 0; i < bytes.length; i += 1024) {
    out += String.fromCharCode(...bytes.subarray(i, Math.min(i + 1024, bytes.length)));
  }
  return out;
}

/**
 * Parses a request head: the request line and header field lines, each ending in CRLF or LF,
 * without the empty line that ends the head. Throws {@linkcode HttpRequestError}.
 *
 * @example
 * ```ts
 * import { parseRequestHead } from "./http.ts";
 * const head = parseRequestHead(new TextEncoder().encode("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n"));
 * head.path; // "/metrics"
 * ```
 */
export function parseRequestHead(bytes: Uint8Array): RequestHead {
  const lines = latin1(bytes).split("\n");
  if (lines[lines.length - 1] === "") lines.pop();
  for (let i = 0; i < lines.length; i++) {
    if (lines[i].endsWith("\r")) lines[i] = lines[i].slice(0, -1);
    if (lines[i].includes("\r")) throw new HttpRequestError(400, "bare CR in request head");
  }
  const parts = (lines[0] ?? "").split(" ");
  if (parts.length !== 3) throw new HttpRequestError(400, "malformed request line");
  const [method, target, version] = parts;
  if (!TOKEN.test(method)) throw new HttpRequestError(400, "malformed method");
  if (!TARGET.test(target)) throw new HttpRequestError(400, "malformed request target");
  if (version !== "HTTP/1.1" && version !== "HTTP/1.0") {
    if (/^HTTP\/\d\.\d$/.test(version)) {
      throw new HttpRequestError(505, `unsupported version ${version}`);
    }
    throw new HttpRequestError(400, "malformed HTTP version");
  }
  let path: string;
  if (target.startsWith("/")) {
    const query = target.indexOf("?");
    path = query < 0 ? target : target.slice(0, query);
  } else if (target === "*") {
    path = "*";
  } else {
    const absolute = target.match(ABSOLUTE_TARGET);
    if (!absolute) throw new HttpRequestError(400, "malformed request target");
    path = absolute[1] === "" ? "/" : absolute[1];
  }

  const fields = new Map<string, string>();
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith(" ") || line.startsWith("\t")) {
      throw new HttpRequestError(400, "obsolete line folding");
    }
    const colon = line.indexOf(":");
    const name = colon < 0 ? "" : line.slice(0, colon);
    if (!TOKEN.test(name)) throw new HttpRequestError(400, "malformed header field");
    const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, "");
    if (hasControlCharacter(value)) throw new HttpRequestError(400, "control character in field");
    const key = name.toLowerCase();
    const previous = fields.get(key);
    if (key === "host" && previous !== undefined) {
      throw new HttpRequestError(400, "more than one Host field");
    }
    fields.set(key, previous === undefined ? value : `${previous}, ${value}`);
  }
  // RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with several, gets 400.
  if (version === "HTTP/1.1" && !fields.has("host")) {
    throw new HttpRequestError(400, "no Host field");
  }

  const length = fields.get("content-length");
  const encoding = fields.get("transfer-encoding");
  if (length !== undefined && encoding !== undefined) {
    // Both: the classic request-smuggling ambiguity (RFC 9112 6.3).
    throw new HttpRequestError(400, "both Content-Length and Transfer-Encoding");
  }
  let hasBody = encoding !== undefined;
  if (length !== undefined) {
    const values = length.split(",").map((v) => v.trim());
    if (!values.every((v) => /^\d{1,15}$/.test(v) && v === values[0])) {
      throw new HttpRequestError(400, "malformed Content-Length");
    }
    hasBody = Number(values[0]) > 0;
  }
  return { method, target, path, version, fields, hasBody };
}

/** True when the client asked to close the connection after this request. */
function wantsClose(head: RequestHead): boolean {
  const connection = head.fields.get("connection");
  if (connection === undefined) return false;
  return connection.split(",").some((token) => token.trim().toLowerCase() === "close");
}

/** Skips empty lines before a request line (RFC 9112 2.2); returns the new start. */
export function skipEmptyLines(buffer: Uint8Array, start: number, end: number): number {
  let at = start;
  while (at < end) {
    if (buffer[at] === LF) at++;
    else if (buffer[at] === CR && at + 1 < end && buffer[at + 1] === LF) at += 2;
    else break;
  }
  return at;
}

/**
 * Finds the empty line that ends a head in `buffer[from, end)`: returns where the head's text
 * ends (after its last line's LF) and where the next bytes start, or null.
 */
export function findHeadEnd(
  buffer: Uint8Array,
  from: number,
  end: number,
): { headEnd: number; next: number } | null {
  for (let i = from; i < end; i++) {
    if (buffer[i] !== LF) continue;
    if (i + 1 < end && buffer[i + 1] === LF) return { headEnd: i + 1, next: i + 2 };
    if (i + 2 < end && buffer[i + 1] === CR && buffer[i + 2] === LF) {
      return { headEnd: i + 1, next: i + 3 };
    }
  }
  return null;
}

/**
 * A connection's read buffer: the bytes read and not yet consumed are `bytes[start, end)`. It
 * grows, by doubling, up to `cap` octets (an HTTP/1.1 DoH connection holds a body in it too;
 * the metrics endpoint's is `maxHeadBytes` from the start).
 */
export class RequestBuffer {
  /** The buffer. */
  bytes: Uint8Array;
  /** Where the unconsumed bytes start. */
  start = 0;
  /** Where they end. */
  end = 0;
  /** The largest the buffer grows to. */
  readonly cap: number;

  /** A buffer of `size` octets (at most `cap`) holding `initial` (bytes already read). */
  constructor(cap: number, size: number, initial: Uint8Array = new Uint8Array(0)) {
    this.cap = cap;
    this.bytes = new Uint8Array(Math.min(cap, size));
    this.bytes.set(initial.subarray(0, this.bytes.length));
    this.end = Math.min(initial.length, this.bytes.length);
  }

  /** Moves the unconsumed bytes to the front; returns how far they moved. */
  compact(): number {
    const moved = this.start;
    this.bytes.copyWithin(0, this.start, this.end);
    this.end -= moved;
    this.start = 0;
    return moved;
  }

  /** Grows (up to `cap`) to hold at least `needed` octets. */
  grow(needed: number): void {
    if (needed <= this.bytes.length) return;
    const bigger = new Uint8Array(Math.min(this.cap, Math.max(needed, 2 * this.bytes.length)));
    bigger.set(this.bytes.subarray(0, this.end));
    this.bytes = bigger;
  }
}

/**
 * Reads from `conn` into `at` until it holds a whole request head (skipping empty lines
 * before it, RFC 9112 section 2.2), for both HTTP/1.1 servers (DoH and the metrics endpoint).
 * Returns where the head ends; `"too large"` when `maxHeadBytes` are buffered without one;
 * `"closed"` when the client closed first (mid-request when `at` still holds bytes). Calls
 * `firstByte`, if given, once, when a read brings the first byte of the request.
 */
export async function readRequestHead(
  conn: Deno.Conn,
  at: RequestBuffer,
  maxHeadBytes: number,
  firstByte: (() => void) | null,
): Promise<{ headEnd: number; next: number } | "too large" | "closed" | null> {
  let scanFrom = at.start;
  // Each pass finds the head or reads at least a byte into a bounded buffer, compacted at most
  // once per byte: bounded.
  for (let pass = 0; pass <= 2 * at.cap + 2; pass++) {
    at.start = skipEmptyLines(at.bytes, at.start, at.end);
    if (at.start === at.end) at.start = at.end = 0;
    const found = findHeadEnd(at.bytes, Math.max(at.start, scanFrom), at.end);
    if (found !== null) return found;
    scanFrom = Math.max(at.start, at.end - 2);
    if (at.end - at.start >= maxHeadBytes) return "too large";
    if (at.end === at.bytes.length) {
      scanFrom -= at.compact();
      if (at.end === at.bytes.length) at.grow(at.end + 1);
    }
    const n = await conn.read(at.bytes.subarray(at.end));
    if (n === null) return "closed";
    firstByte?.();
    firstByte = null;
    at.end += n;
  }
  return null;
}

// ---------------------------------------------------------------------------------------------
// Responses.

const REASONS: Readonly<Record<number, string>> = {
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  503: "Service Unavailable",
  505: "HTTP Version Not Supported",
};

const encoder = new TextEncoder();

function renderResponse(reply: HttpReply, bodyless: boolean, keepAlive: boolean): Uint8Array {
  const body = encoder.encode(reply.body);
  let head = `HTTP/1.1 ${reply.status} ${REASONS[reply.status] ?? "Unknown"}\r\n` +
    `Date: ${new Date().toUTCString()}\r\n` +
    `Content-Type: ${reply.contentType}\r\n` +
    `Content-Length: ${body.length}\r\n` +
    "Cache-Control: no-store\r\n" +
    "X-Content-Type-Options: nosniff\r\n";
  for (const [name, value] of Object.entries(reply.headers ?? {})) head += `${name}: ${value}\r\n`;
  if (!keepAlive) head += "Connection: close\r\n";
  const headBytes = encoder.encode(head + "\r\n");
  if (bodyless) return headBytes;
  const out = new Uint8Array(headBytes.length + body.length);
  out.set(headBytes);
  out.set(body, headBytes.length);
  return out;
}

function errorReply(status: number, reason: string): HttpReply {
  const text = (REASONS[status] ?? "error").toLowerCase();
  return { status, contentType: TEXT, body: `${text}: ${reason}\n` };
}

// ---------------------------------------------------------------------------------------------
// The server.

/** First pause after running out of file descriptors; it doubles while that persists. */
const EXHAUSTED_PAUSE_MIN_MS = 10;
/** Longest pause: short enough that a probe arriving as descriptors free up is served. */
const EXHAUSTED_PAUSE_MAX_MS = 50;
/** Accept failures and the connection limit are logged at most once per this interval. */
const LOG_INTERVAL_MS = 10_000;

function resolveOptions(options: HttpServerOptions): Required<HttpServerOptions> {
  const resolved = { ...HTTP_DEFAULTS, ...options };
  for (const [name, value] of Object.entries(resolved)) {
    if (!Number.isSafeInteger(value) || value < 1) {
      throw new RangeError(`HttpServer option ${name} must be a positive integer, got ${value}`);
    }
  }
  if (resolved.maxHeadBytes < 64) {
    throw new RangeError(
      `HttpServer option maxHeadBytes must be at least 64, got ${resolved.maxHeadBytes}`,
    );
  }
  return resolved;
}

/** Logs at error level at most once per interval, counting what it held back. */
class RateLimitedErrorLog {
  readonly #log: Logger;
  #last = -Infinity;
  #suppressed = 0;

  constructor(log: Logger) {
    this.#log = log;
  }

  error(message: string, fields: LogFields): void {
    const now = performance.now();
    if (now - this.#last < LOG_INTERVAL_MS) {
      this.#suppressed++;
      return;
    }
    this.#last = now;
    const suppressed = this.#suppressed;
    this.#suppressed = 0;
    this.#log.error(message, suppressed > 0 ? { ...fields, suppressed } : fields);
  }
}

/** What every connection of one server shares. */
interface ServeContext {
  readonly handlers: HttpHandlers;
  readonly log: Logger;
  readonly options: Required<HttpServerOptions>;
  readonly handlerFailures: RateLimitedErrorLog;
  readonly slowHandlers: RateLimitedLog;
}

/**
 * Serves {@linkcode respond} over HTTP/1.1 on one TCP address, within the limits of
 * {@linkcode HttpServerOptions}.
 *
 * @example
 * ```ts ignore
 * const http = HttpServer.listen({ hostname: "127.0.0.1", port: 5380 }, handlers, log);
 * await http.close();
 * ```
 */
export class HttpServer {
  readonly #loop: AcceptLoop<Deno.TcpConn>;
  readonly #context: ServeContext;
  #closed: Promise<void> | undefined;

  private constructor(
    listener: Acceptor<Deno.TcpConn>,
    handlers: HttpHandlers,
    log: Logger,
    options: Required<HttpServerOptions>,
  ) {
    const context: ServeContext = {
      handlers,
      log,
      options,
      handlerFailures: new RateLimitedErrorLog(log),
      slowHandlers: new RateLimitedLog(log, LOG_INTERVAL_MS),
    };
    this.#context = context;
    this.#loop = new AcceptLoop(listener, {
      name: "http",
      maxConnections: options.maxConnections,
      maxConnectionsPerClient: options.maxConnectionsPerClient,
      reclaimAtCap: true,
      pauseMinMs: EXHAUSTED_PAUSE_MIN_MS,
      pauseMaxMs: EXHAUSTED_PAUSE_MAX_MS,
      resetLogLevel: "warn",
      log,
      serve: (conn) => new HttpConnection(conn, context),
    });
  }

  /**
   * Binds `address` and serves; throws the OS error when it cannot bind, and a `RangeError`
   * for an option that is not a positive integer.
   */
  static listen(
    address: ListenAddress,
    handlers: HttpHandlers,
    log: Logger,
    options: HttpServerOptions = {},
  ): HttpServer {
    const resolved = resolveOptions(options);
    // SO_REUSEPORT: a new process can take over the address while this one drains.
    const listener = Deno.listen({
      transport: "tcp",
      hostname: address.hostname,
      port: address.port,
      reusePort: true,
    });
    return new HttpServer(listener, handlers, log, resolved);
  }

  /** Serves on an already bound listener, which the server then owns and closes. */
  static serve(
    listener: Acceptor<Deno.TcpConn>,
    handlers: HttpHandlers,
    log: Logger,
    options: HttpServerOptions = {},
  ): HttpServer {
    return new HttpServer(listener, handlers, log, resolveOptions(options));
  }

  /** The bound address. */
  get addr(): Deno.NetAddr {
    return this.#loop.addr as Deno.NetAddr;
  }

  /** Connections open now. */
  get openConnections(): number {
    return this.#loop.open;
  }

  /** Stops accepting and closes every connection, whatever it is doing. */
  close(): Promise<void> {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    await this.#loop.close();
    const connections = [...this.#loop.connections()];
    for (const connection of connections) connection.abort();
    await Promise.all(connections.map((c) => c.finished));
  }
}

/** One client connection: reads requests one after another and answers each in turn. */
class HttpConnection implements Served {
  /** When it last began or finished a request (`performance.now()` time). */
  lastActive = performance.now();
  /** Settles (never rejects) once the connection is closed and its work is over. */
  readonly finished: Promise<void>;
  readonly #conn: Deno.TcpConn;
  readonly #context: ServeContext;
  readonly #client: string;
  readonly #stopped: Promise<null>;
  #stop: () => void = () => {};
  #timer: ReturnType<typeof setTimeout> | undefined;
  #closed = false;
  #waiting = true;
  /** Why the server closed the connection, when it did. */
  #reason = "";

  constructor(conn: Deno.TcpConn, context: ServeContext) {
    this.#conn = conn;
    this.#context = context;
    let client = "unknown";
    try {
      client = formatAddr(conn.remoteAddr) ?? "unknown";
      conn.setNoDelay(true);
    } catch {
      // The client may already be gone; reading will tell.
    }
    this.#client = client;
    this.#stopped = new Promise<null>((resolve) => this.#stop = () => resolve(null));
    this.finished = this.#serve().then(
      () => {
        if (this.#reason !== "") {
          context.log.debug("http connection closed", { client, reason: this.#reason });
        }
      },
      (error) => {
        context.log.debug("http connection closed", {
          client,
          reason: this.#reason === "" ? "error" : this.#reason,
          error: errorMessage(error),
        });
      },
    ).finally(() => this.#close(""));
  }

  /**
   * True while open and waiting for a request (or the rest of one), not handling or
   * answering one.
   */
  get waiting(): boolean {
    return this.#waiting && !this.#closed;
  }

  /** Closing it loses nothing: it waits for a request (see `waiting`). */
  get idle(): boolean {
    return this.waiting;
  }

  /** Closes the connection now. */
  abort(reason = "server closing"): void {
    this.#close(reason);
  }

  #close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#reason = reason;
    this.#disarm();
    this.#stop();
    closeQuietly(this.#conn);
  }

  /** Closes the connection for `reason` unless disarmed or re-armed within `ms`. */
  #arm(ms: number, reason: string): void {
    clearTimeout(this.#timer);
    if (this.#closed) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.#close(reason);
    }, ms);
  }

  #disarm(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
  }

  async #serve(): Promise<void> {
    const options = this.#context.options;
    const at = new RequestBuffer(options.maxHeadBytes, options.maxHeadBytes);
    for (let served = 0; served < options.maxRequestsPerConnection; served++) {
      // Waiting for a first request, or for the rest of one already begun: the head
      // deadline. Between requests on a keep-alive connection: the idle deadline, until a
      // byte arrives.
      const idle = served > 0 && at.start === at.end;
      if (idle) this.#arm(options.idleTimeoutMs, "idle");
      else this.#arm(options.headTimeoutMs, "request head timeout");
      const found = await readRequestHead(
        this.#conn,
        at,
        options.maxHeadBytes,
        idle ? () => this.#arm(options.headTimeoutMs, "request head timeout") : null,
      );
      if (found === "too large") {
        await this.#reject(
          new HttpRequestError(431, `request head over ${options.maxHeadBytes} bytes`),
        );
        return;
      }
      if (found === "closed") {
        if (at.end > at.start) this.#reason = "client closed mid-request";
        return;
      }
      if (found === null) return;
      this.#disarm();
      this.#waiting = false;
      this.lastActive = performance.now();

      let head: RequestHead;
      try {
        head = parseRequestHead(at.bytes.subarray(at.start, found.headEnd));
      } catch (error) {
        if (!(error instanceof HttpRequestError)) throw error;
        await this.#reject(error);
        return;
      }
      at.start = found.next;
      if (at.start === at.end) at.start = at.end = 0;

      const keepAlive = head.version === "HTTP/1.1" && !head.hasBody && !wantsClose(head) &&
        served + 1 < options.maxRequestsPerConnection;
      const reply = await this.#handle(head);
      if (reply === null) return;
      await this.#send(reply, head.method === "HEAD", keepAlive);
      if (!keepAlive) {
        await this.#linger();
        return;
      }
      this.#waiting = true;
      this.lastActive = performance.now();
    }
  }

  /** Runs the handler within its deadline; null when the connection closed meanwhile. */
  async #handle(head: RequestHead): Promise<HttpReply | null> {
    const { handlers, options } = this.#context;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), options.handlerTimeoutMs);
    });
    try {
      const outcome = await Promise.race([
        respond(head.method, head.path, handlers),
        timeout,
        this.#stopped,
      ]);
      if (outcome !== "timeout") return outcome;
      this.#context.slowHandlers.warn("http handler timed out", {
        path: head.path,
        timeout_ms: options.handlerTimeoutMs,
      });
      return errorReply(503, `no answer within ${options.handlerTimeoutMs} ms`);
    } catch (error) {
      this.#context.handlerFailures.error("http handler failed", {
        path: head.path,
        error: errorMessage(error),
      });
      return errorReply(500, "the handler failed");
    } finally {
      clearTimeout(timer);
    }
  }

  async #send(reply: HttpReply, bodyless: boolean, keepAlive: boolean): Promise<void> {
    const bytes = renderResponse(reply, bodyless, keepAlive);
    this.#arm(this.#context.options.writeTimeoutMs, "response write timeout");
    // Each write moves at least one byte or throws; the deadline closes a stalled one.
    for (let offset = 0; offset < bytes.length;) {
      offset += await this.#conn.write(bytes.subarray(offset));
    }
    this.#disarm();
  }

  /** Answers a request it will not serve, then closes. */
  async #reject(error: HttpRequestError): Promise<void> {
    this.#context.log.debug("http request rejected", {
      client: this.#client,
      status: error.status,
      reason: error.message,
    });
    await this.#send(errorReply(error.status, error.message), false, false);
    await this.#linger();
  }

  /**
   * Half-closes and drains what the client still sends, briefly: closing a socket with unread
   * bytes resets it, and a reset can destroy the response before the client reads it.
   */
  async #linger(): Promise<void> {
    if (!this.#closed) await linger(this.#conn, (ms, reason) => this.#arm(ms, reason));
  }
}
