/**
 * The Kubernetes layouts of per-zone routing (deploy/kubernetes/sidecar/pod.yaml and
 * deploy/kubernetes/node-local/daemonset.yaml) say what works: read as text (they are kept
 * simple: `- name:` / `value:` pairs), their settings parse, the sidecar routes the cluster
 * domain and the service and pod CIDRs to the cluster DNS and writes the search list and
 * ndots that Kubernetes writes, and the node-local proxy listens on the node's loopback only.
 *
 * `deno test --allow-read tests/deploy_zones_test.ts`
 */

import assert from "node:assert/strict";
import { ConfigError, KNOWN_VARIABLES, parseConfig } from "../src/config.ts";

const ROOT = new URL("../", import.meta.url);

async function read(path: string): Promise<string> {
  return await Deno.readTextFile(new URL(path, ROOT));
}

/** The `- name: DOTPROXY_X` / `value: ...` pairs of a manifest, values unquoted. */
function settings(text: string): Map<string, string> {
  const out = new Map<string, string>();
  const pair = /^\s*- name: (DOTPROXY_\w+)\n\s*value: (.*)$/gm;
  for (const [, name, raw] of text.matchAll(pair)) {
    out.set(name, raw.trim().replace(/^"(.*)"$/, "$1"));
  }
  return out;
}

/** Parses `env` as the binary would; fails naming the file and the setting. */
function configOf(file: string, env: Map<string, string>) {
  for (const name of env.keys()) assert.ok(KNOWN_VARIABLES.includes(name), `${file}: ${name}`);
  try {
    const request = parseConfig([], (name) => env.get(name));
    assert.equal(request.kind, "config");
    return request.kind === "config" ? request.config : assert.fail("no config");
  } catch (error) {
    if (error instanceof ConfigError) assert.fail(`${file}: ${error.message}`);
    throw error;
  }
}

Deno.test("deploy: the sidecar is the pod's nameserver and routes the cluster to its DNS", async () => {
  const file = "deploy/kubernetes/sidecar/pod.yaml";
  const text = await read(file);
  const config = configOf(file, settings(text));
  assert.deepEqual(config.listen, [{ hostname: "127.0.0.1", port: 53 }], "glibc asks port 53");
  assert.equal(config.zones.length, 1);
  const [route] = config.zones;
  const names = route.zones.map((z) => z.name);
  for (
    const zone of [
      "cluster.local",
      "96.10.in-addr.arpa",
      "111.10.in-addr.arpa",
      "244.10.in-addr.arpa",
    ]
  ) {
    assert.ok(names.includes(zone), `${file}: ${zone} is routed`);
  }
  assert.deepEqual(route.targets.map((t) => [t.label, t.plain]), [["dns://10.96.0.10:53", true]]);
  assert.match(text, /^\s*dnsPolicy: "?None"?$/m);
  assert.match(text, /^\s*nameservers:\n\s*- 127\.0\.0\.1$/m);
  const searches = /^\s*searches:\n((?:\s*- .*\n)+)/m.exec(text)?.[1] ?? "";
  const list = searches.split("\n").map((l) => l.replace(/^\s*- /, "").trim()).filter(Boolean);
  assert.equal(list.length, 3, searches);
  assert.match(list[0], /^[a-z0-9-]+\.svc\.cluster\.local$/);
  assert.deepEqual(list.slice(1), ["svc.cluster.local", "cluster.local"]);
  assert.match(text, /- name: ndots\n\s*value: "5"/);
  const port = /- name: net\.ipv4\.ip_unprivileged_port_start\n\s*value: "(\d+)"/.exec(text);
  assert.ok(port && Number(port[1]) <= 53, "a non-root sidecar may bind port 53");
  assert.doesNotMatch(text, /\badd:|privileged: true|hostNetwork: true/);
});

Deno.test("deploy: the node-local proxy listens on the node's loopback, on the host network", async () => {
  const file = "deploy/kubernetes/node-local/daemonset.yaml";
  const text = await read(file);
  const config = configOf(file, settings(text));
  assert.deepEqual(config.listen.map((l) => l.hostname), ["127.0.0.1"]);
  assert.equal(config.http?.hostname, "127.0.0.1");
  assert.match(text, /^kind: DaemonSet$/m);
  assert.match(text, /^\s*hostNetwork: true$/m);
  assert.match(text, /^\s*dnsPolicy: Default$/m, "never resolves through cluster DNS");
  assert.match(text, /forward \. 127\.0\.0\.1:5300/, "says how node-local-dns forwards to it");
  assert.doesNotMatch(text, /^\s*internalTrafficPolicy:/m);
  assert.doesNotMatch(text, /\badd:|privileged: true/);
});
