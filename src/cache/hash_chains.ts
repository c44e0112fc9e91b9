/**
 * A hash table of intrusive chains, shared by the answer cache and the table of flights in
 * progress: each item carries its own hash and the link to the next item of its bucket, so
 * adding and removing allocate nothing; only doubling the buckets does.
 *
 * Why not a `Map` keyed by the hash: it cost the answer cache 2-3 times as much per miss, as
 * its deletions, one per eviction, keep rehashing it (profiled: `MapPrototypeDelete`,
 * `FindOrderedHashMapEntry`).
 *
 * @module
 */

/**
 * Most items sharing one hash value that a table's users admit. Natural collisions of a
 * 30-bit keyed hash almost never chain more than two; the bound keeps a lookup's cost fixed
 * whatever names clients send.
 */
export const MAX_CHAIN = 8;

/** What an item of a {@linkcode HashChains} table carries. */
export interface Chained<T> {
  /** Its hash, a small non-negative integer; the table uses its low bits. */
  readonly hash: number;
  /** The next item of its bucket; only the table writes it. */
  chain: T | null;
}

/**
 * Buckets of intrusive chains, a power of two of them, at least one per item.
 *
 * @example
 * ```ts
 * import { type Chained, HashChains } from "./hash_chains.ts";
 * class Item implements Chained<Item> {
 *   chain: Item | null = null;
 *   constructor(readonly hash: number) {}
 * }
 * const table = new HashChains<Item>(16);
 * const item = new Item(42);
 * table.add(item);
 * table.first(42) === item; // true
 * table.remove(item); // true
 * ```
 */
export class HashChains<T extends Chained<T>> {
  readonly #initialBuckets: number;
  #buckets: (T | null)[];
  #mask: number;
  #size = 0;

  /** Creates an empty table of `initialBuckets` buckets (a power of two). */
  constructor(initialBuckets: number) {
    this.#initialBuckets = initialBuckets;
    this.#buckets = new Array(initialBuckets).fill(null);
    this.#mask = initialBuckets - 1;
  }

  /** Items held. */
  get size(): number {
    return this.#size;
  }

  /**
   * The first item of the bucket `hash` falls in; follow `chain` for the others. A bucket
   * holds items of other hashes too: compare what identifies an item.
   */
  first(hash: number): T | null {
    return this.#buckets[hash & this.#mask];
  }

  /** How many items have exactly `hash`. */
  countHash(hash: number): number {
    let count = 0;
    for (let item = this.first(hash); item !== null; item = item.chain) {
      if (item.hash === hash) count++;
    }
    return count;
  }

  /** Adds `item` (not in the table) at the head of its bucket. */
  add(item: T): void {
    const index = item.hash & this.#mask;
    item.chain = this.#buckets[index];
    this.#buckets[index] = item;
    if (++this.#size > this.#buckets.length) this.#grow();
  }

  /** Takes `item` out of the table; false when it was not in it. */
  remove(item: T): boolean {
    const index = item.hash & this.#mask;
    let head = this.#buckets[index];
    if (head === item) {
      this.#buckets[index] = item.chain;
    } else {
      while (head !== null && head.chain !== item) head = head.chain;
      if (head === null) return false;
      head.chain = item.chain;
    }
    item.chain = null;
    this.#size--;
    return true;
  }

  /** Forgets every item (their links are left as they are) and shrinks back. */
  clear(): void {
    this.#buckets = new Array(this.#initialBuckets).fill(null);
    this.#mask = this.#initialBuckets - 1;
    this.#size = 0;
  }

  /** Doubles the buckets (rehashing every chain) when items outnumber them. */
  #grow(): void {
    const old = this.#buckets;
    const buckets: (T | null)[] = new Array(old.length * 2).fill(null);
    const mask = buckets.length - 1;
    for (let i = 0; i < old.length; i++) {
      let item = old[i];
      while (item !== null) {
        const next = item.chain;
        const index = item.hash & mask;
        item.chain = buckets[index];
        buckets[index] = item;
        item = next;
      }
    }
    this.#buckets = buckets;
    this.#mask = mask;
  }
}
