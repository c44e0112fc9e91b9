/**
 * What the HTTP/1.1 and HTTP/2 connections of the DoH listener hand to the service behind
 * them, and what they get back: one request with its whole body, one response with its whole
 * body. DNS messages are at most 65,535 octets, so nothing here streams.
 *
 * @module
 */

import { errorMessage } from "../log.ts";
import type { TimerQueue } from "../timers.ts";

/** One request, its body read in full (within the listener's body limit). */
export interface HttpRequest {
  /** The method, case-sensitive as sent. */
  method: string;
  /** The request target's path and query (`/dns-query?dns=...`). */
  target: string;
  /** Header fields by lower-case name; repeated fields joined with `, ` (pseudo-fields out). */
  fields: ReadonlyMap<string, string>;
  /** The body; empty when none was sent. */
  body: Uint8Array;
  /** The protocol it came over. */
  version: "HTTP/1.0" | "HTTP/1.1" | "HTTP/2";
}

/** One response. */
export interface HttpResponse {
  /** The status code. */
  status: number;
  /** Header fields, lower-case names; `content-length` is added by the connection. */
  fields: [name: string, value: string][];
  /** The body (not sent for HEAD; its length is still announced). */
  body: Uint8Array;
}

/** The peer of a connection, as the listener accepted it. */
export interface HttpPeer {
  /** The address the connection came from. */
  address: Deno.NetAddr;
}

/** What serves requests behind an HTTP connection. */
export interface HttpService {
  /** Answers one request; never rejects (a failure is a response too). */
  handle(request: HttpRequest, peer: HttpPeer): Promise<HttpResponse>;
  /**
   * The response to a request the connection itself refuses before `handle` (malformed
   * head: 400; body over the limit: 413; target over the limit: 414; head over the limit:
   * 431), so the service counts and shapes it like its own.
   */
  reject(status: number, reason: string): HttpResponse;
}

/**
 * What one accepted connection is served with, the same for HTTP/1.1 and HTTP/2: the listener
 * builds it once and hands it to whichever protocol the connection speaks.
 */
export interface HttpSession {
  /** The connection (TLS or plain). */
  conn: Deno.Conn;
  /** Who is on the other end. */
  peer: HttpPeer;
  /** What answers its requests. */
  service: HttpService;
  /** The listener's limits. */
  limits: HttpLimits;
  /** The queue its deadlines go in (and the clock they read). */
  timers: TimerQueue;
}

/** The limits every connection of a listener keeps. */
export interface HttpLimits {
  /** Largest request body, octets; larger gets 413. */
  maxBodyBytes: number;
  /** Longest request target (path and query), octets; longer gets 414. */
  maxTargetBytes: number;
  /** Largest request head (HTTP/1.1) or decoded header list (HTTP/2), octets; larger: 431. */
  maxHeadBytes: number;
  /** A request (head and body) must arrive in full within this long of its first byte. */
  requestTimeoutMs: number;
  /** A connection with no request open for this long is closed. */
  idleTimeoutMs: number;
  /** A response not taken by the client within this long closes the connection. */
  writeTimeoutMs: number;
  /** Most HTTP/2 streams open at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS). */
  maxStreams: number;
  /** Most requests answered on one HTTP/1.1 connection before it is closed. */
  maxRequestsPerConnection: number;
}

/** Reason phrases of the statuses this listener sends (HTTP/1.1 only; HTTP/2 has none). */
export const REASONS: Readonly<Record<number, string>> = {
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  411: "Length Required",
  413: "Content Too Large",
  414: "URI Too Long",
  415: "Unsupported Media Type",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  503: "Service Unavailable",
  505: "HTTP Version Not Supported",
};

/** How an HTTP connection ended, for the listener's log. */
export type ConnectionOutcome = { reason: string; error?: string };

/**
 * The outcome of a connection serving as `serving`: once it settles, `reason()` ("closed"
 * when empty, "error" when empty and it failed) with the failure's message.
 *
 * @example
 * ```ts
 * import { connectionOutcome } from "./types.ts";
 * const outcome = await connectionOutcome(Promise.reject(new Error("reset")), () => "");
 * outcome; // { reason: "error", error: "reset" }
 * ```
 */
export function connectionOutcome(
  serving: Promise<void>,
  reason: () => string,
): Promise<ConnectionOutcome> {
  return serving.then(
    () => ({ reason: reason() || "closed" }),
    (error) => ({ reason: reason() || "error", error: errorMessage(error) }),
  );
}
