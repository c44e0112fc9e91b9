import assert from "node:assert/strict";
import {
  type Config,
  ConfigError,
  helpText,
  parseConfig,
  SETTINGS,
  unknownVariables,
} from "../src/config.ts";
import { CA_PEM } from "./fixtures/certs.ts";

function config(args: string[], env: Record<string, string> = {}): Config {
  const request = parseConfig(args, (name) => env[name]);
  assert.equal(request.kind, "config");
  return (request as { config: Config }).config;
}

function failure(args: string[], env: Record<string, string> = {}): string {
  try {
    parseConfig(args, (name) => env[name]);
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected ConfigError, got ${error}`);
    assert.ok(!error.message.includes("\n"), "one line");
    return error.message;
  }
  assert.fail(`expected ${JSON.stringify(args)} ${JSON.stringify(env)} to fail`);
}

Deno.test("defaults: loopback 5300, Cloudflare over TLS, sane limits", () => {
  const c = config([]);
  assert.deepEqual(c.listen, [{ hostname: "127.0.0.1", port: 5300 }]);
  assert.deepEqual(c.upstreams.map((u) => [u.address, u.port, u.tlsName]), [
    ["1.1.1.1", 853, "cloudflare-dns.com"],
    ["1.0.0.1", 853, "cloudflare-dns.com"],
  ]);
  assert.equal(c.logLevel, "info");
  assert.equal(c.logFormat, "text");
  assert.equal(c.logQueries, false);
  assert.equal(c.http, null);
  assert.deepEqual(c.caCerts, []);
  assert.equal(c.command, "serve");
  assert.ok(c.timeoutMs >= 1000 && c.timeoutMs <= 10000);
});

Deno.test("flags: repeatable listen and upstream, IPv6 in brackets, port default 853", () => {
  const c = config([
    "--listen",
    "127.0.0.1:5353",
    "--listen",
    "[::1]:5353",
    "--upstream",
    "[2606:4700:4700::1111]#cloudflare-dns.com",
    "--upstream",
    "9.9.9.9:8853#dns.quad9.net",
    "--upstream",
    "8.8.8.8",
    "--timeout",
    "1500",
    "--log-level",
    "debug",
    "--log-format",
    "json",
    "--log-queries",
    "--http",
    "0.0.0.0:5380",
  ]);
  assert.deepEqual(c.listen, [
    { hostname: "127.0.0.1", port: 5353 },
    { hostname: "::1", port: 5353 },
  ]);
  assert.deepEqual(c.upstreams.map((u) => u.label), [
    "[2606:4700:4700::1111]:853#cloudflare-dns.com",
    "9.9.9.9:8853#dns.quad9.net",
    "8.8.8.8:853#8.8.8.8",
  ]);
  assert.equal(c.timeoutMs, 1500);
  assert.equal(c.logLevel, "debug");
  assert.equal(c.logFormat, "json");
  assert.equal(c.logQueries, true);
  assert.deepEqual(c.http, { hostname: "0.0.0.0", port: 5380 });
});

Deno.test("environment: comma lists, flags win over env", () => {
  const env = {
    DOTPROXY_LISTEN: "127.0.0.1:1053, [::1]:1053",
    DOTPROXY_UPSTREAMS: "1.1.1.1#one.one.one.one,8.8.4.4:853#dns.google",
    DOTPROXY_TIMEOUT_MS: "3000",
    DOTPROXY_LOG_LEVEL: "warn",
    DOTPROXY_LOG_FORMAT: "json",
    DOTPROXY_LOG_QUERIES: "true",
    DOTPROXY_HTTP: "127.0.0.1:5380",
    DOTPROXY_CA_CERTS: CA_PEM,
  };
  const c = config([], env);
  assert.equal(c.listen.length, 2);
  assert.equal(c.upstreams[1].tlsName, "dns.google");
  assert.equal(c.timeoutMs, 3000);
  assert.equal(c.logLevel, "warn");
  assert.equal(c.logQueries, true);
  assert.equal(c.caCerts.length, 1);
  const overridden = config(["--timeout", "900", "--listen", "127.0.0.2:53"], env);
  assert.equal(overridden.timeoutMs, 900);
  assert.deepEqual(overridden.listen, [{ hostname: "127.0.0.2", port: 53 }]);
});

Deno.test("invalid input names the flag or variable and the value", () => {
  const cases: [string[], Record<string, string>, RegExp][] = [
    [["--bogus"], {}, /unknown flag --bogus/],
    [["--listen", "127.0.0.1:0"], {}, /--listen "127.0.0.1:0".*port 0 is out of range/],
    [["--listen", "127.0.0.1:65536"], {}, /--listen.*65536/],
    [["--listen", "127.0.0.1"], {}, /--listen "127.0.0.1": missing port/],
    [["--listen", "::1:53"], {}, /--listen.*brackets/],
    [["--listen", "example.com:53"], {}, /--listen.*not an IP address/],
    [[], { DOTPROXY_LISTEN: "1.2.3.4:x" }, /DOTPROXY_LISTEN.*"x" is not a number/],
    [["--upstream", "dns.google"], {}, /--upstream "dns.google".*not an IP address/],
    [["--upstream", "1.1.1.1:99999#x.test"], {}, /--upstream.*99999/],
    [["--upstream", "1.1.1.1#bad name"], {}, /--upstream.*TLS name "bad name"/],
    [[], { DOTPROXY_UPSTREAMS: " , " }, /DOTPROXY_UPSTREAMS: the upstream list is empty/],
    [[], { DOTPROXY_UPSTREAMS: "" }, /DOTPROXY_UPSTREAMS: the upstream list is empty/],
    [["--log-level", "loud"], {}, /--log-level: unknown log level "loud"/],
    [[], { DOTPROXY_LOG_LEVEL: "trace" }, /DOTPROXY_LOG_LEVEL: unknown log level "trace"/],
    [["--log-format", "xml"], {}, /--log-format: unknown log format "xml"/],
    [["--timeout", "soon"], {}, /--timeout: "soon" is not a whole number/],
    [["--timeout", "0"], {}, /--timeout: 0 is out of range/],
    [[], { DOTPROXY_TIMEOUT_MS: "-5" }, /DOTPROXY_TIMEOUT_MS: "-5"/],
    [[], { DOTPROXY_CA_CERTS: "not a pem" }, /DOTPROXY_CA_CERTS: no PEM certificate/],
    [[], {
      DOTPROXY_CA_CERTS: "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----",
    }, /DOTPROXY_CA_CERTS: certificate 1 is not valid base64/],
    [[], { DOTPROXY_CA_CERTS: "-----BEGIN CERTIFICATE-----\nMIIB" }, /DOTPROXY_CA_CERTS/],
    [[], { DOTPROXY_LOG_QUERIES: "maybe" }, /DOTPROXY_LOG_QUERIES: "maybe"/],
    [["--http", "localhost"], {}, /--http "localhost": missing port/],
    [["serve-please"], {}, /unknown command "serve-please"/],
    [["--timeout"], {}, /--timeout needs a value/],
  ];
  for (const [args, env, pattern] of cases) {
    assert.match(failure(args, env), pattern, `${JSON.stringify(args)} ${JSON.stringify(env)}`);
  }
});

Deno.test("unknown DOTPROXY_* variables are reported, known ones and others are not", () => {
  assert.deepEqual(
    unknownVariables([
      "PATH",
      "DOTPROXY_UPSTREAM",
      "DOTPROXY_LISTEN",
      "DOTPROXY_CA_CERTS",
      "DOTPROXY_SERVICE_HOST",
    ]),
    ["DOTPROXY_SERVICE_HOST", "DOTPROXY_UPSTREAM"],
  );
});

Deno.test("help lists every flag with its variable and default; version and healthcheck", () => {
  assert.equal(parseConfig(["--help"], () => undefined).kind, "help");
  assert.equal(parseConfig(["-V"], () => undefined).kind, "version");
  const text = helpText();
  for (const setting of SETTINGS) {
    if (setting.flag) assert.ok(text.includes(`--${setting.flag}`), setting.flag);
    assert.ok(text.includes(setting.env), setting.env);
    assert.ok(text.includes(setting.defaultText), setting.defaultText);
  }
  assert.equal(config(["healthcheck", "--listen", "127.0.0.1:5301"]).command, "healthcheck");
});

async function runMain(args: string[], env: Record<string, string> = {}) {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-env", "main.ts", ...args],
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: output.code,
    stdout: new TextDecoder().decode(output.stdout),
    stderr: new TextDecoder().decode(output.stderr),
  };
}

Deno.test("main: invalid configuration is one line on stderr and exit code 2", async () => {
  for (
    const [args, env, expected] of [
      [["--listen", "127.0.0.1:99999"], {}, "--listen"],
      [["--nope"], {}, "--nope"],
      [[], { DOTPROXY_LOG_LEVEL: "chatty" }, "DOTPROXY_LOG_LEVEL"],
      [[], { DOTPROXY_CA_CERTS: "garbage" }, "DOTPROXY_CA_CERTS"],
    ] as [string[], Record<string, string>, string][]
  ) {
    const result = await runMain(args, env);
    assert.equal(result.code, 2, `${args} ${JSON.stringify(env)}: ${result.stderr}`);
    const lines = result.stderr.trim().split("\n");
    assert.equal(lines.length, 1, result.stderr);
    assert.ok(lines[0].startsWith("dotproxy: "), lines[0]);
    assert.ok(lines[0].includes(expected), lines[0]);
  }
});

Deno.test("main: --help, --version, and a port in use is one line and exit 1", async () => {
  const help = await runMain(["--help"]);
  assert.equal(help.code, 0);
  assert.ok(help.stdout.includes("DOTPROXY_UPSTREAMS"));
  const version = await runMain(["--version"]);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^dotproxy \d+\.\d+\.\d+/);
  const busy = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    const port = (busy.addr as Deno.NetAddr).port;
    const result = await runMain(["--listen", `127.0.0.1:${port}`]);
    assert.equal(result.code, 1, result.stderr);
    const lines = result.stderr.trim().split("\n");
    assert.equal(lines.length, 1, result.stderr);
    assert.match(
      lines[0],
      new RegExp(`dotproxy: cannot listen on 127.0.0.1:${port} \\(udp\\): address already in use`),
    );
  } finally {
    busy.close();
  }
});
