import assert from "node:assert/strict";
import { AnswerQueue, LARGE_ANSWER } from "../src/server/answer_queue.ts";

/** A connection that takes at most `chunk` bytes per write; `during` runs in each write. */
class SlowWriter {
  readonly received: number[] = [];
  constructor(readonly chunk: number, readonly during?: () => void) {}
  write(bytes: Uint8Array): Promise<number> {
    const n = Math.min(this.chunk, bytes.length);
    this.received.push(...bytes.subarray(0, n));
    this.during?.();
    return Promise.resolve(n);
  }
}

/** Splits a stream of length-prefixed frames into their first octets. */
function firstOctets(stream: number[]): number[] {
  const out: number[] = [];
  for (let at = 0; at < stream.length;) {
    const length = (stream[at] << 8) | stream[at + 1];
    out.push(stream[at + 2]);
    at += 2 + length;
  }
  return out;
}

function answer(tag: number, length: number): Uint8Array {
  return new Uint8Array(length).fill(tag);
}

async function drain(queue: AnswerQueue, writer: SlowWriter): Promise<number> {
  let frames = 0;
  for (let i = 0; i < 1000 && queue.length > 0; i++) frames += await queue.writeOnce(writer);
  return frames;
}

Deno.test("AnswerQueue: small and large answers keep their order through partial writes", async () => {
  const queue = new AnswerQueue();
  const large = LARGE_ANSWER + 1000;
  queue.append(answer(1, 30));
  queue.append(answer(2, large));
  queue.append(answer(3, 40));
  queue.append(answer(4, 50));
  queue.append(answer(5, large));
  assert.equal(queue.length, 5 * 2 + 30 + 40 + 50 + 2 * large);
  const writer = new SlowWriter(333);
  assert.equal(await drain(queue, writer), 5, "five frames written");
  assert.equal(queue.length, 0);
  assert.deepEqual(firstOctets(writer.received), [1, 2, 3, 4, 5]);
  assert.equal(writer.received.length, 5 * 2 + 30 + 40 + 50 + 2 * large);
});

Deno.test("AnswerQueue: answers queued during a write follow it, in order", async () => {
  const queue = new AnswerQueue();
  let next = 2;
  const writer = new SlowWriter(100, () => {
    if (next <= 6) {
      queue.append(answer(next, next % 2 === 0 ? LARGE_ANSWER + 10 : 20));
      next++;
    }
  });
  queue.append(answer(1, 20));
  await drain(queue, writer);
  assert.deepEqual(firstOctets(writer.received), [1, 2, 3, 4, 5, 6]);
});

Deno.test("AnswerQueue: a large answer is kept, not copied; a small one is copied", async () => {
  const queue = new AnswerQueue();
  const large = answer(7, LARGE_ANSWER + 1);
  const small = answer(8, 12);
  queue.append(large);
  queue.append(small);
  large[5] = 99;
  small[5] = 99;
  const writer = new SlowWriter(1 << 20);
  await drain(queue, writer);
  assert.equal(writer.received[2 + 5], 99, "the large answer's own bytes went out");
  assert.equal(writer.received[2 + large.length + 2 + 5], 8, "the small one was copied");
  queue.append(small);
  queue.clear();
  assert.equal(queue.length, 0);
});
