/**
 * The typed failures of the upstream layer: why an attempt or a question failed, with the
 * upstream involved, and how a socket or TLS error is classified into such a reason.
 *
 * @module
 */

/** Why an upstream attempt or question failed. */
export type UpstreamErrorReason =
  | "timeout"
  | "tls"
  | "refused"
  | "unreachable"
  | "reset"
  | "bad_response"
  | "unavailable";

/** Every {@linkcode UpstreamErrorReason}, for metrics that want all series present. */
export const UPSTREAM_ERROR_REASONS: readonly UpstreamErrorReason[] = [
  "timeout",
  "tls",
  "refused",
  "unreachable",
  "reset",
  "bad_response",
  "unavailable",
];

/**
 * A failure to get an answer from the upstreams, with the reason and where.
 *
 * @example
 * ```ts
 * import { UpstreamError } from "./errors.ts";
 * const error = new UpstreamError("timeout", "no answer in time", "192.0.2.1:853");
 * error.reason; // "timeout"
 * ```
 */
export class UpstreamError extends Error {
  /** The failure class, as used in metrics. */
  readonly reason: UpstreamErrorReason;
  /** The upstream involved, when there was one. */
  readonly upstream: string | undefined;

  /** Creates an error for `reason` at `upstream`. */
  constructor(reason: UpstreamErrorReason, message: string, upstream?: string) {
    super(message);
    this.name = "UpstreamError";
    this.reason = reason;
    this.upstream = upstream;
  }
}

/**
 * Classifies a connect, handshake or I/O error into a metrics reason.
 *
 * @example
 * ```ts
 * import { classifyError } from "./errors.ts";
 * classifyError(new Deno.errors.ConnectionRefused("refused")); // "refused"
 * ```
 */
export function classifyError(error: unknown): UpstreamErrorReason {
  if (error instanceof UpstreamError) return error.reason;
  if (error instanceof Deno.errors.ConnectionRefused) return "refused";
  if (error instanceof Deno.errors.TimedOut) return "timeout";
  const message = error instanceof Error ? error.message : String(error);
  // ENETUNREACH (101) and EHOSTUNREACH (113): no route, not a reset.
  if (
    /unreachable|os error 101|os error 113|os error 51|os error 65/i.test(message) ||
    (error instanceof Error && error.name === "NetworkUnreachable")
  ) return "unreachable";
  if (
    error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.UnexpectedEof ||
    error instanceof Deno.errors.NotConnected
  ) return "reset";
  if (/certificate|tls|handshake|CertNotValid|UnknownIssuer|NotValidForName/i.test(message)) {
    return "tls";
  }
  if (/refused/i.test(message)) return "refused";
  return "reset";
}
