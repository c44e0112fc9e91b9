/**
 * The single binary: `deno compile` with only net and env permissions, then real UDP and TCP
 * queries through it. `deno compile` downloads its runtime (denort); where that cannot be
 * had (no internet), the binary test is skipped with the reason printed, and the checks
 * that need no binary still run.
 */
import assert from "node:assert/strict";
import { CA_PEM } from "./fixtures/certs.ts";
import { DotServer } from "./support/dot_server.ts";
import { addressFor, buildQuery, formatA, parseMessage } from "./support/dns.ts";
import { TcpDnsClient, udpExchange } from "./support/proxy.ts";

const root = new URL("../", import.meta.url);
const denoJson = JSON.parse(await Deno.readTextFile(new URL("deno.json", root)));

/** The compile task's flags, so the test builds exactly what users build. */
function compileArgs(output: string): string[] {
  const task: string = denoJson.tasks.compile;
  const words = task.split(/\s+/);
  assert.equal(words[0], "deno");
  assert.equal(words[1], "compile");
  const args = words.slice(2);
  const at = args.indexOf("--output");
  assert.ok(at >= 0, "compile task names its output");
  args[at + 1] = output;
  return ["compile", ...args];
}

const buildDir = await Deno.makeTempDir({ prefix: "dotproxy-compile-" });
const binary = `${buildDir}/dotproxy${Deno.build.os === "windows" ? ".exe" : ""}`;
let skipReason = "";

/** True when `deno compile` can work without downloading its runtime. */
async function runtimeAvailable(): Promise<boolean> {
  if (Deno.env.get("DENORT_BIN")) return true;
  const info = await new Deno.Command(Deno.execPath(), {
    args: ["info", "--json"],
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    stdout: "piped",
    stderr: "null",
  }).output();
  const denoDir: string = JSON.parse(new TextDecoder().decode(info.stdout)).denoDir;
  try {
    for await (const entry of Deno.readDir(`${denoDir}/dl/release/v${Deno.version.deno}`)) {
      if (entry.name.startsWith("denort-")) return true;
    }
  } catch {
    // No cached runtime.
  }
  return false;
}

// CI machines have no internet: there the test neither downloads nor tries to.
if (Deno.env.get("CI") && !(await runtimeAvailable())) {
  skipReason = "deno compile needs its runtime (denort), which is not cached here and would " +
    "be downloaded from the internet; CI does not try (set DENORT_BIN or run it outside CI)";
  console.log(`compile: SKIPPING the compiled-binary test: ${skipReason}`);
}
if (!skipReason) {
  const output = await new Deno.Command(Deno.execPath(), {
    args: compileArgs(binary),
    cwd: root,
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!output.success) {
    const stderr = new TextDecoder().decode(output.stderr);
    const cause = stderr.split("\n").find((l) => /error|Download/i.test(l)) ?? stderr.slice(0, 200);
    skipReason = `deno compile could not build the binary (its runtime, denort, is downloaded ` +
      `from the internet): ${cause.trim()}`;
    console.log(`compile: SKIPPING the compiled-binary test: ${skipReason}`);
  }
}

Deno.test({
  name: "compile task grants exactly --allow-net and --allow-env",
  fn() {
    const allows = denoJson.tasks.compile.split(/\s+/).filter((w: string) =>
      w.startsWith("--allow")
    );
    assert.deepEqual(allows.sort(), ["--allow-env", "--allow-net"]);
    assert.ok(denoJson.tasks.compile.includes("--unstable-net"));
    const start = denoJson.tasks.start.split(/\s+/).filter((w: string) => w.startsWith("--allow"));
    assert.deepEqual(start.sort(), ["--allow-env", "--allow-net"]);
  },
});

Deno.test({
  name: "source is compile-friendly: static imports only, no file, subprocess or FFI use",
  async fn() {
    const files: string[] = ["main.ts"];
    const walk = async (dir: string) => {
      for await (const entry of Deno.readDir(new URL(dir, root))) {
        const path = `${dir}${entry.name}`;
        if (entry.isDirectory) await walk(`${path}/`);
        else if (path.endsWith(".ts")) files.push(path);
      }
    };
    await walk("src/");
    const forbidden = [
      /\bimport\s*\(/, // dynamic import
      /Deno\.(readFile|readTextFile|readDir|open|openSync|readFileSync|readTextFileSync|stat|lstat)\b/,
      /Deno\.(writeFile|writeTextFile|mkdir|remove|create)\b/,
      /Deno\.(Command|run|dlopen)\b/,
      /from\s+["'](https?:|jsr:|npm:)/,
    ];
    for (const file of files) {
      const text = await Deno.readTextFile(new URL(file, root));
      for (const pattern of forbidden) {
        assert.doesNotMatch(text, pattern, `${file} uses ${pattern}`);
      }
    }
    assert.ok(files.length > 10);
  },
});

Deno.test({
  name: "compiled binary answers UDP and TCP through a DoT upstream",
  ignore: skipReason !== "",
  async fn() {
    const upstream = DotServer.start();
    const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = probe.addr.port;
    probe.close();
    const child = new Deno.Command(binary, {
      args: ["--listen", `127.0.0.1:${port}`, "--upstream", upstream.upstream()],
      env: { DOTPROXY_CA_CERTS: CA_PEM, DOTPROXY_LOG_FORMAT: "json" },
      stdout: "null",
      stderr: "piped",
    }).spawn();
    try {
      let reply: Uint8Array | null = null;
      for (let i = 0; i < 50 && reply === null; i++) {
        reply = await udpExchange(port, buildQuery("bin.test", { id: 1 }), 200);
      }
      assert.ok(reply, "the binary answered over UDP");
      assert.equal(formatA(parseMessage(reply).answers[0].data), addressFor("bin.test"));
      const tcp = await TcpDnsClient.connect(port);
      try {
        await tcp.send(buildQuery("bin-tcp.test", { id: 2 }));
        const answer = parseMessage((await tcp.receive())!);
        assert.equal(formatA(answer.answers[0].data), addressFor("bin-tcp.test"));
      } finally {
        tcp.close();
      }
    } finally {
      child.kill("SIGTERM");
      const status = await child.status;
      await child.stderr.cancel();
      await upstream.close();
      assert.equal(status.code, 0, "clean exit on SIGTERM");
    }
  },
});

Deno.test({
  name: "compile: clean up the build directory",
  async fn() {
    await Deno.remove(buildDir, { recursive: true });
  },
});
