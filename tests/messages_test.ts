/**
 * Messages a newcomer meets (issue 22), each checked where it is produced: a TLS handshake
 * with an upstream signed by an unknown CA names DOTPROXY_CA_CERTS (over real sockets); a path
 * given to DOTPROXY_CA_CERTS suggests "$(cat FILE)"; a duration with a unit says the unit;
 * the same --listen twice says so, and a wildcard that already takes the port says which; a
 * loopback listen address that --allow cannot allow is a warning at start (main.ts as a
 * subprocess).
 */

import assert from "node:assert/strict";
import { ConfigError, configWarnings, parseConfig } from "../src/config.ts";
import { tlsHint } from "../src/upstream/tls_hint.ts";
import { SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery } from "./support/dns.ts";
import { spawnMain, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

function failure(args: string[], env: Record<string, string> = {}): string {
  try {
    parseConfig(args, (name) => env[name], Object.keys(env));
  } catch (error) {
    assert.ok(error instanceof ConfigError, String(error));
    assert.ok(!error.message.includes("\n"), "one line");
    return error.message;
  }
  assert.fail(`expected ${JSON.stringify(args)} ${JSON.stringify(env)} to fail`);
}

/** Runs main.ts to its end (bounded) and returns its exit code and output. */
async function runMain(args: string[], env: Record<string, string> = {}) {
  const { child, timedOut, stopTimer } = spawnMain(args, env, 20_000);
  try {
    const output = await child.output();
    assert.ok(!timedOut(), `main ${args.join(" ")} ran too long`);
    const decoder = new TextDecoder();
    return {
      code: output.code,
      stdout: decoder.decode(output.stdout),
      stderr: decoder.decode(output.stderr),
    };
  } finally {
    stopTimer();
  }
}

Deno.test("messages: an upstream certificate from an unknown CA points at DOTPROXY_CA_CERTS", async () => {
  const upstream = DotServer.start();
  try {
    // The test CA is not trusted here, as for a newcomer with a private resolver.
    await withProxy(testConfig([upstream.upstream()], { caCerts: [] }), async ({ proxy, port }) => {
      await udpExchange(port, buildQuery("unknown-ca.test"), 3000);
      let reason = "";
      for (let i = 0; i < 50 && !reason.includes("UnknownIssuer"); i++) {
        reason = (await proxy.upstreamHealth()).reason;
        if (!reason.includes("UnknownIssuer")) await sleep(50);
      }
      assert.match(reason, /invalid peer certificate: UnknownIssuer/);
      assert.ok(
        reason.includes('set DOTPROXY_CA_CERTS to its PEM text, e.g. DOTPROXY_CA_CERTS="$(cat'),
        reason,
      );
      assert.equal(upstream.queries, 0, "nothing crossed the unverified connection");
    });
  } finally {
    await upstream.close();
  }
  // With CAs given that do not sign it, the hint says so instead.
  assert.match(tlsHint("invalid peer certificate: UnknownIssuer", 2), /the 2 CA certificates in/);
  assert.match(tlsHint("invalid peer certificate: NotValidForName", 0), /IP#TLS_NAME/);
  assert.equal(tlsHint("connection reset", 0), "");
});

Deno.test("messages: a path in DOTPROXY_CA_CERTS suggests $(cat FILE)", () => {
  for (const path of ["/etc/ssl/private-ca.pem", "./ca.pem", "ca.crt", "~/ca.pem"]) {
    assert.equal(
      failure([], { DOTPROXY_CA_CERTS: path }),
      `DOTPROXY_CA_CERTS: "${path}" looks like a file path, but DOTPROXY_CA_CERTS takes the ` +
        `PEM text itself (dotproxy reads no files): DOTPROXY_CA_CERTS="$(cat ${path})"`,
    );
  }
  // Garbage that is no path keeps the old message.
  assert.match(failure([], { DOTPROXY_CA_CERTS: "garbage" }), /no PEM certificate found/);
});

Deno.test("messages: a duration with a unit says the unit and the number meant", () => {
  assert.equal(
    failure(["--timeout", "4s"]),
    `--timeout: "4s" has a unit; the value is a whole number of milliseconds, without one ` +
      `(4s is 4000)`,
  );
  assert.match(
    failure([], { DOTPROXY_TIMEOUT_MS: "1.5s" }),
    /^DOTPROXY_TIMEOUT_MS: .*\(1\.5s is 1500\)$/,
  );
  assert.match(
    failure(["--shutdown-delay", "500ms"]),
    /milliseconds, without one \(500ms is 500\)/,
  );
  assert.match(
    failure(["--cache-max-ttl", "1h"]),
    /whole number of seconds, without one \(1h is 3600\)/,
  );
  // Settings that are not durations keep their message.
  assert.match(failure(["--cache-size", "10k"]), /"10k" is not a whole number$/);
});

Deno.test("messages: the same --listen twice says so", () => {
  assert.equal(
    failure(["--listen", "127.0.0.1:5300", "--listen", "127.0.0.1:5300"]),
    "--listen: 127.0.0.1:5300 is given twice",
  );
  assert.equal(
    failure([], { DOTPROXY_LISTEN: "[::1]:53,[0:0::1]:53" }),
    "DOTPROXY_LISTEN: [::1]:53 and [0:0::1]:53 are the same address",
  );
});

Deno.test("messages: a wildcard that already takes the port is named, not 'address already in use'", async () => {
  // Listeners bind with SO_REUSEPORT (rotation), so the overlap would bind and split the
  // port's traffic: it is a configuration error, named before anything binds.
  const cases: [string[], RegExp][] = [
    [
      ["--listen", "0.0.0.0:5300", "--listen", "127.0.0.1:5300"],
      /^dotproxy: --listen: 0\.0\.0\.0:5300 already takes the port of 127\.0\.0\.1:5300; list only the wildcard address\n$/,
    ],
    [
      ["--listen", "[::]:5300", "--listen", "0.0.0.0:5300"],
      /--listen: \[::\]:5300 already takes the port of 0\.0\.0\.0:5300 \(\[::\] takes the port for IPv4 too, dual-stack\)/,
    ],
  ];
  for (const [args, expected] of cases) {
    const result = await runMain([...args, "--upstream", "127.0.0.1:1#x.test"]);
    assert.equal(result.code, 2, result.stderr);
    assert.match(result.stderr, expected);
  }
  // Different ports, or two specific addresses, are fine: --check-config says valid.
  const fine = await runMain([
    "--listen",
    "0.0.0.0:5300",
    "--listen",
    "127.0.0.1:5301",
    "--upstream",
    "127.0.0.1:1#x.test",
    "--check-config",
  ]);
  assert.equal(fine.code, 0, fine.stderr);
});

Deno.test("messages: a loopback listen address --allow cannot allow is a warning at start", async () => {
  const request = parseConfig(
    ["--listen", "127.0.0.1:5300", "--listen", "[::1]:5300", "--listen", "0.0.0.0:5301"],
    (name) => name === "DOTPROXY_ALLOW" ? "10.0.0.0/8" : undefined,
  );
  assert.ok(request.kind === "config");
  assert.deepEqual(configWarnings(request.config), [
    "--listen 127.0.0.1:5300: its clients are on this host, but --allow (10.0.0.0/8) does not " +
    "include them, so every query there is REFUSED (add 127.0.0.0/8 to --allow)",
    "--listen [::1]:5300: its clients are on this host, but --allow (10.0.0.0/8) does not " +
    "include them, so every query there is REFUSED (add ::1/128 to --allow)",
  ]);
  const defaults = parseConfig([], () => undefined);
  assert.ok(defaults.kind === "config");
  assert.deepEqual(configWarnings(defaults.config), []);

  // --check-config prints it and still exits 0.
  const check = await runMain(["--check-config", "--allow", "10.0.0.0/8"]);
  assert.equal(check.code, 0, check.stderr);
  assert.match(check.stderr, /^dotproxy: warning: --listen 127\.0\.0\.1:5300: its clients/);

  // The server logs it at start, before the "started" line.
  const free = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (free.addr as Deno.NetAddr).port;
  free.close();
  const { child, stopTimer } = spawnMain(
    ["--listen", `127.0.0.1:${port}`, "--allow", "10.0.0.0/8", "--upstream", "127.0.0.1:1#x.test"],
    { DOTPROXY_LOG_FORMAT: "json" },
    20_000,
  );
  try {
    const lines: Record<string, unknown>[] = [];
    const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    while (!lines.some((l) => l.msg === "dotproxy started")) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      const parts = buffered.split("\n");
      buffered = parts.pop()!;
      for (const part of parts) if (part.trim() !== "") lines.push(JSON.parse(part));
    }
    child.kill("SIGKILL");
    await reader.cancel();
    await child.stdout.cancel();
    await child.status;
    const warning = lines.findIndex((l) =>
      String(l.msg).startsWith(`--listen 127.0.0.1:${port}: its`)
    );
    const started = lines.findIndex((l) => l.msg === "dotproxy started");
    assert.ok(warning >= 0 && lines[warning].level === "warn", JSON.stringify(lines));
    assert.ok(started > warning, "the warning comes first");
  } finally {
    stopTimer();
  }
});

Deno.test("messages: listeners of different kinds on one TCP port are a configuration error", () => {
  // Every listener binds with SO_REUSEPORT, so both would bind and the kernel would hand each
  // new connection to either one (a DoT client to the DoH listener).
  const env = { DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY };
  assert.equal(
    failure(["--listen", "127.0.0.1:5300", "--listen-dot", "127.0.0.1:5300"], env),
    "--listen 127.0.0.1:5300 and --listen-dot 127.0.0.1:5300 share a TCP port: give each " +
      "listener a port of its own",
  );
  assert.equal(
    failure(["--listen-doh", "[::]:8443", "--http", "127.0.0.1:8443"], env),
    "--listen-doh [::]:8443 and --http 127.0.0.1:8443 share a TCP port: give each listener a " +
      "port of its own",
  );
  assert.match(
    failure([], {
      ...env,
      DOTPROXY_LISTEN_DOH: "0.0.0.0:443",
      DOTPROXY_LISTEN_DOT: "10.0.0.1:443",
    }),
    /^DOTPROXY_LISTEN_DOT 10\.0\.0\.1:443 and DOTPROXY_LISTEN_DOH 0\.0\.0\.0:443 share a TCP port|^DOTPROXY_LISTEN_DOH 0\.0\.0\.0:443 and DOTPROXY_LISTEN_DOT 10\.0\.0\.1:443 share a TCP port/,
  );
  // Different ports, or addresses that do not overlap, are fine.
  const request = parseConfig(
    [
      "--listen",
      "127.0.0.1:5300",
      "--listen-dot",
      "127.0.0.1:853",
      "--listen-doh",
      "127.0.0.2:5300",
    ],
    (name) => (env as Record<string, string>)[name],
    Object.keys(env),
  );
  assert.equal(request.kind, "config");
});
