/**
 * A small YAML reader for the subset the repository's own manifests use (deploy/, the GitHub
 * workflows): block mappings and sequences, plain, single- and double-quoted scalars, block
 * literals (`|`, `|-`, `|+`) and folded scalars (`>`), one-line flow collections (`[a, b]`,
 * `{a: b}`, `{}`), comments and several documents in one file.
 *
 * Why not `npm:yaml`: a locked npm package made every `deno task` fetch it from the registry
 * first, so `deno task start` failed on a fresh clone without network (issue 22). Anchors,
 * aliases, tags, directives, complex keys and multi-line flow or quoted scalars are refused
 * with the line number instead of being misread: the manifests do not use them, and a test
 * that reads them must not silently see something else.
 *
 * Plain scalars resolve by the schema asked for: YAML 1.1 (what Kubernetes and Compose use:
 * `on`, `yes`, `y` are booleans, `12:30` is the number 750, `0755` octal) or the YAML 1.2
 * core schema (GitHub Actions: `on` is a string).
 *
 * @module
 */

/** A YAML document the reader refuses, with the line it stopped at (1-based). */
export class YamlError extends Error {
  /** Creates an error for `line` (1-based). */
  constructor(line: number, message: string) {
    super(`line ${line}: ${message}`);
    this.name = "YamlError";
  }
}

/** Which YAML version decides what a plain scalar means. */
export interface YamlOptions {
  /** "1.1" (Kubernetes, Compose) or "1.2" (core schema). Default "1.2". */
  version?: "1.1" | "1.2";
}

interface Line {
  /** 1-based line number in the file. */
  number: number;
  /** Column of the first content character. */
  indent: number;
  /** The line from `indent` on, comment and trailing space removed. */
  text: string;
  /** The whole line as written (block scalars read it). */
  raw: string;
}

/**
 * Every document of `text`, in order; an empty document (only comments) is `null`.
 *
 * @example
 * ```ts
 * import { parseYamlDocuments } from "./yaml.ts";
 * parseYamlDocuments("a: on\n---\nb: [1, x]\n", { version: "1.1" });
 * // [{ a: true }, { b: [1, "x"] }]
 * ```
 */
export function parseYamlDocuments(text: string, options: YamlOptions = {}): unknown[] {
  const rawLines = text.replace(/\r\n?/g, "\n").split("\n");
  const schema = options.version === "1.1" ? resolve11 : resolve12;
  const out: unknown[] = [];
  // A document opens at "---" (even if it stays empty) or at its first content line.
  let current = { lines: [] as string[], offset: 0, explicit: false };
  const hasContent = (lines: string[]) => lines.some((l) => stripComment(l, 0).trim() !== "");
  const close = () => {
    if (current.explicit || hasContent(current.lines)) {
      out.push(new Reader(current.lines, current.offset, schema).document());
    }
  };
  for (const [i, raw] of rawLines.entries()) {
    if (/^%/.test(raw)) throw new YamlError(i + 1, "directives are not supported");
    const marker = /^(---|\.\.\.)(\s|$)/.exec(raw);
    if (marker === null) {
      current.lines.push(raw);
      continue;
    }
    if (stripComment(raw.slice(3), i + 1).trim() !== "") {
      throw new YamlError(i + 1, `content after "${marker[1]}" is not supported`);
    }
    close();
    current = { lines: [], offset: i + 1, explicit: marker[1] === "---" };
  }
  close();
  return out;
}

/**
 * The one document of `text`; throws when there are several.
 *
 * @example
 * ```ts
 * import { parseYaml } from "./yaml.ts";
 * parseYaml("on: push\n"); // { on: "push" }
 * ```
 */
export function parseYaml(text: string, options: YamlOptions = {}): unknown {
  const documents = parseYamlDocuments(text, options);
  if (documents.length !== 1) {
    throw new YamlError(1, `expected one document, found ${documents.length}`);
  }
  return documents[0];
}

/** The line without its comment: `#` at the start or after white space, outside quotes. */
function stripComment(raw: string, number: number): string {
  let quote: string | null = null;
  for (let i = 0; i < raw.length; i++) {
    const c = raw[i];
    if (quote === "'") {
      if (c === "'") quote = null;
    } else if (quote === '"') {
      if (c === "\\") i++;
      else if (c === '"') quote = null;
    } else if (c === "#" && (i === 0 || raw[i - 1] === " " || raw[i - 1] === "\t")) {
      return raw.slice(0, i).trimEnd();
    } else if ((c === "'" || c === '"') && startsScalar(raw, i)) {
      quote = c;
    }
  }
  if (quote !== null && number > 0) {
    throw new YamlError(number, "quoted scalars over several lines are not supported");
  }
  return raw.trimEnd();
}

/** True when a quote at `i` opens a quoted scalar (not an apostrophe inside a plain one). */
function startsScalar(raw: string, i: number): boolean {
  const before = raw.slice(0, i).trimEnd();
  return before === "" || /[:\-\[{,?]$/.test(before);
}

type Resolver = (text: string) => unknown;

class Reader {
  #lines: Line[] = [];
  #at = 0;
  #resolve: Resolver;

  constructor(raw: string[], offset: number, resolve: Resolver) {
    this.#resolve = resolve;
    for (const [i, line] of raw.entries()) {
      const number = offset + i + 1;
      this.#lines.push({ number, indent: 0, text: "", raw: line });
    }
  }

  /** The document's root node. */
  document(): unknown {
    const value = this.#node(0);
    const next = this.#peek();
    if (next !== undefined) throw new YamlError(next.number, "unexpected content (indentation?)");
    return value;
  }

  /** The next line with content, comments skipped; fills its indent and text. */
  #peek(): Line | undefined {
    while (this.#at < this.#lines.length) {
      const line = this.#lines[this.#at];
      if (line.text === "") {
        const leading = /^[ \t]*/.exec(line.raw)![0];
        const text = stripComment(line.raw.slice(leading.length), line.number);
        if (text !== "" && leading.includes("\t")) {
          throw new YamlError(line.number, "tabs are not allowed in indentation");
        }
        line.indent = leading.length;
        line.text = text;
      }
      if (line.text !== "") return line;
      this.#at++;
    }
    return undefined;
  }

  /** A node whose lines are indented at least `min`; null when there is none. */
  #node(min: number): unknown {
    const line = this.#peek();
    if (line === undefined || line.indent < min) return null;
    if (isSequenceItem(line.text)) return this.#sequence(line.indent);
    if (mappingKey(line.text, line.number) !== null) return this.#mapping(line.indent);
    this.#at++;
    const value = this.#inline(line.text, line);
    const after = this.#peek();
    if (after !== undefined && after.indent > line.indent && after.indent >= min) {
      throw new YamlError(after.number, "plain scalars over several lines are not supported");
    }
    return value;
  }

  #sequence(indent: number): unknown[] {
    const items: unknown[] = [];
    for (;;) {
      const line = this.#peek();
      if (line === undefined || line.indent !== indent || !isSequenceItem(line.text)) break;
      const rest = line.text.slice(1);
      const spaces = /^ */.exec(rest)![0].length;
      if (rest.trim() === "") {
        this.#at++;
        items.push(this.#node(indent + 1));
        continue;
      }
      // "- key: value" or "- - x": the rest is a node of its own at its own column.
      line.indent = indent + 1 + spaces;
      line.text = rest.slice(spaces);
      items.push(this.#node(line.indent));
    }
    const next = this.#peek();
    if (next !== undefined && next.indent > indent) {
      throw new YamlError(next.number, "bad indentation in a sequence");
    }
    return items;
  }

  #mapping(indent: number): Record<string, unknown> {
    const map: Record<string, unknown> = {};
    for (;;) {
      const line = this.#peek();
      if (line === undefined || line.indent !== indent) break;
      const entry = mappingKey(line.text, line.number);
      if (entry === null) {
        if (isSequenceItem(line.text)) break;
        throw new YamlError(line.number, `expected "key: value", found "${line.text}"`);
      }
      // A plain key is a scalar like any other (YAML 1.1 reads `on:` as the key true).
      const key = entry.quoted ? entry.key : String(this.#resolve(entry.key));
      if (Object.hasOwn(map, key)) throw new YamlError(line.number, `duplicate key "${key}"`);
      this.#at++;
      let value: unknown;
      if (entry.rest === "") {
        const next = this.#peek();
        if (next !== undefined && next.indent > indent) value = this.#node(indent + 1);
        else if (next !== undefined && next.indent === indent && isSequenceItem(next.text)) {
          value = this.#sequence(indent);
        } else value = null;
      } else if (/^[|>]/.test(entry.rest)) {
        value = this.#blockScalar(entry.rest, line, indent);
      } else {
        value = this.#inline(entry.rest, line);
        const next = this.#peek();
        if (next !== undefined && next.indent > indent) {
          throw new YamlError(next.number, "plain scalars over several lines are not supported");
        }
      }
      Object.defineProperty(map, key, { value, enumerable: true, writable: true });
    }
    return map;
  }

  #blockScalar(header: string, line: Line, parentIndent: number): string {
    const m = /^([|>])([+-]?)([1-9]?)([+-]?)$/.exec(header);
    if (m === null) throw new YamlError(line.number, `bad block scalar header "${header}"`);
    const folded = m[1] === ">";
    const chomp = m[2] || m[4];
    const body: { number: number; raw: string }[] = [];
    let contentIndent = m[3] === "" ? -1 : parentIndent + Number(m[3]);
    while (this.#at < this.#lines.length) {
      const next = this.#lines[this.#at];
      const trimmed = next.raw.trim();
      const indent = /^ */.exec(next.raw)![0].length;
      if (trimmed !== "") {
        if (contentIndent < 0) contentIndent = indent;
        if (indent < contentIndent || indent <= parentIndent) break;
      }
      body.push({ number: next.number, raw: next.raw });
      this.#at++;
    }
    // Trailing blank lines belong to the scalar only for chomping; give them back to the file.
    let lines = body.map((b) => b.raw.trim() === "" ? "" : b.raw.slice(contentIndent));
    let trailing = 0;
    while (lines.length > 0 && lines[lines.length - 1] === "") {
      lines = lines.slice(0, -1);
      trailing++;
    }
    let text: string;
    if (!folded) {
      text = lines.join("\n");
    } else {
      text = "";
      for (const [i, l] of lines.entries()) {
        const previous = lines[i - 1];
        if (i === 0) text = l;
        else if (l === "") text += "\n";
        else if (previous === "") text += l;
        else if (/^\s/.test(l) || /^\s/.test(previous)) text += "\n" + l;
        else text += " " + l;
      }
    }
    if (lines.length === 0) return chomp === "+" ? "\n".repeat(trailing) : "";
    if (chomp === "-") return text;
    if (chomp === "+") return text + "\n" + "\n".repeat(trailing);
    return text + "\n";
  }

  /** A value on one line: a quoted or plain scalar, or a flow collection. */
  #inline(text: string, line: Line): unknown {
    const parser = new FlowParser(text, line.number, this.#resolve);
    const value = parser.value(false);
    parser.end();
    return value;
  }
}

function isSequenceItem(text: string): boolean {
  return text === "-" || text.startsWith("- ");
}

/** `key: rest` when the line is a mapping entry; the key unquoted. */
function mappingKey(
  text: string,
  number: number,
): { key: string; quoted: boolean; rest: string } | null {
  if (text.startsWith("? ")) throw new YamlError(number, "complex keys are not supported");
  let end: number;
  let key: string;
  if (text.startsWith('"') || text.startsWith("'")) {
    const parser = new FlowParser(text, number, resolve12);
    const quoted = parser.quoted();
    end = parser.position;
    const after = text.slice(end);
    if (!/^\s*:(\s|$)/.test(after)) return null;
    key = quoted;
    end += after.indexOf(":");
  } else {
    if (/^[\[{]/.test(text)) return null;
    const m = /:(\s|$)/.exec(text);
    if (m === null) return null;
    end = m.index;
    key = text.slice(0, end).trimEnd();
    if (key === "") throw new YamlError(number, "empty key");
    if (/^[&*!|>%@`]/.test(key)) {
      throw new YamlError(number, `anchors, aliases and tags are not supported ("${key}")`);
    }
  }
  return { key, quoted: /^["']/.test(text), rest: text.slice(end + 1).trim() };
}

/** Reads scalars and flow collections from one line. */
class FlowParser {
  position = 0;
  #text: string;
  #line: number;
  #resolve: Resolver;

  constructor(text: string, line: number, resolve: Resolver) {
    this.#text = text;
    this.#line = line;
    this.#resolve = resolve;
  }

  #fail(message: string): never {
    throw new YamlError(this.#line, message);
  }

  #skipSpace(): void {
    while (this.#text[this.position] === " ") this.position++;
  }

  end(): void {
    this.#skipSpace();
    if (this.position < this.#text.length) {
      this.#fail(`unexpected "${this.#text.slice(this.position)}"`);
    }
  }

  /** A value; inside a flow collection `,`, `]`, `}` and `: ` end a plain scalar. */
  value(inFlow: boolean): unknown {
    this.#skipSpace();
    const c = this.#text[this.position];
    if (c === "[") return this.#flowSequence();
    if (c === "{") return this.#flowMapping();
    if (c === '"' || c === "'") return this.quoted();
    if (c === undefined) return this.#resolve("");
    if ("&*!|>%@`".includes(c)) {
      this.#fail(`anchors, aliases, tags and reserved indicators are not supported ("${c}")`);
    }
    const start = this.position;
    while (this.position < this.#text.length) {
      const ch = this.#text[this.position];
      const next = this.#text[this.position + 1];
      if (ch === ":" && (next === undefined || next === " " || (inFlow && ",]}".includes(next)))) {
        if (!inFlow) this.#fail("a mapping value is not allowed here (quote the scalar)");
        break;
      }
      if (inFlow && ",]}".includes(ch)) break;
      this.position++;
    }
    return this.#resolve(this.#text.slice(start, this.position).trim());
  }

  quoted(): string {
    const quote = this.#text[this.position++];
    let out = "";
    while (this.position < this.#text.length) {
      const c = this.#text[this.position++];
      if (quote === "'") {
        if (c !== "'") out += c;
        else if (this.#text[this.position] === "'") {
          out += "'";
          this.position++;
        } else return out;
      } else if (c === '"') {
        return out;
      } else if (c === "\\") {
        out += this.#escape();
      } else {
        out += c;
      }
    }
    this.#fail("unterminated quoted scalar");
  }

  #escape(): string {
    const c = this.#text[this.position++];
    const simple: Record<string, string> = {
      "0": "\0",
      a: "\x07",
      b: "\b",
      t: "\t",
      "\t": "\t",
      n: "\n",
      v: "\v",
      f: "\f",
      r: "\r",
      e: "\x1b",
      " ": " ",
      '"': '"',
      "/": "/",
      "\\": "\\",
      N: "\x85",
      _: "\xa0",
      L: "\u2028",
      P: "\u2029",
    };
    if (c in simple) return simple[c];
    const digits = c === "x" ? 2 : c === "u" ? 4 : c === "U" ? 8 : 0;
    const hex = this.#text.slice(this.position, this.position + digits);
    if (digits === 0 || !new RegExp(`^[0-9A-Fa-f]{${digits}}$`).test(hex)) {
      this.#fail(`bad escape "\\${c ?? ""}" in a double-quoted scalar`);
    }
    this.position += digits;
    return String.fromCodePoint(parseInt(hex, 16));
  }

  #flowSequence(): unknown[] {
    this.position++;
    const items: unknown[] = [];
    for (;;) {
      this.#skipSpace();
      if (this.#text[this.position] === "]") {
        this.position++;
        return items;
      }
      if (this.position >= this.#text.length) this.#fail("unterminated flow sequence");
      items.push(this.value(true));
      this.#skipSpace();
      const c = this.#text[this.position];
      if (c === ",") this.position++;
      else if (c === undefined) this.#fail("unterminated flow sequence");
      else if (c !== "]") this.#fail(`expected "," or "]" in a flow sequence`);
    }
  }

  #flowMapping(): Record<string, unknown> {
    this.position++;
    const map: Record<string, unknown> = {};
    for (;;) {
      this.#skipSpace();
      if (this.#text[this.position] === "}") {
        this.position++;
        return map;
      }
      if (this.position >= this.#text.length) this.#fail("unterminated flow mapping");
      const key = this.value(true);
      if (typeof key === "object" && key !== null) this.#fail("complex keys are not supported");
      this.#skipSpace();
      let value: unknown = null;
      if (this.#text[this.position] === ":") {
        this.position++;
        value = this.value(true);
      }
      const name = String(key);
      if (Object.hasOwn(map, name)) this.#fail(`duplicate key "${name}"`);
      Object.defineProperty(map, name, { value, enumerable: true, writable: true });
      this.#skipSpace();
      const c = this.#text[this.position];
      if (c === ",") this.position++;
      else if (c === undefined) this.#fail("unterminated flow mapping");
      else if (c !== "}") this.#fail(`expected "," or "}" in a flow mapping`);
    }
  }
}

/** YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1023-core-schema). */
function resolve12(text: string): unknown {
  if (/^(|~|null|Null|NULL)$/.test(text)) return null;
  if (/^(true|True|TRUE)$/.test(text)) return true;
  if (/^(false|False|FALSE)$/.test(text)) return false;
  if (/^[-+]?[0-9]+$/.test(text)) return Number(text);
  if (/^0o[0-7]+$/.test(text)) return parseInt(text.slice(2), 8);
  if (/^0x[0-9a-fA-F]+$/.test(text)) return parseInt(text.slice(2), 16);
  if (/^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$/.test(text)) return Number(text);
  if (/^[-+]?\.(inf|Inf|INF)$/.test(text)) return text.startsWith("-") ? -Infinity : Infinity;
  if (/^\.(nan|NaN|NAN)$/.test(text)) return NaN;
  return text;
}

/** YAML 1.1 types (https://yaml.org/type/), as Kubernetes' and Compose's parsers read them. */
function resolve11(text: string): unknown {
  if (/^(|~|null|Null|NULL)$/.test(text)) return null;
  if (/^(y|Y|yes|Yes|YES|true|True|TRUE|on|On|ON)$/.test(text)) return true;
  if (/^(n|N|no|No|NO|false|False|FALSE|off|Off|OFF)$/.test(text)) return false;
  const sign = text.startsWith("-") ? -1 : 1;
  const unsigned = text.replace(/^[-+]/, "").replaceAll("_", "");
  if (/^0b[01]+$/.test(unsigned)) return sign * parseInt(unsigned.slice(2), 2);
  if (/^0x[0-9a-fA-F]+$/.test(unsigned)) return sign * parseInt(unsigned.slice(2), 16);
  if (/^0[0-7]+$/.test(unsigned)) return sign * parseInt(unsigned, 8);
  if (/^(0|[1-9][0-9]*)$/.test(unsigned) && /^[-+]?[0-9][0-9_]*$/.test(text)) {
    return sign * Number(unsigned);
  }
  if (/^[-+]?[1-9][0-9_]*(:[0-5]?[0-9])+$/.test(text)) {
    return sign * unsigned.split(":").reduce((sum, part) => sum * 60 + Number(part), 0);
  }
  if (/^[-+]?([0-9][0-9_]*)?\.[0-9_]*([eE][-+][0-9]+)?$/.test(text) && /[0-9]/.test(text)) {
    return Number(text.replaceAll("_", ""));
  }
  if (/^[-+]?\.(inf|Inf|INF)$/.test(text)) return sign * Infinity;
  if (/^\.(nan|NaN|NAN)$/.test(text)) return NaN;
  return text;
}
