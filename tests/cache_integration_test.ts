/**
 * The answer cache over real sockets: the proxy in-process (or `main.ts` as a subprocess for
 * SIGHUP) in front of the tests' DoT server or a real Unbound, with `dig`, `delv` and an
 * Unbound using 0x20 (`use-caps-for-id`) as clients. Tests that need a tool skip, saying so,
 * when it is missing; `.ci/run` installs them.
 */

import assert from "node:assert/strict";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { addressFor, answerFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { metricValue } from "./support/prometheus.ts";
import { spawnMain, TcpDnsClient, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { unboundServerHead } from "./support/unbound.ts";
import { sleep } from "./support/wait.ts";

async function toolAvailable(command: string, args: string[]): Promise<boolean> {
  try {
    await new Deno.Command(command, { args, stdout: "null", stderr: "null" }).output();
    return true;
  } catch {
    return false;
  }
}

const hasDig = await toolAvailable("dig", ["-v"]);
const hasDelv = await toolAvailable("delv", ["-v"]);
const hasUnbound = await toolAvailable("unbound", ["-V"]);
const hasSigner = await toolAvailable("dnssec-signzone", ["-h"]) &&
  await toolAvailable("dnssec-keygen", ["-h"]);
for (
  const [tool, present] of [
    ["dig", hasDig],
    ["delv", hasDelv],
    ["unbound", hasUnbound],
    ["dnssec-keygen/dnssec-signzone (bind9-utils)", hasSigner],
  ] as const
) {
  if (!present) console.log(`cache integration: SKIPPING tests that need ${tool}: not installed`);
}

async function run(command: string, args: string[]): Promise<{ code: number; out: string }> {
  const output = await new Deno.Command(command, { args, stdout: "piped", stderr: "piped" })
    .output();
  const decoder = new TextDecoder();
  return { code: output.code, out: decoder.decode(output.stdout) + decoder.decode(output.stderr) };
}

function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = listener.addr.port;
  listener.close();
  return port;
}

/** The A record's TTLs and addresses of a reply. */
function answersOf(reply: Uint8Array): { ttl: number; address: string }[] {
  return parseMessage(reply).answers.filter((r) => r.type === 1).map((r) => ({
    ttl: r.ttl,
    address: formatA(r.data),
  }));
}

/** `answerFor` with the A record's last octet set to `octet` (to tell refreshes apart). */
function answerWithOctet(query: Uint8Array, octet: number): Uint8Array {
  const response = answerFor(query);
  let at = 12;
  while (response[at] !== 0) at += response[at] + 1;
  response[at + 5 + 12 + 3] = octet; // question end, then pointer+type+class+ttl+rdlength
  return response;
}

// ---- in-process proxy, the tests' DoT server -------------------------------------------------------

Deno.test("cache over sockets: UDP and TCP hits from one upstream query, TTLs aging, metrics", async () => {
  const dot = DotServer.start();
  try {
    await withProxy(testConfig([dot.upstream()]), async ({ proxy, port }) => {
      const first = await udpExchange(port, buildQuery("www.sockets.test", { id: 1 }));
      assert.ok(first);
      assert.deepEqual(answersOf(first), [{ ttl: 60, address: addressFor("www.sockets.test") }]);
      const tcp = await TcpDnsClient.connect(port);
      try {
        await tcp.send(buildQuery("WWW.Sockets.TEST", { id: 2 }));
        const viaTcp = parseMessage((await tcp.receive())!);
        assert.equal(viaTcp.id, 2);
        assert.equal(viaTcp.question?.name, "WWW.Sockets.TEST.");
      } finally {
        tcp.close();
      }
      assert.equal(dot.queries, 1, "the TCP query was a hit");
      await sleep(1100);
      const later = await udpExchange(port, buildQuery("www.sockets.test", { id: 3 }));
      assert.ok(later);
      const [{ ttl }] = answersOf(later);
      assert.ok(ttl === 59 || ttl === 58, `aged TTL ${ttl}`);
      assert.equal(dot.queries, 1);
      const text = proxy.metrics.registry.render();
      const lookups = (result: string) =>
        metricValue(text, "dotproxy_cache_lookups_total", { result });
      assert.equal(lookups("miss"), 1);
      assert.equal(lookups("hit"), 2);
      assert.equal(lookups("stale"), 0);
      assert.equal(lookups("coalesced"), 0);
      assert.equal(metricValue(text, "dotproxy_cache_entries"), 1);
      assert.equal(metricValue(text, "dotproxy_cache_evictions_total"), 0);
      assert.equal(metricValue(text, "dotproxy_cache_prefetches_total"), 0);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache over sockets: 100 concurrent identical queries make one upstream query", async () => {
  const dot = DotServer.start({ delayMs: () => 150 });
  try {
    // No hedge: a second copy of the question on another connection would count too.
    const config = testConfig([dot.upstream()], { hedgeDelay: 0 });
    await withProxy(config, async ({ proxy, port }) => {
      const names = Array.from(
        { length: 100 },
        (_, i) =>
          [..."many.clients.test"].map((c, j) => (i * 7 + j) % 3 === 0 ? c.toUpperCase() : c)
            .join(""),
      );
      const replies = await Promise.all(
        names.map((name, i) => udpExchange(port, buildQuery(name, { id: 5000 + i }))),
      );
      assert.equal(dot.queries, 1);
      for (const [i, reply] of replies.entries()) {
        assert.ok(reply, `client ${i} got an answer`);
        const parsed = parseMessage(reply);
        assert.equal(parsed.id, 5000 + i);
        assert.equal(parsed.question?.name, `${names[i]}.`);
        assert.equal(formatA(parsed.answers[0].data), addressFor("many.clients.test"));
      }
      const text = proxy.metrics.registry.render();
      assert.equal(metricValue(text, "dotproxy_cache_lookups_total", { result: "miss" }), 1);
      assert.equal(metricValue(text, "dotproxy_cache_lookups_total", { result: "coalesced" }), 99);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache over sockets: 1,000 clients of one slow name make one upstream query (past 256 waiters too)", async () => {
  // Health probes (the root's NS) are answered at once: the upstream is slow, not down.
  const dot = DotServer.start({ delayMs: (query) => query[12] === 0 ? 0 : 1000 });
  try {
    const config = testConfig([dot.upstream()], { hedgeDelay: 0 });
    await withProxy(config, async ({ port }) => {
      // Sent in waves, so that most clients arrive while the flight is out and full.
      const replies: Promise<Uint8Array | null>[] = [];
      for (let wave = 0; wave < 10; wave++) {
        for (let i = 0; i < 100; i++) {
          const id = wave * 100 + i;
          replies.push(udpExchange(port, buildQuery("slow.many.test", { id }), 5000));
        }
        await sleep(20);
      }
      const answered = await Promise.all(replies);
      assert.equal(dot.queries, 1, "one question upstream for every client");
      for (const [id, reply] of answered.entries()) {
        assert.ok(reply, `client ${id} got an answer`);
        const parsed = parseMessage(reply);
        assert.equal(parsed.id, id);
        assert.equal(parsed.rcode, 0);
        assert.equal(formatA(parsed.answers[0].data), addressFor("slow.many.test"));
      }
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache over sockets: 15 KB answers for unique names stay within --cache-max-bytes (dotproxy_cache_bytes)", async () => {
  const dot = DotServer.start();
  try {
    const mib = 1024 * 1024;
    const config = testConfig([dot.upstream()], { cacheMaxBytes: mib });
    await withProxy(config, async ({ proxy, port }) => {
      const client = await TcpDnsClient.connect(port);
      try {
        for (let i = 0; i < 200; i++) {
          await client.send(buildQuery(`big15000.n${i}.fill.test`, { id: i, type: 16 }));
          const reply = await client.receive();
          assert.ok(reply && reply.length > 15_000, `answer ${i} whole over TCP`);
        }
      } finally {
        client.close();
      }
      const text = proxy.metrics.registry.render();
      const bytes = metricValue(text, "dotproxy_cache_bytes") ?? -1;
      const entries = metricValue(text, "dotproxy_cache_entries", {});
      assert.ok(bytes > 0 && bytes <= mib, `dotproxy_cache_bytes ${bytes}`);
      assert.equal(entries, 64, "16 KiB slots: 64 fit in 1 MiB");
      assert.equal(metricValue(text, "dotproxy_cache_evictions_total", {}), 200 - 64);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache over sockets: every upstream dead: the expired answer is served stale", async () => {
  const dot = DotServer.start();
  let closed = false;
  try {
    const config = testConfig([dot.upstream()], { cacheMaxTtl: 1, staleAnswerTimeoutMs: 1800 });
    await withProxy(config, async ({ port }) => {
      const fresh = await udpExchange(port, buildQuery("stale.sockets.test", { id: 1 }));
      assert.deepEqual(answersOf(fresh!), [{ ttl: 1, address: addressFor("stale.sockets.test") }]);
      await dot.close();
      closed = true;
      await sleep(1100);
      const started = performance.now();
      const stale = await udpExchange(port, buildQuery("stale.sockets.test", { id: 2 }), 4000);
      assert.ok(stale, "an answer, not silence");
      assert.equal(parseMessage(stale).rcode, 0);
      assert.deepEqual(answersOf(stale), [{ ttl: 30, address: addressFor("stale.sockets.test") }]);
      assert.ok(performance.now() - started < 2500, "by the stale answer timeout at the latest");
      const again = await udpExchange(port, buildQuery("stale.sockets.test", { id: 3 }), 1000);
      assert.deepEqual(answersOf(again!), [{ ttl: 30, address: addressFor("stale.sockets.test") }]);
    });
  } finally {
    if (!closed) await dot.close();
  }
});

Deno.test("cache over sockets: an upstream slower than --stale-answer-timeout: stale, then the fresh answer", async () => {
  let served = 0;
  const isOurs = (query: Uint8Array) => parseMessage(query).question?.name === "slow.sockets.test.";
  const dot = DotServer.start({
    answer: (query) => answerWithOctet(query, isOurs(query) && ++served === 1 ? 1 : 2),
    delayMs: (query) => (isOurs(query) && served > 1 ? 900 : 0),
  });
  try {
    const config = testConfig([dot.upstream()], {
      cacheMaxTtl: 1,
      staleAnswerTimeoutMs: 300,
      hedgeDelay: 0,
    });
    await withProxy(config, async ({ port, proxy }) => {
      const fresh = await udpExchange(port, buildQuery("slow.sockets.test", { id: 1 }));
      assert.equal(answersOf(fresh!)[0].address.split(".")[3], "1");
      await sleep(1100);
      const started = performance.now();
      const stale = await udpExchange(port, buildQuery("slow.sockets.test", { id: 2 }));
      const waited = performance.now() - started;
      assert.deepEqual(answersOf(stale!).map((a) => [a.ttl, a.address.split(".")[3]]), [[30, "1"]]);
      assert.ok(waited >= 250 && waited < 850, `stale after the 300 ms timeout (${waited} ms)`);
      // The refresh goes on and replaces the entry; meanwhile queries join it.
      let octet = "1";
      for (let i = 0; i < 20 && octet === "1"; i++) {
        const reply = await udpExchange(port, buildQuery("slow.sockets.test", { id: 3 + i }));
        octet = answersOf(reply!)[0].address.split(".")[3];
        if (octet === "1") await sleep(50);
      }
      assert.equal(octet, "2", "the fresh answer replaced the stale one");
      // One refresh, joined by the queries meanwhile (the pool itself may send the slow
      // question once more, to another connection: that is not the cache's doing).
      const text = proxy.metrics.registry.render();
      assert.equal(metricValue(text, "dotproxy_cache_lookups_total", { result: "miss" }), 1);
      assert.ok(metricValue(text, "dotproxy_cache_lookups_total", { result: "stale" })! >= 1);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache over sockets: --cache-size 0 sends every query upstream", async () => {
  const dot = DotServer.start();
  try {
    await withProxy(testConfig([dot.upstream()], { cacheSize: 0 }), async ({ proxy, port }) => {
      for (let id = 1; id <= 3; id++) {
        assert.ok(await udpExchange(port, buildQuery("off.sockets.test", { id })));
      }
      assert.equal(dot.queries, 3);
      assert.equal(proxy.resolver.cache, null);
      const text = proxy.metrics.registry.render();
      assert.equal(metricValue(text, "dotproxy_cache_lookups_total", { result: "miss" }), 0);
      assert.equal(metricValue(text, "dotproxy_cache_entries"), 0);
    });
  } finally {
    await dot.close();
  }
});

Deno.test("cache: SIGHUP flushes the cache of a running main.ts, logged, and the process lives on", async () => {
  const dot = DotServer.start();
  const listen = freePort();
  const { child, timedOut, stopTimer } = spawnMain(
    [
      "--listen",
      `127.0.0.1:${listen}`,
      "--upstream",
      dot.upstream(),
      "--log-format",
      "json",
    ],
    { DOTPROXY_CA_CERTS: CA_PEM },
  );
  const output = child.output();
  try {
    let reply: Uint8Array | null = null;
    for (let i = 0; i < 100 && reply === null && !timedOut(); i++) {
      reply = await udpExchange(listen, buildQuery("hup.test", { id: 1 }), 200);
    }
    assert.ok(reply, "the proxy never answered");
    // (At start the pool may send a slow first question twice; count from here.)
    const asked = dot.queries;
    assert.ok(await udpExchange(listen, buildQuery("hup.test", { id: 2 })));
    assert.equal(dot.queries, asked, "the second query was a hit");
    child.kill("SIGHUP");
    // The flush happens on the signal's turn of the event loop: ask until it went upstream.
    for (let i = 0; i < 40 && dot.queries === asked; i++) {
      await sleep(50);
      assert.ok(await udpExchange(listen, buildQuery("hup.test", { id: 3 + i })));
    }
    assert.ok(dot.queries > asked, "asked upstream again after the flush");
    child.kill("SIGTERM");
    const result = await output;
    assert.ok(!timedOut(), "stopped on SIGTERM");
    assert.equal(result.code, 0);
    const lines = new TextDecoder().decode(result.stderr).split("\n").filter((l) => l !== "")
      .map((l) => JSON.parse(l));
    const flushed = lines.find((l) => l.msg === "SIGHUP: cache flushed");
    assert.ok(flushed, "the flush is logged");
    assert.equal(flushed.entries, 1);
    assert.equal(flushed.level, "info");
  } finally {
    stopTimer();
    try {
      child.kill("SIGKILL");
    } catch {
      // Already exited.
    }
    await output.catch(() => {});
    await dot.close();
  }
});

// ---- real Unbound -------------------------------------------------------------------------------

/** Runs `unbound -d` with `config` (a whole file; `DIR` replaced by its directory). */
async function withUnboundConfig(
  config: string,
  files: Record<string, string>,
  fn: (dir: string) => Promise<void>,
  waitPort?: number,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "dotproxy-cache-" });
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${dir}/${name}`, text);
  }
  await Deno.writeTextFile(`${dir}/unbound.conf`, config.replaceAll("DIR", dir));
  const child = new Deno.Command("unbound", {
    args: ["-d", "-c", `${dir}/unbound.conf`],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  try {
    if (waitPort !== undefined) {
      let ready = false;
      for (let i = 0; i < 100 && !ready; i++) {
        try {
          (await Deno.connect({ hostname: "127.0.0.1", port: waitPort })).close();
          ready = true;
        } catch {
          await sleep(50);
        }
      }
      assert.ok(ready, "unbound did not listen within 5 s");
    } else {
      await sleep(300);
    }
    await fn(dir);
  } catch (error) {
    child.kill("SIGTERM");
    await child.status;
    throw new Error(`${error instanceof Error ? error.message : error}\nunbound: ${await stderr}`);
  } finally {
    try {
      child.kill("SIGTERM");
    } catch {
      // Already exited.
    }
    await child.status;
    await stderr;
    await Deno.remove(dir, { recursive: true });
  }
}

/** Unbound serving DoT on `port` from `zoneLines` (inside `server:`), never recursing. */
function dotUnboundConfig(port: number, zoneLines: string[], tail = ""): string {
  return [
    ...unboundServerHead(port, "DIR"),
    // Answer the proxy's `. NS` health probe at once, and never go to the internet.
    `  local-zone: "." refuse`,
    ...zoneLines.map((line) => `  ${line}`),
    tail,
    "remote-control:",
    "  control-enable: no",
    "",
  ].join("\n");
}

const TLS_FILES = { "server.pem": SERVER_PEM, "server.key": SERVER_KEY };

Deno.test({
  name: "interop: dig twice through dotproxy in front of Unbound shows the decremented TTL",
  ignore: !(hasDig && hasUnbound),
  async fn() {
    const upstreamPort = freePort();
    const config = dotUnboundConfig(upstreamPort, [
      `local-zone: "ttl.test." static`,
      `local-data: "www.ttl.test. 300 IN A 192.0.2.30"`,
    ]);
    await withUnboundConfig(config, TLS_FILES, async () => {
      const proxyConfig = testConfig([`127.0.0.1:${upstreamPort}#dns.test`]);
      await withProxy(proxyConfig, async ({ port }) => {
        const dig = async () => {
          const { out } = await run("dig", [
            "@127.0.0.1",
            "-p",
            String(port),
            "www.ttl.test",
            "A",
            "+noall",
            "+answer",
            "+time=3",
            "+tries=1",
          ]);
          const fields = out.trim().split(/\s+/);
          assert.equal(fields[4], "192.0.2.30", out);
          return Number(fields[1]);
        };
        assert.equal(await dig(), 300);
        await sleep(1100);
        const second = await dig();
        assert.ok(second === 299 || second === 298, `second dig TTL ${second}, want 299`);
      });
    }, upstreamPort);
  },
});

Deno.test({
  name: "interop: Unbound with use-caps-for-id (0x20) in front of dotproxy accepts cached answers",
  ignore: !(hasDig && hasUnbound),
  async fn() {
    const upstreamPort = freePort();
    const upstream = dotUnboundConfig(upstreamPort, [
      `local-zone: "caps.test." static`,
      `local-data: "www.mixed-case-check.caps.test. 300 IN A 192.0.2.20"`,
    ]);
    await withUnboundConfig(upstream, TLS_FILES, async () => {
      const proxyConfig = testConfig([`127.0.0.1:${upstreamPort}#dns.test`], {
        logQueries: true,
      });
      await withProxy(proxyConfig, async ({ port, logs, proxy }) => {
        const frontPort = freePort();
        const front = [
          "server:",
          `  interface: 127.0.0.1@${frontPort}`,
          `  port: ${frontPort}`,
          `  username: ""`,
          `  chroot: ""`,
          `  directory: "DIR"`,
          `  pidfile: "DIR/unbound.pid"`,
          "  do-daemonize: no",
          "  use-syslog: no",
          "  verbosity: 1",
          "  num-threads: 1",
          "  so-reuseport: no",
          "  do-ip6: no",
          `  module-config: "iterator"`,
          "  do-not-query-localhost: no",
          "  use-caps-for-id: yes",
          "  qname-minimisation: no",
          // Nothing cached in front: each dig reaches dotproxy, under a new random casing.
          "  cache-max-ttl: 0",
          "  prefetch: no",
          `  local-zone: "test." nodefault`,
          "forward-zone:",
          `  name: "."`,
          `  forward-addr: 127.0.0.1@${port}`,
          "remote-control:",
          "  control-enable: no",
          "",
        ].join("\n");
        await withUnboundConfig(front, {}, async () => {
          for (let round = 0; round < 2; round++) {
            const { out } = await run("dig", [
              "@127.0.0.1",
              "-p",
              String(frontPort),
              "www.mixed-case-check.caps.test",
              "A",
              "+time=5",
              "+tries=1",
            ]);
            assert.match(out, /status: NOERROR/, out);
            assert.match(out, /192\.0\.2\.20/, out);
          }
        });
        const fromFront = logs.find("query").filter((l) =>
          String(l.name).toLowerCase() === "www.mixed-case-check.caps.test."
        );
        assert.deepEqual(
          fromFront.map((l) => l.cache),
          ["miss", "hit"],
          `Unbound took each answer at once, the cached one too: ${JSON.stringify(fromFront)}`,
        );
        assert.ok(
          fromFront.every((l) => l.name !== "www.mixed-case-check.caps.test."),
          "Unbound randomised the case (0x20)",
        );
        assert.notEqual(fromFront[0].name, fromFront[1].name);
        const text = proxy.metrics.registry.render();
        assert.equal(metricValue(text, "dotproxy_cache_lookups_total", { result: "hit" }), 1);
      });
    }, upstreamPort);
  },
});

Deno.test({
  name: "interop: delv validates a DNSSEC-signed answer served from dotproxy's cache",
  ignore: !(hasDelv && hasUnbound && hasSigner),
  async fn() {
    const work = await Deno.makeTempDir({ prefix: "dotproxy-dnssec-" });
    try {
      const zone = "signed.test";
      await Deno.writeTextFile(
        `${work}/zone`,
        [
          "$TTL 300",
          `@ IN SOA ns.${zone}. hostmaster.${zone}. 1 7200 900 1209600 300`,
          `@ IN NS ns.${zone}.`,
          "ns IN A 192.0.2.53",
          "www IN A 192.0.2.80",
          "",
        ].join("\n"),
      );
      const keygen = async (...extra: string[]) => {
        const { code, out } = await run("dnssec-keygen", [
          "-q",
          "-K",
          work,
          "-a",
          "ECDSAP256SHA256",
          ...extra,
          zone,
        ]);
        assert.equal(code, 0, out);
        return out.trim();
      };
      const ksk = await keygen("-f", "KSK");
      const zsk = await keygen();
      const signed = await run("dnssec-signzone", [
        "-q",
        "-S",
        "-K",
        work,
        "-d",
        work,
        "-o",
        zone,
        "-f",
        `${work}/zone.signed`,
        `${work}/zone`,
        `${work}/${ksk}`,
        `${work}/${zsk}`,
      ]);
      assert.equal(signed.code, 0, signed.out);
      // The KSK as delv's trust anchor for the zone.
      const key = (await Deno.readTextFile(`${work}/${ksk}.key`)).split("\n")
        .find((line) => /\sDNSKEY\s+257\s/.test(line))!.trim().split(/\s+/);
      await Deno.writeTextFile(
        `${work}/anchor.conf`,
        `trust-anchors {\n  ${zone}. static-key ${key.slice(3, 6).join(" ")} "${
          key.slice(6).join("")
        }";\n};\n`,
      );
      const upstreamPort = freePort();
      const config = dotUnboundConfig(
        upstreamPort,
        [`local-zone: "${zone}." transparent`],
        [
          "auth-zone:",
          `  name: "${zone}."`,
          `  zonefile: "${work}/zone.signed"`,
          "  for-downstream: yes",
          "  for-upstream: no",
          "  fallback-enabled: no",
        ].join("\n"),
      );
      await withUnboundConfig(config, TLS_FILES, async () => {
        const proxyConfig = testConfig([`127.0.0.1:${upstreamPort}#dns.test`]);
        await withProxy(proxyConfig, async ({ port, proxy }) => {
          const delv = () =>
            run("delv", [
              "@127.0.0.1",
              "-p",
              String(port),
              "-a",
              `${work}/anchor.conf`,
              `+root=${zone}`,
              `www.${zone}`,
              "A",
            ]);
          const first = await delv();
          assert.match(first.out, /; fully validated/, first.out);
          const before = proxy.metrics.registry.render();
          const hitsBefore = metricValue(before, "dotproxy_cache_lookups_total", {
            result: "hit",
          })!;
          const second = await delv();
          assert.match(second.out, /; fully validated/, second.out);
          assert.match(second.out, /www\.signed\.test\.\s+\d+\s+IN\s+A\s+192\.0\.2\.80/);
          assert.match(second.out, /RRSIG\s+A 13 3 300/);
          const after = proxy.metrics.registry.render();
          const misses = (text: string) =>
            metricValue(text, "dotproxy_cache_lookups_total", { result: "miss" });
          assert.equal(misses(after), misses(before), "the second delv was answered from cache");
          assert.ok(
            metricValue(after, "dotproxy_cache_lookups_total", { result: "hit" })! >=
              hitsBefore + 2,
            "the A answer and the DNSKEY set came from the cache",
          );
        });
      }, upstreamPort);
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
});
