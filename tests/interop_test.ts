/**
 * Interop with real DNS software from Debian: `dig` and `kdig` as clients, and Unbound
 * serving DNS-over-TLS on loopback as the upstream. Each test is skipped, with the reason
 * printed, when its tool is missing; `.ci/run` installs them so CI runs them all.
 */
import assert from "node:assert/strict";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { addressFor } from "./support/dns.ts";
import { testConfig, withProxy } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

async function toolAvailable(command: string, args: string[]): Promise<boolean> {
  try {
    const output = await new Deno.Command(command, { args, stdout: "null", stderr: "null" })
      .output();
    return output.success || output.code !== 127;
  } catch {
    return false;
  }
}

const hasDig = await toolAvailable("dig", ["-v"]);
const hasKdig = await toolAvailable("kdig", ["--version"]);
const hasUnbound = await toolAvailable("unbound", ["-V"]);
for (const [tool, present] of [["dig", hasDig], ["kdig", hasKdig], ["unbound", hasUnbound]]) {
  if (!present) console.log(`interop: SKIPPING tests that need ${tool}: it is not installed`);
}

async function run(command: string, args: string[]): Promise<{ code: number; out: string }> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    out: decoder.decode(output.stdout) + decoder.decode(output.stderr),
  };
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

const BIG_TXT = Array.from({ length: 12 }, (_, i) => `"${String(i % 10).repeat(200)}"`).join(" ");

/** Runs Unbound as a DoT server for `interop.test` on a free loopback port. */
async function withUnbound(fn: (port: number) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dotproxy-unbound-" });
  const port = freePort();
  await Deno.writeTextFile(`${dir}/server.pem`, SERVER_PEM);
  await Deno.writeTextFile(`${dir}/server.key`, SERVER_KEY);
  await Deno.writeTextFile(
    `${dir}/unbound.conf`,
    `server:
  interface: 127.0.0.1@${port}
  tls-port: ${port}
  tls-service-key: "${dir}/server.key"
  tls-service-pem: "${dir}/server.pem"
  username: ""
  chroot: ""
  directory: "${dir}"
  pidfile: "${dir}/unbound.pid"
  do-daemonize: no
  use-syslog: no
  verbosity: 1
  num-threads: 1
  so-reuseport: no
  module-config: "iterator"
  incoming-num-tcp: 64
  local-zone: "interop.test." static
  local-data: "www.interop.test. 300 IN A 192.0.2.10"
  local-data: "WWW2.interop.test. 300 IN AAAA 2001:db8::10"
  local-data: 'big.interop.test. 300 IN TXT ${BIG_TXT}'
remote-control:
  control-enable: no
`,
  );
  const child = new Deno.Command("unbound", {
    args: ["-d", "-c", `${dir}/unbound.conf`],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  try {
    // Wait, bounded, until it accepts TCP connections.
    let ready = false;
    for (let i = 0; i < 100 && !ready; i++) {
      try {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port });
        conn.close();
        ready = true;
      } catch {
        await sleep(50);
      }
    }
    assert.ok(ready, "unbound did not start listening within 5 s");
    await fn(port);
  } finally {
    try {
      child.kill("SIGTERM");
    } catch {
      // It already exited; its stderr says why.
    }
    const status = await child.status;
    const stderr = new TextDecoder().decode(
      (await new Response(child.stderr).arrayBuffer()).slice(0, 4000),
    );
    await Deno.remove(dir, { recursive: true });
    assert.ok(status.signal === "SIGTERM" || status.code === 0, `unbound exited: ${stderr}`);
  }
}

Deno.test({
  name: "interop: dig and kdig through dotproxy to Unbound over TLS",
  ignore: !(hasDig && hasKdig && hasUnbound),
  async fn() {
    await withUnbound(async (unboundPort) => {
      const config = testConfig([`127.0.0.1:${unboundPort}#dns.test`], { caCerts: [CA_PEM] });
      await withProxy(config, async ({ port }) => {
        const at = ["@127.0.0.1", "-p", String(port)];
        const udp = await run("dig", [...at, "www.interop.test", "+short", "+time=3", "+tries=1"]);
        assert.equal(udp.out.trim(), "192.0.2.10", udp.out);
        const tcp = await run("dig", [...at, "www.interop.test", "+tcp", "+short", "+time=3"]);
        assert.equal(tcp.out.trim(), "192.0.2.10", tcp.out);
        const aaaa = await run("dig", [...at, "www2.interop.test", "AAAA", "+short", "+time=3"]);
        assert.equal(aaaa.out.trim(), "2001:db8::10", aaaa.out);
        const nx = await run("dig", [...at, "nope.interop.test", "+time=3", "+tries=1"]);
        assert.match(nx.out, /status: NXDOMAIN/);
        // A 2.4 kB TXT answer: truncated over UDP, so dig retries over TCP by itself.
        const big = await run("dig", [
          ...at,
          "big.interop.test",
          "TXT",
          "+ignore",
          "+noedns",
          "+time=3",
          "+tries=1",
        ]);
        assert.match(big.out, /flags: qr[a-z ]* tc[a-z ]*;/, big.out);
        const retried = await run("dig", [...at, "big.interop.test", "TXT", "+time=3"]);
        assert.match(retried.out, /Truncated, retrying in TCP mode|MSG SIZE\s+rcvd: 2\d\d\d/);
        assert.match(retried.out, /status: NOERROR/);
        const kd = await run("kdig", [...at, "www.interop.test", "+short", "+timeout=3"]);
        assert.equal(kd.out.trim(), "192.0.2.10", kd.out);
        const kdTcp = await run("kdig", [...at, "www.interop.test", "+tcp", "+short"]);
        assert.equal(kdTcp.out.trim(), "192.0.2.10", kdTcp.out);
        // kdig's own DoT client agrees the upstream is what we think it is.
        const direct = await run("kdig", [
          "@127.0.0.1",
          "-p",
          String(unboundPort),
          "+tls",
          "+short",
          "www.interop.test",
        ]);
        assert.equal(direct.out.trim(), "192.0.2.10", direct.out);
      });
    });
  },
});

Deno.test({
  name: "interop: Unbound with a certificate for another name is refused",
  ignore: !(hasDig && hasUnbound),
  async fn() {
    await withUnbound(async (unboundPort) => {
      const config = testConfig([`127.0.0.1:${unboundPort}#cloudflare-dns.com`]);
      await withProxy(config, async ({ port, logs }) => {
        const out = await run("dig", [
          "@127.0.0.1",
          "-p",
          String(port),
          "www.interop.test",
          "+time=3",
          "+tries=1",
        ]);
        assert.match(out.out, /status: SERVFAIL/);
        assert.ok(logs.find("upstream connection failed").some((r) => r.reason === "tls"));
      });
    });
  },
});

Deno.test({
  name: "interop: dig pipelined over one TCP connection (+keepopen) against the test upstream",
  ignore: !hasDig,
  async fn() {
    const upstream = DotServer.start();
    try {
      await withProxy(testConfig([upstream.upstream()]), async ({ port }) => {
        const names = ["one.test", "two.test", "three.test"];
        const out = await run("dig", [
          "@127.0.0.1",
          "-p",
          String(port),
          "+tcp",
          "+keepopen",
          "+short",
          ...names,
        ]);
        assert.deepEqual(out.out.trim().split("\n"), names.map(addressFor), out.out);
      });
    } finally {
      await upstream.close();
    }
  },
});
