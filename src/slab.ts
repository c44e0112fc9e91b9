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
  readonly #slabSize: number;
  #slab: ArrayBuffer;
  #offset = 0;

  /** Carves from slabs of `slabSize` bytes (larger for {@linkcode window}s). */
  constructor(slabSize: number = SLAB_SIZE) {
    this.#slabSize = slabSize;
    this.#slab = new ArrayBuffer(slabSize);
  }

  /** A new zeroed view of `length` bytes (its own buffer when large). */
  reserve(length: number): Uint8Array {
    if (length > LARGEST_CARVED) return new Uint8Array(length);
    const view = this.#view(length);
    this.#offset += (length + 7) & ~7;
    return view;
  }

  /**
   * The next `length` free bytes, not yet handed out: a receive buffer whose first bytes
   * become a message (see {@linkcode keep}) without a copy. `length` must fit a slab.
   */
  window(length: number): Uint8Array {
    return this.#view(length);
  }

  /** Hands out `used`, the start of the last {@linkcode window} (what was received into it). */
  keep(used: Uint8Array): Uint8Array {
    this.#offset += (used.length + 7) & ~7;
    return used;
  }

  /** A new view holding a copy of `source[start, end)`. */
  copy(source: Uint8Array, start: number, end: number): Uint8Array {
    const length = end - start;
    if (length > LARGEST_CARVED) return source.slice(start, end);
    const view = this.#view(length);
    view.set(source.subarray(start, end));
    // Keep views 8-byte aligned so neighbours never share a cache line needlessly.
    this.#offset += (length + 7) & ~7;
    return view;
  }

  /** A view of `length` bytes at the offset, on a new slab when this one is full. */
  #view(length: number): Uint8Array {
    if (this.#offset + length > this.#slabSize) {
      this.#slab = new ArrayBuffer(this.#slabSize);
      this.#offset = 0;
    }
    return new Uint8Array(this.#slab, this.#offset, length);
  }
}
