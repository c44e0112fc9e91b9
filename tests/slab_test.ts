import assert from "node:assert/strict";
import { SlabCopier } from "../src/slab.ts";

Deno.test("slab: a message received into a window stays its own while later ones arrive", () => {
  const slabs = new SlabCopier(1024);
  const kept: [Uint8Array, number][] = [];
  for (let i = 0; i < 100; i++) {
    const window = slabs.window(300);
    assert.equal(window.length, 300);
    // What a receive writes: some bytes at the start of the window.
    const length = 1 + (i * 37) % 120;
    window.fill(i, 0, length);
    kept.push([slabs.keep(window.subarray(0, length)), i]);
  }
  for (const [message, fill] of kept) {
    assert.ok(message.every((b) => b === fill), `message ${fill} intact`);
  }
  // Copies and reservations share the slabs (and go to new ones) without overlapping.
  const copies: [Uint8Array, number][] = [];
  for (let i = 0; i < 100; i++) {
    const source = new Uint8Array(1 + (i * 53) % 200).fill(i);
    copies.push([slabs.copy(source, 0, source.length), i]);
    slabs.reserve(64).fill(255);
  }
  for (const [message, fill] of [...kept, ...copies]) {
    assert.ok(message.every((b) => b === fill), `message ${fill} intact`);
  }
});
