/**
 * The YAML reader of tests/support/yaml.ts, which tests/deploy_test.ts reads the manifests with
 * (it replaced npm:yaml so that `deno task` runs offline). Each case is what the YAML 1.1 or
 * 1.2 specification says the text means (checked against npm:yaml 2.8.1 on the repository's
 * manifests when it was written); each refusal is a construct the reader does not read.
 */

import assert from "node:assert/strict";
import { parseYaml, parseYamlDocuments, YamlError } from "./support/yaml.ts";

Deno.test("yaml: block mappings, sequences, nested and compact", () => {
  const text = [
    "# comment",
    "a: 1",
    "b:",
    "  c: two # trailing comment",
    "  d:",
    "  - x",
    "  - y: 1",
    "    z: '#not a comment'",
    "e:",
    "  - - 1",
    "    - 2",
    "  -",
    "    k: v",
    'f: "a#b"',
    "g: a#b",
    "app.kubernetes.io/name: dotproxy",
    "empty:",
    "",
  ].join("\n");
  assert.deepEqual(parseYaml(text), {
    a: 1,
    b: { c: "two", d: ["x", { y: 1, z: "#not a comment" }] },
    e: [[1, 2], { k: "v" }],
    f: "a#b",
    g: "a#b",
    "app.kubernetes.io/name": "dotproxy",
    empty: null,
  });
});

Deno.test("yaml: scalars by schema: YAML 1.1 for Kubernetes and Compose, 1.2 core otherwise", () => {
  const text = "a: on\nb: yes\nc: 12:30\nd: 0755\ne: '5300'\nf: 1.5\ng: ~\nh: 1_000\non: x\n";
  assert.deepEqual(parseYaml(text, { version: "1.1" }), {
    a: true,
    b: true,
    c: 750,
    d: 493,
    e: "5300",
    f: 1.5,
    g: null,
    h: 1000,
    true: "x",
  });
  assert.deepEqual(parseYaml(text, { version: "1.2" }), {
    a: "on",
    b: "yes",
    c: "12:30",
    d: 755,
    e: "5300",
    f: 1.5,
    g: null,
    h: "1_000",
    on: "x",
  });
});

Deno.test("yaml: quoted scalars, flow collections", () => {
  assert.deepEqual(
    parseYaml(`a: "x\\ty\\u00e9\\"" \nb: 'it''s'\nc: ["**", 'v*', 3]\nd: {}\ne: {k: v, n: 1}\n`),
    { a: 'x\tyé"', b: "it's", c: ["**", "v*", 3], d: {}, e: { k: "v", n: 1 } },
  );
});

Deno.test("yaml: block literals and folded scalars with chomping", () => {
  const text = [
    "keep: |+",
    "  one",
    "",
    "clip: |",
    "  one",
    "    indented",
    "  # not a comment",
    "",
    "strip: |-",
    "  one",
    "folded: >",
    "  a",
    "  b",
    "",
    "  c",
    "after: 1",
  ].join("\n");
  assert.deepEqual(parseYaml(text), {
    keep: "one\n\n",
    clip: "one\n  indented\n# not a comment\n",
    strip: "one",
    folded: "a b\nc\n",
    after: 1,
  });
});

Deno.test("yaml: several documents; empty ones", () => {
  assert.deepEqual(parseYamlDocuments("a: 1\n---\nb: 2\n...\n"), [{ a: 1 }, { b: 2 }]);
  assert.deepEqual(parseYamlDocuments("# only a comment\n---\na: 1\n"), [{ a: 1 }]);
  assert.deepEqual(parseYamlDocuments("---\n---\na: 1\n"), [null, { a: 1 }]);
  assert.deepEqual(parseYamlDocuments(""), []);
});

Deno.test("yaml: refuses what it does not read, naming the line", () => {
  const refused: [string, RegExp][] = [
    ["a: 1\na: 2\n", /line 2: duplicate key "a"/],
    ["a: {x: 1, x: 2}\n", /line 1: duplicate key "x"/],
    ["a:\n\t- b\n", /line 2: tabs/],
    ["a: &x 1\nb: *x\n", /line 1: anchors/],
    ["a: !!str 1\n", /line 1: anchors, aliases, tags/],
    ["a: b: c\n", /line 1: a mapping value is not allowed/],
    ["a: 'open\n", /line 1: quoted scalars over several lines/],
    ["a: one\n  two\n", /line 2: plain scalars over several lines/],
    ["a: [1, 2\n", /line 1: unterminated flow sequence/],
    ["%YAML 1.2\n---\na: 1\n", /line 1: directives/],
    ["? a\n: b\n", /line 1: complex keys/],
    ["a:\n  b: 1\n c: 2\n", /line 3: unexpected content/],
  ];
  for (const [text, message] of refused) {
    assert.throws(() => parseYamlDocuments(text), (error: unknown) => {
      assert.ok(error instanceof YamlError, `${JSON.stringify(text)}: ${error}`);
      assert.match(error.message, message, JSON.stringify(text));
      return true;
    });
  }
});
