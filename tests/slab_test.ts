import assert from "node:assert/strict";
import { SlabCopier } from "../src/slab.ts";

Deno.test("slab: copies and reservations stay intact as new slabs are started", () => {
  const slabs = new SlabCopier();
  const copies: [Uint8Array, number][] = [];
  // About 4 MiB in all: dozens of 64 KiB slabs, and copies too large for one.
  for (let i = 0; i < 4000; i++) {
    const size = i % 500 === 0 ? 5000 : 1 + (i * 53) % 1500;
    const source = new Uint8Array(size).fill(i & 0xff);
    copies.push([slabs.copy(source, 0, source.length), i & 0xff]);
    slabs.reserve(64).fill(0xee);
  }
  for (const [message, fill] of copies) {
    assert.ok(message.every((b) => b === fill), `copy filled with ${fill} intact`);
  }
});
