/**
 * The answers queued for one stream client, in order, as length-prefixed frames (RFC 1035
 * section 4.2.2). Small answers are coalesced into one {@linkcode FrameBuffer} so that many
 * go out in one write; a large answer is queued as it is (its length prefix goes with the
 * small frames before it), instead of growing that buffer (and its spare, which takes turns
 * with it) to hold a copy.
 *
 * Why: a connection whose client stops reading holds what is queued for it until it is
 * closed. With 60 KB answers copied into a frame buffer, each such connection held two
 * buffers grown to 64-128 KiB besides the answers themselves; 1,000 of them kept the proxy
 * near 270 MiB (bench/memory_attacks.ts, `tcp-no-read-1000`).
 *
 * @module
 */

import { FrameBuffer, type Writable } from "../frame_buffer.ts";

/**
 * Answers longer than this are queued as they are, not copied: the resolver hands every
 * answer this long over in a buffer of its own (`SlabCopier` carves only shorter ones from
 * shared slabs), so keeping it pins nothing else.
 */
export const LARGE_ANSWER = 4096;
const SMALL_BUFFER = 4096;

/**
 * A queue of answer frames for one connection.
 *
 * @example
 * ```ts
 * import { AnswerQueue } from "./answer_queue.ts";
 * const queue = new AnswerQueue();
 * queue.append(new Uint8Array(12));
 * queue.append(new Uint8Array(60_000));
 * queue.length; // 60_016
 * ```
 */
export class AnswerQueue {
  #small = new FrameBuffer(SMALL_BUFFER);
  #smallFrames = 0;
  /** Whole frames that go before what `#small` holds, oldest first. */
  #segments: Uint8Array[] = [];
  #segmentFrames: number[] = [];
  #segmentBytes = 0;
  #grown = false;

  /** Bytes queued and not yet handed to a write. */
  get length(): number {
    return this.#segmentBytes + this.#small.length;
  }

  /**
   * Queues `answer` behind its two-octet length. An answer longer than
   * {@linkcode LARGE_ANSWER} is kept, not copied: it must not change until written.
   */
  append(answer: Uint8Array): void {
    if (this.#small.length + answer.length + 2 > SMALL_BUFFER) this.#grown = true;
    if (answer.length <= LARGE_ANSWER) {
      this.#small.append(answer);
      this.#smallFrames++;
      return;
    }
    this.#small.appendLength(answer.length);
    this.#seal();
    this.#push(answer, 1);
  }

  /**
   * Writes the oldest part of the queue completely: one large frame, or the small frames
   * coalesced so far. Resolves with the number of frames written (0 when nothing was
   * queued); rejects with the connection's error.
   */
  async writeOnce(conn: Writable): Promise<number> {
    const segment = this.#segments.shift();
    if (segment !== undefined) {
      const frames = this.#segmentFrames.shift()!;
      this.#segmentBytes -= segment.length;
      let offset = 0;
      while (offset < segment.length) offset += await conn.write(segment.subarray(offset));
      return frames;
    }
    const frames = this.#smallFrames;
    this.#smallFrames = 0;
    await this.#small.drainOnce(conn);
    return frames;
  }

  /** Drops everything queued. */
  clear(): void {
    this.#segments = [];
    this.#segmentFrames = [];
    this.#segmentBytes = 0;
    this.#small.clear();
    this.#smallFrames = 0;
  }

  /** Once empty, lets go of buffers a burst of small answers grew. */
  shrink(): void {
    if (this.#grown && this.length === 0) {
      this.#small = new FrameBuffer(SMALL_BUFFER);
      this.#grown = false;
    }
  }

  /** Moves the small frames queued so far in front of what comes next. */
  #seal(): void {
    const length = this.#small.length;
    this.#push(this.#small.bytes.slice(0, length), this.#smallFrames);
    this.#small.clear();
    this.#smallFrames = 0;
  }

  #push(frame: Uint8Array, frames: number): void {
    this.#segments.push(frame);
    this.#segmentFrames.push(frames);
    this.#segmentBytes += frame.length;
  }
}
