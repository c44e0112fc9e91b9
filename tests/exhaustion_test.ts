/**
 * The process survives what used to end it: `main.ts` under `ulimit -n 1024` with 1,000 idle
 * DNS-over-TCP clients (the case that used to end the process at the first /healthz), and an
 * unhandled rejection or uncaught exception. While descriptors are gone UDP still answers;
 * once the clients leave, /healthz and a TCP query work again; the process never exits;
 * accept failures are logged rate limited.
 */
import assert from "node:assert/strict";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { base64Url } from "./support/doh.ts";
import { addressFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { DotServer } from "./support/dot_server.ts";
import { freeStablePort } from "./support/fault_upstream.ts";

import { TcpDnsClient, udpExchange } from "./support/proxy.ts";
import { sleep, until } from "./support/wait.ts";

const ROOT = new URL("../", import.meta.url);
const CLIENTS = 1000;
/**
 * One client address holds them all: the per-client and global caps lifted so that the
 * descriptors run out first.
 */
const UNCAPPED = [
  "--max-tcp-connections",
  "5000",
  "--max-tcp-connections-per-client",
  "5000",
];

/** The status of a GET of `url` (through `client` when given), or the error's name. */
async function httpStatus(
  url: string,
  timeoutMs: number,
  client?: Deno.HttpClient,
): Promise<number | string> {
  try {
    const response = await fetch(url, { client, signal: AbortSignal.timeout(timeoutMs) });
    await response.body?.cancel();
    return response.status;
  } catch (error) {
    return error instanceof Error ? error.name : String(error);
  }
}

/** `main.ts` running as its own process, its stderr collected. */
interface MainChild {
  /** Everything written to stderr so far. */
  stderr(): string;
  /** True once the process ended. */
  exited(): boolean;
  /** Sends `signal`. */
  kill(signal: Deno.Signal): void;
  /** SIGTERM, then waits for the exit; resolves with the exit code. */
  stop(): Promise<number>;
}

/**
 * Starts `deno run [denoArgs] main.ts [args]` under `ulimit -n` (when given) with the test CA
 * and a clean `DOTPROXY_*` environment; killed after 60 s whatever happens.
 */
function startMain(
  options: { ulimit?: number; denoArgs?: string[]; args: string[]; env?: Record<string, string> },
): MainChild {
  const inherited = Object.fromEntries(
    Object.entries(Deno.env.toObject()).filter(([name]) => !name.startsWith("DOTPROXY_")),
  );
  const limit = options.ulimit === undefined ? "" : `ulimit -n ${options.ulimit} && `;
  const child = new Deno.Command("bash", {
    args: [
      "-c",
      `${limit}exec "$0" run --allow-net --allow-env "$@"`,
      Deno.execPath(),
      ...(options.denoArgs ?? []),
      "main.ts",
      ...options.args,
      "--log-format",
      "json",
    ],
    cwd: ROOT,
    clearEnv: true,
    env: {
      ...inherited,
      NO_COLOR: "1",
      DENO_NO_UPDATE_CHECK: "1",
      DOTPROXY_CA_CERTS: CA_PEM,
      ...options.env,
    },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let stderr = "";
  const collected = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) stderr += decoder.decode(chunk, { stream: true });
  })();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const killer = setTimeout(() => child.kill("SIGKILL"), 60_000);
  return {
    stderr: () => stderr,
    exited: () => exited,
    kill: (signal) => child.kill(signal),
    stop: async () => {
      clearTimeout(killer);
      try {
        child.kill("SIGTERM");
      } catch {
        // Already gone.
      }
      const { code } = await status;
      await collected;
      return code;
    },
  };
}

/** Waits (15 s at most) for `main` to log that it started. */
async function started(main: MainChild): Promise<void> {
  assert.ok(
    await until(() => main.stderr().includes("dotproxy started"), 15_000),
    `started: ${main.stderr()}`,
  );
}

/**
 * Opens CLIENTS connections to `port` on 127.0.0.1, each pushed to `clients` (the caller
 * closes them), and waits (10 s at most) for `main` to log `logged`.
 */
async function exhaust(
  main: MainChild,
  port: number,
  clients: Deno.TcpConn[],
  logged: string,
  message: string,
): Promise<void> {
  for (let i = 0; i < CLIENTS; i++) {
    clients.push(await Deno.connect({ hostname: "127.0.0.1", port }));
  }
  assert.ok(await until(() => main.stderr().includes(logged), 10_000), message);
}

Deno.test({
  name: "exhaustion: 1,000 idle TCP clients under ulimit -n 1024; every port comes back",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    const upstream = DotServer.start();
    const dnsPort = freeStablePort();
    const httpPort = freeStablePort();
    const main = startMain({
      ulimit: 1024,
      args: [
        "--listen",
        `127.0.0.1:${dnsPort}`,
        "--http",
        `127.0.0.1:${httpPort}`,
        "--upstream",
        upstream.upstream(),
        ...UNCAPPED,
        // Idle clients stay open through the test.
        "--tcp-idle-timeout",
        "120000",
      ],
    });
    const clients: Deno.TcpConn[] = [];
    try {
      const healthz = `http://127.0.0.1:${httpPort}/healthz`;
      await started(main);
      assert.equal(await httpStatus(healthz, 2000), 200);

      // 1,000 idle clients: the kernel completes every handshake; the proxy runs out of
      // descriptors accepting them.
      await exhaust(
        main,
        dnsPort,
        clients,
        "out of file descriptors",
        "the proxy ran out of descriptors",
      );
      // Meanwhile: /healthz may not get a descriptor, but must not end the process...
      await httpStatus(healthz, 1000);
      await httpStatus(healthz, 1000);
      // ...and UDP needs none: it still answers.
      const udp = await udpExchange(dnsPort, buildQuery("during.test", { id: 1 }));
      assert.ok(udp, "UDP answered while descriptors are gone");
      assert.equal(formatA(parseMessage(udp).answers[0].data), addressFor("during.test"));
      assert.equal(main.exited(), false, "still running");

      for (const conn of clients.splice(0)) conn.close();
      let health: number | string = 0;
      for (let i = 0; i < 40 && health !== 200; i++) {
        health = await httpStatus(healthz, 1000);
        if (health !== 200) await sleep(100);
      }
      assert.equal(health, 200, "/healthz answers once descriptors free up");
      const tcp = await TcpDnsClient.connect(dnsPort);
      try {
        await tcp.send(buildQuery("after.test", { id: 2 }));
        const reply = await tcp.receive(5000);
        assert.ok(reply);
        assert.equal(formatA(parseMessage(reply).answers[0].data), addressFor("after.test"));
      } finally {
        tcp.close();
      }
      assert.equal(main.exited(), false, "never exited");
      const stderr = main.stderr();
      assert.ok(!stderr.includes("unhandled"), "no unhandled rejection");
      assert.ok(!stderr.includes("uncaught"), "no uncaught exception");
      const pauses = stderr.split("\n").filter((l) => l.includes("out of file descriptors"));
      // One line per listener per ten seconds, however many accepts failed.
      assert.ok(pauses.length <= 4, `accept failures logged ${pauses.length} times`);
    } finally {
      for (const conn of clients) conn.close();
      await main.stop();
      await upstream.close();
    }
  },
});

Deno.test({
  name: "exhaustion: an unhandled rejection or uncaught exception is logged; the process serves on",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    // A module loaded before main.ts (deno run --preload) that, on SIGUSR2, leaves a promise
    // rejected with no handler and throws from a timer: what a bug anywhere would do.
    const bug = await Deno.makeTempFile({ dir: "/tmp", prefix: "dotproxy-bug-", suffix: ".ts" });
    await Deno.writeTextFile(
      bug,
      [
        'Deno.addSignalListener("SIGUSR2", () => {',
        '  Promise.reject(new Error("injected rejection"));',
        '  setTimeout(() => { throw new Error("injected exception"); }, 0);',
        "});",
      ].join("\n"),
    );
    const upstream = DotServer.start();
    const dnsPort = freeStablePort();
    const main = startMain({
      denoArgs: ["--preload", bug],
      args: ["--listen", `127.0.0.1:${dnsPort}`, "--upstream", upstream.upstream()],
    });
    try {
      await started(main);
      for (let round = 1; round <= 2; round++) {
        main.kill("SIGUSR2");
        assert.ok(
          await until(() => main.stderr().split("injected exception").length > round, 5000),
          `round ${round}: ${main.stderr()}`,
        );
        const reply = await udpExchange(dnsPort, buildQuery(`after${round}.test`, { id: round }));
        assert.ok(reply, `answered after round ${round}`);
        assert.equal(
          formatA(parseMessage(reply).answers[0].data),
          addressFor(`after${round}.test`),
        );
        assert.equal(main.exited(), false, "still running");
      }
      const records: { level: string; msg: string }[] = main.stderr().split("\n")
        .filter((line) => line.startsWith("{")).map((line) => JSON.parse(line));
      const messages = records.filter((r) => r.level === "error").map((r) => r.msg);
      assert.equal(
        messages.filter((m) => m === "unhandled rejection (a bug; please report it)").length,
        2,
        main.stderr(),
      );
      assert.equal(
        messages.filter((m) => m === "uncaught exception (a bug; please report it)").length,
        2,
      );
      assert.equal(await main.stop(), 0, "a clean exit on SIGTERM");
    } finally {
      await main.stop();
      await upstream.close();
      await Deno.remove(bug);
    }
  },
});

Deno.test({
  name: "exhaustion: 1,000 idle clients on the DoH listener under ulimit -n 1024; DoH comes back",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    const upstream = DotServer.start();
    const dnsPort = freeStablePort();
    const dohPort = freeStablePort();
    const plainPort = freeStablePort();
    const main = startMain({
      ulimit: 1024,
      env: { DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY },
      args: [
        "--listen",
        `127.0.0.1:${dnsPort}`,
        "--listen-doh",
        `127.0.0.1:${dohPort}`,
        "--listen-doh-plain",
        `127.0.0.1:${plainPort}`,
        "--upstream",
        upstream.upstream(),
        ...UNCAPPED,
        "--tcp-idle-timeout",
        "120000",
      ],
    });
    const clients: Deno.TcpConn[] = [];
    const client = Deno.createHttpClient({ caCerts: [CA_PEM] });
    const ask = (url: string) => httpStatus(url, 2000, client);
    const path = `/dns-query?dns=${base64Url(buildQuery("doh.test", { id: 0 }))}`;
    try {
      await started(main);
      assert.equal(await ask(`http://127.0.0.1:${plainPort}${path}`), 200);
      await exhaust(
        main,
        plainPort,
        clients,
        "doh-plain accept failed: out of file descriptors",
        "the proxy ran out of descriptors on the DoH listener",
      );
      assert.equal(main.exited(), false, "still running");
      for (const conn of clients.splice(0)) conn.close();
      let plain: number | string = 0;
      let tls: number | string = 0;
      for (let i = 0; i < 40 && (plain !== 200 || tls !== 200); i++) {
        plain = await ask(`http://127.0.0.1:${plainPort}${path}`);
        tls = await ask(`https://localhost:${dohPort}${path}`);
        if (plain !== 200 || tls !== 200) await sleep(100);
      }
      assert.equal(plain, 200, "plain DoH answers once descriptors free up");
      assert.equal(tls, 200, "DoH over TLS answers once descriptors free up");
      assert.equal(main.exited(), false, "never exited");
      assert.ok(!main.stderr().includes("unhandled"), "no unhandled rejection");
      assert.ok(!main.stderr().includes("no longer serving"), "no listener gave up");
    } finally {
      for (const conn of clients) conn.close();
      client.close();
      await main.stop();
      await upstream.close();
    }
  },
});

Deno.test({
  name:
    "exhaustion: 1,000 clients on the DoT listener under ulimit -n 1024; UDP answers, DoT comes back",
  ignore: Deno.build.os === "windows",
  fn: async () => {
    const upstream = DotServer.start();
    const dnsPort = freeStablePort();
    const dotPort = freeStablePort();
    const main = startMain({
      ulimit: 1024,
      env: { DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY },
      args: [
        "--listen",
        `127.0.0.1:${dnsPort}`,
        "--listen-dot",
        `127.0.0.1:${dotPort}`,
        "--upstream",
        upstream.upstream(),
        ...UNCAPPED,
      ],
    });
    const clients: Deno.TcpConn[] = [];
    const askDot = async (): Promise<boolean> => {
      try {
        const client = await TcpDnsClient.connectTls(dotPort);
        try {
          await client.send(buildQuery("dot.test", { id: 1 }));
          return (await client.receive(2000)) !== null;
        } finally {
          client.close();
        }
      } catch {
        return false;
      }
    };
    try {
      await started(main);
      assert.ok(await askDot(), "DoT answers at first");
      // Connections that never start a handshake: each holds a descriptor up to the deadline.
      await exhaust(
        main,
        dotPort,
        clients,
        "dot accept failed: out of file descriptors",
        "the proxy ran out of descriptors on the DoT listener",
      );
      const udp = await udpExchange(dnsPort, buildQuery("udp.test", { id: 2 }), 2000);
      assert.ok(udp, "UDP answers meanwhile");
      for (const conn of clients.splice(0)) conn.close();
      let dot = false;
      for (let i = 0; i < 40 && !dot; i++) {
        dot = await askDot();
        if (!dot) await sleep(100);
      }
      assert.ok(dot, "DoT answers once descriptors free up");
      assert.equal(main.exited(), false, "never exited");
      assert.ok(!main.stderr().includes("unhandled"), "no unhandled rejection");
      assert.ok(!main.stderr().includes("no longer serving"), "no listener gave up");
    } finally {
      for (const conn of clients) conn.close();
      await main.stop();
      await upstream.close();
    }
  },
});
