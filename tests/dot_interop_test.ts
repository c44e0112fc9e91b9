/**
 * Real DoT clients against the DoT listener, on loopback (issue 25): `kdig +tls` and
 * `dig +tls` verifying the test CA, Stubby in front (a loopback-only configuration), Unbound
 * in front with `forward-tls-upstream: yes`, and `dnsperf -m dot` for pipelined load. DO and
 * CD pass through as over TCP. Each test is skipped, saying why, when its tool is missing.
 *
 * Needs `--allow-run`, `--allow-write=/tmp` and `--allow-read` (configuration files).
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { answerFor } from "./support/dns.ts";
import { hasTool, named, run } from "./support/doh.ts";
import { DotServer } from "./support/dot_server.ts";
import { freeStablePort } from "./support/fault_upstream.ts";

import { metricValue } from "./support/prometheus.ts";
import { testConfig, type TestProxy, withProxy } from "./support/proxy.ts";
import { sleep, until } from "./support/wait.ts";

const KDIG = await hasTool("kdig", ["--version"]);
const DIG = await hasTool("dig", ["-v"]);
const STUBBY = await hasTool("stubby", ["-V"]);
const UNBOUND = await hasTool("unbound", ["-V"]);
const DNSPERF = await hasTool("dnsperf", ["-h"]).then((ok) => ok || hasTool("dnsperf", []));
const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/**
 * The test upstream's answer, with the CD bit of the query copied (as a validating resolver
 * does) so that a client sees it come back through the proxy.
 */
function answerKeepingCd(query: Uint8Array): Uint8Array {
  const answer = answerFor(query);
  answer[3] |= query[3] & 0x10;
  return answer;
}

/** A proxy with one DoT listener on 127.0.0.1 in front of a test upstream; the CA in a file. */
async function withDot(
  fn: (setup: TestProxy & { dotPort: number; caFile: string; dir: string }) => Promise<void>,
): Promise<void> {
  const upstream = DotServer.start({ answer: answerKeepingCd });
  const dir = await Deno.makeTempDir({ prefix: "dotproxy-dot-interop-" });
  const caFile = `${dir}/ca.pem`;
  await Deno.writeTextFile(caFile, CA_PEM);
  try {
    const config = testConfig([upstream.upstream()], {
      listenDot: [{ hostname: "127.0.0.1", port: 0 }],
      tlsCert: SERVER_PEM,
      tlsKey: SERVER_KEY,
      maxTcpConnections: 200,
    });
    await withProxy(config, async (test) => {
      await fn({ ...test, dotPort: test.proxy.dot[0].addr.port, caFile, dir });
    });
  } finally {
    await upstream.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** dig/kdig arguments for `test`'s DoT listener, `hostname` verified against the test CA. */
function overTls(test: { dotPort: number; caFile: string }, hostname = "dns.test"): string[] {
  return [
    "@127.0.0.1",
    "-p",
    String(test.dotPort),
    "+tls",
    `+tls-ca=${test.caFile}`,
    `+tls-hostname=${hostname}`,
  ];
}

function dotQueries(test: TestProxy): number {
  const render = test.proxy.metrics.registry.render();
  return metricValue(render, "dotproxy_queries_total", { transport: "dot", rcode: "NOERROR" }) ??
    0;
}

/** Starts `command`, runs `fn`, then kills it. */
async function withProcess(
  command: string,
  args: string[],
  fn: () => Promise<void>,
): Promise<void> {
  const child = new Deno.Command(command, { args, stdout: "null", stderr: "piped" }).spawn();
  const stderr = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let log = "";
  const reading = (async () => {
    for (;;) {
      const { value, done } = await stderr.read().catch(() => ({ value: "", done: true }));
      if (done) return;
      log = (log + value).slice(-4000);
    }
  })();
  try {
    await fn();
  } catch (error) {
    throw new Error(`${error}\n${command} said: ${log}`);
  } finally {
    try {
      child.kill("SIGKILL");
    } catch {
      // Gone already.
    }
    await child.status;
    await reading;
  }
}

/** Asks `dig` over UDP until it answers (a server just started); the last output. */
async function digUntilAnswered(port: number, name: string, extra: string[] = []) {
  let out: Awaited<ReturnType<typeof run>> = { code: -1, stdout: new Uint8Array(0), stderr: "" };
  for (let i = 0; i < 40; i++) {
    out = await run("dig", [
      "@127.0.0.1",
      "-p",
      String(port),
      "+tries=1",
      "+time=1",
      ...extra,
      name,
      "A",
    ]);
    if (/status: NOERROR/.test(text(out.stdout))) return out;
    await sleep(250);
  }
  return out;
}

Deno.test({
  name: named(
    "dot interop: kdig +tls verifies the certificate; DO and CD pass through",
    KDIG,
    "kdig",
  ),
  ignore: !KDIG,
  fn: async () => {
    await withDot(async (test) => {
      const out = await run("kdig", [
        ...overTls(test),
        "+dnssec",
        "+cdflag",
        "kdig.example",
        "A",
      ]);
      const said = text(out.stdout) + out.stderr;
      assert.equal(out.code, 0, said);
      assert.match(said, /status: NOERROR/, said);
      assert.match(said, /kdig\.example\.\s+\d+\s+IN\s+A\s+10\./, said);
      assert.match(said, /flags: qr rd ra cd/i, said);
      assert.match(said, /EDNS PSEUDOSECTION:[\s\S]*flags: do/i, said);
      // kdig pads its queries over TLS: the answer fills a 468-octet block (RFC 8467).
      assert.match(said, /PADDING: \d+ B/, said);
      const received = Number(/Received (\d+) B/.exec(said)?.[1]);
      assert.equal(received % 468, 0, said);
      assert.match(said, /TLS session \(TLS1\.[23]\)/, said);
      // A wrong name fails verification: kdig refuses to ask.
      const wrong = await run("kdig", [
        ...overTls(test, "wrong.test"),
        "x.example",
      ]);
      assert.doesNotMatch(text(wrong.stdout), /status: NOERROR/);
      assert.equal(dotQueries(test), 1);
    });
  },
});

Deno.test({
  name: named("dot interop: dig +tls with the test CA", DIG, "dig"),
  ignore: !DIG,
  fn: async () => {
    await withDot(async (test) => {
      const out = await run("dig", [
        ...overTls(test),
        "dig.example",
        "A",
      ]);
      const said = text(out.stdout) + out.stderr;
      assert.equal(out.code, 0, said);
      assert.match(said, /status: NOERROR/, said);
      assert.match(said, /dig\.example\.\s+\d+\s+IN\s+A\s+10\./, said);
      assert.match(said, /\(TLS\)/, said);
    });
  },
});

Deno.test({
  name: named(
    "dot interop: Stubby in front (loopback), over DoT with keepalive",
    STUBBY && DIG,
    "stubby or dig",
  ),
  ignore: !STUBBY || !DIG,
  fn: async () => {
    await withDot(async (test) => {
      const port = freeStablePort();
      const config = `${test.dir}/stubby.yml`;
      await Deno.writeTextFile(
        config,
        [
          "resolution_type: GETDNS_RESOLUTION_STUB",
          "dns_transport_list:",
          "  - GETDNS_TRANSPORT_TLS",
          "tls_authentication: GETDNS_AUTHENTICATION_REQUIRED",
          `tls_ca_file: "${test.caFile}"`,
          "tls_query_padding_blocksize: 128",
          "edns_client_subnet_private: 1",
          "round_robin_upstreams: 0",
          "idle_timeout: 10000",
          "listen_addresses:",
          `  - 127.0.0.1@${port}`,
          "upstream_recursive_servers:",
          "  - address_data: 127.0.0.1",
          `    tls_port: ${test.dotPort}`,
          '    tls_auth_name: "dns.test"',
          "",
        ].join("\n"),
      );
      await withProcess("stubby", ["-C", config, "-l"], async () => {
        const first = await digUntilAnswered(port, "stubby.example");
        assert.match(text(first.stdout), /stubby\.example\.\s+\d+\s+IN\s+A\s+10\./);
        for (let i = 0; i < 20; i++) {
          const out = await run("dig", ["@127.0.0.1", "-p", String(port), `s${i}.example`, "A"]);
          assert.match(text(out.stdout), /status: NOERROR/, text(out.stdout));
        }
        assert.ok(dotQueries(test) >= 21, `${dotQueries(test)} queries over DoT`);
        // Stubby kept its connection (it asks for edns-tcp-keepalive and gets 2 s back).
        const handshakes =
          metricValue(test.proxy.metrics.registry.render(), "dotproxy_tls_handshakes_total", {
            transport: "dot",
            result: "ok",
          }) ?? 0;
        assert.ok(handshakes <= 3, `${handshakes} handshakes for 21 queries`);
      });
    });
  },
});

Deno.test({
  name: named(
    "dot interop: Unbound in front with forward-tls-upstream",
    UNBOUND && DIG,
    "unbound or dig",
  ),
  ignore: !UNBOUND || !DIG,
  fn: async () => {
    await withDot(async (test) => {
      const port = freeStablePort();
      const config = `${test.dir}/unbound.conf`;
      await Deno.writeTextFile(
        config,
        [
          "server:",
          `  interface: 127.0.0.1@${port}`,
          '  username: ""',
          '  chroot: ""',
          `  directory: "${test.dir}"`,
          `  pidfile: "${test.dir}/unbound.pid"`,
          "  do-daemonize: no",
          "  use-syslog: no",
          "  num-threads: 1",
          '  module-config: "iterator"',
          "  do-not-query-localhost: no",
          `  tls-cert-bundle: "${test.caFile}"`,
          "forward-zone:",
          '  name: "."',
          `  forward-addr: 127.0.0.1@${test.dotPort}#dns.test`,
          "  forward-tls-upstream: yes",
          "remote-control:",
          "  control-enable: no",
          "",
        ].join("\n"),
      );
      await withProcess("unbound", ["-d", "-c", config], async () => {
        const first = await digUntilAnswered(port, "unbound.example");
        assert.match(text(first.stdout), /unbound\.example\.\s+\d+\s+IN\s+A\s+10\./);
        const cd = await run("dig", [
          "@127.0.0.1",
          "-p",
          String(port),
          "+cd",
          "+dnssec",
          "cd.example",
          "A",
        ]);
        assert.match(text(cd.stdout), /status: NOERROR/);
        assert.ok(await until(() => dotQueries(test) >= 2), `${dotQueries(test)} over DoT`);
      });
    });
  },
});

Deno.test({
  name: named("dot interop: dnsperf -m dot, pipelined load, nothing lost", DNSPERF, "dnsperf"),
  ignore: !DNSPERF,
  fn: async () => {
    await withDot(async (test) => {
      const data = `${test.dir}/queries.txt`;
      await Deno.writeTextFile(
        data,
        Array.from({ length: 500 }, (_, i) => `n${i % 100}.perf.example A`).join("\n") + "\n",
      );
      const out = await run("dnsperf", [
        "-m",
        "dot",
        "-s",
        "127.0.0.1",
        "-p",
        String(test.dotPort),
        "-d",
        data,
        "-n",
        "4",
        "-c",
        "4",
        "-q",
        "64",
        "-t",
        "5",
      ]);
      const said = text(out.stdout) + out.stderr;
      const completed = /Queries completed:\s+(\d+)/.exec(said);
      const lost = /Queries lost:\s+(\d+)/.exec(said);
      assert.ok(completed && lost, said);
      assert.equal(Number(completed[1]), 2000, said);
      assert.equal(Number(lost[1]), 0, said);
      assert.match(said, /NOERROR 2000/, said);
      const answered = dotQueries(test);
      assert.ok(answered >= 2000, `${answered} over DoT`);
    });
  },
});

const OPENSSL = await hasTool("openssl", ["version"]);

Deno.test({
  name: named("dot interop: TLS 1.2 and TLS 1.3 handshakes (openssl s_client)", OPENSSL, "openssl"),
  ignore: !OPENSSL,
  fn: async () => {
    await withDot(async (test) => {
      for (const version of ["-tls1_2", "-tls1_3"]) {
        const out = await run("openssl", [
          "s_client",
          "-connect",
          `127.0.0.1:${test.dotPort}`,
          version,
          "-CAfile",
          test.caFile,
          "-verify_hostname",
          "dns.test",
          "-alpn",
          "dot",
          "-brief",
        ], new Uint8Array(0));
        const said = text(out.stdout) + out.stderr;
        const expected = version === "-tls1_2" ? "TLSv1.2" : "TLSv1.3";
        assert.match(said, new RegExp(`Protocol version: ${expected.replace(".", "\\.")}`), said);
        assert.match(said, /Verification: OK/, said);
      }
    });
  },
});
