/**
 * Copies of small messages carved out of shared slabs. `Uint8Array.prototype.slice` costs a
 * fresh `ArrayBuffer` per call (about a microsecond in V8, measured in bench/wire_bench.ts);
 * a view into a 64 KiB slab costs a tenth of that. A slab is freed by the garbage collector
 * once every message carved from it is done, and messages live at most a query's deadline,
 * so the memory held is bounded by the bytes copied during one deadline.
 *
 * @module
 */

const SLAB_SIZE = 64 * 1024;
/** Messages larger than this get their own buffer rather than wasting a slab's tail. */
const LARGEST_CARVED = 4096;

/**
 * Hands out copies of byte ranges.
 *
 * @example
 * ```ts
 * import { SlabCopier } from "./slab.ts";
 * const copier = new SlabCopier();
 * const received = new Uint8Array([1, 2, 3, 4]);
 * const mine = copier.copy(received, 0, 2); // Uint8Array [1, 2], independent of `received`
 * ```
 */
export class SlabCopier {
  #slab = new ArrayBuffer(SLAB_SIZE);
  #offset = 0;

  /** A new zeroed view of `length` bytes (its own buffer when large). */
  reserve(length: number): Uint8Array {
    if (length > LARGEST_CARVED) return new Uint8Array(length);
    if (this.#offset + length > SLAB_SIZE) {
      this.#slab = new ArrayBuffer(SLAB_SIZE);
      this.#offset = 0;
    }
    const view = new Uint8Array(this.#slab, this.#offset, length);
    this.#offset += (length + 7) & ~7;
    return view;
  }

  /** A new view holding a copy of `source[start, end)`. */
  copy(source: Uint8Array, start: number, end: number): Uint8Array {
    const length = end - start;
    if (length > LARGEST_CARVED) return source.slice(start, end);
    if (this.#offset + length > SLAB_SIZE) {
      this.#slab = new ArrayBuffer(SLAB_SIZE);
      this.#offset = 0;
    }
    const view = new Uint8Array(this.#slab, this.#offset, length);
    view.set(source.subarray(start, end));
    // Keep views 8-byte aligned so neighbours never share a cache line needlessly.
    this.#offset += (length + 7) & ~7;
    return view;
  }
}
