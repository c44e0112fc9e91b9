/**
 * `dotproxy healthcheck` run as a real subprocess (`deno run main.ts healthcheck ...`)
 * against an in-process proxy: exit 0 when this dotproxy answers its own `version.bind CH TXT`
 * on its DNS listener (and, with `--http`, its `/readyz` says ready), 1 when nothing listens,
 * when another DNS or HTTP server answers there, or when dotproxy's own access list refuses
 * the check; configured by flags or by the same `DOTPROXY_*` environment variables the server
 * reads. Upstream health does not enter into it (issue 22).
 *
 * Run with `deno test --allow-net --allow-env --allow-read --allow-run tests/healthcheck_test.ts`.
 *
 * @module
 */

import assert from "node:assert/strict";
import { parseCidr } from "../src/config.ts";
import { describeHttpFailure, healthcheck } from "../src/healthcheck.ts";
import { VERSION } from "../src/version.ts";
import { DotServer } from "./support/dot_server.ts";
import { spawnMain, testConfig, udpExchange, withProxy } from "./support/proxy.ts";
import { buildQuery } from "./support/dns.ts";

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
      assert.equal(byDns.stdout, `healthy: 127.0.0.1:${port}: dotproxy ${VERSION} answered\n`);
      assert.equal(upstream.queries, 0, "the check is answered by the proxy, never forwarded");

      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const byHttp = await runHealthcheck([
        "--listen",
        `127.0.0.1:${port}`,
        "--http",
        `127.0.0.1:${httpPort}`,
      ]);
      assert.equal(byHttp.code, 0, explain(byHttp));
      assert.equal(
        byHttp.stdout,
        `healthy: 127.0.0.1:${port}: dotproxy ${VERSION} answered; ` +
          `http://127.0.0.1:${httpPort}/readyz: 200 ready: serving\n`,
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

  // The DNS listener answers, nothing listens on --http.
  await withProxy(testConfig(["127.0.0.1:1#dns.test"]), async ({ port: dns }) => {
    const byHttp = await runHealthcheck([
      "--listen",
      `127.0.0.1:${dns}`,
      "--http",
      `127.0.0.1:${port}`,
    ]);
    assert.equal(byHttp.code, 1, explain(byHttp));
    // In words, not `TypeError: fetch failed`.
    assert.equal(
      byHttp.stdout,
      `unhealthy: 127.0.0.1:${dns}: dotproxy ${VERSION} answered; ` +
        `http://127.0.0.1:${port}/readyz: connection refused ` +
        `(is dotproxy running with --http 127.0.0.1:${port}?)\n`,
    );
  });
});

Deno.test("healthcheck: exit 0 when the proxy serves but no upstream answers (a fault every replica shares)", async () => {
  const dead = deadPort();
  await withProxy(
    testConfig([`127.0.0.1:${dead}#dns.test`], HTTP),
    async ({ proxy, port }) => {
      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const both = await runHealthcheck([
        "--listen",
        `127.0.0.1:${port}`,
        "--http",
        `127.0.0.1:${httpPort}`,
      ]);
      assert.equal(both.code, 0, explain(both));
      assert.match(both.stdout, / 200 ready: serving\n$/);
    },
  );
});

Deno.test("healthcheck: REFUSED by the proxy's own --allow is unhealthy, saying what to allow", async () => {
  const allow = ["--allow", "10.0.0.0/8"];
  await withProxy(
    { ...testConfig(["127.0.0.1:1#dns.test"]), allow: [parseCidr("10.0.0.0/8", "--allow")] },
    async ({ port }) => {
      const refused = await runHealthcheck(["--listen", `127.0.0.1:${port}`, ...allow]);
      assert.equal(refused.code, 1, explain(refused));
      assert.equal(
        refused.stdout,
        `unhealthy: 127.0.0.1:${port}: answered REFUSED: the check comes from 127.0.0.1, ` +
          `which --allow does not include, so dotproxy refuses it (add 127.0.0.1/32 to ` +
          `--allow, or check with --http)\n`,
      );
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
      assert.equal(byDns.stdout, `healthy: 127.0.0.1:${port}: dotproxy ${VERSION} answered\n`);

      const httpPort = proxy.http?.addr.port;
      assert.ok(httpPort);
      const byHttp = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${port}`,
        DOTPROXY_HTTP: `127.0.0.1:${httpPort}`,
      });
      assert.equal(byHttp.code, 0, explain(byHttp));
      assert.match(byHttp.stdout, /\/readyz: 200 ready: /);

      // The DNS listener is where it matters: a dead one is unhealthy whatever /readyz says.
      const deadListen = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${dead}`,
        DOTPROXY_HTTP: `127.0.0.1:${httpPort}`,
      });
      assert.equal(deadListen.code, 1, explain(deadListen));

      // The environment of a container that lists several addresses: the first is checked.
      const list = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${port},127.0.0.1:${dead}`,
      });
      assert.equal(list.code, 0, explain(list));

      // Flags win over the environment.
      const flagWins = await runHealthcheck(["--http", `127.0.0.1:${httpPort}`], {
        DOTPROXY_LISTEN: `127.0.0.1:${port}`,
        DOTPROXY_HTTP: `127.0.0.1:${dead}`,
      });
      assert.equal(flagWins.code, 0, explain(flagWins));

      // The environment points at a dead endpoint: unhealthy.
      const deadEnv = await runHealthcheck([], {
        DOTPROXY_LISTEN: `127.0.0.1:${port}`,
        DOTPROXY_HTTP: `127.0.0.1:${dead}`,
      });
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
 * A UDP DNS server on loopback that answers one query by echoing it with QR set and `rcode`,
 * plus `answer` (wire bytes of one answer record) when given: another DNS server than
 * dotproxy. `answered` resolves with the query it saw.
 */
function answerOnce(rcode: number, answer: number[] = []) {
  const server = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (server.addr as Deno.NetAddr).port;
  const answered = (async () => {
    const [query, from] = await server.receive();
    const response = new Uint8Array([...query, ...answer]);
    response[2] |= 0x80; // QR
    response[3] = (response[3] & 0xf0) | rcode;
    response[7] = answer.length > 0 ? 1 : 0; // ANCOUNT
    await server.send(response, from);
    return query;
  })();
  return { server, port, answered };
}

/** A TXT record in class CH for the question's name (a pointer to it), holding `text`. */
function chaosTxt(text: string): number[] {
  const bytes = [...new TextEncoder().encode(text)];
  return [0xc0, 12, 0, 16, 0, 3, 0, 0, 0, 0, 0, bytes.length + 1, bytes.length, ...bytes];
}

Deno.test("healthcheck: the DNS check asks version.bind CH TXT, without RD or EDNS", async () => {
  const { server, port, answered: answering } = answerOnce(0, chaosTxt(`dotproxy ${VERSION}`));
  try {
    const result = await healthcheck({ http: null, listen: [{ hostname: "127.0.0.1", port }] });
    assert.deepEqual(result, {
      healthy: true,
      detail: `127.0.0.1:${port}: dotproxy ${VERSION} answered`,
    });
    const query = await answering;
    assert.deepEqual([...query.subarray(2)], [
      ...[0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 0],
      ...[7, ..."version".split("").map((c) => c.charCodeAt(0)), 4, 98, 105, 110, 100, 0],
      ...[0, 16, 0, 3],
    ]);
  } finally {
    server.close();
  }
});

Deno.test("healthcheck: another DNS server on the address is unhealthy, whatever it answers", async () => {
  const others: [number, number[], string][] = [
    [0, chaosTxt("unbound 1.19.2"), 'answered NOERROR "unbound 1.19.2" to version.bind'],
    [0, [], "answered NOERROR to version.bind"],
    [5, [], "answered REFUSED (the rate limit, or another DNS server on this address?)"],
    [4, [], "answered NOTIMP to version.bind"],
    [2, [], "answered SERVFAIL to version.bind"],
  ];
  for (const [rcode, answer, detail] of others) {
    const { server, port, answered: answering } = answerOnce(rcode, answer);
    try {
      const result = await healthcheck({ http: null, listen: [{ hostname: "127.0.0.1", port }] });
      assert.equal(result.healthy, false, detail);
      assert.ok(result.detail.startsWith(`127.0.0.1:${port}: ${detail}`), result.detail);
      await answering;
    } finally {
      server.close();
    }
  }
});

Deno.test("healthcheck: a 200 from another HTTP server is not dotproxy's /readyz", async () => {
  const other = misbehave(async (conn) => {
    await readRequest(conn);
    const response = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK";
    await conn.write(new TextEncoder().encode(response));
    conn.close();
  });
  try {
    const result = await healthcheck({
      http: { hostname: "127.0.0.1", port: other.port },
      listen: [],
    });
    assert.deepEqual(result, {
      healthy: false,
      detail: `http://127.0.0.1:${other.port}/readyz: 200 OK ` +
        `(not dotproxy's /readyz: is another server on this port?)`,
    });
  } finally {
    await other.close();
  }
});

Deno.test("healthcheck: the image's [::] convention: IPv4 and IPv6 clients answered, the check passes", async () => {
  const upstream = DotServer.start();
  try {
    const config = testConfig([upstream.upstream()], {
      listen: [{ hostname: "::", port: 0 }],
      http: { hostname: "::", port: 0 },
    });
    await withProxy(config, async ({ proxy, port }) => {
      // Dual-stack: one [::] socket answers both families, and the default --allow matches the
      // IPv4 client (::ffff:127.0.0.1) as 127.0.0.1.
      for (const hostname of ["127.0.0.1", "::1"]) {
        const reply = await udpExchange(port, buildQuery("dual.test"), 3000, hostname);
        assert.ok(reply, hostname);
        assert.equal(reply[3] & 0xf, 0, `${hostname}: NOERROR`);
      }
      const httpPort = proxy.http!.addr.port;
      const check = await runHealthcheck([], {
        DOTPROXY_LISTEN: `[::]:${port}`,
        DOTPROXY_HTTP: `[::]:${httpPort}`,
        DOTPROXY_CONTAINER: "true",
      });
      assert.equal(check.code, 0, explain(check));
      assert.equal(
        check.stdout,
        `healthy: [::1]:${port}: dotproxy ${VERSION} answered; ` +
          `http://[::1]:${httpPort}/readyz: 200 ready: serving\n`,
      );
    });
  } finally {
    await upstream.close();
  }
});
