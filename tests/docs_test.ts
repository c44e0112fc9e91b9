/**
 * The documentation stays true: every relative link in the README, CONTRIBUTING.md,
 * RELEASING.md and docs/ reaches a file and a heading; the metrics table of
 * docs/operations.md lists exactly the families a running proxy serves, and its example
 * queries and alerts name only those; and the README's "Try it without internet" recipe
 * (scripts/local_upstream.sh, a real Unbound with the test certificate, the proxy trusting the
 * test CA through DOTPROXY_CA_CERTS) answers as the README shows.
 *
 * Run with `deno test --allow-net --allow-env --allow-read --allow-run --allow-write=/tmp
 * tests/docs_test.ts`. The recipe test is skipped where Unbound is missing.
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import { buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { DotServer } from "./support/dot_server.ts";
import { freeStablePort } from "./support/fault_upstream.ts";
import { parsePrometheus } from "./support/prometheus.ts";
import { spawnMain, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { UnboundUpstream } from "./support/unbound.ts";
import { sleep } from "./support/wait.ts";

const ROOT = new URL("../", import.meta.url);

/** Every markdown page of the documentation, relative to the repository root. */
async function pages(): Promise<string[]> {
  const found = ["README.md", "CONTRIBUTING.md", "RELEASING.md"];
  const walk = async (dir: string): Promise<void> => {
    for await (const entry of Deno.readDir(new URL(dir, ROOT))) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) await walk(path);
      else if (entry.name.endsWith(".md")) found.push(path);
    }
  };
  await walk("docs");
  return found.sort();
}

/** The text outside fenced code blocks, where links and headings live. */
function prose(text: string): string {
  return text.replace(/^```[^\n]*\n[\s\S]*?^```$/gm, "");
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens. */
function slug(heading: string): string {
  return heading.trim().toLowerCase().replace(/[^\p{L}\p{N}_\- ]/gu, "").replaceAll(" ", "-");
}

function anchorsOf(text: string): Set<string> {
  return new Set([...prose(text).matchAll(/^#+ (.*)$/gm)].map((m) => slug(m[1])));
}

/** `a/b/../c.md` to `a/c.md`. */
function normalize(path: string): string {
  const out: string[] = [];
  for (const part of path.split("/")) {
    if (part === "..") out.pop();
    else if (part !== "." && part !== "") out.push(part);
  }
  return out.join("/");
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(new URL(path, ROOT));
    return true;
  } catch {
    return false;
  }
}

Deno.test("docs: every relative link reaches a file, and every #anchor a heading", async () => {
  const list = await pages();
  assert.ok(list.includes("docs/configuration.md") && list.includes("docs/operations.md"));
  const texts = new Map<string, string>();
  for (const page of list) texts.set(page, await Deno.readTextFile(new URL(page, ROOT)));
  const broken: string[] = [];
  for (const [page, text] of texts) {
    const dir = page.includes("/") ? page.slice(0, page.lastIndexOf("/") + 1) : "";
    for (const [, target] of prose(text).matchAll(/\]\(([^)\s]+)\)/g)) {
      if (/^[a-z]+:/.test(target)) continue; // https:, mailto:
      const [path, anchor] = target.split("#", 2);
      const file = path === "" ? page : normalize(dir + path);
      if (!(await exists(file))) {
        broken.push(`${page}: ${target} (no ${file})`);
        continue;
      }
      if (anchor === undefined || !file.endsWith(".md")) continue;
      const other = texts.get(file) ?? await Deno.readTextFile(new URL(file, ROOT));
      if (!anchorsOf(other).has(anchor)) broken.push(`${page}: ${target} (no heading #${anchor})`);
    }
  }
  assert.deepEqual(broken, []);
});

/** The rows of the first table under `## Metrics` in docs/operations.md: family to type. */
async function documentedFamilies(): Promise<{ table: Map<string, string>; page: string }> {
  const page = await Deno.readTextFile(new URL("docs/operations.md", ROOT));
  const lines = page.split("\n");
  const start = lines.indexOf("## Metrics");
  assert.ok(start >= 0, "docs/operations.md has a ## Metrics section");
  const first = lines.findIndex((line, i) => i > start && line.startsWith("|"));
  const table = new Map<string, string>();
  for (const line of lines.slice(first + 2)) {
    if (!line.startsWith("|")) break;
    const [family, type] = line.slice(1).split("|").map((cell) => cell.trim());
    table.set(family.replaceAll("`", ""), type);
  }
  return { table, page };
}

/** Family name to type, as a running proxy's `/metrics` serves them. */
async function servedFamilies(): Promise<Map<string, string>> {
  const upstream = DotServer.start();
  const types = new Map<string, string>();
  try {
    await withProxy(
      testConfig([upstream.upstream()], { http: { hostname: "127.0.0.1", port: 0 } }),
      async ({ proxy, port }) => {
        assert.ok(await udpExchange(port, buildQuery("docs.example")), "the proxy answered");
        const response = await fetch(`http://127.0.0.1:${proxy.http?.addr.port}/metrics`, {
          signal: AbortSignal.timeout(5000),
        });
        assert.equal(response.status, 200);
        for (const family of parsePrometheus(await response.text()).values()) {
          types.set(family.name, family.type);
        }
      },
    );
  } finally {
    await upstream.close();
  }
  return types;
}

Deno.test("docs: the metrics table lists exactly the families /metrics serves, with their types", async () => {
  const served = await servedFamilies();
  const { table, page } = await documentedFamilies();
  assert.ok(served.size > 20, `only ${served.size} families served`);
  assert.deepEqual([...table.keys()].sort(), [...served.keys()].sort());
  for (const [name, type] of served) assert.equal(table.get(name), type, `${name}: type`);
  // The example queries and the alert rules name only served series.
  const series = new Set<string>();
  for (const [name, type] of served) {
    if (type === "histogram") {
      for (const s of ["_bucket", "_sum", "_count"]) series.add(name + s);
    } else series.add(name);
  }
  const named = [
    ...page.matchAll(/(?<![\w:`])(?:dotproxy|process)_[a-z_]+(?=[\s{[)=>]|$)/gm),
  ].map((m) => m[0]);
  assert.ok(named.length > 10);
  const unknown = [...new Set(named)].filter((name) => !series.has(name) && !served.has(name));
  assert.deepEqual(unknown, [], "names in docs/operations.md that /metrics does not serve");
});

Deno.test({
  name: "docs: the README's offline recipe answers as shown (local_upstream.sh, test CA)",
  ignore: !(await UnboundUpstream.available()),
  fn: async () => {
    const upstreamPort = freeStablePort();
    const listenPort = freeStablePort();
    const tmp = await Deno.makeTempDir({ prefix: "dotproxy-docs-" });
    const unbound = new Deno.Command("bash", {
      args: ["scripts/local_upstream.sh", String(upstreamPort)],
      cwd: ROOT,
      env: { TMPDIR: tmp },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const output = unbound.output();
    const proxy = spawnMain(
      ["--listen", `127.0.0.1:${listenPort}`, "--upstream", `127.0.0.1:${upstreamPort}#dns.test`],
      { DOTPROXY_CA_CERTS: CA_PEM },
    );
    const proxyOutput = proxy.child.output();
    try {
      // Both start in the background: ask until the first answer, within a bound.
      let answer: Uint8Array | null = null;
      for (let i = 0; i < 50 && answer === null; i++) {
        answer = await udpExchange(listenPort, buildQuery("www.dotproxy.test"), 200);
        if (answer !== null && parseMessage(answer).rcode !== 0) answer = null;
        if (answer === null) await sleep(100);
      }
      assert.ok(answer, "www.dotproxy.test answered NOERROR");
      assert.deepEqual(parseMessage(answer).answers.map((r) => formatA(r.data)), ["192.0.2.10"]);
      const aaaa = await udpExchange(listenPort, buildQuery("www.dotproxy.test", { type: 28 }));
      assert.ok(aaaa);
      assert.equal(parseMessage(aaaa).answers.length, 1, "the AAAA record");
      const outside = await udpExchange(listenPort, buildQuery("example.com"));
      assert.ok(outside);
      assert.equal(parseMessage(outside).rcode, 5, "names outside the zone: REFUSED");
    } finally {
      proxy.child.kill("SIGTERM");
      await proxyOutput;
      proxy.stopTimer();
      unbound.kill("SIGTERM"); // the script execs unbound
      const { stdout } = await output;
      await Deno.remove(tmp, { recursive: true });
      // The script printed the command the README shows.
      assert.match(
        new TextDecoder().decode(stdout),
        /DOTPROXY_CA_CERTS="\$\(cat tests\/fixtures\/ca\.pem\)" deno task start --upstream 127\.0\.0\.1:\d+#dns\.test/,
      );
    }
  },
});
