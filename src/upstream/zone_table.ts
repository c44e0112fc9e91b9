/**
 * Zones by name, and the longest of them that holds a name in a DNS message: what the
 * router and the special-use names look names up in. Labels are compared whole and
 * without regard to ASCII case (RFC 4343): `mycluster.local` is not in `cluster.local`.
 *
 * @module
 */

import { HEADER_SIZE } from "../dns/wire.ts";

/** Most labels a name can have (255 octets, two per label at least). */
const MAX_LABELS = 128;

/**
 * A set of zones, each with a value.
 *
 * @example
 * ```ts
 * import { ZoneTable } from "./zone_table.ts";
 * const table = new ZoneTable<string>();
 * table.add("cluster.local", "cluster DNS");
 * // "x.Cluster.Local" as a question name at offset 12 of a message
 * const msg = new Uint8Array([...new Array(12).fill(0), 1, 120, 7, 67, 108, 117, 115, 116,
 *   101, 114, 5, 76, 111, 99, 97, 108, 0, 0, 1, 0, 1]);
 * table.lookup(msg, 0); // "cluster DNS"
 * table.apex; // 14: where "Cluster.Local" starts
 * ```
 */
export class ZoneTable<T> {
  readonly #zones = new Map<string, T>();
  /** Every zone and every suffix of one: where a longer match may still be found. */
  readonly #suffixes = new Set<string>();
  readonly #offsets = new Int32Array(MAX_LABELS);
  /** Offset of the first label of the zone the last successful lookup matched. */
  apex: number = -1;

  /** Zones in the table. */
  get size(): number {
    return this.#zones.size;
  }

  /** The values of the zones, in the order added (a value shared by zones repeats). */
  values(): IterableIterator<T> {
    return this.#zones.values();
  }

  /** Adds `zone` (lowercase, no final dot, not the root) with `value`. */
  add(zone: string, value: T): void {
    this.#zones.set(zone, value);
    const labels = zone.split(".");
    for (let i = 0; i < labels.length; i++) this.#suffixes.add(labels.slice(i).join("."));
  }

  /**
   * The value of the longest zone holding the question name of `msg` (at offset 12,
   * uncompressed, as `inspectQuery` accepted it), after dropping its first `skip` labels
   * (1 for a DS question: the parent side answers it). Null when no zone holds it.
   */
  lookup(msg: Uint8Array, skip: number): T | null {
    const offsets = this.#offsets;
    let count = 0;
    let at = HEADER_SIZE;
    for (; count < MAX_LABELS && at < msg.length; count++) {
      const length = msg[at];
      if (length === 0) break;
      if (length > 63) return null;
      offsets[count] = at;
      at += length + 1;
    }
    let key = "";
    let found: T | null = null;
    for (let i = count - 1; i >= skip; i--) {
      const start = offsets[i];
      const label = labelText(msg, start + 1, start + 1 + msg[start]);
      key = key === "" ? label : `${label}.${key}`;
      if (!this.#suffixes.has(key)) break;
      const value = this.#zones.get(key);
      if (value !== undefined) {
        found = value;
        this.apex = start;
      }
    }
    return found;
  }
}

/** A label as lowercase text; a dot or backslash inside it is escaped, so never matches. */
function labelText(msg: Uint8Array, from: number, to: number): string {
  let text = "";
  for (let i = from; i < to && i < msg.length; i++) {
    const byte = msg[i];
    if (byte === 0x2e || byte === 0x5c) text += "\\";
    text += String.fromCharCode(byte >= 0x41 && byte <= 0x5a ? byte + 0x20 : byte);
  }
  return text;
}
