/**
 * HPACK (src/http/hpack.ts): blocks encoded by python3-hpack (Huffman strings, incremental
 * indexing, then references into the dynamic table) decode to the fields that were encoded;
 * malformed blocks are errors, never wrong fields; the encoder's output decodes back.
 *
 * @module
 */

import assert from "node:assert/strict";
import { encodeHeaders, type HeaderField, HpackDecoder, HpackError } from "../src/http/hpack.ts";

const hex = (text: string) => Uint8Array.from(text.match(/../g)!.map((b) => parseInt(b, 16)));

const GET: HeaderField[] = [
  [":method", "GET"],
  [":scheme", "https"],
  [":path", "/dns-query?dns=AAABAAABAAAAAAAAB2V4YW1wbGUDY29tAAABAAE"],
  [":authority", "dns.test"],
  ["accept", "application/dns-message"],
  ["user-agent", "curl/8"],
];

Deno.test("hpack: python3-hpack's blocks (Huffman, dynamic table) decode to their fields", () => {
  const decoder = new HpackDecoder();
  // Generated with hpack.Encoder().encode(fields, huffman=True), three blocks in a row.
  const first = decoder.decode(
    hex(
      "828744aa624a90b76b4b67aff24a910430c3761861bb0c30c30c30c3745c5ae7c83e23c5c2ff313e986186ec30e0418692a42e92a13f53901d75d0620d263d4c495216a4a840e62f7a8525b650c3df",
    ),
    16384,
  );
  assert.deepEqual(first, { fields: GET, tooLarge: false });
  const second = decoder.decode(
    hex(
      "83874488624a90b76b4b67afc15f901d75d0620d263d4c495216a4a840e62fc14086f2b12d424f4f91fffe3fffecd5fffc7ffff610f21563227f",
    ),
    16384,
  );
  assert.deepEqual(second.fields, [
    [":method", "POST"],
    [":scheme", "https"],
    [":path", "/dns-query"],
    [":authority", "dns.test"],
    ["content-type", "application/dns-message"],
    ["accept", "application/dns-message"],
    // Sent as UTF-8, read as Latin-1 (field values are octets, RFC 9110 section 5.5).
    ["x-custom", "\u00c3\u009cn\u00c3\u00afcode-ish"],
  ]);
  // The third block is six references: four into the dynamic table.
  assert.deepEqual(decoder.decode(hex("8287c4c3c2c1"), 16384).fields, GET);
});

Deno.test("hpack: the header list limit is reported, the table still follows", () => {
  const decoder = new HpackDecoder();
  const block = hex(
    "828744aa624a90b76b4b67aff24a910430c3761861bb0c30c30c30c3745c5ae7c83e23c5c2ff313e986186ec30e0418692a42e92a13f53901d75d0620d263d4c495216a4a840e62f7a8525b650c3df",
  );
  assert.equal(decoder.decode(block, 100).tooLarge, true);
});

Deno.test("hpack: malformed blocks throw HpackError", () => {
  for (
    const block of [
      "80", // index 0
      "bf", // index 62: beyond an empty dynamic table
      "ff80808080808001", // integer too large
      "4088", // truncated string
      "408125", // a Huffman string ending in padding that is not all ones... (0x25)
      "3fe21f", // table size update above 4096
      "82" + "20", // a table size update after a field
    ]
  ) {
    assert.throws(() => new HpackDecoder().decode(hex(block), 16384), HpackError, block);
  }
});

Deno.test("hpack: the encoder's blocks decode back", () => {
  const fields: HeaderField[] = [
    [":status", "200"],
    ["content-type", "application/dns-message"],
    ["cache-control", "max-age=300"],
    ["content-length", "1234"],
    ["x-long", "v".repeat(300)],
  ];
  assert.deepEqual(new HpackDecoder().decode(encodeHeaders(fields), 16384).fields, fields);
  assert.deepEqual(new HpackDecoder().decode(encodeHeaders([[":status", "415"]]), 100).fields, [
    [":status", "415"],
  ]);
});
