/**
 * Outgoing DNS-over-TCP frames (two-byte length prefix, RFC 1035 section 4.2.2), queued in
 * one growable buffer and written in as few writes as possible: every frame appended while a
 * write is in progress goes out in the next one. Two buffers take turns so appending never
 * waits for a write.
 *
 * @module
 */

import { writeU16 } from "./dns/wire.ts";

/** A writable connection: `Deno.Conn` and `Deno.TlsConn` both fit. */
export interface Writable {
  /** Writes some of `bytes`, resolving with how many. */
  write(bytes: Uint8Array): Promise<number>;
}

/**
 * A queue of length-prefixed frames.
 *
 * @example
 * ```ts
 * import { FrameBuffer } from "./frame_buffer.ts";
 * const frames = new FrameBuffer();
 * const at = frames.append(new Uint8Array(12));
 * frames.bytes[at] = 0xab; // edit the message in place, e.g. its ID
 * frames.length; // 14
 * ```
 */
export class FrameBuffer {
  #out: Uint8Array;
  #length = 0;
  #spare: Uint8Array;

  /** Creates a queue whose buffers start at `initialSize` bytes and grow as needed. */
  constructor(initialSize = 4096) {
    this.#out = new Uint8Array(initialSize);
    this.#spare = new Uint8Array(initialSize);
  }

  /** Bytes queued and not yet handed to a write. */
  get length(): number {
    return this.#length;
  }

  /** The current buffer; valid until the next append or drain step. */
  get bytes(): Uint8Array {
    return this.#out;
  }

  /**
   * Queues `message` behind its length prefix; returns the offset of the message in `bytes`.
   * With `continued`, the prefix's first octet was queued already by
   * {@linkcode appendLengthHigh} (then `message` must be shorter than 256 octets).
   */
  append(message: Uint8Array, continued = false): number {
    const prefix = continued ? 1 : 2;
    this.#reserve(prefix + message.length);
    if (continued) this.#out[this.#length] = message.length;
    else writeU16(this.#out, this.#length, message.length);
    const at = this.#length + prefix;
    this.#out.set(message, at);
    this.#length = at + message.length;
    return at;
  }

  /** Queues a length prefix alone: the message follows in a write of its own. */
  appendLength(length: number): void {
    this.#reserve(2);
    writeU16(this.#out, this.#length, length);
    this.#length += 2;
  }

  /**
   * Queues the first octet (0) of the next frame's length prefix alone. The next
   * {@linkcode append} must be `continued`. A stream is a stream: the peer reads on until the
   * frame is whole, and answers nothing meanwhile.
   */
  appendLengthHigh(): void {
    this.#reserve(1);
    this.#out[this.#length++] = 0;
  }

  #reserve(more: number): void {
    const needed = this.#length + more;
    if (needed <= this.#out.length) return;
    let size = this.#out.length * 2;
    while (size < needed) size *= 2;
    const bigger = new Uint8Array(size);
    bigger.set(this.#out.subarray(0, this.#length));
    this.#out = bigger;
  }

  /** Drops everything queued. */
  clear(): void {
    this.#length = 0;
  }

  /**
   * Writes what is queued now (one buffer's worth) completely; frames appended meanwhile
   * wait for the next call. Rejects with the connection's error.
   */
  async drainOnce(conn: Writable): Promise<void> {
    const buffer = this.#out;
    const length = this.#length;
    this.#out = this.#spare;
    this.#length = 0;
    this.#spare = buffer;
    let offset = 0;
    while (offset < length) offset += await conn.write(buffer.subarray(offset, length));
  }

  /**
   * Writes what is queued, and what gets queued meanwhile, until nothing is left or `open()`
   * turns false; `onWrite` is told as each write is issued. Rejects with the connection's
   * error.
   */
  async drainTo(conn: Writable, open: () => boolean, onWrite?: () => void): Promise<void> {
    while (this.#length > 0 && open()) {
      const buffer = this.#out;
      const length = this.#length;
      this.#out = this.#spare;
      this.#length = 0;
      this.#spare = buffer;
      onWrite?.();
      let offset = 0;
      while (offset < length) offset += await conn.write(buffer.subarray(offset, length));
    }
  }
}
