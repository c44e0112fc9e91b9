import assert from "node:assert/strict";
import { FrameBuffer } from "../src/frame_buffer.ts";

/** A connection that takes at most `chunk` bytes per write, like a congested socket. */
class SlowWriter {
  readonly received: number[] = [];
  writes = 0;
  constructor(readonly chunk: number, readonly during?: () => void) {}
  write(bytes: Uint8Array): Promise<number> {
    this.writes++;
    const n = Math.min(this.chunk, bytes.length);
    this.received.push(...bytes.subarray(0, n));
    this.during?.();
    return Promise.resolve(n);
  }
}

Deno.test("FrameBuffer: length-prefixed frames survive partial writes and grow past the buffer", async () => {
  const frames = new FrameBuffer(8);
  const big = new Uint8Array(300).map((_, i) => i & 0xff);
  frames.append(new Uint8Array([1, 2, 3]));
  frames.append(big);
  assert.equal(frames.length, 2 + 3 + 2 + 300);
  const writer = new SlowWriter(7);
  await frames.drainTo(writer, () => true);
  assert.equal(frames.length, 0);
  assert.deepEqual(writer.received, [0, 3, 1, 2, 3, 1, 44, ...big]);
  assert.ok(writer.writes > 40, "partial writes were continued");
});

Deno.test("FrameBuffer: frames appended during a write go out in the next one, in order", async () => {
  const frames = new FrameBuffer(4);
  let appended = 0;
  const writer = new SlowWriter(1000, () => {
    if (appended < 3) frames.append(new Uint8Array([10 + appended++]));
  });
  frames.append(new Uint8Array([9]));
  await frames.drainTo(writer, () => true);
  assert.deepEqual(writer.received, [0, 1, 9, 0, 1, 10, 0, 1, 11, 0, 1, 12]);
  assert.equal(writer.writes, 4);
});

Deno.test("FrameBuffer: edits in place at the returned offset, stops when closed", async () => {
  const frames = new FrameBuffer();
  const at = frames.append(new Uint8Array([0, 0, 5]));
  frames.bytes[at] = 0xab;
  frames.bytes[at + 1] = 0xcd;
  const writer = new SlowWriter(100);
  await frames.drainTo(writer, () => false);
  assert.equal(writer.writes, 0, "nothing written once closed");
  await frames.drainTo(writer, () => true);
  assert.deepEqual(writer.received, [0, 3, 0xab, 0xcd, 5]);
  frames.append(new Uint8Array([1]));
  frames.clear();
  assert.equal(frames.length, 0);
});

Deno.test("frame buffer: a lone length octet, then the frame it starts", async () => {
  const frames = new FrameBuffer(4);
  frames.append(new Uint8Array([1, 2, 3]));
  frames.appendLengthHigh();
  const at = frames.append(new Uint8Array([9, 8]), true);
  assert.equal(at, 7);
  const written: number[] = [];
  await frames.drainTo({
    write: (p: Uint8Array) => (written.push(...p), Promise.resolve(p.length)),
  }, () => true);
  // Two whole frames on the wire: [0 3 1 2 3] [0 2 9 8].
  assert.deepEqual(written, [0, 3, 1, 2, 3, 0, 2, 9, 8]);
});
