/**
 * HPACK (RFC 7541), the header compression of HTTP/2: a decoder with the dynamic table and
 * Huffman strings (browsers and nghttp2 clients use both), and an encoder that writes every
 * field as a literal without indexing (section 6.2.2), so that it keeps no state: responses
 * of a DNS server carry four or five short fields, and indexing them would save a few bytes
 * at the cost of a table per connection.
 *
 * @module
 */

import { HUFFMAN_CODES, HUFFMAN_LENGTHS, STATIC_TABLE } from "./hpack_tables.ts";

/** A header block the decoder cannot read: a connection error COMPRESSION_ERROR. */
export class HpackError extends Error {
  /** `message` says what was wrong, for the log. */
  constructor(message: string) {
    super(message);
    this.name = "HpackError";
  }
}

/** A header field: lower-case name and value, as bytes read as Latin-1. */
export type HeaderField = [name: string, value: string];

/** Per-entry overhead in the table size (RFC 7541 section 4.1). */
const ENTRY_OVERHEAD = 32;

// The Huffman decoding trie: node i has children at 2i, 2i+1 of `trie`; a value >= 0 below
// LEAF is a node index, a value LEAF + symbol is a leaf; -1 is no child.
const LEAF = 1 << 16;
const trie: Int32Array = buildTrie();

function buildTrie(): Int32Array {
  const children: number[] = [-1, -1];
  let nodes = 1;
  for (let symbol = 0; symbol < HUFFMAN_CODES.length; symbol++) {
    const code = HUFFMAN_CODES[symbol];
    const length = HUFFMAN_LENGTHS[symbol];
    let node = 0;
    for (let bit = length - 1; bit >= 0; bit--) {
      const branch = 2 * node + ((code >>> bit) & 1);
      if (bit === 0) {
        children[branch] = LEAF + symbol;
      } else {
        if (children[branch] === -1) {
          children[branch] = nodes++;
          children.push(-1, -1);
        }
        node = children[branch];
      }
    }
  }
  return Int32Array.from(children);
}

/**
 * The Huffman decoder as a state machine over 4-bit steps (as nghttp2 does): entry
 * `state * 16 + nibble` holds the next state (low 9 bits) and the symbol completed, plus
 * one (bits 9 and up; 0 for none), or -1 for an invalid code or EOS. A nibble completes at
 * most one symbol (the shortest code has 5 bits). Decoding bit by bit was 5.6% of the CPU of
 * a cached DoH request over HTTP/2 (V8 profile).
 */
const NIBBLES: Int32Array = (() => {
  const nodes = trie.length / 2;
  const table = new Int32Array(nodes * 16);
  for (let state = 0; state < nodes; state++) {
    for (let nibble = 0; nibble < 16; nibble++) {
      let node = state;
      let symbol = -1;
      let entry = 0;
      for (let bit = 3; bit >= 0; bit--) {
        const next = trie[2 * node + ((nibble >> bit) & 1)];
        if (next === -1 || next === LEAF + 256) {
          entry = -1;
          break;
        }
        if (next >= LEAF) {
          symbol = next - LEAF;
          node = 0;
        } else {
          node = next;
        }
      }
      table[state * 16 + nibble] = entry < 0 ? -1 : node | ((symbol + 1) << 9);
    }
  }
  return table;
})();

/**
 * For each state, how many bits of ones lead to it from the root, or -1 when its path has a
 * zero: a string may end only at the root or at most 7 bits of ones into the EOS code.
 */
const ONES_DEPTH: Int8Array = (() => {
  const depth = new Int8Array(trie.length / 2).fill(-1);
  depth[0] = 0;
  for (let node = 0, d = 0; node >= 0 && node < LEAF; d++) {
    depth[node] = d;
    node = trie[2 * node + 1];
  }
  return depth;
})();

/** Decodes a Huffman-coded string (RFC 7541 section 5.2). */
function huffmanDecode(bytes: Uint8Array, start: number, end: number): string {
  let out = "";
  let state = 0;
  for (let i = start; i < end; i++) {
    const byte = bytes[i];
    let entry = NIBBLES[state * 16 + (byte >> 4)];
    if (entry < 0) throw new HpackError("invalid Huffman code");
    if (entry >= 512) out += String.fromCharCode((entry >> 9) - 1);
    state = entry & 511;
    entry = NIBBLES[state * 16 + (byte & 15)];
    if (entry < 0) throw new HpackError("invalid Huffman code");
    if (entry >= 512) out += String.fromCharCode((entry >> 9) - 1);
    state = entry & 511;
  }
  const padding = ONES_DEPTH[state];
  if (padding < 0 || padding > 7) throw new HpackError("invalid Huffman padding");
  return out;
}

/** A decoder for one connection's header blocks (its dynamic table lives as long). */
export class HpackDecoder {
  /** Newest first. */
  readonly #table: HeaderField[] = [];
  #size = 0;
  #maxSize: number;
  /** The most the peer may set the table to (our SETTINGS_HEADER_TABLE_SIZE). */
  readonly #limit: number;
  #at = 0;
  #block: Uint8Array = new Uint8Array(0);

  /** `limit` is the SETTINGS_HEADER_TABLE_SIZE we announced (4,096 by default). */
  constructor(limit = 4096) {
    this.#limit = limit;
    this.#maxSize = limit;
  }

  /**
   * Decodes one complete header block. `maxListSize` bounds the decoded list (names plus
   * values plus 32 per field, as SETTINGS_MAX_HEADER_LIST_SIZE counts); beyond it the block
   * is still decoded, to keep the table in step, but `tooLarge` is set.
   */
  decode(block: Uint8Array, maxListSize: number): { fields: HeaderField[]; tooLarge: boolean } {
    this.#block = block;
    this.#at = 0;
    const fields: HeaderField[] = [];
    let listSize = 0;
    let tooLarge = false;
    const add = (field: HeaderField) => {
      listSize += field[0].length + field[1].length + ENTRY_OVERHEAD;
      if (listSize > maxListSize) tooLarge = true;
      else fields.push(field);
    };
    let first = true;
    while (this.#at < block.length) {
      const byte = block[this.#at];
      if (byte & 0x80) {
        add(this.#entry(this.#integer(7)));
      } else if (byte & 0x40) {
        const field = this.#literal(6);
        this.#insert(field);
        add(field);
      } else if (byte & 0x20) {
        // A table size update: only at the start of a block (section 4.2).
        if (!first) throw new HpackError("table size update after a field");
        const size = this.#integer(5);
        if (size > this.#limit) throw new HpackError(`table size ${size} over ${this.#limit}`);
        this.#maxSize = size;
        this.#evict(0);
        continue;
      } else {
        add(this.#literal(4));
      }
      first = false;
    }
    this.#block = new Uint8Array(0);
    return { fields, tooLarge };
  }

  #integer(prefixBits: number): number {
    const block = this.#block;
    const mask = (1 << prefixBits) - 1;
    let value = block[this.#at++] & mask;
    if (value < mask) return value;
    for (let shift = 0; shift <= 21; shift += 7) {
      if (this.#at >= block.length) throw new HpackError("truncated integer");
      const byte = block[this.#at++];
      value += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return value;
    }
    throw new HpackError("integer too large");
  }

  #string(): string {
    const block = this.#block;
    if (this.#at >= block.length) throw new HpackError("truncated string");
    const huffman = (block[this.#at] & 0x80) !== 0;
    const length = this.#integer(7);
    const start = this.#at;
    const end = start + length;
    if (end > block.length) throw new HpackError("truncated string");
    this.#at = end;
    if (huffman) return huffmanDecode(block, start, end);
    let out = "";
    for (let i = start; i < end; i += 1024) {
      out += String.fromCharCode(...block.subarray(i, Math.min(end, i + 1024)));
    }
    return out;
  }

  #literal(prefixBits: number): HeaderField {
    const index = this.#integer(prefixBits);
    const name = index === 0 ? this.#string() : this.#entry(index)[0];
    return [name, this.#string()];
  }

  #entry(index: number): HeaderField {
    if (index === 0) throw new HpackError("index 0");
    if (index <= STATIC_TABLE.length) {
      const [name, value] = STATIC_TABLE[index - 1];
      return [name, value];
    }
    const entry = this.#table[index - STATIC_TABLE.length - 1];
    if (entry === undefined) throw new HpackError(`index ${index} beyond the table`);
    return entry;
  }

  #insert(field: HeaderField): void {
    const size = field[0].length + field[1].length + ENTRY_OVERHEAD;
    if (size > this.#maxSize) {
      // Larger than the whole table: the table empties (section 4.4).
      this.#table.length = 0;
      this.#size = 0;
      return;
    }
    this.#evict(size);
    this.#table.unshift(field);
    this.#size += size;
  }

  /** Evicts the oldest entries until `room` more fits. */
  #evict(room: number): void {
    while (this.#size + room > this.#maxSize && this.#table.length > 0) {
      const [name, value] = this.#table.pop()!;
      this.#size -= name.length + value.length + ENTRY_OVERHEAD;
    }
  }
}

/** The first static-table index of each name. */
const STATIC_NAMES = new Map<string, number>();
for (let i = STATIC_TABLE.length - 1; i >= 0; i--) STATIC_NAMES.set(STATIC_TABLE[i][0], i + 1);
/** The static-table index of each `:status` value it holds. */
const STATIC_STATUS = new Map<string, number>();
STATIC_TABLE.forEach(([name, value], i) => {
  if (name === ":status") STATIC_STATUS.set(value, i + 1);
});

/** Writes an HPACK integer (section 5.1) at `at`; returns the offset after it. */
function writeInteger(
  out: Uint8Array,
  at: number,
  value: number,
  prefixBits: number,
  first: number,
) {
  const mask = (1 << prefixBits) - 1;
  if (value < mask) {
    out[at++] = first | value;
    return at;
  }
  out[at++] = first | mask;
  let rest = value - mask;
  while (rest >= 0x80) {
    out[at++] = (rest & 0x7f) | 0x80;
    rest = Math.floor(rest / 0x80);
  }
  out[at++] = rest;
  return at;
}

/** Writes a string literal without Huffman coding; returns the offset after it. */
function writeString(out: Uint8Array, at: number, text: string): number {
  at = writeInteger(out, at, text.length, 7, 0);
  for (let i = 0; i < text.length; i++) out[at++] = text.charCodeAt(i) & 0xff;
  return at;
}

/**
 * Encodes response fields as a header block: `:status` indexed when the static table has
 * it, everything else a literal without indexing (by static name index where there is one).
 * Names must be lower case; values Latin-1.
 *
 * @example
 * ```ts
 * import { encodeHeaders } from "./hpack.ts";
 * encodeHeaders([[":status", "200"], ["content-type", "application/dns-message"]]);
 * ```
 */
export function encodeHeaders(fields: readonly HeaderField[]): Uint8Array {
  // At most 6 octets of integers per string (lengths under 2^28) and 6 for the index.
  let size = 0;
  for (const [name, value] of fields) size += name.length + value.length + 18;
  const out = new Uint8Array(size);
  let at = 0;
  for (const [name, value] of fields) {
    const status = name === ":status" ? STATIC_STATUS.get(value) : undefined;
    if (status !== undefined) {
      out[at++] = 0x80 | status;
      continue;
    }
    const index = STATIC_NAMES.get(name);
    if (index !== undefined) {
      at = writeInteger(out, at, index, 4, 0);
    } else {
      out[at++] = 0;
      at = writeString(out, at, name);
    }
    at = writeString(out, at, value);
  }
  return out.subarray(0, at);
}
