/**
 * The admit stage: who may ask (`--allow`) and how much (`--rate-limit`), decided per client
 * address before anything else is done with a message.
 *
 * - Access control: a client outside every allowed prefix gets REFUSED (over TCP the
 *   connection then closes). The default list (loopback, RFC 1918, 100.64.0.0/10, link-local,
 *   fc00::/7, fe80::/10) keeps a proxy bound to 0.0.0.0 from being an open resolver.
 * - Rate limiting: a token bucket per client (IPv4 address, IPv6 /64). Over the limit a UDP
 *   query is dropped, but every second one is answered with an empty TC=1 response (slip, as
 *   BIND's RRL does), so a real client retries over TCP, where it gets REFUSED when over the
 *   limit. The table of clients is bounded (least recently seen goes first), so spoofed
 *   sources cannot grow memory.
 *
 * - Refusals: REFUSED costs no more bytes than the query, but a spoofed source would still
 *   make the proxy a reflector; over UDP at most {@linkcode UDP_REFUSALS_PER_SECOND} a second
 *   are answered, the rest dropped (TCP cannot be spoofed: always answered).
 *
 * Address parsing costs about a microsecond; verdicts are remembered per address text in a
 * bounded map so the hot path is one map lookup.
 *
 * @module
 */

import { type Cidr, cidrContains, parseIpAddress } from "../net/ip.ts";
import type { Clock } from "../timers.ts";
import { isDatagram, type Transport } from "./job.ts";

/** What the admit stage says about a message. */
export const Admit = {
  /** Go on. */
  ALLOW: 0,
  /** Not an allowed client: REFUSED. */
  DENY: 1,
  /** Over the rate limit: drop it. */
  DROP: 2,
  /** Over the rate limit, UDP: an empty TC=1 response. */
  SLIP: 3,
  /** Over the rate limit, TCP: REFUSED. */
  REFUSE: 4,
} as const;

/** One of {@linkcode Admit}'s values. */
export type Admit = typeof Admit[keyof typeof Admit];

/** Most client addresses whose verdicts are remembered. */
const VERDICT_CACHE = 8192;
/** Most clients tracked by the rate limiter. */
export const MAX_RATE_CLIENTS = 65536;
/** REFUSED answers sent over UDP to clients outside `--allow`, per second, in all. */
export const UDP_REFUSALS_PER_SECOND = 100;

/** What is known about one client address. */
interface ClientVerdict {
  /** Allowed by the access list. */
  allowed: boolean;
  /** The rate limiter's key: the IPv4 address or the IPv6 /64 prefix. */
  rateKey: string;
}

/** A token bucket of one client. */
interface Bucket {
  tokens: number;
  updated: number;
  limited: number;
}

/**
 * Turns an address as the socket reports it into bytes, unwrapping IPv4-mapped IPv6
 * (`::ffff:192.0.2.1`, what dual-stack sockets report for IPv4 clients).
 */
export function clientAddressBytes(hostname: string): Uint8Array | null {
  const bytes = parseIpAddress(hostname);
  if (bytes === null || bytes.length === 4) return bytes;
  for (let i = 0; i < 10; i++) if (bytes[i] !== 0) return bytes;
  if (bytes[10] !== 0xff || bytes[11] !== 0xff) return bytes;
  return bytes.slice(12);
}

/** The key a client is known by: its IPv4 address, or its IPv6 /64 (`2001:db8:0:1::/64`). */
function keyOf(bytes: Uint8Array): string {
  if (bytes.length === 4) return `${bytes[0]}.${bytes[1]}.${bytes[2]}.${bytes[3]}`;
  let key = "";
  for (let i = 0; i < 8; i += 2) key += ((bytes[i] << 8) | bytes[i + 1]).toString(16) + ":";
  return key + ":/64";
}

/**
 * The key one client is counted under (rate limit, TCP connections per client): the IPv4
 * address (IPv4-mapped IPv6 unwrapped), or the IPv6 /64, since one host commonly holds a
 * whole /64 and could otherwise count as millions of clients. Text that is no address is its
 * own key.
 *
 * @example
 * ```ts
 * import { clientKey } from "./admission.ts";
 * clientKey("::ffff:192.0.2.1"); // "192.0.2.1"
 * clientKey("2001:db8::1"); // "2001:db8:0:0::/64"
 * ```
 */
export function clientKey(hostname: string): string {
  const bytes = clientAddressBytes(hostname);
  return bytes === null ? hostname : keyOf(bytes);
}

/** Settings of {@linkcode Admission}. */
export interface AdmissionSettings {
  /** Allowed client prefixes. */
  allow: readonly Cidr[];
  /** Queries per second per client; 0 turns rate limiting off. */
  rateLimit: number;
  /** Bucket size per client. */
  rateLimitBurst: number;
  /** The clock. */
  clock: Clock;
  /** Most clients tracked (default {@linkcode MAX_RATE_CLIENTS}). */
  maxClients?: number;
}

/**
 * Access control and rate limiting.
 *
 * @example
 * ```ts ignore
 * const admission = new Admission({ allow, rateLimit: 100, rateLimitBurst: 200, clock });
 * if (admission.admit(addr, "udp") !== Admit.ALLOW) ...
 * ```
 */
export class Admission {
  readonly #allow: readonly Cidr[];
  readonly #everyone: boolean;
  readonly #rate: number;
  readonly #burst: number;
  readonly #clock: Clock;
  readonly #maxClients: number;
  readonly #verdicts = new Map<string, ClientVerdict>();
  readonly #buckets = new Map<string, Bucket>();
  /**
   * The last address asked about and its verdict: a busy client sends query after query, and
   * comparing its address is cheaper than hashing a fresh string into the map each time
   * (a microsecond per query at saturation, V8 sampling profile).
   */
  #lastHostname = "";
  #lastVerdict: ClientVerdict | null = null;
  #refusalTokens = UDP_REFUSALS_PER_SECOND;
  #refusalsUpdated = Number.NEGATIVE_INFINITY;

  /** Creates the stage. */
  constructor(settings: AdmissionSettings) {
    this.#allow = settings.allow;
    this.#everyone = settings.allow.some((cidr) => cidr.prefix === 0) &&
      settings.allow.some((c) => c.prefix === 0 && c.family === 4) &&
      settings.allow.some((c) => c.prefix === 0 && c.family === 6);
    this.#rate = settings.rateLimit;
    this.#burst = Math.max(1, settings.rateLimitBurst);
    this.#clock = settings.clock;
    this.#maxClients = settings.maxClients ?? MAX_RATE_CLIENTS;
  }

  /** Clients currently tracked by the rate limiter. */
  get trackedClients(): number {
    return this.#buckets.size;
  }

  /** Client addresses whose access-list verdict is remembered (bounded under spoofed floods). */
  get rememberedVerdicts(): number {
    return this.#verdicts.size;
  }

  /** True when `client` is in an allowed prefix. */
  allowed(client: Deno.Addr | undefined): boolean {
    if (this.#everyone) return true;
    if (client === undefined || !("hostname" in client)) return false;
    return this.#verdict(client.hostname).allowed;
  }

  /**
   * True when a REFUSED answer may go to a client outside `--allow` over `transport`: always
   * over a stream transport, over a datagram one (UDP) within
   * {@linkcode UDP_REFUSALS_PER_SECOND} (all sources together).
   */
  answerRefusal(transport: Transport): boolean {
    if (!isDatagram(transport)) return true;
    const now = this.#clock.now();
    const refill = ((now - this.#refusalsUpdated) / 1000) * UDP_REFUSALS_PER_SECOND;
    this.#refusalTokens = Math.min(UDP_REFUSALS_PER_SECOND, this.#refusalTokens + refill);
    this.#refusalsUpdated = now;
    if (this.#refusalTokens < 1) return false;
    this.#refusalTokens -= 1;
    return true;
  }

  /** The verdict for one message from `client` over `transport`. */
  admit(client: Deno.Addr | undefined, transport: Transport): Admit {
    // One property read: Deno's address objects are dictionaries, each lookup a hash probe.
    const hostname = (client as Partial<Deno.NetAddr> | undefined)?.hostname;
    if (hostname === undefined) return this.#everyone ? Admit.ALLOW : Admit.DENY;
    if (this.#everyone && this.#rate === 0) return Admit.ALLOW;
    const verdict = this.#verdict(hostname);
    if (!verdict.allowed) return Admit.DENY;
    if (this.#rate === 0) return Admit.ALLOW;
    return this.#take(verdict.rateKey, transport);
  }

  #verdict(hostname: string): ClientVerdict {
    if (hostname === this.#lastHostname && this.#lastVerdict !== null) return this.#lastVerdict;
    let verdict = this.#verdicts.get(hostname);
    if (verdict !== undefined) return this.#remember(hostname, verdict);
    const bytes = clientAddressBytes(hostname);
    let allowed = this.#everyone;
    if (!allowed && bytes !== null) {
      for (const cidr of this.#allow) {
        if (cidrContains(cidr, bytes)) {
          allowed = true;
          break;
        }
      }
    }
    verdict = { allowed, rateKey: bytes === null ? hostname : keyOf(bytes) };
    // Spoofed floods rotate addresses: start over rather than grow.
    if (this.#verdicts.size >= VERDICT_CACHE) this.#verdicts.clear();
    this.#verdicts.set(hostname, verdict);
    return this.#remember(hostname, verdict);
  }

  #remember(hostname: string, verdict: ClientVerdict): ClientVerdict {
    this.#lastHostname = hostname;
    this.#lastVerdict = verdict;
    return verdict;
  }

  #take(key: string, transport: Transport): Admit {
    const now = this.#clock.now();
    let bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      if (this.#buckets.size >= this.#maxClients) {
        // The least recently seen client goes (a Map iterates in insertion order).
        const oldest = this.#buckets.keys().next().value;
        if (oldest !== undefined) this.#buckets.delete(oldest);
      }
      bucket = { tokens: this.#burst, updated: now, limited: 0 };
    } else {
      this.#buckets.delete(key);
      const refill = ((now - bucket.updated) / 1000) * this.#rate;
      bucket.tokens = Math.min(this.#burst, bucket.tokens + refill);
      bucket.updated = now;
    }
    this.#buckets.set(key, bucket);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return Admit.ALLOW;
    }
    if (!isDatagram(transport)) return Admit.REFUSE;
    return (++bucket.limited & 1) === 0 ? Admit.SLIP : Admit.DROP;
  }
}
