/**
 * `dotproxy healthcheck` run as a real subprocess (`deno run main.ts healthcheck ...`)
 * against an in-process proxy: exit 0 when the proxy answers through its DNS listener or
 * its `/readyz`, 1 when nothing listens or the proxy cannot reach an upstream, configured by
 * flags or by the same `DOTPROXY_*` environment variables the server reads.
 *
 * Run with `deno test --allow-net --allow-env --allow-read --allow-run tests/healthcheck_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { DotServer } from "./support/dot_server.ts";
import { spawnMain, testConfig, withProxy } from "./support/proxy.ts";

/** Longest a healthcheck subprocess may run (its own deadline is 3 s, plus Deno's start). */
const SUBPROCESS_LIMIT_MS = 20_000;

interface Outcome {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * Runs `main.ts healthcheck` with `args` and exactly `env` on top of the parent's
 * environment minus every `DOTPROXY_*` variable; kills it if it outlives the limit.
 */
async function runHealthcheck(args: string[], env: Record<string, string> = {}): Promise<Outcome> {
  const { child, timedOut, stopTimer } = spawnMain(
    ["healthcheck", ...args],
    env,
    SUBPROCESS_LIMIT_MS,
  );
  try {
    const output = await child.output();
    const decoder = new TextDecoder();
    const outcome = {
      code: output.code,
      stdout: decoder.decode(output.stdout),
      stderr: decoder.decode(output.stderr),
    };
    assert.ok(!timedOut(), `healthcheck ${args.join(" ")} ran past ${SUBPROCESS_LIMIT_MS} ms`);
    return outcome;
  } finally {
    stopTimer();
  }
}

/** A loopback port nothing listens on, over UDP and TCP (free when it was checked). */
function deadPort(): number {
  for (let attempt = 0; attempt < 20; attempt++) {
    const udp = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    const port = (udp.addr as Deno.NetAddr).port;
    try {
      const tcp = Deno.listen({ transport: "tcp", hostname: "127.0.0.1", port });
      tcp.close();
      return port;
    } catch {
      // The TCP side is taken; try another.
    } finally {
      udp.close();
    }
  }
  throw new Error("no free loopback port found");
}

function explain(outcome: Outcome): string {
  return `exit ${outcome.code}\nstdout: ${outcome.stdout}\nstderr: ${outcome.stderr}`;
}

const HTTP = { http: { hostname: "127.0.0.1", port: 0 } };

Deno.test("healthcheck: exit 0 against a running proxy, by DNS and by /readyz", async () => {
  const upstream = DotServer.start();
  try {
    await withProxy(testConfig([upstream.upstream()], HTTP), async ({ proxy, port }) => {
      const byDns = await runHealthcheck(["--listen", `127.0.0.1:${port}`]);
      assert.equal(byDns.code, 0, explain(byDns));
      assert.equal(byDns.stdout, `healthy: 127.0.0.1:${port}: answered NOERROR\n`);
      assert.ok(upstream.queries >= 1, "the probe went through to the upstream");

      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const byHttp = await runHealthcheck(["--http", `127.0.0.1:${httpPort}`]);
      assert.equal(byHttp.code, 0, explain(byHttp));
      assert.match(
        byHttp.stdout,
        new RegExp(`^healthy: http://127\\.0\\.0\\.1:${httpPort}/readyz: 200 ready: `),
      );

      // A wildcard listen address is checked through loopback.
      const wildcard = await runHealthcheck(["--listen", `0.0.0.0:${port}`]);
      assert.equal(wildcard.code, 0, explain(wildcard));
    });
  } finally {
    await upstream.close();
  }
});

Deno.test("healthcheck: exit 1 when nothing listens", async () => {
  const port = deadPort();
  const byDns = await runHealthcheck(["--listen", `127.0.0.1:${port}`]);
  assert.equal(byDns.code, 1, explain(byDns));
  assert.match(byDns.stdout, /^unhealthy: 127\.0\.0\.1:\d+: /);

  const byHttp = await runHealthcheck(["--http", `127.0.0.1:${port}`]);
  assert.equal(byHttp.code, 1, explain(byHttp));
  assert.match(byHttp.stdout, new RegExp(`^unhealthy: http://127\\.0\\.0\\.1:${port}/readyz: `));
});

Deno.test("healthcheck: exit 1 when the proxy runs but no upstream answers", async () => {
  const dead = deadPort();
  await withProxy(
    testConfig([`127.0.0.1:${dead}#dns.test`], HTTP),
    async ({ proxy, port }) => {
      const byDns = await runHealthcheck(["--listen", `127.0.0.1:${port}`]);
      assert.equal(byDns.code, 1, explain(byDns));
      assert.equal(byDns.stdout, `unhealthy: 127.0.0.1:${port}: answered SERVFAIL\n`);

      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const byHttp = await runHealthcheck(["--http", `127.0.0.1:${httpPort}`]);
      assert.equal(byHttp.code, 1, explain(byHttp));
      assert.match(byHttp.stdout, / 503 not ready: no upstream answers: /);
    },
  );
});

Deno.test("healthcheck: DOTPROXY_* environment configures it like flags", async () => {
  const upstream = DotServer.start();
  const dead = deadPort();
  try {
    await withProxy(testConfig([upstream.upstream()], HTTP), async ({ proxy, port }) => {
      const byDns = await runHealthcheck([], { DOTPROXY_LISTEN: `127.0.0.1:${port}` });
      assert.equal(byDns.code, 0, explain(byDns));
      assert.equal(byDns.stdout, `healthy: 127.0.0.1:${port}: answered NOERROR\n`);

      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const byHttp = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${dead}`,
        DOTPROXY_HTTP: `127.0.0.1:${httpPort}`,
      });
      assert.equal(byHttp.code, 0, explain(byHttp));
      assert.match(byHttp.stdout, /\/readyz: 200 ready: /);

      // The environment of a container that lists several addresses: the first is checked.
      const list = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${port},127.0.0.1:${dead}`,
      });
      assert.equal(list.code, 0, explain(list));

      // Flags win over the environment.
      const flagWins = await runHealthcheck(["--http", `127.0.0.1:${httpPort}`], {
        DOTPROXY_HTTP: `127.0.0.1:${dead}`,
      });
      assert.equal(flagWins.code, 0, explain(flagWins));

      // The environment points at a dead endpoint: unhealthy.
      const deadEnv = await runHealthcheck([], { DOTPROXY_HTTP: `127.0.0.1:${dead}` });
      assert.equal(deadEnv.code, 1, explain(deadEnv));

      // A bad value is a configuration error (exit 2), named in the message.
      const bad = await runHealthcheck([], { DOTPROXY_LISTEN: "not-an-address" });
      assert.equal(bad.code, 2, explain(bad));
      assert.match(bad.stderr, /DOTPROXY_LISTEN/);
    });
  } finally {
    await upstream.close();
  }
});
