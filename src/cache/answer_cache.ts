/**
 * The answer cache: whole upstream answers keyed by question (name ignoring case, type,
 * class) and the header and EDNS bits that change an answer (DO, CD, AD, RD), with
 * TTL-correct serving, RFC 2308 negative caching, RFC 8767 serve-stale bookkeeping and LRU
 * eviction at a fixed number of entries and a fixed number of bytes.
 *
 * What is stored is the upstream's answer after the hop-by-hop EDNS options were removed,
 * with its TTLs clamped to the configured bounds. What is served is a copy with the client's
 * ID, the client's question bytes (its 0x20 casing), every TTL reduced by the whole seconds
 * spent in the cache, and no OPT record for a client that sent none. Nothing else changes:
 * DNSSEC records pass byte for byte.
 *
 * Answers are kept in an arena of 256 KiB chunks carved into size classes (as memcached
 * does), not in an `ArrayBuffer` each, and the entry objects are recycled: a small
 * long-lived allocation per entry, interleaved with the short-lived slabs of the query path,
 * fragmented the process heap, and every new entry cost the garbage collector a promotion.
 * Measured with 200,000 unique names through the resolver: RSS over the cache off +36 MB at
 * 10,000 entries and +180 MB at 100,000 with an `ArrayBuffer` and a new object per entry;
 * +5 to +15 MB and +60 to +70 MB with the arena and recycling.
 *
 * The key (question, DO, CD, AD, RD; seeded hash) is `dns/cache_key.ts`'s, which says why
 * each bit is in it.
 *
 * @module
 */

import { cacheKeyHash } from "../dns/cache_key.ts";
import type { ResponseInfo } from "../dns/message.ts";
import { clampTtls, MAX_TTL, readTtl, writeTtl } from "../dns/ttl.ts";
import { HEADER_SIZE, Rcode, sameQuestion } from "../dns/wire.ts";
import { SlabCopier } from "../slab.ts";
import { HashChains, MAX_CHAIN } from "./hash_chains.ts";

export { MAX_CHAIN };

/** Answers larger than this are not cached. */
export const MAX_CACHED_ANSWER = 16 * 1024;
/** SERVFAIL from an upstream is cached at most this long (RFC 2308 section 7.1). */
export const SERVFAIL_TTL = 5;
/** TTL of a stale answer (RFC 8767 section 4). */
export const STALE_TTL = 30;
/**
 * After a failed refresh, stale answers go out at once, without asking upstream again, for
 * this long (RFC 8767 section 5, the "failure recheck timer").
 */
export const STALE_RECHECK_MS = 30_000;

/** Settings of an {@linkcode AnswerCache}. */
export interface CacheSettings {
  /** Most entries; the least recently used goes first. */
  maxEntries: number;
  /**
   * Most bytes of answers held (in 256 KiB chunks, at least one); the least recently used
   * entries go until a new answer fits. Unbounded when left out.
   */
  maxBytes?: number;
  /** Lower bound for positive TTLs, seconds. */
  minTtl: number;
  /** Upper bound for positive TTLs, seconds. */
  maxTtl: number;
  /** Upper bound for negative TTLs (and the SERVFAIL lifetime), seconds. */
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

/**
 * One cached answer. Its message and the offsets of its TTL fields lie in a chunk of the
 * cache's arena: `bytes[at, at + length)` is the message, then two octets per TTL offset.
 *
 * Entries are recycled: the object of an evicted or replaced entry carries the next answer
 * stored (no allocation, nothing for the garbage collector, once the cache is full). So an
 * entry is valid only until the cache is next changed: look it up again rather than keep it.
 */
export class CacheEntry {
  /** The key's hash (`cacheKeyHash` of `dns/cache_key.ts`). */
  hash = 0;
  /** Key flags (`cacheKeyFlags` of `dns/cache_key.ts`). */
  flags = 0;
  /** Offset just past the question, in the message. */
  questionEnd = 0;
  /** OPT record extent in the message (-1 when none). */
  optStart: number = -1;
  /** See `optStart`. */
  optEnd: number = -1;
  /** The arena chunk holding the answer (shared with other entries). */
  bytes: Uint8Array = EMPTY;
  /** Where the answer starts in `bytes`. */
  at = 0;
  /** The arena slot (for freeing it). */
  slot = 0;
  /** Length of the message. */
  length = 0;
  /** How many TTL offsets follow the message. */
  ttlCount = 0;
  /** What it holds. */
  kind: EntryKind = "positive";
  /** The lifetime it was stored with, seconds. */
  ttl = 0;
  /** Clock time it was stored (whole milliseconds: a small integer, not a boxed double). */
  storedAt = 0;
  /** Clock time it expires. */
  expiresAt = 0;
  /** Clock time after which it is not served even stale. */
  staleUntil = 0;
  /** True once a prefetch was started for it. */
  prefetched = false;
  /** Clock time a refresh of the expired entry last failed (-1: never). */
  refreshFailedAt: number = -1;
  /** LRU neighbours and the hash chain. */
  newer: CacheEntry | null = null;
  /** See `newer`. */
  older: CacheEntry | null = null;
  /** See `newer`. */
  chain: CacheEntry | null = null;
}

const EMPTY = new Uint8Array(0);

/**
 * Decides how long an answer may be cached, in seconds; null when it must not be.
 *
 * - positive (NOERROR with answer records): the smallest TTL of its records (OPT excluded),
 *   clamped to [minTtl, maxTtl]; never when that TTL is 0;
 * - negative (NXDOMAIN, or NODATA: NOERROR without answer records): min(SOA TTL, SOA
 *   MINIMUM) of the authority section's SOA (RFC 2308 section 5), at most maxNegativeTtl;
 *   never without an SOA, never when that is 0;
 * - SERVFAIL: 5 seconds (RFC 2308 section 7.1), at most maxNegativeTtl;
 * - never: TC=1, any other rcode (REFUSED, FORMERR, NOTIMP, YXDOMAIN, BADVERS...), larger
 *   than 16 KiB.
 *
 * @example
 * ```ts ignore
 * const decision = cacheableTtl(info, answer.length, settings); // { ttl: 300, kind: "positive" }
 * ```
 */
export function cacheableTtl(
  info: ResponseInfo,
  length: number,
  settings: CacheSettings,
  minTtl: number = settings.minTtl,
): { ttl: number; kind: EntryKind } | null {
  if (info.truncated || length > MAX_CACHED_ANSWER) return null;
  const rcode = info.extendedRcode;
  if (rcode === Rcode.SERVFAIL) {
    const ttl = Math.min(SERVFAIL_TTL, settings.maxNegativeTtl);
    return ttl > 0 ? { ttl, kind: "servfail" } : null;
  }
  if (rcode === Rcode.NXDOMAIN || (rcode === Rcode.NOERROR && info.ancount === 0)) {
    if (info.negativeTtl <= 0) return null;
    const ttl = Math.min(info.negativeTtl, settings.maxNegativeTtl);
    return ttl > 0 ? { ttl, kind: "negative" } : null;
  }
  if (rcode !== Rcode.NOERROR || info.minTtl <= 0) return null;
  const ttl = Math.min(settings.maxTtl, Math.max(minTtl, info.minTtl));
  return ttl > 0 ? { ttl, kind: "positive" } : null;
}

/** Buckets of an empty cache (it grows by doubling). */
const INITIAL_BUCKETS = 1024;

/** Bytes of one arena chunk (2^18: over glibc's 128 KiB threshold, so a mapping of its own). */
const CHUNK_SIZE = 1 << 18;
/**
 * Slot sizes of the arena: steps of at most 50%, up to the largest entry (16 KiB of answer
 * plus two octets per TTL field, and an answer of 16 KiB has fewer than 1,500 records).
 */
const SIZE_CLASSES = [
  64,
  96,
  128,
  192,
  256,
  384,
  512,
  768,
  1024,
  1536,
  2048,
  3072,
  4096,
  6144,
  8192,
  12288,
  16384,
  20480,
];

/**
 * Fixed-size slots in chunks of 256 KiB, at most `maxBytes` of them in all (one at least).
 * A chunk serves one size class at a time and keeps its own free slots; a chunk whose slots
 * are all free again goes to whichever class next needs a chunk when the budget is spent.
 * So the memory held is at most `maxChunks` chunks whatever the mix of answer sizes: with a
 * free list per class and no budget, each class kept the most slots it ever held at once.
 */
class Arena {
  readonly #maxChunks: number;
  #chunks: Uint8Array[] = [];
  /** Per chunk: its size class. */
  #chunkClass: number[] = [];
  /** Per chunk: slots in use. */
  #live: number[] = [];
  /** Per chunk: freed slots (chunk index * CHUNK_SIZE + offset). */
  #free: number[][] = [];
  /** Per chunk: its next never-used slot, and true while it is on its class's list. */
  #next: number[] = [];
  #listed: boolean[] = [];
  /** Per class: chunks that may have room (a chunk found full is taken off). */
  #withRoom: number[][] = SIZE_CLASSES.map(() => []);
  /**
   * Chunks whose slots all went free (some may have been used again since), each at most
   * once: `#emptyListed` says which are on it.
   */
  #empty: number[] = [];
  #emptyListed: boolean[] = [];

  constructor(maxBytes: number) {
    this.#maxChunks = Math.max(1, Math.floor(maxBytes / CHUNK_SIZE));
  }

  /** Bytes held in chunks. */
  get bytes(): number {
    return this.#chunks.length * CHUNK_SIZE;
  }

  /** The size class for `length` octets (-1: too large); the same for the same length. */
  classFor(length: number): number {
    for (let i = 0; i < SIZE_CLASSES.length; i++) if (length <= SIZE_CLASSES[i]) return i;
    return -1;
  }

  /** A free slot of class `sizeClass`; -1 when none is left within the budget. */
  allocate(sizeClass: number): number {
    const withRoom = this.#withRoom[sizeClass];
    while (withRoom.length > 0) {
      const chunk = withRoom[withRoom.length - 1];
      const slot = this.#take(chunk);
      if (slot >= 0) return slot;
      withRoom.pop();
      this.#listed[chunk] = false;
    }
    let chunk = -1;
    if (this.#chunks.length < this.#maxChunks) {
      chunk = this.#chunks.length;
      this.#chunks.push(new Uint8Array(CHUNK_SIZE));
      this.#live.push(0);
      this.#free.push([]);
      this.#next.push(0);
      this.#listed.push(false);
      this.#emptyListed.push(false);
      this.#chunkClass.push(sizeClass);
    } else {
      while (this.#empty.length > 0) {
        const candidate = this.#empty.pop()!;
        this.#emptyListed[candidate] = false;
        if (this.#live[candidate] === 0) {
          chunk = candidate;
          break;
        }
      }
      if (chunk < 0) return -1;
      // Moves to `sizeClass`: off the old class's list, its slots forgotten.
      const old = this.#withRoom[this.#chunkClass[chunk]];
      if (this.#listed[chunk]) old.splice(old.indexOf(chunk), 1);
      this.#free[chunk] = [];
      this.#chunkClass[chunk] = sizeClass;
    }
    this.#next[chunk] = chunk * CHUNK_SIZE;
    this.#listed[chunk] = true;
    withRoom.push(chunk);
    return this.#take(chunk);
  }

  /** A slot of `chunk`, or -1 when it is full. */
  #take(chunk: number): number {
    const free = this.#free[chunk];
    let slot: number;
    if (free.length > 0) {
      slot = free.pop()!;
    } else {
      const size = SIZE_CLASSES[this.#chunkClass[chunk]];
      slot = this.#next[chunk];
      if (slot + size > (chunk + 1) * CHUNK_SIZE) return -1;
      this.#next[chunk] = slot + size;
    }
    this.#live[chunk]++;
    return slot;
  }

  /** The chunk holding `slot`. */
  chunk(slot: number): Uint8Array {
    return this.#chunks[Math.floor(slot / CHUNK_SIZE)];
  }

  /** Gives `slot` back. */
  release(slot: number): void {
    const chunk = Math.floor(slot / CHUNK_SIZE);
    this.#free[chunk].push(slot);
    if (!this.#listed[chunk]) {
      this.#listed[chunk] = true;
      this.#withRoom[this.#chunkClass[chunk]].push(chunk);
    }
    if (--this.#live[chunk] === 0 && !this.#emptyListed[chunk]) {
      this.#emptyListed[chunk] = true;
      this.#empty.push(chunk);
    }
  }

  /** Drops every chunk. */
  clear(): void {
    this.#chunks = [];
    this.#chunkClass = [];
    this.#live = [];
    this.#free = [];
    this.#next = [];
    this.#listed = [];
    this.#emptyListed = [];
    this.#withRoom = SIZE_CLASSES.map(() => []);
    this.#empty = [];
  }
}

/**
 * Served answers are carved from shared slabs: a fresh `ArrayBuffer` per hit would cost
 * about a microsecond (see `src/slab.ts`); the slabs are never reused, so an answer still
 * being sent is never overwritten.
 */
const answers = new SlabCopier();

/**
 * A bounded LRU answer cache.
 *
 * @example
 * ```ts ignore
 * const cache = new AnswerCache(settings);
 * const entry = cache.lookup(query, questionEnd, flags, now);
 * if (entry && now < entry.expiresAt) send(cache.render(entry, query, now, false, true));
 * ```
 */
export class AnswerCache {
  readonly #settings: CacheSettings;
  readonly #stats: CacheStats | null;
  /** The entries by hash, chained through `CacheEntry.chain`. */
  readonly #table = new HashChains<CacheEntry>(INITIAL_BUCKETS);
  readonly #arena: Arena;
  /** Most recently used. */
  #newest: CacheEntry | null = null;
  /** Least recently used. */
  #oldest: CacheEntry | null = null;

  /** Creates an empty cache. */
  constructor(settings: CacheSettings, stats: CacheStats | null = null) {
    this.#settings = settings;
    this.#stats = stats;
    this.#arena = new Arena(settings.maxBytes ?? Number.MAX_SAFE_INTEGER);
  }

  /** Bytes of memory the cached answers hold (whole chunks, in use or free). */
  get bytes(): number {
    return this.#arena.bytes;
  }

  /** Entries held. */
  get size(): number {
    return this.#table.size;
  }

  /** The settings. */
  get settings(): CacheSettings {
    return this.#settings;
  }

  /**
   * The entry for the question in `query[12, questionEnd)` with key `flags`, fresh or
   * stale; null when there is none or it is past serving even stale (it is dropped then).
   * A found entry becomes the most recently used. `hash` is the key's `cacheKeyHash`
   * (`dns/cache_key.ts`), computed when not given.
   */
  lookup(
    query: Uint8Array,
    questionEnd: number,
    flags: number,
    now: number,
    hash: number = cacheKeyHash(query, questionEnd, flags),
  ): CacheEntry | null {
    const entry = this.#find(hash, flags, query, questionEnd);
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
   * of `query`: clamps its TTLs in place (see {@linkcode cacheableTtl}), then copies it.
   * Returns the entry, or null when the answer is not
   * cacheable. A SERVFAIL does not replace an entry that can still be served (fresh or
   * stale): RFC 8767 keeps the good answer when a refresh fails. At `maxEntries` the least
   * recently used entry goes, and its object holds the new answer. `keepTtls` (an answer
   * from a zone target) leaves TTLs below `minTtl` as they are.
   */
  store(
    query: Uint8Array,
    questionEnd: number,
    flags: number,
    response: Uint8Array,
    info: ResponseInfo,
    now: number,
    hash: number = cacheKeyHash(query, questionEnd, flags),
    keepTtls = false,
  ): CacheEntry | null {
    const settings = this.#settings;
    if (settings.maxEntries <= 0 || info.questionEnd !== questionEnd) return null;
    const length = response.length;
    const minTtl = keepTtls ? 0 : settings.minTtl;
    const decision = cacheableTtl(info, length, settings, minTtl);
    if (decision === null) return null;
    // One walk of the bucket: the entry to replace, and how many share the hash.
    let existing: CacheEntry | null = null;
    let sameHash = 0;
    for (let e = this.#table.first(hash); e !== null; e = e.chain) {
      if (e.hash !== hash) continue;
      sameHash++;
      if (e.flags === flags && sameQuestion(e.bytes, e.questionEnd, query, questionEnd, e.at)) {
        existing = e;
      }
    }
    const count = info.ttlCount;
    const sizeClass = this.#arena.classFor(length + 2 * count);
    if (sizeClass < 0) return null;
    let entry: CacheEntry | null = null;
    if (existing !== null) {
      if (
        decision.kind === "servfail" && existing.kind !== "servfail" && now < existing.staleUntil
      ) {
        return null;
      }
      this.#remove(existing);
      entry = existing;
    } else if (sameHash >= MAX_CHAIN) {
      return null;
    } else if (this.#table.size >= settings.maxEntries && this.#oldest !== null) {
      entry = this.#oldest;
      this.#remove(entry);
      this.#stats?.evicted();
    }
    // Within --cache-max-bytes: the least recently used go until a slot of the class frees
    // or a whole chunk does (at most every entry, when the new answer is of a class no
    // chunk serves and the old ones are spread over all chunks).
    let slot = this.#arena.allocate(sizeClass);
    while (slot < 0) {
      const victim = this.#oldest;
      if (victim === null) return null;
      this.#remove(victim);
      this.#stats?.evicted();
      entry ??= victim;
      slot = this.#arena.allocate(sizeClass);
    }
    entry ??= new CacheEntry();
    const offsets = info.ttlOffsets;
    // Negative answers: every TTL at most the negative TTL, so the SOA a client caches from
    // says how long the denial lives (RFC 2308 section 5). Positive: into [min, max]. In
    // `response` itself, so the clients waiting for it get what later ones get.
    if (decision.kind === "positive") {
      clampTtls(response, offsets, count, minTtl, settings.maxTtl);
    } else {
      clampTtls(response, offsets, count, 0, decision.kind === "negative" ? decision.ttl : MAX_TTL);
    }
    entry.hash = hash;
    entry.flags = flags;
    entry.questionEnd = questionEnd;
    entry.optStart = info.optStart;
    entry.optEnd = info.optEnd;
    this.#place(entry, response, info, slot);
    this.#setLifetime(entry, decision.kind, decision.ttl, now);
    this.#table.add(entry);
    this.#linkNewest(entry);
    return entry;
  }

  /**
   * Copies `response` and the offsets of its TTL fields (from `info`) into `slot`, and
   * records in `entry` where they are.
   */
  #place(entry: CacheEntry, response: Uint8Array, info: ResponseInfo, slot: number): void {
    const data = this.#arena.chunk(slot);
    const at = slot % CHUNK_SIZE;
    const length = response.length;
    const offsets = info.ttlOffsets;
    const count = info.ttlCount;
    data.set(response, at);
    for (let i = 0, o = at + length; i < count; i++, o += 2) {
      data[o] = offsets[i] >> 8;
      data[o + 1] = offsets[i] & 0xff;
    }
    entry.slot = slot;
    entry.bytes = data;
    entry.at = at;
    entry.length = length;
    entry.ttlCount = count;
  }

  /**
   * Starts the life of an answer stored `now` for `ttl` seconds: fresh until then, then
   * servable stale for `--serve-stale` more (a SERVFAIL never), not yet refreshed.
   */
  #setLifetime(entry: CacheEntry, kind: EntryKind, ttl: number, now: number): void {
    const storedAt = Math.floor(now);
    const expiresAt = storedAt + ttl * 1000;
    entry.kind = kind;
    entry.ttl = ttl;
    entry.storedAt = storedAt;
    entry.expiresAt = expiresAt;
    entry.staleUntil = kind === "servfail"
      ? expiresAt
      : expiresAt + this.#settings.serveStaleSeconds * 1000;
    entry.prefetched = false;
    entry.refreshFailedAt = -1;
  }

  /**
   * A copy of `entry` for the client whose query is `query`: the client's ID and question
   * bytes, TTLs aged by the whole seconds since it was stored (or all 30 when `stale`), and
   * the OPT record only when `keepOpt` (the client sent one). One allocation, from a slab.
   */
  render(
    entry: CacheEntry,
    query: Uint8Array,
    now: number,
    stale: boolean,
    keepOpt: boolean,
  ): Uint8Array {
    const source = entry.bytes;
    const base = entry.at;
    const length = entry.length;
    const optStart = entry.optStart;
    const cut = !keepOpt && optStart >= 0 ? entry.optEnd - optStart : 0;
    const out = answers.reserve(length - cut);
    if (cut === 0) {
      for (let i = 0; i < length; i++) out[i] = source[base + i];
    } else {
      for (let i = 0; i < optStart; i++) out[i] = source[base + i];
      for (let i = entry.optEnd, j = optStart; i < length; i++, j++) out[j] = source[base + i];
      const arcount = ((out[10] << 8) | out[11]) - 1;
      out[10] = arcount >> 8;
      out[11] = arcount & 0xff;
    }
    out[0] = query[0];
    out[1] = query[1];
    const questionEnd = entry.questionEnd;
    for (let i = HEADER_SIZE; i < questionEnd; i++) out[i] = query[i];
    const elapsed = stale ? 0 : Math.floor((now - entry.storedAt) / 1000);
    if (stale || elapsed > 0) {
      const count = entry.ttlCount;
      for (let i = 0, at = base + length; i < count; i++, at += 2) {
        const offset = (source[at] << 8) | source[at + 1];
        const ttl = stale ? STALE_TTL : readTtl(source, base + offset) - elapsed;
        writeTtl(out, cut > 0 && offset > optStart ? offset - cut : offset, ttl > 0 ? ttl : 0);
      }
    }
    return out;
  }

  /** Drops every entry; returns how many there were. */
  flush(): number {
    const count = this.#table.size;
    this.#arena.clear();
    this.#table.clear();
    this.#newest = null;
    this.#oldest = null;
    return count;
  }

  #find(hash: number, flags: number, query: Uint8Array, questionEnd: number): CacheEntry | null {
    let entry = this.#table.first(hash);
    while (entry !== null) {
      if (
        entry.flags === flags &&
        sameQuestion(entry.bytes, entry.questionEnd, query, questionEnd, entry.at)
      ) return entry;
      entry = entry.chain;
    }
    return null;
  }

  #remove(entry: CacheEntry): void {
    if (!this.#table.remove(entry)) return;
    this.#unlink(entry);
    this.#arena.release(entry.slot);
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
