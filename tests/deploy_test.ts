/**
 * Checks that the shipping files agree with each other and with the binary's interface:
 * the Dockerfile, .dockerignore, deploy/docker-compose.yml, every Kubernetes document under
 * deploy/kubernetes/, scripts/release.sh and the `compile` task in deno.json.
 *
 * Only reads files: `deno test --allow-read tests/deploy_test.ts`. The YAML is read by
 * tests/support/yaml.ts (no third-party package, so every `deno task` runs offline).
 */

import assert from "node:assert/strict";
import { parseYaml, parseYamlDocuments } from "./support/yaml.ts";
import { ConfigError, parseConfig, SETTINGS } from "../src/config.ts";

/** Every environment variable the binary reads. Any DOTPROXY_* name set elsewhere is a typo. */
const KNOWN_ENV: readonly string[] = SETTINGS.map((setting) => setting.env);

/** The container conventions. */
const DNS_PORT = 5300;
const HTTP_PORT = 5380;
/** `[::]` takes IPv6 and, dual-stack, IPv4 (`0.0.0.0` and `[::]` on one port cannot both bind). */
const CONTAINER_ENV: Readonly<Record<string, string>> = {
  DOTPROXY_LISTEN: `[::]:${DNS_PORT}`,
  DOTPROXY_HTTP: `[::]:${HTTP_PORT}`,
  DOTPROXY_LOG_FORMAT: "json",
};
/** The one image name, as the release workflow pushes it, everywhere it is written. */
const IMAGE = "ghcr.io/dotproxy/dotproxy";
/** The uid of `nonroot` in the distroless images. */
const NONROOT_UID = 65532;
const BINARY = "/dotproxy";
const HEALTHCHECK_CMD = [BINARY, "healthcheck"];
/** The only permissions the binary is compiled with. */
const ALLOW_FLAGS = ["--allow-env", "--allow-net"];
const RELEASE_TARGETS = [
  "x86_64-unknown-linux-gnu",
  "aarch64-unknown-linux-gnu",
  "x86_64-apple-darwin",
  "aarch64-apple-darwin",
  "x86_64-pc-windows-msvc",
];
/**
 * Kubernetes files that kustomization.yaml must not list: they need CRDs, or (the
 * NetworkPolicy) are examples to adapt to the cluster before applying.
 */
const OPTIONAL_K8S_FILES = ["servicemonitor.yaml", "prometheusrule.yaml", "networkpolicy.yaml"];
const COMPOSE_FILE = "deploy/docker-compose.yml";

const ROOT = new URL("../", import.meta.url);

// ---------------------------------------------------------------------------------------------
// Typed access to parsed YAML/JSON (no `any`).

type Obj = Record<string, unknown>;

function isObj(v: unknown): v is Obj {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function obj(v: unknown, what: string): Obj {
  if (!isObj(v)) assert.fail(`${what}: expected a mapping, got ${JSON.stringify(v)}`);
  return v;
}

function arr(v: unknown, what: string): unknown[] {
  if (!Array.isArray(v)) assert.fail(`${what}: expected a list, got ${JSON.stringify(v)}`);
  return v;
}

function str(v: unknown, what: string): string {
  if (typeof v !== "string") assert.fail(`${what}: expected a string, got ${JSON.stringify(v)}`);
  return v;
}

function num(v: unknown, what: string): number {
  if (typeof v !== "number") assert.fail(`${what}: expected a number, got ${JSON.stringify(v)}`);
  return v;
}

function strRecord(v: unknown, what: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(obj(v, what))) out[k] = str(val, `${what}.${k}`);
  return out;
}

/** True when every key/value of `selector` is among `labels` (and the selector is not empty). */
function selects(selector: Record<string, string>, labels: Record<string, string>): boolean {
  const entries = Object.entries(selector);
  return entries.length > 0 && entries.every(([k, v]) => labels[k] === v);
}

// ---------------------------------------------------------------------------------------------
// Files.

async function readText(rel: string): Promise<string> {
  return await Deno.readTextFile(new URL(rel, ROOT));
}

async function exists(rel: string): Promise<boolean> {
  try {
    await Deno.stat(new URL(rel, ROOT));
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Files under `dir` (relative to the repo root), as repo-relative paths, sorted. */
async function walk(dir: string): Promise<string[]> {
  const base = dir.endsWith("/") ? dir : `${dir}/`;
  const out: string[] = [];
  for await (const entry of Deno.readDir(new URL(base, ROOT))) {
    const rel = `${base}${entry.name}`;
    if (entry.isDirectory) out.push(...await walk(rel));
    else out.push(rel);
  }
  return out.sort();
}

/**
 * All documents of a YAML file, as plain values. Parsed with YAML 1.1 rules, as Kubernetes and
 * Compose do (so an unquoted `on` or `12:30` shows up as the boolean or number it becomes);
 * any error or warning (duplicate keys included) fails.
 */
async function loadYaml(rel: string): Promise<unknown[]> {
  let docs: unknown[];
  try {
    docs = parseYamlDocuments(await readText(rel), { version: "1.1" });
  } catch (error) {
    assert.fail(`${rel}: ${error instanceof Error ? error.message : error}`);
  }
  const out = docs.filter((value) => value !== null && value !== undefined);
  assert.ok(out.length > 0, `${rel}: no YAML documents`);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Shell-like words, Dockerfiles, .dockerignore.

/** Splits a command line into words, honouring '...' and "..." and backslash escapes. */
function shellWords(line: string): string[] {
  const words: string[] = [];
  let cur = "";
  let inWord = false;
  let quote: "'" | '"' | null = null;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quote !== null) {
      if (c === quote) quote = null;
      else if (c === "\\" && quote === '"' && i + 1 < line.length) cur += line[++i];
      else cur += c;
    } else if (c === "'" || c === '"') {
      quote = c;
      inWord = true;
    } else if (c === "\\" && i + 1 < line.length) {
      cur += line[++i];
      inWord = true;
    } else if (/\s/.test(c)) {
      if (inWord) words.push(cur);
      cur = "";
      inWord = false;
    } else {
      cur += c;
      inWord = true;
    }
  }
  assert.equal(quote, null, `unbalanced quote in: ${line}`);
  if (inWord) words.push(cur);
  return words;
}

/** `--allow-*`/`-A` and `--unstable-*` flags of a `deno compile` command line, sorted. */
function denoFlags(line: string): { allow: string[]; unstable: string[] } {
  const words = shellWords(line);
  const allow = words.filter((w) => w.startsWith("--allow-") || /^-[a-zA-Z]*A/.test(w)).sort();
  const unstable = words.filter((w) => w.startsWith("--unstable")).sort();
  return { allow, unstable };
}

/** The value after `--output` (or `-o`) in a command line. */
function outputOf(line: string): string {
  const words = shellWords(line);
  for (let i = 0; i < words.length; i++) {
    if (words[i] === "--output" || words[i] === "-o") return words[i + 1];
    if (words[i].startsWith("--output=")) return words[i].slice("--output=".length);
  }
  assert.fail(`no --output in: ${line}`);
}

interface Instruction {
  cmd: string;
  args: string;
  line: number;
}

interface Stage {
  from: string;
  name: string | undefined;
  instructions: Instruction[];
}

/** Dockerfile instructions, continuation lines joined, comments dropped, grouped by stage. */
function parseDockerfile(text: string): { preamble: Instruction[]; stages: Stage[] } {
  const instructions: Instruction[] = [];
  let buf = "";
  let start = 0;
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const raw = lines[i].replace(/\r$/, "");
    const trimmed = raw.trim();
    if (trimmed.startsWith("#")) continue; // comments, also inside continued instructions
    if (buf === "" && trimmed === "") continue;
    if (buf === "") start = i + 1;
    if (/\\\s*$/.test(raw)) {
      buf += raw.replace(/\\\s*$/, "") + " ";
      continue;
    }
    buf += raw;
    const m = buf.trim().match(/^(\S+)\s*(.*)$/s);
    assert.ok(m, `Dockerfile:${start}: cannot parse`);
    instructions.push({ cmd: m[1].toUpperCase(), args: m[2].trim(), line: start });
    buf = "";
  }
  assert.equal(buf, "", "Dockerfile ends inside a continued line");
  const preamble: Instruction[] = [];
  const stages: Stage[] = [];
  for (const ins of instructions) {
    if (ins.cmd === "FROM") {
      const words = shellWords(ins.args).filter((w) => !w.startsWith("--platform"));
      const asAt = words.findIndex((w) => w.toUpperCase() === "AS");
      stages.push({
        from: words[0],
        name: asAt >= 0 ? words[asAt + 1] : undefined,
        instructions: [],
      });
    } else if (stages.length === 0) {
      preamble.push(ins);
    } else {
      stages[stages.length - 1].instructions.push(ins);
    }
  }
  return { preamble, stages };
}

/** KEY=VALUE pairs of an ENV, LABEL or ARG instruction (also the legacy `ENV KEY VALUE`). */
function keyValues(args: string): Record<string, string> {
  const words = shellWords(args);
  const out: Record<string, string> = {};
  if (words.length >= 2 && !words[0].includes("=")) {
    out[words[0]] = words.slice(1).join(" ");
    return out;
  }
  for (const w of words) {
    const eq = w.indexOf("=");
    if (eq < 0) out[w] = "";
    else out[w.slice(0, eq)] = w.slice(eq + 1);
  }
  return out;
}

function only(stage: Stage, cmd: string): Instruction[] {
  return stage.instructions.filter((i) => i.cmd === cmd);
}

function single(stage: Stage, cmd: string): Instruction {
  const found = only(stage, cmd);
  assert.equal(found.length, 1, `expected exactly one ${cmd} in the stage FROM ${stage.from}`);
  return found[0];
}

/** Compiles a .dockerignore pattern (Go filepath.Match syntax plus `**`) to a RegExp. */
function ignoreRegExp(pattern: string): RegExp {
  let re = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*" && pattern[i + 1] === "*") {
      i++;
      if (pattern[i + 1] === "/") {
        i++;
        re += "(?:.*/)?";
      } else {
        re += ".*";
      }
    } else if (c === "*") {
      re += "[^/]*";
    } else if (c === "?") {
      re += "[^/]";
    } else {
      re += c.replace(/[.+^${}()|[\]\\]/g, "\\$&");
    }
  }
  return new RegExp(`^${re}$`);
}

/** Whether Docker leaves `path` out of the build context, by the rules of .dockerignore. */
function dockerIgnored(rules: readonly string[], path: string): boolean {
  const parts = path.split("/");
  const candidates = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
  let ignored = false;
  for (const rule of rules) {
    const negate = rule.startsWith("!");
    const pattern = (negate ? rule.slice(1) : rule).trim().replace(/^\/+|\/+$/g, "")
      .replace(/^\.\//, "");
    const re = ignoreRegExp(pattern);
    if (candidates.some((c) => re.test(c))) ignored = !negate;
  }
  return ignored;
}

// ---------------------------------------------------------------------------------------------
// Values.

/** Seconds of a Go/Docker duration such as `30s`, `1m30s` or `500ms`. */
function seconds(d: string): number {
  const units: Record<string, number> = { h: 3600, m: 60, s: 1, ms: 0.001, us: 1e-6, ns: 1e-9 };
  const re = /(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)/gy;
  let total = 0;
  let end = 0;
  for (let m = re.exec(d); m !== null; m = re.exec(d)) {
    total += Number(m[1]) * units[m[2]];
    end = re.lastIndex;
  }
  assert.ok(d.length > 0 && end === d.length, `bad duration: ${d}`);
  return total;
}

/** A Kubernetes quantity (`100m`, `1`, `64Mi`, `1G`) as a number. */
function quantity(v: unknown, what: string): number {
  const s = typeof v === "number" ? String(v) : str(v, what);
  const m = s.match(/^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$/);
  assert.ok(m, `${what}: not a quantity: ${s}`);
  const factor: Record<string, number> = {
    "": 1,
    m: 1e-3,
    k: 1e3,
    M: 1e6,
    G: 1e9,
    T: 1e12,
    Ki: 2 ** 10,
    Mi: 2 ** 20,
    Gi: 2 ** 30,
    Ti: 2 ** 40,
  };
  return Number(m[1]) * factor[m[2] ?? ""];
}

function isPort(s: string): boolean {
  return /^\d{1,5}$/.test(s) && Number(s) >= 1 && Number(s) <= 65535;
}

/** `ADDR:PORT` with an IPv4 address, a hostname or a bracketed IPv6 address. */
function addrPort(s: string): { host: string; port: number } | null {
  const m = s.match(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d+)$/);
  if (!m || !isPort(m[2])) return null;
  return { host: m[1], port: Number(m[2]) };
}

function portOf(addr: string, what: string): number {
  const ap = addrPort(addr);
  assert.ok(ap, `${what}: not ADDR:PORT: ${addr}`);
  return ap.port;
}

/** Checks one DOTPROXY_* setting against what the binary accepts, by its own parser. */
function checkEnv(where: string, name: string, value: string | undefined): void {
  if (!name.startsWith("DOTPROXY_")) return;
  assert.ok(KNOWN_ENV.includes(name), `${where}: unknown setting ${name}`);
  if (value === undefined) return; // e.g. Kubernetes valueFrom
  try {
    parseConfig([], (n) => n === name ? value : undefined);
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    assert.fail(`${where}: ${name}=${value}: ${error.message}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Everything, loaded once.

interface K8sDoc {
  file: string;
  apiVersion: string;
  kind: string;
  name: string;
  doc: Obj;
}

interface ContainerPort {
  name: string;
  containerPort: number;
  protocol: string;
}

const denoJson = obj(JSON.parse(await readText("deno.json")), "deno.json");
const VERSION = str(denoJson.version, "deno.json version");

const dockerfile = parseDockerfile(await readText("Dockerfile"));
const dockerignore = (await readText(".dockerignore")).split("\n").map((l) => l.trim())
  .filter((l) => l !== "" && !l.startsWith("#"));
const releaseSh = await readText("scripts/release.sh");

const yamlFiles = (await walk("deploy")).filter((f) => /\.ya?ml$/.test(f));
const yamlDocs = new Map<string, unknown[]>();
for (const f of yamlFiles) yamlDocs.set(f, await loadYaml(f));

const k8sDocs: K8sDoc[] = [];
const kustomizations = new Map<string, Obj>();
for (const [file, docs] of yamlDocs) {
  if (!file.startsWith("deploy/kubernetes/")) continue;
  for (const [i, d] of docs.entries()) {
    const doc = obj(d, `${file}#${i}`);
    const kind = str(doc.kind, `${file}#${i} kind`);
    if (kind === "Kustomization") {
      kustomizations.set(file, doc);
      continue;
    }
    const meta = obj(doc.metadata, `${file} ${kind} metadata`);
    k8sDocs.push({
      file,
      apiVersion: str(doc.apiVersion, `${file} ${kind} apiVersion`),
      kind,
      name: str(meta.name, `${file} ${kind} metadata.name`),
      doc,
    });
  }
}

function k8s(kind: string): K8sDoc {
  const found = k8sDocs.filter((d) => d.kind === kind);
  assert.equal(found.length, 1, `expected exactly one ${kind} under deploy/kubernetes/`);
  return found[0];
}

const deployment = k8s("Deployment");
const deploySpec = obj(deployment.doc.spec, "Deployment spec");
const template = obj(deploySpec.template, "Deployment spec.template");
const podLabels = strRecord(
  obj(template.metadata, "pod template metadata").labels,
  "pod template labels",
);
const podSpec = obj(template.spec, "pod spec");
const containers = arr(podSpec.containers, "pod spec containers").map((c, i) =>
  obj(c, `container ${i}`)
);
const container = containers.find((c) => c.name === "dotproxy") ?? containers[0];
const containerPorts: ContainerPort[] = arr(container.ports, "container ports").map((p, i) => {
  const port = obj(p, `container port ${i}`);
  return {
    name: str(port.name, `container port ${i} name`),
    containerPort: num(port.containerPort, `container port ${i} containerPort`),
    protocol: port.protocol === undefined ? "TCP" : str(port.protocol, "protocol"),
  };
});

/** The container env as name -> value (undefined for valueFrom). */
const podEnv = new Map<string, string | undefined>();
for (const [i, e] of arr(container.env, "container env").entries()) {
  const entry = obj(e, `env ${i}`);
  const name = str(entry.name, `env ${i} name`);
  assert.ok(!podEnv.has(name), `Deployment env ${name} is set twice`);
  podEnv.set(name, entry.value === undefined ? undefined : str(entry.value, `env ${name}`));
}

function resolveContainerPort(port: unknown, what: string): ContainerPort[] {
  if (typeof port === "string") {
    const byName = containerPorts.filter((p) => p.name === port);
    assert.equal(byName.length, 1, `${what}: no container port named ${port}`);
    return byName;
  }
  const byNumber = containerPorts.filter((p) => p.containerPort === num(port, what));
  assert.ok(byNumber.length > 0, `${what}: no container port ${port}`);
  return byNumber;
}

const composeDocs = yamlDocs.get(COMPOSE_FILE);
assert.ok(composeDocs, `${COMPOSE_FILE} is missing`);
const compose = obj(composeDocs[0], COMPOSE_FILE);
const composeService = obj(obj(compose.services, "compose services").dotproxy, "services.dotproxy");

function composeEnv(): Map<string, string> {
  const env = composeService.environment;
  const out = new Map<string, string>();
  if (Array.isArray(env)) {
    for (const e of env) {
      const s = str(e, "compose environment entry");
      const eq = s.indexOf("=");
      assert.ok(eq > 0, `compose environment entry without '=': ${s}`);
      out.set(s.slice(0, eq), s.slice(eq + 1));
    }
  } else {
    for (const [k, v] of Object.entries(obj(env, "compose environment"))) {
      out.set(k, str(v, `compose environment ${k} (quote it)`));
    }
  }
  return out;
}

const buildStage = dockerfile.stages[0];
const runStage = dockerfile.stages[dockerfile.stages.length - 1];

function dockerEnv(): Map<string, string> {
  const out = new Map<string, string>();
  for (const ins of only(runStage, "ENV")) {
    for (const [k, v] of Object.entries(keyValues(ins.args))) out.set(k, v);
  }
  return out;
}

function dockerArgDefault(stage: Stage, name: string): string | undefined {
  for (const ins of only(stage, "ARG")) {
    const kv = keyValues(ins.args);
    if (name in kv) return kv[name];
  }
  return undefined;
}

function dockerHealthcheck(): { options: Record<string, string>; cmd: unknown } {
  const words = single(runStage, "HEALTHCHECK").args;
  const m = words.match(/^((?:--[a-z-]+=\S+\s+)*)CMD\s+(.*)$/s);
  assert.ok(m, `HEALTHCHECK must be --options... CMD [exec form]: ${words}`);
  const options: Record<string, string> = {};
  for (const o of shellWords(m[1])) {
    const [k, v] = o.slice(2).split("=");
    options[k] = v;
  }
  let cmd: unknown;
  try {
    cmd = JSON.parse(m[2]);
  } catch {
    assert.fail(`HEALTHCHECK CMD must be the exec (JSON) form, no shell in distroless: ${m[2]}`);
  }
  return { options, cmd };
}

function dockerUid(): number {
  const user = single(runStage, "USER").args.split(":")[0];
  const uids: Record<string, number> = { root: 0, nonroot: NONROOT_UID };
  const uid = /^\d+$/.test(user) ? Number(user) : uids[user];
  assert.ok(uid !== undefined, `USER ${user}: unknown user in the distroless image`);
  return uid;
}

// =============================================================================================
// Tests.

Deno.test("deploy: every YAML file under deploy/ is a compose file or a Kubernetes manifest", () => {
  assert.ok(yamlFiles.includes(COMPOSE_FILE));
  for (const file of yamlFiles) {
    if (file.startsWith("deploy/kubernetes/")) continue;
    for (const doc of yamlDocs.get(file) ?? []) {
      assert.ok(isObj(obj(doc, file).services), `${file}: not a compose file (no services)`);
    }
  }
  const keys = k8sDocs.map((d) => `${d.kind}/${d.name}`);
  assert.equal(new Set(keys).size, keys.length, `duplicate Kubernetes objects: ${keys}`);
  for (const d of k8sDocs) {
    const meta = obj(d.doc.metadata, `${d.file} metadata`);
    // No hard-coded namespace: `kubectl -n` and kustomize's `namespace:` must place them all.
    assert.equal(meta.namespace, undefined, `${d.file}: ${d.kind} has a hard-coded namespace`);
    const labels = strRecord(meta.labels ?? {}, `${d.file} labels`);
    assert.equal(labels["app.kubernetes.io/name"], "dotproxy", `${d.file}: ${d.kind} labels`);
  }
});

Deno.test("deploy: kustomization.yaml lists every manifest but the CRD-dependent ones", async () => {
  const kust = kustomizations.get("deploy/kubernetes/kustomization.yaml");
  assert.ok(kust, "deploy/kubernetes/kustomization.yaml is missing");
  assert.equal(kust.apiVersion, "kustomize.config.k8s.io/v1beta1");
  const resources = arr(kust.resources, "kustomization resources").map((r) => str(r, "resource"));
  for (const r of resources) {
    assert.ok(await exists(`deploy/kubernetes/${r}`), `kustomization lists missing ${r}`);
  }
  const manifests = yamlFiles.filter((f) => f.startsWith("deploy/kubernetes/"))
    .map((f) => f.slice("deploy/kubernetes/".length))
    .filter((f) => f !== "kustomization.yaml" && !f.includes("/"));
  const expected = manifests.filter((f) => !OPTIONAL_K8S_FILES.includes(f)).sort();
  assert.deepEqual([...resources].sort(), expected);
  for (const f of OPTIONAL_K8S_FILES) {
    assert.ok(!resources.includes(f), `${f} is optional and must stay out of kustomization`);
  }
  for (const kind of ["Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]) {
    assert.ok(resources.includes(k8s(kind).file.slice("deploy/kubernetes/".length)), kind);
  }
});

Deno.test("deploy: one image name in the Dockerfile, compose, Kubernetes and kustomize", async () => {
  const kust = kustomizations.get("deploy/kubernetes/kustomization.yaml");
  assert.ok(kust);
  const images = arr(kust.images, "kustomization images").map((i) => obj(i, "image"));
  assert.deepEqual(images.map((i) => [i.name, i.newTag]), [[IMAGE, VERSION]]);
  assert.ok(images[0].newName === undefined, "no other registry by default");
  // Every `name:version` reference in the shipping files is the one image.
  for (const file of ["Dockerfile", ...yamlFiles, "deploy/systemd/dotproxy.service"]) {
    const text = await readText(file);
    for (const m of text.matchAll(/([\w./-]*)dotproxy:(\d+\.\d+\.\d+)\b/g)) {
      assert.equal(`${m[1]}dotproxy`, IMAGE, `${file}: ${m[0]}`);
      assert.equal(m[2], VERSION, `${file}: ${m[0]}`);
    }
  }
});

Deno.test("deploy: the manifests listen on IPv6 and IPv4", () => {
  for (
    const [where, env] of [["Dockerfile", dockerEnv()], ["compose", composeEnv()], [
      "Deployment",
      podEnv,
    ]] as const
  ) {
    for (const name of ["DOTPROXY_LISTEN", "DOTPROXY_HTTP"]) {
      const value = env.get(name);
      assert.ok(value, `${where} ${name}`);
      const request = parseConfig([], (n) => n === "DOTPROXY_LISTEN" ? value : undefined);
      assert.ok(request.kind === "config");
      const hosts = request.config.listen.map((a) => a.hostname);
      // `::` is dual-stack: one socket takes both families (and 0.0.0.0 beside it cannot bind).
      assert.ok(hosts.includes("::"), `${where} ${name}=${value}: listen on [::]`);
    }
  }
});

Deno.test("deploy: Deployment runs 2+ replicas of the image with the container ports", () => {
  assert.equal(deployment.apiVersion, "apps/v1");
  assert.ok(num(deploySpec.replicas, "replicas") >= 2, "replicas must be >= 2");
  const selector = strRecord(
    obj(deploySpec.selector, "selector").matchLabels,
    "selector.matchLabels",
  );
  assert.ok(selects(selector, podLabels), "Deployment selector must match the pod labels");
  assert.equal(container.image, `${IMAGE}:${VERSION}`, "the released image, at the version");
  const ports = containerPorts.map((p) => `${p.name} ${p.containerPort}/${p.protocol}`).sort();
  assert.deepEqual(ports, [
    `dns-tcp ${DNS_PORT}/TCP`,
    `dns-udp ${DNS_PORT}/UDP`,
    `http ${HTTP_PORT}/TCP`,
  ]);
});

Deno.test("deploy: Deployment env follows the container conventions and names real settings", () => {
  for (const [name, value] of podEnv) checkEnv("Deployment", name, value);
  // Service links would inject DOTPROXY_SERVICE_HOST, DOTPROXY_PORT=udp://... and the like for
  // a Service named dotproxy: names the binary does not know, one of them clashing in spirit
  // with its own settings. They must be off.
  const clash = k8sDocs.some((d) => d.kind === "Service" && /^dotproxy/i.test(d.name));
  if (clash) assert.equal(podSpec.enableServiceLinks, false, "enableServiceLinks must be false");
  for (const [name, value] of Object.entries(CONTAINER_ENV)) {
    assert.equal(podEnv.get(name), value, `Deployment env ${name}`);
  }
  const listen = str(podEnv.get("DOTPROXY_LISTEN"), "DOTPROXY_LISTEN");
  assert.ok(listen.endsWith(`:${DNS_PORT}`), `DOTPROXY_LISTEN ${listen}`);
  const http = str(podEnv.get("DOTPROXY_HTTP"), "DOTPROXY_HTTP");
  assert.ok(http.endsWith(`:${HTTP_PORT}`), `DOTPROXY_HTTP ${http}`);
  assert.equal(
    portOf(http, "DOTPROXY_HTTP"),
    resolveContainerPort("http", "http")[0].containerPort,
  );
  for (const proto of ["UDP", "TCP"]) {
    assert.ok(
      containerPorts.some((p) =>
        p.protocol === proto && p.containerPort === portOf(listen, "DOTPROXY_LISTEN")
      ),
      `the DOTPROXY_LISTEN port must be a ${proto} container port`,
    );
  }
});

Deno.test("deploy: probes use /readyz and /healthz on the http port", () => {
  const probes: [string, string][] = [["readinessProbe", "/readyz"], ["livenessProbe", "/healthz"]];
  for (const [probe, path] of probes) {
    const get = obj(obj(container[probe], probe).httpGet, `${probe}.httpGet`);
    assert.equal(get.path, path, `${probe} path`);
    const [port] = resolveContainerPort(get.port, `${probe} port`);
    assert.equal(port.name, "http", `${probe} must hit the port named http`);
    assert.equal(port.containerPort, HTTP_PORT);
    assert.equal(port.protocol, "TCP");
  }
});

Deno.test("deploy: Deployment is locked down and has requests and limits", () => {
  const pod = obj(podSpec.securityContext ?? {}, "pod securityContext");
  const ctr = obj(container.securityContext, "container securityContext");
  const eff = (k: string): unknown => ctr[k] ?? pod[k];
  assert.equal(eff("runAsNonRoot"), true, "runAsNonRoot");
  assert.equal(eff("runAsUser"), NONROOT_UID, "runAsUser must be the image's nonroot uid");
  assert.equal(eff("runAsUser"), dockerUid(), "runAsUser must match the Dockerfile USER");
  assert.notEqual(eff("runAsGroup") ?? NONROOT_UID, 0, "runAsGroup");
  assert.equal(ctr.readOnlyRootFilesystem, true, "readOnlyRootFilesystem");
  assert.equal(ctr.allowPrivilegeEscalation, false, "allowPrivilegeEscalation");
  assert.notEqual(ctr.privileged, true, "privileged");
  const caps = obj(ctr.capabilities, "capabilities");
  assert.ok(arr(caps.drop, "capabilities.drop").includes("ALL"), "capabilities must drop ALL");
  assert.equal(caps.add, undefined, "no capabilities may be added");
  const seccomp = obj(eff("seccompProfile"), "seccompProfile");
  assert.equal(seccomp.type, "RuntimeDefault");
  assert.notEqual(podSpec.hostNetwork, true, "hostNetwork");
  // CoreDNS may forward to this Service: the proxy must not resolve through cluster DNS.
  assert.equal(podSpec.dnsPolicy, "Default", "dnsPolicy must be Default (no DNS loop)");

  const resources = obj(container.resources, "resources");
  const requests = obj(resources.requests, "resources.requests");
  const limits = obj(resources.limits, "resources.limits");
  for (const r of ["cpu", "memory"]) {
    const req = quantity(requests[r], `requests.${r}`);
    const lim = quantity(limits[r], `limits.${r}`);
    assert.ok(req > 0 && req <= lim, `${r}: request ${requests[r]} must be <= limit ${limits[r]}`);
  }
});

Deno.test("deploy: replicas are spread and Prometheus annotations point at /metrics", () => {
  const spreads = arr(podSpec.topologySpreadConstraints ?? [], "topologySpreadConstraints");
  const affinity = obj(obj(podSpec.affinity ?? {}, "affinity").podAntiAffinity ?? {}, "anti");
  const terms = [
    ...arr(affinity.preferredDuringSchedulingIgnoredDuringExecution ?? [], "preferred")
      .map((t) => obj(obj(t, "term").podAffinityTerm, "podAffinityTerm")),
    ...arr(affinity.requiredDuringSchedulingIgnoredDuringExecution ?? [], "required")
      .map((t) => obj(t, "term")),
  ];
  const rules = [...spreads.map((s) => obj(s, "spread")), ...terms];
  assert.ok(rules.length > 0, "replicas need a topology spread or pod anti-affinity");
  assert.ok(
    rules.some((r) => r.topologyKey === "kubernetes.io/hostname"),
    "replicas must be spread over nodes",
  );
  for (const r of rules) {
    const sel = strRecord(obj(r.labelSelector, "labelSelector").matchLabels, "matchLabels");
    assert.ok(selects(sel, podLabels), `spread rule ${r.topologyKey} must select the pods`);
  }

  const annotations = strRecord(
    obj(template.metadata, "pod metadata").annotations,
    "pod annotations",
  );
  assert.equal(annotations["prometheus.io/scrape"], "true");
  assert.equal(annotations["prometheus.io/port"], String(HTTP_PORT));
  assert.equal(annotations["prometheus.io/path"], "/metrics");
});

Deno.test("deploy: Service maps 53/UDP and 53/TCP to 5300 and selects the pods", () => {
  const service = k8s("Service");
  const spec = obj(service.doc.spec, "Service spec");
  assert.equal(spec.type ?? "ClusterIP", "ClusterIP");
  assert.ok(selects(strRecord(spec.selector, "Service selector"), podLabels), "Service selector");
  const ports = arr(spec.ports, "Service ports").map((p, i) => obj(p, `Service port ${i}`));
  const summary = ports.map((p) => {
    const protocol = p.protocol === undefined ? "TCP" : str(p.protocol, "protocol");
    const targets = resolveContainerPort(p.targetPort ?? p.port, `Service port ${p.name}`);
    assert.ok(
      targets.some((t) => t.protocol === protocol),
      `Service port ${p.name}: no ${protocol} container port ${p.targetPort}`,
    );
    const target = targets[0].containerPort;
    return `${p.name} ${num(p.port, "port")}/${protocol}->${target}`;
  }).sort();
  assert.deepEqual(summary, [
    `dns 53/UDP->${DNS_PORT}`,
    `dns-tcp 53/TCP->${DNS_PORT}`,
    `metrics ${HTTP_PORT}/TCP->${HTTP_PORT}`,
  ]);
});

Deno.test("deploy: PDB and HPA target the Deployment's pods", () => {
  const pdb = k8s("PodDisruptionBudget");
  assert.equal(pdb.apiVersion, "policy/v1");
  const pdbSpec = obj(pdb.doc.spec, "PDB spec");
  const pdbSel = strRecord(obj(pdbSpec.selector, "PDB selector").matchLabels, "PDB matchLabels");
  assert.ok(selects(pdbSel, podLabels), "PDB selector must match the pod labels");
  assert.equal(pdbSpec.minAvailable, 1);

  const hpa = k8s("HorizontalPodAutoscaler");
  assert.equal(hpa.apiVersion, "autoscaling/v2");
  const hpaSpec = obj(hpa.doc.spec, "HPA spec");
  const ref = obj(hpaSpec.scaleTargetRef, "scaleTargetRef");
  assert.deepEqual(
    { apiVersion: ref.apiVersion, kind: ref.kind, name: ref.name },
    { apiVersion: deployment.apiVersion, kind: "Deployment", name: deployment.name },
  );
  const min = num(hpaSpec.minReplicas, "minReplicas");
  const max = num(hpaSpec.maxReplicas, "maxReplicas");
  assert.ok(min >= 2, "minReplicas must be >= 2");
  assert.ok(max >= min, "maxReplicas must be >= minReplicas");
  const replicas = num(deploySpec.replicas, "replicas");
  assert.ok(replicas >= min && replicas <= max, "Deployment replicas must lie in the HPA range");
  // A drain must be able to evict a pod: fewer than the fewest replicas must be required.
  assert.ok(num(pdbSpec.minAvailable, "minAvailable") < Math.min(min, replicas));
  const cpu = arr(hpaSpec.metrics, "HPA metrics").map((m) => obj(m, "metric")).find((m) =>
    m.type === "Resource" && obj(m.resource, "resource").name === "cpu"
  );
  assert.ok(cpu, "HPA must scale on CPU");
  const target = obj(obj(cpu.resource, "resource").target, "target");
  assert.equal(target.type, "Utilization");
  const utilization = num(target.averageUtilization, "averageUtilization");
  assert.ok(utilization > 0 && utilization <= 100);
  // Utilization is relative to the request, so the container must request CPU.
  const requests = obj(obj(container.resources, "resources").requests, "requests");
  assert.ok(quantity(requests.cpu, "requests.cpu") > 0);
});

Deno.test("deploy: ServiceMonitor scrapes /metrics from the Service's metrics port", () => {
  const sm = k8s("ServiceMonitor");
  assert.equal(sm.apiVersion, "monitoring.coreos.com/v1");
  const service = k8s("Service");
  const spec = obj(sm.doc.spec, "ServiceMonitor spec");
  const sel = strRecord(obj(spec.selector, "selector").matchLabels, "matchLabels");
  const serviceLabels = strRecord(obj(service.doc.metadata, "meta").labels, "Service labels");
  assert.ok(selects(sel, serviceLabels), "ServiceMonitor must select the Service's labels");
  const servicePorts = arr(obj(service.doc.spec, "spec").ports, "ports").map((p) => obj(p, "port"));
  for (const e of arr(spec.endpoints, "endpoints")) {
    const ep = obj(e, "endpoint");
    assert.equal(ep.path, "/metrics");
    const port = servicePorts.find((p) => p.name === ep.port);
    assert.ok(port, `ServiceMonitor port ${ep.port} is not a Service port name`);
    assert.equal(port.targetPort, HTTP_PORT);
  }
});

Deno.test("deploy: docker-compose.yml agrees with the image and binds only to localhost", async () => {
  const build = obj(composeService.build, "compose build");
  const context = new URL(`${str(build.context, "build.context")}/`, new URL("deploy/", ROOT));
  assert.equal(context.href, ROOT.href, "build context must be the repository root");
  assert.equal(build.dockerfile ?? "Dockerfile", "Dockerfile");
  assert.ok(await exists("Dockerfile"));
  const args = strRecord(build.args ?? {}, "build.args");
  assert.equal(args.VERSION, VERSION, "build arg VERSION must be the release version");
  assert.equal(composeService.image, `${IMAGE}:${VERSION}`);
  assert.equal(composeService.image, container.image, "compose and Kubernetes image differ");

  const env = composeEnv();
  for (const [name, value] of env) checkEnv(COMPOSE_FILE, name, value);
  const image = dockerEnv();
  for (const [name, value] of env) {
    if (image.has(name)) assert.equal(value, image.get(name), `compose ${name} vs Dockerfile`);
  }
  const listen = portOf(env.get("DOTPROXY_LISTEN") ?? image.get("DOTPROXY_LISTEN") ?? "", "L");
  const http = portOf(env.get("DOTPROXY_HTTP") ?? image.get("DOTPROXY_HTTP") ?? "", "HTTP");

  const ports = arr(composeService.ports, "compose ports").map((p) => {
    const s = str(p, "compose port (use the quoted short syntax)");
    const m = s.match(/^(?:([\d.]+|\[[0-9a-fA-F:]+\]):)?(\d+):(\d+)(?:\/(udp|tcp))?$/);
    assert.ok(m, `compose port not IP:HOST:CONTAINER[/PROTO]: ${s}`);
    assert.equal(m[1], "127.0.0.1", `compose port ${s} must bind to 127.0.0.1 only`);
    return `${m[2]}->${m[3]}/${m[4] ?? "tcp"}`;
  }).sort();
  assert.deepEqual(ports, [`53->${listen}/tcp`, `53->${listen}/udp`, `${http}->${http}/tcp`]);
  assert.equal(listen, DNS_PORT);
  assert.equal(http, HTTP_PORT);

  const hc = obj(composeService.healthcheck, "compose healthcheck");
  assert.deepEqual(hc.test, ["CMD", ...HEALTHCHECK_CMD]);
  const docker = dockerHealthcheck().options;
  for (const k of ["interval", "timeout", "start_period"]) {
    const dockerKey = k.replace("_", "-");
    assert.equal(
      seconds(str(hc[k], `healthcheck.${k}`)),
      seconds(docker[dockerKey]),
      `compose healthcheck ${k} vs Dockerfile --${dockerKey}`,
    );
  }
  assert.equal(hc.retries, Number(docker.retries));

  assert.equal(composeService.read_only, true, "read_only");
  assert.ok(arr(composeService.cap_drop, "cap_drop").includes("ALL"), "cap_drop ALL");
  assert.equal(composeService.cap_add, undefined, "cap_add");
  assert.ok(
    arr(composeService.security_opt, "security_opt").includes("no-new-privileges:true"),
    "no-new-privileges",
  );
  assert.equal(composeService.restart, "unless-stopped");
  assert.notEqual(composeService.privileged, true);
  assert.notEqual(composeService.network_mode, "host");
  if (composeService.user !== undefined) {
    assert.equal(str(composeService.user, "user").split(":")[0], String(dockerUid()));
  }
});

Deno.test("deploy: Dockerfile builds with Deno and runs on distroless as nonroot", () => {
  assert.equal(dockerfile.stages.length, 2, "two stages: build and run");
  assert.deepEqual(dockerfile.preamble.filter((i) => i.cmd !== "ARG"), [], "only ARG before FROM");
  const [from, tag] = buildStage.from.split("@")[0].split(":");
  assert.equal(from, "denoland/deno", "build stage must use the official Deno image");
  assert.match(tag ?? "", /^\d+\.\d+\.\d+$/, "the Deno image must be pinned to a version");
  assert.equal(buildStage.name, "build");
  assert.equal(single(buildStage, "WORKDIR").args, "/app");
  assert.match(runStage.from, /^gcr\.io\/distroless\/cc-debian12:nonroot(@sha256:[0-9a-f]{64})?$/);

  const copy = single(runStage, "COPY");
  const words = shellWords(copy.args);
  assert.deepEqual(words, [`--from=${buildStage.name}`, outputOf(compileLine()), BINARY]);
  assert.ok(dockerUid() !== 0, "USER must not be root");
  assert.equal(dockerUid(), NONROOT_UID);

  const exposed = shellWords(only(runStage, "EXPOSE").map((i) => i.args).join(" "))
    .map((p) => p.includes("/") ? p.toLowerCase() : `${p}/tcp`).sort();
  assert.deepEqual(exposed, [`${DNS_PORT}/tcp`, `${DNS_PORT}/udp`, `${HTTP_PORT}/tcp`]);
  assert.deepEqual(JSON.parse(single(runStage, "ENTRYPOINT").args), [BINARY]);
  assert.equal(single(runStage, "STOPSIGNAL").args, "SIGTERM");

  const hc = dockerHealthcheck();
  assert.deepEqual(hc.cmd, HEALTHCHECK_CMD);
  for (const k of ["interval", "timeout", "start-period"]) {
    assert.ok(hc.options[k], `HEALTHCHECK --${k}`);
  }
  assert.ok(seconds(hc.options.timeout) < seconds(hc.options.interval));
  assert.ok(Number(hc.options.retries) >= 1);

  const env = dockerEnv();
  for (const [name, value] of env) checkEnv("Dockerfile", name, value);
  for (const [name, value] of Object.entries(CONTAINER_ENV)) {
    assert.equal(env.get(name), value, `Dockerfile ENV ${name}`);
  }
});

/** parseConfig as main.ts runs it in the image: the image's ENV, then `env` over it. */
function imageConfig(args: string[], env: ReadonlyMap<string, string | undefined> = new Map()) {
  const all = new Map<string, string>(dockerEnv());
  for (const [name, value] of env) if (value !== undefined) all.set(name, value);
  return parseConfig(args, (name) => all.get(name), [...all.keys()]);
}

Deno.test("deploy: the image's HEALTHCHECK checks where the server serves, flags or not", () => {
  // Docker runs HEALTHCHECK with the container's environment, never with the arguments given
  // after the image name: those settings must come from the environment in the image.
  assert.equal(dockerEnv().get("DOTPROXY_CONTAINER"), "true", "Dockerfile ENV DOTPROXY_CONTAINER");
  assert.deepEqual(dockerHealthcheck().cmd, HEALTHCHECK_CMD, "no flags in the HEALTHCHECK");
  const serve = imageConfig([]);
  const check = imageConfig(["healthcheck"]);
  assert.ok(serve.kind === "config" && check.kind === "config");
  assert.deepEqual(check.config.listen, serve.config.listen);
  assert.deepEqual(check.config.http, serve.config.http);
  assert.deepEqual(check.config.allow, serve.config.allow);
  for (
    const [flag, value, variable] of [
      ["--listen", "0.0.0.0:53", "DOTPROXY_LISTEN"],
      ["--http", "0.0.0.0:9153", "DOTPROXY_HTTP"],
      ["--allow", "10.0.0.0/8", "DOTPROXY_ALLOW"],
    ]
  ) {
    assert.throws(() => imageConfig([flag, value]), (error: unknown) => {
      assert.ok(error instanceof ConfigError, String(error));
      assert.ok(
        error.message.includes(`it must be the variable ${variable}`) &&
          error.message.includes(`docker run -e ${variable}=${value}`),
        error.message,
      );
      return true;
    });
  }
  // Settings the check does not need may still be flags after the image name.
  const flags = imageConfig(["--log-level", "debug", "--upstream", "9.9.9.9#dns.quad9.net"]);
  assert.equal(flags.kind, "config");
  // What compose and Kubernetes pass runs in the image as it is.
  const composeCommand = composeService.command === undefined
    ? []
    : arr(composeService.command, "compose command").map((w) => str(w, "command"));
  imageConfig(composeCommand, composeEnv());
  const podArgs = container.args === undefined
    ? []
    : arr(container.args, "container args").map((w) => str(w, "args"));
  imageConfig(podArgs, podEnv);
});

Deno.test("deploy: Dockerfile OCI labels carry the release version", () => {
  assert.equal(dockerArgDefault(runStage, "VERSION"), VERSION, "ARG VERSION default");
  const labels: Record<string, string> = {};
  for (const ins of only(runStage, "LABEL")) Object.assign(labels, keyValues(ins.args));
  for (const k of ["title", "description", "source", "licenses", "version"]) {
    assert.ok(labels[`org.opencontainers.image.${k}`], `label org.opencontainers.image.${k}`);
  }
  assert.equal(labels["org.opencontainers.image.title"], "dotproxy");
  assert.equal(labels["org.opencontainers.image.version"], "${VERSION}");
});

Deno.test("deploy: LICENSE is the license the image's label names; CHANGELOG and SECURITY cover the version", async () => {
  const labels: Record<string, string> = {};
  for (const ins of only(runStage, "LABEL")) Object.assign(labels, keyValues(ins.args));
  assert.equal(labels["org.opencontainers.image.licenses"], "MIT");
  const license = await readText("LICENSE");
  assert.match(license, /^MIT License\n\nCopyright \(c\) 2026 the dotproxy authors\n/);
  assert.match(license, /THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND/);

  // Keep a Changelog: Unreleased first, then each version with a date, newest first.
  const changelog = await readText("CHANGELOG.md");
  const versions = [...changelog.matchAll(/^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$/gm)];
  assert.equal(versions[0]?.[1], "Unreleased", "## [Unreleased] comes first");
  const current = versions.find((v) => v[1] === VERSION);
  assert.ok(current?.[2], `CHANGELOG.md: ## [${VERSION}] - YYYY-MM-DD`);
  for (const v of versions) {
    assert.match(changelog, new RegExp(`^\\[${v[1].replaceAll(".", "\\.")}\\]: https://`, "m"));
  }

  const security = await readText("SECURITY.md");
  assert.match(security, /^## Reporting a vulnerability$/m);
  assert.match(security, /^## Supported versions$/m);
  assert.match(security, /^## Scope$/m);
  const minor = VERSION.split(".").slice(0, 2).join(".");
  assert.ok(security.includes(`| ${minor}.x`), `SECURITY.md: a row for ${minor}.x`);
});

function compileLine(): string {
  const runs = only(buildStage, "RUN").filter((i) => /\bdeno\s+compile\b/.test(i.args));
  assert.equal(runs.length, 1, "one `RUN deno compile` in the build stage");
  return runs[0].args;
}

Deno.test("deploy: every compile grants exactly --allow-net --allow-env", () => {
  const tasks = obj(denoJson.tasks, "deno.json tasks");
  const lines: [string, string][] = [
    ["deno.json compile task", str(tasks.compile, "tasks.compile")],
    ["Dockerfile", compileLine()],
  ];
  const releaseLines = releaseSh.split("\n").filter((l) => /^\s*deno\s+compile\b/.test(l));
  assert.equal(releaseLines.length, 1, "scripts/release.sh: one deno compile line");
  lines.push(["scripts/release.sh", releaseLines[0]]);
  for (const [where, line] of lines) {
    assert.match(line, /\bdeno\s+compile\b/, where);
    const flags = denoFlags(line);
    assert.deepEqual(flags.allow, ALLOW_FLAGS, `${where}: permissions`);
    assert.deepEqual(flags.unstable, ["--unstable-net"], `${where}: unstable flags`);
    assert.ok(shellWords(line).includes("main.ts"), `${where}: compiles main.ts`);
  }
});

Deno.test("deploy: release.sh builds every target and checksums them", () => {
  const m = releaseSh.match(/ALL_TARGETS=\(([^)]*)\)/);
  assert.ok(m, "scripts/release.sh: ALL_TARGETS=(...)");
  assert.deepEqual(shellWords(m[1]), RELEASE_TARGETS);
  assert.match(releaseSh, /^set -euo pipefail$/m);
  assert.match(releaseSh, /--target "\$\{target\}"/);
  assert.match(releaseSh, /dotproxy-\$\{target\}/);
  assert.match(releaseSh, /\.exe/);
  assert.match(releaseSh, /sha256sum/);
  assert.match(releaseSh, />\s*SHA256SUMS/);
});

Deno.test("deploy: .dockerignore keeps the context small but lets in what the build copies", async () => {
  const sources: string[] = [];
  for (const ins of only(buildStage, "COPY")) {
    const words = shellWords(ins.args).filter((w) => !w.startsWith("--"));
    assert.ok(words.length >= 2, `COPY needs sources and a destination: ${ins.args}`);
    sources.push(...words.slice(0, -1).map((w) => w.replace(/\/+$/, "")));
  }
  assert.deepEqual([...sources].sort(), ["deno.json", "deno.lock", "main.ts", "src"]);
  for (const source of sources) {
    assert.ok(await exists(source), `the Dockerfile copies ${source}, which does not exist`);
    const info = await Deno.stat(new URL(source, ROOT));
    const files = info.isDirectory ? await walk(source) : [source];
    for (const f of files.filter((f) => f.endsWith(".ts") || !info.isDirectory)) {
      assert.ok(!dockerIgnored(dockerignore, f), `.dockerignore leaves out ${f}`);
    }
  }
  for (
    const path of [
      ".git/HEAD",
      "dist/dotproxy-x86_64-unknown-linux-gnu",
      "bench/results/latest.json",
      "tests/deploy_test.ts",
      "deploy/docker-compose.yml",
      "dotproxy",
    ]
  ) {
    assert.ok(dockerIgnored(dockerignore, path), `.dockerignore must leave out ${path}`);
  }
});

Deno.test("deploy: the systemd unit sets real settings and can bind its port", async () => {
  const unit = await readText("deploy/systemd/dotproxy.service");
  const settings = unit.split("\n").map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("#") && !l.startsWith("["))
    .map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]);
  const get = (k: string): string[] => settings.filter(([key]) => key === k).map(([, v]) => v);
  assert.match(get("ExecStart")[0] ?? "", /^\/usr\/local\/bin\/dotproxy(\s|$)/);
  const env = new Map<string, string>();
  for (const e of get("Environment")) {
    for (const w of shellWords(e)) env.set(w.slice(0, w.indexOf("=")), w.slice(w.indexOf("=") + 1));
  }
  for (const [name, value] of env) checkEnv("dotproxy.service", name, value);
  const listen = env.get("DOTPROXY_LISTEN");
  assert.ok(listen, "the unit must set DOTPROXY_LISTEN");
  for (const a of listen.split(",")) {
    if (portOf(a, "DOTPROXY_LISTEN") < 1024) {
      assert.ok(get("AmbientCapabilities").join(" ").includes("CAP_NET_BIND_SERVICE"));
      assert.ok(get("CapabilityBoundingSet").join(" ").includes("CAP_NET_BIND_SERVICE"));
    }
  }
  assert.deepEqual(get("NoNewPrivileges"), ["yes"]);
  assert.deepEqual(get("DynamicUser"), ["yes"]);
  // V8 compiles JavaScript to machine code at run time.
  assert.deepEqual(get("MemoryDenyWriteExecute"), [], "MemoryDenyWriteExecute breaks V8");
});

Deno.test("deploy: the test's .dockerignore matcher follows Docker's rules", () => {
  assert.ok(dockerIgnored(["*"], "src/a.ts"));
  assert.ok(!dockerIgnored(["*", "!src/"], "src/dns/a.ts"));
  assert.ok(dockerIgnored(["*", "!src/", "**/*.swp"], "src/dns/.a.ts.swp"));
  assert.ok(dockerIgnored(["bench/results"], "bench/results/x/y.json"));
  assert.ok(!dockerIgnored(["bench/results"], "bench/run.ts"));
  assert.ok(!dockerIgnored([".git"], "src/.github"));
});

Deno.test("deploy: the test's helpers parse what they claim to", () => {
  assert.deepEqual(shellWords(`a "b c" 'd' e\\ f`), ["a", "b c", "d", "e f"]);
  assert.deepEqual(denoFlags("deno compile -A --allow-read --unstable-net x").allow, [
    "--allow-read",
    "-A",
  ]);
  assert.equal(seconds("1m30s"), 90);
  assert.equal(quantity("100m", "q"), 0.1);
  assert.equal(quantity("64Mi", "q"), 64 * 2 ** 20);
  assert.throws(() => checkEnv("t", "DOTPROXY_LISTN", "0.0.0.0:5300"));
  assert.throws(() => checkEnv("t", "DOTPROXY_CA_CERTS", "/etc/ssl/ca.pem"));
  assert.throws(() => checkEnv("t", "DOTPROXY_LISTEN", "0.0.0.0"));
  assert.doesNotThrow(() => checkEnv("t", "DOTPROXY_UPSTREAMS", "9.9.9.9#dns.quad9.net,[::1]:853"));
  const df = parseDockerfile('FROM a AS b\n# c\nENV X=1 \\\n  # inner\n  Y="2 3"\nFROM d\n');
  assert.deepEqual(df.stages.map((s) => [s.from, s.name]), [["a", "b"], ["d", undefined]]);
  assert.deepEqual(keyValues(df.stages[0].instructions[0].args), { X: "1", Y: "2 3" });
  assert.deepEqual(parseYaml("a: on", { version: "1.1" }), { a: true });
});

// =============================================================================================
// Release workflows (.github/workflows/), heap sizing and shutdown grace periods.

const CI_WORKFLOW = ".github/workflows/ci.yml";
const RELEASE_WORKFLOW = ".github/workflows/release.yml";
/** The platforms the release image is built for. */
const IMAGE_PLATFORMS = ["linux/amd64", "linux/arm64"];
/** The heap cap leaves this share of the container memory limit for everything but the heap. */
const MAX_HEAP_SHARE = 0.7;

/**
 * A workflow file parsed as GitHub Actions does: YAML 1.2, so `on:` is a key and not the boolean
 * YAML 1.1 makes of it. Any error (duplicate keys included) fails.
 */
async function loadWorkflow(rel: string): Promise<Obj> {
  let doc: unknown;
  try {
    doc = parseYaml(await readText(rel), { version: "1.2" });
  } catch (error) {
    assert.fail(`${rel}: ${error instanceof Error ? error.message : error}`);
  }
  return obj(doc, rel);
}

interface WorkflowStep {
  job: string;
  uses: string | undefined;
  run: string | undefined;
  with: Obj;
}

function workflowJobs(workflow: Obj, file: string): Map<string, Obj> {
  const jobs = new Map<string, Obj>();
  for (const [id, job] of Object.entries(obj(workflow.jobs, `${file} jobs`))) {
    jobs.set(id, obj(job, `${file} job ${id}`));
  }
  assert.ok(jobs.size > 0, `${file}: no jobs`);
  return jobs;
}

function workflowSteps(workflow: Obj, file: string): WorkflowStep[] {
  const out: WorkflowStep[] = [];
  for (const [id, job] of workflowJobs(workflow, file)) {
    for (const [i, s] of arr(job.steps, `${file} ${id} steps`).entries()) {
      const step = obj(s, `${file} ${id} step ${i}`);
      out.push({
        job: id,
        uses: step.uses === undefined ? undefined : str(step.uses, `${file} ${id} step ${i} uses`),
        run: step.run === undefined ? undefined : str(step.run, `${file} ${id} step ${i} run`),
        with: obj(step.with ?? {}, `${file} ${id} step ${i} with`),
      });
    }
  }
  return out;
}

/** The permissions a job ends up with: its own, else the workflow's. */
function jobPermissions(workflow: Obj, job: Obj, what: string): Record<string, string> {
  const permissions = job.permissions ?? workflow.permissions;
  assert.notEqual(permissions, undefined, `${what}: permissions must be explicit`);
  assert.ok(isObj(permissions), `${what}: permissions must be a mapping, not ${permissions}`);
  return strRecord(permissions, `${what} permissions`);
}

/** Checks pinning and privileges every workflow must have. */
function checkWorkflowHygiene(file: string, workflow: Obj): void {
  for (const step of workflowSteps(workflow, file)) {
    if (step.uses === undefined) continue;
    const pinned = step.uses.startsWith("./") ||
      /^docker:\/\/[^@\s]+@sha256:[0-9a-f]{64}$/.test(step.uses) ||
      /^[\w.-]+\/[\w./-]+@[0-9a-f]{40}$/.test(step.uses);
    assert.ok(pinned, `${file} ${step.job}: ${step.uses} must be pinned by full commit SHA`);
  }
  // The workflow-wide default grants nothing that writes.
  const top = workflow.permissions;
  assert.ok(isObj(top), `${file}: top-level permissions must be a mapping ({} or read-only)`);
  for (const [scope, level] of Object.entries(strRecord(top, `${file} permissions`))) {
    assert.notEqual(level, "write", `${file}: top-level ${scope}: write; grant it per job`);
  }
  for (const [id, job] of workflowJobs(workflow, file)) {
    jobPermissions(workflow, job, `${file} job ${id}`);
    assert.ok(typeof job["timeout-minutes"] === "number", `${file} job ${id}: timeout-minutes`);
  }
}

/** Jobs granted `level` on `scope`. */
function jobsWith(workflow: Obj, file: string, scope: string, level: string): string[] {
  return [...workflowJobs(workflow, file)]
    .filter(([id, job]) => jobPermissions(workflow, job, `${file} ${id}`)[scope] === level)
    .map(([id]) => id);
}

Deno.test("deploy: workflows pin every action by commit SHA and grant least privilege", async () => {
  for (const file of [CI_WORKFLOW, RELEASE_WORKFLOW]) {
    checkWorkflowHygiene(file, await loadWorkflow(file));
    // No owner is hard-coded: forks and the canonical repository publish to their own places.
    const text = await readText(file);
    assert.doesNotMatch(
      text,
      /ghcr\.io\/(?!\$)/i,
      `${file}: use ghcr.io/\${{ github.repository }}`,
    );
    assert.doesNotMatch(text, /github\.com\/[\w-]+\/dotproxy/i, `${file}: hard-coded owner`);
  }
});

Deno.test("deploy: ci.yml runs .ci/run on every push and pull request, read-only", async () => {
  const ci = await loadWorkflow(CI_WORKFLOW);
  const on = obj(ci.on, "ci on");
  assert.ok("push" in on && "pull_request" in on, "ci runs on push and pull_request");
  const steps = workflowSteps(ci, CI_WORKFLOW);
  assert.ok(steps.some((s) => /(^|\s|\/)\.ci\/run\b/.test(s.run ?? "")), "ci runs .ci/run");
  for (const [id, job] of workflowJobs(ci, CI_WORKFLOW)) {
    const permissions = jobPermissions(ci, job, `ci job ${id}`);
    assert.ok(Object.values(permissions).every((l) => l !== "write"), `ci job ${id} writes`);
  }
});

Deno.test("deploy: release.yml tests, builds every target with SHA256SUMS, publishes, pushes the image", async () => {
  const release = await loadWorkflow(RELEASE_WORKFLOW);
  const file = RELEASE_WORKFLOW;
  const on = obj(release.on, "release on");
  assert.deepEqual(Object.keys(on), ["push"], "release runs on tag pushes only");
  const push = obj(on.push, "release on.push");
  assert.deepEqual(arr(push.tags, "on.push.tags"), ["v*"]);
  assert.equal(push.branches, undefined);

  const jobs = workflowJobs(release, file);
  const steps = workflowSteps(release, file);
  // The tests gate everything else.
  const testJobs = [
    ...new Set(steps.filter((s) => /\.ci\/run\b/.test(s.run ?? "")).map((s) => s.job)),
  ];
  assert.equal(testJobs.length, 1, "one job runs .ci/run");
  for (const [id, job] of jobs) {
    if (id === testJobs[0]) continue;
    const needs = job.needs === undefined ? [] : [job.needs].flat();
    assert.ok(needs.includes(testJobs[0]), `release job ${id} must need ${testJobs[0]}`);
  }

  // Binaries: scripts/release.sh with every target, compiled with the compile task's permissions.
  const builds = steps.filter((s) => /scripts\/release\.sh\b/.test(s.run ?? ""));
  assert.equal(builds.length, 1, "one step runs scripts/release.sh");
  const args = shellWords(str(builds[0].run, "release.sh step").trim());
  const targets = args.slice(args.findIndex((w) => /scripts\/release\.sh$/.test(w)) + 1);
  const all = releaseSh.match(/ALL_TARGETS=\(([^)]*)\)/);
  assert.ok(all, "scripts/release.sh: ALL_TARGETS=(...)");
  assert.deepEqual(
    targets.length === 0 ? shellWords(all[1]) : targets,
    RELEASE_TARGETS,
    "release.yml must build the five targets",
  );
  const compileTask = str(obj(denoJson.tasks, "tasks").compile, "tasks.compile");
  const releaseCompile = releaseSh.split("\n").filter((l) => /^\s*deno\s+compile\b/.test(l));
  assert.equal(releaseCompile.length, 1);
  assert.deepEqual(denoFlags(releaseCompile[0]).allow, denoFlags(compileTask).allow);
  assert.deepEqual(denoFlags(compileTask).allow, ALLOW_FLAGS);
  for (const step of steps) {
    // Any compile in the workflow itself grants exactly what the compile task grants.
    for (const line of (step.run ?? "").split("\n").filter((l) => /\bdeno\s+compile\b/.test(l))) {
      assert.deepEqual(denoFlags(line).allow, ALLOW_FLAGS, `release.yml: ${line}`);
    }
  }
  assert.match(releaseSh, /sha256[^\n]*>\s*SHA256SUMS/, "release.sh writes SHA256SUMS");

  // Published as release assets, SHA256SUMS included, by the only job that may write contents.
  const publish = steps.filter((s) =>
    /\bgh\s+release\s+(create|upload)\b/.test(s.run ?? "") ||
    (s.uses ?? "").startsWith("softprops/action-gh-release@")
  );
  assert.equal(publish.length, 1, "one step publishes the release");
  const published = JSON.stringify(publish[0]);
  assert.match(published, /dist\/SHA256SUMS/, "SHA256SUMS is a release asset");
  assert.match(published, /dist\/dotproxy-\*/, "every binary is a release asset");
  assert.deepEqual(jobsWith(release, file, "contents", "write"), [publish[0].job]);
  const builtIn = builds[0].job;
  assert.equal(publish[0].job, builtIn, "published from the job that built them");

  // The image: both platforms, pushed to ghcr.io/<repository> as the version and latest.
  const images = steps.filter((s) => (s.uses ?? "").startsWith("docker/build-push-action@"));
  assert.equal(images.length, 1, "one docker/build-push-action step");
  const image = images[0];
  const platforms = str(image.with.platforms, "platforms").split(",").map((p) => p.trim());
  assert.deepEqual([...platforms].sort(), IMAGE_PLATFORMS);
  assert.equal(image.with.push, true);
  assert.ok(image.with.provenance !== undefined && image.with.provenance !== false, "provenance");
  assert.equal(image.with.sbom, true, "SBOM attestation");
  assert.deepEqual(jobsWith(release, file, "packages", "write"), [image.job]);
  const imageJob = JSON.stringify(jobs.get(image.job));
  assert.match(imageJob, /ghcr\.io\/\$\{(GITHUB_REPOSITORY,,|\{ github\.repository \}\})/);
  assert.match(imageJob, /:latest\b/);
  assert.match(imageJob, /GITHUB_REF_NAME#v|github\.ref_name/, "tagged with the version");
});

/** The value of `--v8-flags=` in a command line, as a list of flags. */
function v8Flags(line: string, where: string): string[] {
  const flag = shellWords(line).find((w) => w.startsWith("--v8-flags="));
  assert.ok(flag, `${where}: no --v8-flags=`);
  return flag.slice("--v8-flags=".length).split(",");
}

Deno.test("deploy: the image and release binaries cap V8's heap below the memory limit", () => {
  const releaseLine = releaseSh.split("\n").find((l) => /^\s*deno\s+compile\b/.test(l)) ?? "";
  const image = v8Flags(compileLine(), "Dockerfile");
  assert.deepEqual(v8Flags(releaseLine, "scripts/release.sh"), image, "the same V8 flags");
  const oldSpace = image.find((f) => f.startsWith("--max-old-space-size="));
  assert.ok(oldSpace, "--max-old-space-size= must be set");
  const heapMiB = Number(oldSpace.split("=")[1]);
  const limits = obj(obj(container.resources, "resources").limits, "resources.limits");
  const limitMiB = quantity(limits.memory, "limits.memory") / 2 ** 20;
  assert.ok(
    heapMiB >= 64 && heapMiB <= limitMiB * MAX_HEAP_SHARE,
    `old space ${heapMiB} MiB for a ${limitMiB} MiB limit`,
  );
  if (composeService.mem_limit !== undefined) {
    const compose = str(composeService.mem_limit, "compose mem_limit").replace(/m$/i, "Mi");
    assert.equal(quantity(compose, "mem_limit") / 2 ** 20, limitMiB, "compose and Kubernetes");
  }
});

/** The shutdown delay and timeout, in seconds, that `env` configures. */
function shutdownSeconds(env: ReadonlyMap<string, string | undefined>): number {
  const names = ["DOTPROXY_SHUTDOWN_DELAY_MS", "DOTPROXY_SHUTDOWN_TIMEOUT_MS"];
  const request = parseConfig([], (n) => names.includes(n) ? env.get(n) : undefined);
  assert.equal(request.kind, "config");
  if (request.kind !== "config") return 0;
  return (request.config.shutdownDelayMs + request.config.shutdownTimeoutMs) / 1000;
}

Deno.test("deploy: grace periods outlast the shutdown delay and timeout", async () => {
  const delay = podEnv.get("DOTPROXY_SHUTDOWN_DELAY_MS");
  assert.ok(delay !== undefined && Number(delay) > 0, "the Deployment sets a shutdown delay");
  const grace = num(podSpec.terminationGracePeriodSeconds, "terminationGracePeriodSeconds");
  const needed = shutdownSeconds(podEnv);
  assert.ok(grace >= needed + 5, `terminationGracePeriodSeconds ${grace} < ${needed} + 5`);

  const composeGrace = seconds(str(composeService.stop_grace_period, "stop_grace_period"));
  const composeNeeds = shutdownSeconds(composeEnv());
  assert.ok(composeGrace >= composeNeeds + 2, `compose stop_grace_period ${composeGrace}s`);

  const unit = await readText("deploy/systemd/dotproxy.service");
  const stop = unit.match(/^TimeoutStopSec=(\S+)$/m);
  assert.ok(stop, "the unit sets TimeoutStopSec");
  const unitEnv = new Map<string, string>();
  for (const m of unit.matchAll(/^Environment=(\S+?)=(.*)$/gm)) unitEnv.set(m[1], m[2]);
  assert.ok(seconds(stop[1]) >= shutdownSeconds(unitEnv) + 2, `TimeoutStopSec=${stop[1]}`);
});

Deno.test("deploy: the NetworkPolicy example admits DNS from anywhere, the HTTP port from named sources only", () => {
  const policy = k8s("NetworkPolicy");
  assert.equal(policy.apiVersion, "networking.k8s.io/v1");
  const spec = obj(policy.doc.spec, "NetworkPolicy spec");
  const selector = strRecord(obj(spec.podSelector, "podSelector").matchLabels, "matchLabels");
  assert.ok(selects(selector, podLabels), "the policy must select the pods");
  const rules = arr(spec.ingress, "ingress").map((r, i) => obj(r, `ingress ${i}`));
  const portsOf = (rule: Obj) =>
    arr(rule.ports, "ports").map((p) => {
      const port = obj(p, "port");
      return `${num(port.port, "port")}/${str(port.protocol, "protocol")}`;
    });
  const dns = rules.filter((r) => portsOf(r).includes(`${DNS_PORT}/UDP`));
  assert.equal(dns.length, 1);
  assert.deepEqual(portsOf(dns[0]).sort(), [`${DNS_PORT}/TCP`, `${DNS_PORT}/UDP`]);
  assert.equal(dns[0].from, undefined, "DNS from any source");
  const http = rules.filter((r) => portsOf(r).includes(`${HTTP_PORT}/TCP`));
  assert.equal(http.length, 1);
  const from = arr(http[0].from, "HTTP port sources").map((f, i) => obj(f, `from ${i}`));
  assert.ok(from.length > 0, "the HTTP port from named sources only");
  assert.ok(from.some((f) => f.ipBlock !== undefined), "the nodes (kubelet probes)");
  assert.ok(from.some((f) => f.namespaceSelector !== undefined), "the scraper");
});
