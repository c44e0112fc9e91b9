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
import { describeHttpFailure, healthcheck } from "../src/healthcheck.ts";
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
      assert.ok(upstream.queries + upstream.probes >= 1, "the probe went through to the upstream");

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
  // In words, not `TypeError: fetch failed`.
  assert.equal(
    byHttp.stdout,
    `unhealthy: http://127.0.0.1:${port}/readyz: connection refused ` +
      `(is dotproxy running with --http 127.0.0.1:${port}?)\n`,
  );
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
      // /readyz is about this replica serving, not about the upstreams (issue 22).
      const byHttp = await runHealthcheck(["--http", `127.0.0.1:${httpPort}`]);
      assert.equal(byHttp.code, 0, explain(byHttp));
      assert.match(byHttp.stdout, / 200 ready: serving/);
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

/**
 * A loopback TCP server that does `serve` with each connection (at most `limit` of them), for
 * endpoints that misbehave in the ways a healthcheck must put into words.
 */
function misbehave(
  serve: (conn: Deno.TcpConn) => Promise<void>,
  limit = 4,
): { port: number; close: () => Promise<void> } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.TcpConn[] = [];
  const tasks: Promise<void>[] = [];
  const loop = (async () => {
    for (let i = 0; i < limit; i++) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch {
        return;
      }
      conns.push(conn);
      tasks.push(serve(conn).catch(() => {}));
    }
  })();
  return {
    port: listener.addr.port,
    close: async () => {
      listener.close();
      await loop;
      for (const conn of conns) {
        try {
          conn.close();
        } catch {
          // Closed by `serve`.
        }
      }
      await Promise.all(tasks);
    },
  };
}

async function readRequest(conn: Deno.TcpConn): Promise<void> {
  await conn.read(new Uint8Array(4096));
}

Deno.test("healthcheck: says in words why /readyz could not be had", async () => {
  const check = (port: number, timeoutMs = 3000) =>
    healthcheck({ http: { hostname: "127.0.0.1", port }, listen: [] }, timeoutMs);
  const hint = (port: number) => `(is dotproxy running with --http 127.0.0.1:${port}?)`;

  const refusedPort = deadPort();
  const refused = await check(refusedPort);
  assert.deepEqual(refused, {
    healthy: false,
    detail: `http://127.0.0.1:${refusedPort}/readyz: connection refused ${hint(refusedPort)}`,
  });

  // Accepts, reads the request, never answers.
  const silent = misbehave(async (conn) => {
    await readRequest(conn);
    await conn.read(new Uint8Array(1));
  });
  try {
    const result = await check(silent.port, 300);
    assert.equal(
      result.detail,
      `http://127.0.0.1:${silent.port}/readyz: timed out: no answer within 300 ms ` +
        hint(silent.port),
    );
    assert.equal(result.healthy, false);
  } finally {
    await silent.close();
  }

  // Accepts and hangs up (as dotproxy does beyond its HTTP connection limit).
  const hangUp = misbehave(async (conn) => {
    await readRequest(conn);
    conn.close();
  });
  try {
    const result = await check(hangUp.port);
    assert.equal(
      result.detail,
      `http://127.0.0.1:${hangUp.port}/readyz: connection closed without an answer ` +
        hint(hangUp.port),
    );
  } finally {
    await hangUp.close();
  }

  // Something else on the port.
  const notHttp = misbehave(async (conn) => {
    await readRequest(conn);
    await conn.write(new TextEncoder().encode("SSH-2.0-OpenSSH_9.6\r\n\r\n"));
    conn.close();
  });
  try {
    const result = await check(notHttp.port);
    assert.match(
      result.detail,
      new RegExp(`/readyz: not an HTTP answer \\(.+\\) \\(is dotproxy running with --http `),
    );
  } finally {
    await notHttp.close();
  }

  // A wildcard address is checked through loopback; the hint names the configured address.
  const wildcard = await healthcheck({
    http: { hostname: "0.0.0.0", port: refusedPort },
    listen: [],
  });
  assert.equal(
    wildcard.detail,
    `http://127.0.0.1:${refusedPort}/readyz: connection refused ` +
      `(is dotproxy running with --http 0.0.0.0:${refusedPort}?)`,
  );
});

Deno.test("healthcheck: describeHttpFailure reads error.cause", () => {
  const failed = (cause: unknown) => new TypeError("fetch failed", { cause });
  assert.equal(
    describeHttpFailure(new DOMException("aborted", "AbortError"), 3000, true),
    "timed out: no answer within 3000 ms",
  );
  assert.equal(
    describeHttpFailure(failed(new Deno.errors.ConnectionRefused("x")), 1, false),
    "connection refused",
  );
  assert.equal(
    describeHttpFailure(
      failed(
        new Error(
          "error sending request for url (http://[::1]:5380/readyz): client error " +
            "(Connect): tcp connect error: Connection refused (os error 111)",
        ),
      ),
      1,
      false,
    ),
    "connection refused",
  );
  assert.equal(
    describeHttpFailure(failed(new Error("Connection reset by peer (os error 104)")), 1, false),
    "connection reset",
  );
  assert.equal(
    describeHttpFailure(failed(new Error("Network is unreachable (os error 101)")), 1, false),
    "network unreachable",
  );
  assert.equal(
    describeHttpFailure(failed(new Error('Requires net access to "127.0.0.1:5380"')), 1, false),
    "no permission to connect",
  );
  assert.equal(describeHttpFailure(new Error("something odd"), 1, false), "something odd");
});

Deno.test("healthcheck: does not load the proxy (src/app.ts)", async () => {
  const info = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json", "src/healthcheck.ts"],
    cwd: new URL("../", import.meta.url),
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(info.success, new TextDecoder().decode(info.stderr));
  const graph: { modules: { specifier: string }[] } = JSON.parse(
    new TextDecoder().decode(info.stdout),
  );
  const modules = graph.modules.map((m) => m.specifier);
  assert.ok(modules.some((m) => m.endsWith("/src/healthcheck.ts")));
  assert.ok(!modules.some((m) => m.endsWith("/src/app.ts")), modules.join("\n"));
});

/**
 * A UDP DNS server on loopback that answers one query by echoing it with QR set and `rcode`;
 * `answered` resolves with the query it saw.
 */
function answerOnce(rcode: number) {
  const server = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (server.addr as Deno.NetAddr).port;
  const answered = (async () => {
    const [query, from] = await server.receive();
    const response = query.slice();
    response[2] |= 0x80; // QR
    response[3] = (response[3] & 0xf0) | rcode;
    await server.send(response, from);
    return query;
  })();
  return { server, port, answered };
}

Deno.test("healthcheck: the DNS probe is `. NS` with EDNS and no RD, and NOERROR is healthy", async () => {
  const { server, port, answered: answering } = answerOnce(0);
  try {
    const result = await healthcheck({ http: null, listen: [{ hostname: "127.0.0.1", port }] });
    assert.deepEqual(result, { healthy: true, detail: `127.0.0.1:${port}: answered NOERROR` });
    const query = await answering;
    // Header: no RD (no upstream recurses for it), one question, one additional record; then
    // ". NS IN"; then an OPT record advertising 1232 bytes (DNS flag day 2020).
    assert.deepEqual([...query.subarray(2)], [
      ...[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 1],
      ...[0, 0, 2, 0, 1],
      ...[0, 0, 41, 1232 >> 8, 1232 & 0xff, 0, 0, 0, 0, 0, 0],
    ]);
  } finally {
    server.close();
  }
});

Deno.test("healthcheck: REFUSED relayed from an upstream is healthy, SERVFAIL is not", async () => {
  for (const [rcode, name, healthy] of [[5, "REFUSED", true], [2, "SERVFAIL", false]] as const) {
    const { server, port, answered: answering } = answerOnce(rcode);
    try {
      const result = await healthcheck({ http: null, listen: [{ hostname: "127.0.0.1", port }] });
      assert.deepEqual(result, { healthy, detail: `127.0.0.1:${port}: answered ${name}` });
      await answering;
    } finally {
      server.close();
    }
  }
});
