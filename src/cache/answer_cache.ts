/**
 * The answer cache: whole upstream answers keyed by question (name ignoring case, type,
 * class) and the header and EDNS bits that change an answer (DO, CD, AD, RD), with
 * TTL-correct serving, RFC 2308 negative caching, RFC 8767 serve-stale bookkeeping and LRU
 * eviction at a fixed number of entries.
 *
 * What is stored is the upstream's answer after the hop-by-hop EDNS options were removed,
 * with its TTLs clamped to the configured bounds. What is served is a copy with the client's
 * ID, the client's question bytes (its 0x20 casing), and every TTL reduced by the whole
 * seconds spent in the cache. Nothing else changes: DNSSEC records pass byte for byte.
 *
 * @module
 */

import { questionHash, questionKeyEquals } from "../dns/cache_key.ts";
import type { ResponseInfo } from "../dns/message.ts";
import { clampTtls, writeAgedTtls, writeTtls } from "../dns/ttl.ts";
import { HEADER_SIZE, Rcode } from "../dns/wire.ts";

/** Key flag bits (besides DO=1 and CD=2 of `questionKeyFlags`). */
export const KEY_AUTHENTIC_DATA = 4;
/** Key flag: RD. */
export const KEY_RECURSION_DESIRED = 8;

/** Answers larger than this are not cached. */
export const MAX_CACHED_ANSWER = 16 * 1024;
/** SERVFAIL from an upstream is cached at most this long (RFC 2308 section 7.1). */
export const SERVFAIL_TTL = 5;
/** TTL of a stale answer (RFC 8767 section 4). */
export const STALE_TTL = 30;
/** After a failed refresh, stale answers go out at once for this long (RFC 8767 section 5). */
export const STALE_RECHECK_MS = 30_000;

/** Settings of an {@linkcode AnswerCache}. */
export interface CacheSettings {
  /** Most entries; the least recently used goes first. */
  maxEntries: number;
  /** Lower bound for positive TTLs, seconds. */
  minTtl: number;
  /** Upper bound for positive TTLs, seconds. */
  maxTtl: number;
  /** Upper bound for negative TTLs, seconds. */
  maxNegativeTtl: number;
  /** How long past expiry an answer may still be served stale, seconds (0: never). */
  serveStaleSeconds: number;
}

/** Statistics hooks of the cache. */
export interface CacheStats {
  /** An entry was evicted to make room. */
  evicted(): void;
}

/** What kind of answer an entry holds. */
export type EntryKind = "positive" | "negative" | "servfail";

/** One cached answer. */
export class CacheEntry {
  /** The key's hash. */
  readonly hash: number;
  /** Key flags. */
  readonly flags: number;
  /** The stored answer (canonical form). */
  readonly bytes: Uint8Array;
  /** Offset just past the question in `bytes`. */
  readonly questionEnd: number;
  /** Offsets of the TTL fields in `bytes`. */
  readonly ttlOffsets: Uint32Array;
  /** OPT record extent in `bytes` (-1 when none). */
  readonly optStart: number;
  /** See `optStart`. */
  readonly optEnd: number;
  /** What it holds. */
  readonly kind: EntryKind;
  /** The lifetime it was stored with, seconds. */
  readonly ttl: number;
  /** Clock time it was stored. */
  readonly storedAt: number;
  /** Clock time it expires. */
  readonly expiresAt: number;
  /** Clock time after which it is not served even stale. */
  readonly staleUntil: number;
  /** True once a prefetch was started for it. */
  prefetched = false;
  /** Clock time a refresh of the expired entry last failed (0: never). */
  refreshFailedAt = 0;
  /** LRU neighbours and the hash chain. */
  newer: CacheEntry | null = null;
  /** See `newer`. */
  older: CacheEntry | null = null;
  /** See `newer`. */
  chain: CacheEntry | null = null;

  /** Creates an entry; use {@linkcode AnswerCache.store}. */
  constructor(
    hash: number,
    flags: number,
    bytes: Uint8Array,
    questionEnd: number,
    ttlOffsets: Uint32Array,
    optStart: number,
    optEnd: number,
    kind: EntryKind,
    ttl: number,
    storedAt: number,
    staleSeconds: number,
  ) {
    this.hash = hash;
    this.flags = flags;
    this.bytes = bytes;
    this.questionEnd = questionEnd;
    this.ttlOffsets = ttlOffsets;
    this.optStart = optStart;
    this.optEnd = optEnd;
    this.kind = kind;
    this.ttl = ttl;
    this.storedAt = storedAt;
    this.expiresAt = storedAt + ttl * 1000;
    this.staleUntil = kind === "servfail" ? this.expiresAt : this.expiresAt + staleSeconds * 1000;
  }
}

/**
 * The key flags of a query: DO, CD, AD and RD.
 *
 * @example
 * ```ts
 * import { cacheKeyFlags } from "./answer_cache.ts";
 * cacheKeyFlags(new Uint8Array([0, 0, 1, 0x20]), true, false); // DO | AD | RD = 13
 * ```
 */
export function cacheKeyFlags(query: Uint8Array, dnssecOk: boolean, cd: boolean): number {
  return (dnssecOk ? 1 : 0) | (cd ? 2 : 0) | ((query[3] & 0x20) !== 0 ? KEY_AUTHENTIC_DATA : 0) |
    ((query[2] & 0x01) !== 0 ? KEY_RECURSION_DESIRED : 0);
}

/**
 * Decides how long an answer may be cached, in seconds; 0 when it must not be.
 *
 * - positive (NOERROR with answer records): the smallest TTL of its records, clamped to
 *   [minTtl, maxTtl]; never when that TTL is 0;
 * - negative (NXDOMAIN, or NODATA: NOERROR without answer records): min(SOA TTL, SOA MINIMUM)
 *   of the authority section's SOA, at most maxNegativeTtl; never without an SOA;
 * - SERVFAIL: 5 seconds;
 * - never: TC=1, any other rcode (REFUSED, FORMERR, NOTIMP...), larger than 16 KiB.
 */
export function cacheableTtl(
  info: ResponseInfo,
  length: number,
  settings: CacheSettings,
): { ttl: number; kind: EntryKind } | null {
  if (info.truncated || length > MAX_CACHED_ANSWER) return null;
  const rcode = info.extendedRcode;
  if (rcode === Rcode.SERVFAIL) return { ttl: SERVFAIL_TTL, kind: "servfail" };
  if (rcode === Rcode.NXDOMAIN || (rcode === Rcode.NOERROR && info.ancount === 0)) {
    if (info.negativeTtl <= 0) return null;
    const ttl = Math.min(info.negativeTtl, settings.maxNegativeTtl);
    return ttl > 0 ? { ttl, kind: "negative" } : null;
  }
  if (rcode !== Rcode.NOERROR || info.minTtl <= 0) return null;
  const ttl = Math.min(settings.maxTtl, Math.max(settings.minTtl, info.minTtl));
  return ttl > 0 ? { ttl, kind: "positive" } : null;
}

/**
 * A bounded LRU answer cache.
 *
 * @example
 * ```ts ignore
 * const cache = new AnswerCache(settings);
 * const entry = cache.lookup(query, questionEnd, flags);
 * if (entry && now < entry.expiresAt) send(cache.render(entry, query, now, false));
 * ```
 */
export class AnswerCache {
  readonly #settings: CacheSettings;
  readonly #stats: CacheStats | null;
  readonly #table = new Map<number, CacheEntry>();
  #size = 0;
  /** Most recently used. */
  #newest: CacheEntry | null = null;
  /** Least recently used. */
  #oldest: CacheEntry | null = null;

  /** Creates an empty cache. */
  constructor(settings: CacheSettings, stats: CacheStats | null = null) {
    this.#settings = settings;
    this.#stats = stats;
  }

  /** Entries held. */
  get size(): number {
    return this.#size;
  }

  /** The settings. */
  get settings(): CacheSettings {
    return this.#settings;
  }

  /**
   * The entry for the question in `query[12, questionEnd)` with key `flags`, fresh or
   * stale; null when there is none or it is past serving even stale (it is dropped then).
   * A found entry becomes the most recently used.
   */
  lookup(
    query: Uint8Array,
    questionEnd: number,
    flags: number,
    now: number,
  ): CacheEntry | null {
    const hash = questionHash(query, questionEnd, (flags & 1) !== 0, (flags & 2) !== 0);
    let entry = this.#table.get(hash) ?? null;
    while (entry !== null) {
      if (
        entry.flags === flags &&
        questionKeyEquals(entry.bytes, entry.questionEnd, 0, query, questionEnd, 0)
      ) break;
      entry = entry.chain;
    }
    if (entry === null) return null;
    if (now >= entry.staleUntil) {
      this.#remove(entry);
      return null;
    }
    this.#touch(entry);
    return entry;
  }

  /**
   * Stores `response` (analysed as `info`, its question matching the query's) for the key
   * of `query`. Copies the bytes. Returns the entry, or null when the answer is not
   * cacheable. A SERVFAIL does not replace an entry that can still be served stale.
   */
  store(
    query: Uint8Array,
    questionEnd: number,
    flags: number,
    response: Uint8Array,
    info: ResponseInfo,
    now: number,
  ): CacheEntry | null {
    if (this.#settings.maxEntries <= 0 || info.questionEnd !== questionEnd) return null;
    const decision = cacheableTtl(info, response.length, this.#settings);
    if (decision === null) return null;
    const hash = questionHash(query, questionEnd, (flags & 1) !== 0, (flags & 2) !== 0);
    const existing = this.#find(hash, flags, query, questionEnd);
    if (existing !== null) {
      if (
        decision.kind === "servfail" && existing.kind !== "servfail" && now < existing.staleUntil
      ) {
        return null;
      }
      this.#remove(existing);
    }
    const bytes = response.slice();
    const offsets = info.ttlOffsets.slice(0, info.ttlCount);
    if (decision.kind === "positive") {
      clampTtls(bytes, offsets, offsets.length, this.#settings.minTtl, this.#settings.maxTtl);
    } else if (decision.kind === "negative") {
      clampTtls(bytes, offsets, offsets.length, 0, decision.ttl);
    }
    const entry = new CacheEntry(
      hash,
      flags,
      bytes,
      questionEnd,
      offsets,
      info.optStart,
      info.optEnd,
      decision.kind,
      decision.ttl,
      now,
      this.#settings.serveStaleSeconds,
    );
    entry.chain = this.#table.get(hash) ?? null;
    this.#table.set(hash, entry);
    this.#size++;
    this.#linkNewest(entry);
    while (this.#size > this.#settings.maxEntries && this.#oldest !== null) {
      this.#remove(this.#oldest);
      this.#stats?.evicted();
    }
    return entry;
  }

  /**
   * A copy of `entry` for the client whose query is `query`: the client's ID and question
   * bytes, TTLs aged by the whole seconds since it was stored, or all set to 30 when
   * `stale`. The OPT record is kept; the caller removes it for clients without EDNS.
   */
  render(entry: CacheEntry, query: Uint8Array, now: number, stale: boolean): Uint8Array {
    const source = entry.bytes;
    const out = new Uint8Array(source.length);
    out.set(source);
    out[0] = query[0];
    out[1] = query[1];
    out.set(query.subarray(HEADER_SIZE, entry.questionEnd), HEADER_SIZE);
    const offsets = entry.ttlOffsets;
    if (stale) {
      writeTtls(out, offsets, offsets.length, STALE_TTL);
    } else {
      const elapsed = Math.floor((now - entry.storedAt) / 1000);
      if (elapsed > 0) writeAgedTtls(out, source, offsets, offsets.length, elapsed);
    }
    return out;
  }

  /** Drops every entry; returns how many there were. */
  flush(): number {
    const count = this.#size;
    this.#table.clear();
    this.#size = 0;
    this.#newest = null;
    this.#oldest = null;
    return count;
  }

  #find(hash: number, flags: number, query: Uint8Array, questionEnd: number): CacheEntry | null {
    let entry = this.#table.get(hash) ?? null;
    while (entry !== null) {
      if (
        entry.flags === flags &&
        questionKeyEquals(entry.bytes, entry.questionEnd, 0, query, questionEnd, 0)
      ) return entry;
      entry = entry.chain;
    }
    return null;
  }

  #remove(entry: CacheEntry): void {
    let head = this.#table.get(entry.hash) ?? null;
    if (head === entry) {
      if (entry.chain === null) this.#table.delete(entry.hash);
      else this.#table.set(entry.hash, entry.chain);
    } else {
      while (head !== null && head.chain !== entry) head = head.chain;
      if (head === null) return; // not in the table
      head.chain = entry.chain;
    }
    entry.chain = null;
    this.#unlink(entry);
    this.#size--;
  }

  #touch(entry: CacheEntry): void {
    if (this.#newest === entry) return;
    this.#unlink(entry);
    this.#linkNewest(entry);
  }

  #linkNewest(entry: CacheEntry): void {
    entry.older = this.#newest;
    entry.newer = null;
    if (this.#newest !== null) this.#newest.newer = entry;
    this.#newest = entry;
    if (this.#oldest === null) this.#oldest = entry;
  }

  #unlink(entry: CacheEntry): void {
    if (entry.newer !== null) entry.newer.older = entry.older;
    else if (this.#newest === entry) this.#newest = entry.older;
    if (entry.older !== null) entry.older.newer = entry.newer;
    else if (this.#oldest === entry) this.#oldest = entry.newer;
    entry.newer = null;
    entry.older = null;
  }
}
