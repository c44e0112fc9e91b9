/**
 * Graceful drain of a running `main.ts`, with real signals: on SIGTERM `/readyz` turns 503 at
 * once; UDP and TCP keep being answered for `--shutdown-delay`; then the listeners stop,
 * queries in flight finish within `--shutdown-timeout`, and the process exits 0 with a
 * "stopped" line. Drain under load loses nothing. A TCP client that stops reading cannot hold
 * the exit past the timeout; SIGHUP never kills; a second signal ends the process at once.
 *
 * Needs `--allow-net --allow-env --allow-run --allow-read` (it runs `deno run main.ts`).
 *
 * @module
 */

import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { buildQuery } from "./support/dns.ts";
import { freeStablePort } from "./support/fault_upstream.ts";
import { type MainProcess, spawnMain, TcpDnsClient, udpExchange } from "./support/proxy.ts";
import { sleep } from "./support/wait.ts";

/** Status of GET /readyz, or 0 when nothing answers. */
async function readyz(port: number): Promise<number> {
  try {
    const response = await fetch(`http://127.0.0.1:${port}/readyz`, {
      signal: AbortSignal.timeout(1000),
    });
    await response.body?.cancel();
    return response.status;
  } catch {
    return 0;
  }
}

interface Running {
  main: MainProcess;
  dns: number;
  http: number;
  output: Promise<Deno.CommandOutput>;
}

/** Starts main.ts in front of `upstream` and waits (bounded) until /readyz says 200. */
async function startMain(upstream: DotServer, extra: string[]): Promise<Running> {
  const dns = freeStablePort();
  const http = freeStablePort();
  const main = spawnMain(
    [
      "--listen",
      `127.0.0.1:${dns}`,
      "--http",
      `127.0.0.1:${http}`,
      "--upstream",
      upstream.upstream(),
      "--log-format",
      "json",
      "--cache-size",
      "0",
      ...extra,
    ],
    { DOTPROXY_CA_CERTS: CA_PEM },
    30_000,
  );
  const output = main.child.output();
  for (let i = 0; i < 200 && !main.timedOut(); i++) {
    if (await readyz(http) === 200) return { main, dns, http, output };
    await sleep(50);
  }
  main.child.kill("SIGKILL");
  await output;
  main.stopTimer();
  throw new Error("main.ts did not become ready within 10 s");
}

/** Waits for the exit; returns it with the parsed log lines and the time it took. */
async function finish(running: Running, from: number) {
  const result = await running.output;
  const tookMs = performance.now() - from;
  running.main.stopTimer();
  assert.ok(!running.main.timedOut(), "killed by the test's timer");
  const lines = new TextDecoder().decode(result.stderr).split("\n").filter((l) => l !== "")
    .map((l) => {
      try {
        return JSON.parse(l);
      } catch {
        return { msg: l };
      }
    });
  return { code: result.code, lines, tookMs };
}

async function cleanup(running: Running): Promise<void> {
  running.main.stopTimer();
  try {
    running.main.child.kill("SIGKILL");
  } catch {
    // Already exited.
  }
  await running.output.catch(() => {});
}

Deno.test("drain: SIGTERM turns /readyz 503 at once, answers through the delay, loses nothing, exits 0", async () => {
  // Every answer takes 150 ms: queries are always in flight when the listeners close.
  const upstream = DotServer.start({ delayMs: () => 150 });
  const running = await startMain(upstream, [
    "--shutdown-delay",
    "800",
    "--shutdown-timeout",
    "3000",
  ]);
  try {
    const tcp = await TcpDnsClient.connect(running.dns);
    const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const sentAt = new Map<number, number>();
    const rcodes: number[] = [];
    const receiving = (async () => {
      for (let i = 0; i < 10_000; i++) {
        try {
          const [data] = await socket.receive();
          if (sentAt.delete((data[0] << 8) | data[1])) rcodes.push(data[3] & 0xf);
        } catch {
          return;
        }
      }
    })();
    const send = async (i: number) => {
      sentAt.set(i, performance.now());
      await socket.send(buildQuery(`load${i}.test`, { id: i }), {
        transport: "udp",
        hostname: "127.0.0.1",
        port: running.dns,
      });
    };
    // Load at 100 q/s; SIGTERM after 300 ms; keep sending until shortly before the delay ends.
    let i = 0;
    for (; i < 30; i++) {
      await send(i);
      await sleep(10);
    }
    const signalledAt = performance.now();
    running.main.child.kill("SIGTERM");
    let status = 0;
    for (let t = 0; t < 20 && status !== 503; t++) {
      status = await readyz(running.http);
      if (status !== 503) await sleep(10);
    }
    const readyzAfter = performance.now() - signalledAt;
    assert.equal(status, 503, "/readyz fails once SIGTERM arrived");
    assert.ok(readyzAfter < 300, `/readyz 503 after ${readyzAfter} ms`);
    // UDP and TCP keep being answered during the delay.
    for (; performance.now() - signalledAt < 720 && i < 200; i++) {
      await send(i);
      await sleep(10);
    }
    await tcp.send(buildQuery("tcp-during-delay.test", { id: 7 }));
    const tcpAnswer = await tcp.receive(2000);
    assert.ok(tcpAnswer && (tcpAnswer[3] & 0xf) === 0, "TCP answered during the delay");
    const sent = i;
    // Everything sent before the listeners closed is answered, in-flight ones included.
    for (let w = 0; w < 100 && sentAt.size > 0; w++) await sleep(20);
    assert.equal(sentAt.size, 0, `${sentAt.size} of ${sent} queries lost in the drain`);
    assert.ok(rcodes.every((rcode) => rcode === 0), `rcodes ${[...new Set(rcodes)]}`);
    const { code, lines, tookMs } = await finish(running, signalledAt);
    socket.close();
    await receiving;
    tcp.close();
    assert.equal(code, 0);
    assert.equal(lines.at(-1)?.msg, "stopped", "the last line says stopped");
    assert.ok(lines.some((l) => l.msg === "draining: readiness is 503; still answering"));
    assert.ok(tookMs >= 800, `exited ${tookMs} ms after SIGTERM, before the delay ended`);
    assert.ok(tookMs < 800 + 2000, `exited ${tookMs} ms after SIGTERM`);
    // After the exit nothing listens.
    assert.equal(await udpExchange(running.dns, buildQuery("after.test"), 200), null);
  } finally {
    await cleanup(running);
    await upstream.close();
  }
});

Deno.test("drain: a TCP client that stops reading cannot hold the exit past --shutdown-timeout", async () => {
  // Big answers (60 kB each) for a client that never reads, and late: still in flight when
  // the drain starts, and unwritable when they come.
  const upstream = DotServer.start({ delayMs: (q) => q[12] === 0 ? 0 : 3000 });
  const running = await startMain(upstream, [
    "--shutdown-delay",
    "0",
    "--shutdown-timeout",
    "1000",
  ]);
  try {
    const stuck = await TcpDnsClient.connect(running.dns);
    for (let i = 0; i < 40; i++) {
      await stuck.send(buildQuery(`big60000.q${i}.test`, { id: i, type: 16, ednsUdpSize: 4096 }));
    }
    // As many as the listener takes in at once from one connection are in flight upstream.
    for (let i = 0; i < 100 && upstream.queries < 10; i++) await sleep(20);
    assert.ok(upstream.queries >= 10, `in flight upstream: ${upstream.queries}`);
    const signalledAt = performance.now();
    running.main.child.kill("SIGTERM");
    const { code, lines, tookMs } = await finish(running, signalledAt);
    stuck.close();
    assert.equal(code, 0, "a clean exit, not the force timer's");
    assert.equal(lines.at(-1)?.msg, "stopped");
    assert.ok(tookMs >= 900, `exited ${tookMs} ms after SIGTERM: did it wait for anything?`);
    assert.ok(tookMs < 1000 + 1500, `exited ${tookMs} ms after SIGTERM`);
  } finally {
    await cleanup(running);
    await upstream.close();
  }
});

Deno.test("signals: SIGHUP never kills; a second SIGTERM or SIGINT ends a drain at once", async () => {
  const upstream = DotServer.start();
  for (const second of ["SIGTERM", "SIGINT"] as const) {
    const running = await startMain(upstream, [
      "--shutdown-delay",
      "20000",
      "--shutdown-timeout",
      "10000",
    ]);
    try {
      running.main.child.kill("SIGHUP");
      running.main.child.kill("SIGHUP");
      await sleep(100);
      const reply = await udpExchange(running.dns, buildQuery("after-hup.test"), 2000);
      assert.ok(reply && (reply[3] & 0xf) === 0, "alive and answering after SIGHUP");
      assert.equal(await readyz(running.http), 200);
      running.main.child.kill("SIGTERM");
      for (let t = 0; t < 50 && await readyz(running.http) !== 503; t++) await sleep(10);
      // Draining for 20 s; the operator insists.
      const insistedAt = performance.now();
      running.main.child.kill(second);
      const { code, lines, tookMs } = await finish(running, insistedAt);
      assert.ok(tookMs < 1000, `exited ${tookMs} ms after the second signal`);
      assert.notEqual(code, 0, "an interrupted drain is not a clean exit");
      assert.ok(lines.some((l) => l.msg === "second signal; exiting at once"));
      assert.ok(lines.some((l) => l.msg === "SIGHUP: cache flushed"));
    } finally {
      await cleanup(running);
    }
  }
  await upstream.close();
});
