/**
 * Per-zone routing with real servers on loopback: a plain-DNS Unbound as the "cluster DNS"
 * serving a fake `cluster.local` (a service's A, SRV, a TXT too big for UDP, PTR records of
 * the service CIDR), and a DoT Unbound as the default upstream that logs every query and
 * holds a sentinel answer for the same cluster name, so that any leak shows. Skips, saying
 * so, without Unbound.
 */

import assert from "node:assert/strict";
import { buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { TcpDnsClient, testConfig, udpExchange, withProxy, zones } from "./support/proxy.ts";
import { UnboundUpstream } from "./support/unbound.ts";
import {
  BIG_TXT_STRINGS,
  CLUSTER_DNS,
  leaks,
  loggedQueries,
  PUBLIC_DOT,
  SERVICE,
  SERVICE_IP,
} from "./support/cluster.ts";
import { sleep } from "./support/wait.ts";

const unboundAvailable = await UnboundUpstream.available();
if (!unboundAvailable) console.warn("cluster_dns_test: skipped, unbound is not installed");

const A = 1;
const PTR = 12;
const TXT = 16;
const SRV = 33;

function clusterDns(): Promise<UnboundUpstream> {
  return UnboundUpstream.start(CLUSTER_DNS);
}

function publicDot(): Promise<UnboundUpstream> {
  return UnboundUpstream.start(PUBLIC_DOT);
}

function zonesFor(cluster: UnboundUpstream) {
  return zones(`cluster.local,10.96.0.0/12=dns://127.0.0.1:${cluster.port}`);
}

function dotQueries(dot: UnboundUpstream): string[] {
  return loggedQueries(dot.stderr);
}

async function tcpAsk(port: number, query: Uint8Array): Promise<Uint8Array> {
  const client = await TcpDnsClient.connect(port);
  try {
    await client.send(query);
    const reply = await client.receive();
    assert.ok(reply);
    return reply;
  } finally {
    client.close();
  }
}

Deno.test({
  name:
    "cluster DNS: cluster names and reverse lookups over UDP and TCP, the big TXT whole; nothing leaks to DoT",
  ignore: !unboundAvailable,
  async fn() {
    const cluster = await clusterDns();
    const dot = await publicDot();
    try {
      const config = testConfig([dot.upstream()], { zones: zonesFor(cluster), cacheSize: 0 });
      await withProxy(config, async ({ port, logs }) => {
        for (
          const ask of [(q: Uint8Array) => udpExchange(port, q), (q: Uint8Array) => tcpAsk(port, q)]
        ) {
          const a = parseMessage((await ask(buildQuery(SERVICE, { ednsUdpSize: 1232 })))!);
          assert.equal(a.rcode, 0);
          assert.deepEqual(
            a.answers.map((r) => formatA(r.data)),
            [SERVICE_IP],
            "the cluster's, not the sentinel",
          );
          const srv = parseMessage(
            (await ask(buildQuery(`_http._tcp.${SERVICE}`, { type: SRV })))!,
          );
          assert.equal(srv.answers[0]?.type, SRV);
          const ptr = parseMessage(
            (await ask(buildQuery("20.0.96.10.in-addr.arpa", { type: PTR })))!,
          );
          assert.equal(ptr.answers[0]?.type, PTR);
          assert.ok(
            new TextDecoder().decode(ptr.answers[0].data).includes("orders"),
            "the cluster's PTR",
          );
          const missing = parseMessage((await ask(buildQuery("nope.svc.cluster.local")))!);
          assert.equal(missing.rcode, 3, "the cluster's NXDOMAIN, not a fall-through");
        }
        const bigQuery = () =>
          buildQuery("big.shop.svc.cluster.local", { type: TXT, ednsUdpSize: 1232 });
        const overUdp = parseMessage((await udpExchange(port, bigQuery()))!);
        assert.equal(overUdp.tc, true, "too big for UDP");
        const whole = parseMessage(await tcpAsk(port, bigQuery()));
        assert.equal(whole.tc, false);
        const text = new TextDecoder().decode(whole.answers[0].data);
        for (const [i, string] of BIG_TXT_STRINGS.entries()) {
          assert.ok(text.includes(string), `string ${i}`);
        }
        // Special-use names: answered here.
        for (
          const [name, type] of [["localhost", A], ["x.onion", A], ["printer.local", A], [
            "1.1.168.192.in-addr.arpa",
            PTR,
          ], ["nas.home.arpa", A]] as const
        ) {
          const reply = parseMessage((await udpExchange(port, buildQuery(name, { type })))!);
          assert.ok(reply.rcode === 0 || reply.rcode === 3, name);
        }
        const publicName = parseMessage((await udpExchange(port, buildQuery("www.unbound.test")))!);
        assert.deepEqual(
          publicName.answers.map((r) => formatA(r.data)),
          ["192.0.2.10"],
          "through DoT",
        );
        const logged = dotQueries(dot);
        assert.ok(
          logged.some((line) => line.includes("www.unbound.test.")),
          `the DoT log works: ${logged}`,
        );
        assert.deepEqual(
          leaks(logged),
          [],
          "nothing of the cluster or special-use names reached DoT",
        );
        const routes = logs.find("route").map((r) => `${r.route} ${r.targets}`);
        assert.ok(routes.includes(`cluster.local dns://127.0.0.1:${cluster.port}`), String(routes));
        assert.ok(routes.includes(`10.96.0.0/12 dns://127.0.0.1:${cluster.port}`), String(routes));
      });
    } finally {
      await cluster.close();
      await dot.close();
    }
  },
});

Deno.test({
  name: "cluster DNS: frozen, cluster names get SERVFAIL or stale while public names keep working",
  ignore: !unboundAvailable,
  async fn() {
    const cluster = await clusterDns();
    const dot = await publicDot();
    try {
      const config = testConfig([dot.upstream()], {
        zones: zonesFor(cluster),
        timeoutMs: 1500,
        staleAnswerTimeoutMs: 200,
      });
      await withProxy(config, async ({ port, proxy }) => {
        const first = parseMessage((await udpExchange(port, buildQuery(SERVICE)))!);
        assert.deepEqual(first.answers.map((r) => formatA(r.data)), [SERVICE_IP]);
        cluster.stop();
        try {
          await sleep(1100); // the TTL of 1 s runs out
          const started = performance.now();
          const [stale, unknown, publicName] = await Promise.all([
            udpExchange(port, buildQuery(SERVICE)),
            udpExchange(port, buildQuery("other.shop.svc.cluster.local")),
            udpExchange(port, buildQuery("www.unbound.test")),
          ]);
          const publicParsed = parseMessage(publicName!);
          assert.deepEqual(publicParsed.answers.map((r) => formatA(r.data)), ["192.0.2.10"]);
          const staleParsed = parseMessage(stale!);
          assert.equal(staleParsed.rcode, 0, "served stale");
          assert.deepEqual(staleParsed.answers.map((r) => formatA(r.data)), [SERVICE_IP]);
          assert.equal(parseMessage(unknown!).rcode, 2, "SERVFAIL, not the sentinel");
          const waited = performance.now() - started;
          console.log(`frozen: answers after ${Math.round(waited)} ms`);
          assert.ok(waited < 5000);
          // Public names stay fast with the cluster DNS frozen: answered from DoT each time.
          for (let i = 0; i < 3; i++) {
            const again = parseMessage(
              (await udpExchange(port, buildQuery(`n${i}.unbound.test`)))!,
            );
            assert.equal(again.rcode, 3, "the DoT Unbound's NXDOMAIN for its static zone");
          }
          assert.equal(dotQueries(dot).filter((l) => /cluster\.local/.test(l)).length, 0);
          const text = proxy.metrics.registry.render();
          assert.match(
            text,
            /dotproxy_upstream_errors_total\{upstream="dns:\/\/127\.0\.0\.1:\d+",reason="timeout"\} [1-9]/,
          );
        } finally {
          cluster.resume();
        }
      });
    } finally {
      await cluster.close();
      await dot.close();
    }
  },
});
