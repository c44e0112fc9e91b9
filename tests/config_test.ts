import assert from "node:assert/strict";
import {
  CONFIG_DOC_PATH,
  expectedGeneratedPart,
  flagText,
  generatedPart,
} from "../scripts/gen_config_docs.ts";
import {
  cidrContains,
  type Config,
  ConfigError,
  DEFAULT_STRATEGY,
  defaultConfig,
  formatConfig,
  helpText,
  isIpLiteral,
  isServiceLinkVariable,
  KNOWN_VARIABLES,
  parseCidr,
  parseConfig,
  parseIpAddress,
  SETTINGS,
  STRATEGIES,
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
      "DOTPROXY_CACHE_SIZE",
      "DOTPROXY_ALLOW",
      "DOTPROXY_RATE_LIMIT_BURST",
      "DOTPROXY_CACHE_SIZ",
    ]),
    // No value given: DOTPROXY_SERVICE_HOST without an address is no service link.
    ["DOTPROXY_CACHE_SIZ", "DOTPROXY_SERVICE_HOST"],
  );
  assert.deepEqual(unknownVariables([...KNOWN_VARIABLES]), []);
});

/** What kubelet injects for deploy/kubernetes/service.yaml's Service `dotproxy`. */
const SERVICE_LINKS: Record<string, string> = {
  DOTPROXY_SERVICE_HOST: "10.96.0.53",
  DOTPROXY_SERVICE_PORT: "53",
  DOTPROXY_SERVICE_PORT_DNS: "53",
  DOTPROXY_SERVICE_PORT_DNS_TCP: "53",
  DOTPROXY_SERVICE_PORT_METRICS: "5380",
  DOTPROXY_PORT: "udp://10.96.0.53:53",
  DOTPROXY_PORT_53_UDP: "udp://10.96.0.53:53",
  DOTPROXY_PORT_53_UDP_PROTO: "udp",
  DOTPROXY_PORT_53_UDP_PORT: "53",
  DOTPROXY_PORT_53_UDP_ADDR: "10.96.0.53",
  DOTPROXY_PORT_53_TCP: "tcp://10.96.0.53:53",
  DOTPROXY_PORT_53_TCP_PROTO: "tcp",
  DOTPROXY_PORT_53_TCP_PORT: "53",
  DOTPROXY_PORT_53_TCP_ADDR: "10.96.0.53",
  DOTPROXY_PORT_5380_TCP: "tcp://10.96.0.53:5380",
  DOTPROXY_PORT_5380_TCP_PROTO: "tcp",
  DOTPROXY_PORT_5380_TCP_PORT: "5380",
  DOTPROXY_PORT_5380_TCP_ADDR: "10.96.0.53",
  // A second Service, dotproxy-metrics, on IPv6.
  DOTPROXY_METRICS_SERVICE_HOST: "fd00::a",
  DOTPROXY_METRICS_PORT: "tcp://[fd00::a]:5380",
  DOTPROXY_METRICS_PORT_5380_TCP_ADDR: "fd00::a",
};

/** parseConfig as main.ts calls it: the environment's names given, so unknown ones fail. */
function strictConfig(args: string[], env: Record<string, string>): Config {
  const request = parseConfig(args, (name) => env[name], Object.keys(env));
  assert.equal(request.kind, "config");
  return (request as { config: Config }).config;
}

function strictFailure(args: string[], env: Record<string, string>): string {
  try {
    parseConfig(args, (name) => env[name], Object.keys(env));
  } catch (error) {
    assert.ok(error instanceof ConfigError, `expected ConfigError, got ${error}`);
    assert.ok(!error.message.includes("\n"), "one line");
    return error.message;
  }
  assert.fail(`expected ${JSON.stringify(env)} to fail`);
}

Deno.test("an unknown DOTPROXY_* variable is a configuration error with a suggestion", () => {
  const cases: [Record<string, string>, RegExp][] = [
    [
      { DOTPROXY_TIMEOUT: "4000" },
      /unknown environment variable DOTPROXY_TIMEOUT \(did you mean DOTPROXY_TIMEOUT_MS\?\)/,
    ],
    [
      { DOTPROXY_UPSTRAEMS: "10.0.0.53#dns.corp" },
      /DOTPROXY_UPSTRAEMS \(did you mean DOTPROXY_UPSTREAMS\?\)/,
    ],
    [{ DOTPROXY_LISTN: "0.0.0.0:53" }, /did you mean DOTPROXY_LISTEN\?/],
    [{ DOTPROXY_HTTP_PORT: "5380" }, /unknown environment variable DOTPROXY_HTTP_PORT/],
    [{ DOTPROXY_WHATEVER_ELSE: "1" }, /variable DOTPROXY_WHATEVER_ELSE; dotproxy reads only/],
    [
      { DOTPROXY_CACHE_SIZ: "5", DOTPROXY_LOGLEVEL: "debug" },
      /variables DOTPROXY_CACHE_SIZ \(did you mean DOTPROXY_CACHE_SIZE\?\), DOTPROXY_LOGLEVEL \(did you mean DOTPROXY_LOG_LEVEL\?\)/,
    ],
    // Service-link names whose values are not what kubelet writes are typos, not links.
    [{ DOTPROXY_PORT: "5300" }, /unknown environment variable DOTPROXY_PORT/],
    [
      { DOTPROXY_SERVICE_HOST: "dotproxy.svc" },
      /unknown environment variable DOTPROXY_SERVICE_HOST/,
    ],
    [{ DOTPROXY_PORT_53_UDP_PROTO: "tcp" }, /DOTPROXY_PORT_53_UDP_PROTO/],
    [{ DOTPROXY_PORT_53_UDP: "tcp://10.0.0.1:53" }, /DOTPROXY_PORT_53_UDP/],
    [{ DOTPROXY_PORT_53_UDP_PORT: "54" }, /DOTPROXY_PORT_53_UDP_PORT/],
  ];
  for (const [env, pattern] of cases) {
    assert.match(strictFailure([], env), pattern, JSON.stringify(env));
    // Without the names (tests, library use) the same input is accepted as before.
    assert.equal(parseConfig([], (name) => env[name]).kind, "config");
  }
  // Other variables are not dotproxy's business; --help and --version look at nothing.
  assert.equal(
    strictConfig([], { PATH: "/bin", DOTPROXYX: "1", dotproxy_x: "1" }).command,
    "serve",
  );
  assert.equal(parseConfig(["--help"], () => "x", ["DOTPROXY_NOPE"]).kind, "help");
});

Deno.test("Kubernetes service links for a Service named dotproxy are not errors", () => {
  const c = strictConfig([], { ...SERVICE_LINKS, DOTPROXY_LISTEN: "0.0.0.0:5300" });
  assert.deepEqual(c.listen, [{ hostname: "0.0.0.0", port: 5300 }]);
  for (const [name, value] of Object.entries(SERVICE_LINKS)) {
    assert.ok(isServiceLinkVariable(name, value), `${name}=${value}`);
  }
  assert.ok(!isServiceLinkVariable("DOTPROXY_LISTEN", "0.0.0.0:5300"));
  assert.ok(!isServiceLinkVariable("DOTPROXY_PORT_53_QUIC", "quic://10.0.0.1:53"));
});

Deno.test("DOTPROXY_UPSTREAM is another name for DOTPROXY_UPSTREAMS; never both", () => {
  const one = strictConfig([], { DOTPROXY_UPSTREAM: "10.0.0.53#dns.corp" });
  assert.deepEqual(one.upstreams.map((u) => u.label), ["10.0.0.53:853#dns.corp"]);
  // Its errors name it.
  assert.match(
    strictFailure([], { DOTPROXY_UPSTREAM: "dns.corp" }),
    /^DOTPROXY_UPSTREAM "dns.corp": "dns.corp" is not an IP address/,
  );
  assert.match(
    strictFailure([], { DOTPROXY_UPSTREAM: "10.0.0.53", DOTPROXY_UPSTREAMS: "10.0.0.54" }),
    /DOTPROXY_UPSTREAM and DOTPROXY_UPSTREAMS are both set; DOTPROXY_UPSTREAM is another name for DOTPROXY_UPSTREAMS: set one/,
  );
  // The flag wins over either, as over any variable.
  const flag = strictConfig(["--upstream", "10.0.0.9"], { DOTPROXY_UPSTREAM: "10.0.0.53" });
  assert.deepEqual(flag.upstreams.map((u) => u.address), ["10.0.0.9"]);
  assert.ok(helpText().includes("DOTPROXY_UPSTREAMS (or DOTPROXY_UPSTREAM)"));
});

Deno.test("--print-config: every setting as NAME=value, sources named, reads back the same", () => {
  const env: Record<string, string> = {
    DOTPROXY_UPSTREAM: "10.0.0.53#dns.corp,[fd00::53]:8853#dns.corp",
    DOTPROXY_CA_CERTS: CA_PEM,
    DOTPROXY_FAILOVER_RCODES: "SERVFAIL,5,NOTIMP",
    DOTPROXY_HTTP: "[::1]:5380",
  };
  const args = ["--listen", "127.0.0.1:5353", "--listen", "[::1]:5353", "--hedge-delay", "0"];
  const request = parseConfig([...args, "--print-config"], (name) => env[name], Object.keys(env));
  assert.ok(request.kind === "config" && request.mode === "print-config");
  const text = formatConfig(request.config, request.sources);
  const lines = text.split("\n");
  const values = lines.filter((l) => !l.startsWith("#"));
  assert.deepEqual(values.map((l) => l.slice(0, l.indexOf("="))), [...KNOWN_VARIABLES]);
  // Where a value came from is the comment before it; defaults have none.
  const sourceOf = (name: string) => {
    const at = lines.findIndex((l) => l.startsWith(`${name}=`));
    return lines[at - 1].startsWith("# ") ? lines[at - 1].slice(2) : "default";
  };
  assert.equal(sourceOf("DOTPROXY_LISTEN"), "--listen");
  assert.equal(sourceOf("DOTPROXY_UPSTREAMS"), "DOTPROXY_UPSTREAM");
  assert.equal(sourceOf("DOTPROXY_HTTP"), "DOTPROXY_HTTP");
  assert.equal(sourceOf("DOTPROXY_CACHE_SIZE"), "default");
  assert.ok(lines.includes("DOTPROXY_LISTEN=127.0.0.1:5353,[::1]:5353"));
  assert.ok(lines.includes("DOTPROXY_UPSTREAMS=10.0.0.53:853#dns.corp,[fd00::53]:8853#dns.corp"));
  assert.ok(lines.includes("DOTPROXY_FAILOVER_RCODES=SERVFAIL,REFUSED,NOTIMP"));
  // The CA text is not shown.
  assert.ok(lines.includes("DOTPROXY_CA_CERTS=<redacted: 1 PEM certificate>"), text);
  assert.ok(!text.includes("BEGIN CERTIFICATE") && !text.includes(CA_PEM.split("\n")[1]));
  // Read back as an environment file, it is the same configuration.
  const back: Record<string, string> = {};
  for (const line of values) {
    if (line.includes("<redacted")) continue;
    back[line.slice(0, line.indexOf("="))] = line.slice(line.indexOf("=") + 1);
  }
  const again = strictConfig([], back);
  assert.deepEqual({ ...again, caCerts: [] }, { ...request.config, caCerts: [] });
  // Defaults alone: no source comments, only the two header lines.
  const defaults = formatConfig(defaultConfig());
  assert.equal(defaults.split("\n").filter((l) => l.startsWith("#")).length, 2, "the header");
});

Deno.test("--print-config: secrets are declared secret and never printed", () => {
  for (const setting of SETTINGS) {
    if (/(_KEY|PASSWORD|SECRET|TOKEN)/.test(setting.env)) {
      assert.ok(setting.secret, `${setting.env} holds a secret: declare it secret: true`);
    }
  }
  // Any PEM private key is redacted whatever setting holds it, e.g. a key pasted by mistake.
  const key =
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----";
  const text = formatConfig({ ...defaultConfig(), caCerts: [] }, new Map());
  assert.ok(!text.includes("PRIVATE KEY"));
  for (const setting of SETTINGS.filter((s) => s.secret)) {
    const config = { ...defaultConfig(), [setting.field]: key };
    assert.ok(!formatConfig(config).includes("PRIVATE KEY"), setting.env);
  }
});

Deno.test("--check-config and --print-config: flags of their own", () => {
  const check = parseConfig(["--check-config", "--listen", "127.0.0.1:1"], () => undefined);
  assert.ok(check.kind === "config" && check.mode === "check-config");
  assert.equal(parseConfig([], () => undefined).kind === "config", true);
  assert.equal((parseConfig([], () => undefined) as { mode?: string }).mode, undefined);
  assert.match(failure(["--check-config", "--print-config"]), /cannot be given together/);
  assert.match(failure(["--check-config=yes"]), /--check-config takes no value/);
  // Checking validates: a bad value is the same one-line error.
  assert.match(failure(["--check-config", "--timeout", "4s"]), /--timeout/);
  assert.ok(helpText().includes("--print-config") && helpText().includes("--check-config"));
});

Deno.test("help lists every flag with its variable and default; version and healthcheck", () => {
  assert.equal(parseConfig(["--help"], () => undefined).kind, "help");
  assert.equal(parseConfig(["-V"], () => undefined).kind, "version");
  // Long defaults wrap onto the next line; compare with the line breaks read as spaces.
  const text = helpText().replace(/\n +/g, " ");
  for (const setting of SETTINGS) {
    if (setting.flag) {
      const shown = `--${setting.flag}${setting.arg ? " " + setting.arg : ""}`;
      assert.ok(text.includes(shown), shown);
    }
    assert.ok(text.includes(setting.env), setting.env);
    assert.ok(text.includes(`default: ${setting.defaultText}`), setting.defaultText);
    assert.ok(text.includes(setting.help), setting.help);
    if (setting.range) assert.ok(text.includes(`range: ${setting.range}`), setting.range);
    assert.ok(helpText().includes(`\n${setting.group}:\n`), setting.group);
  }
  for (const line of helpText().split("\n")) assert.ok(line.length <= 80, line);
  assert.equal(config(["healthcheck", "--listen", "127.0.0.1:5301"]).command, "healthcheck");
});

Deno.test("the table: one setting per Config field, unique flags and variables", () => {
  const fields = SETTINGS.map((s) => s.field).sort();
  const configFields = Object.keys(defaultConfig()).filter((k) => k !== "command").sort();
  assert.deepEqual(fields, configFields);
  const flags = SETTINGS.map((s) => s.flag).filter((f) => f !== "");
  assert.equal(new Set(flags).size, flags.length, "flags are unique");
  assert.equal(new Set(KNOWN_VARIABLES).size, KNOWN_VARIABLES.length, "variables are unique");
  assert.deepEqual(KNOWN_VARIABLES, SETTINGS.map((s) => s.env));
  for (const setting of SETTINGS) {
    assert.match(setting.env, /^DOTPROXY_[A-Z0-9_]+$/, setting.env);
    assert.match(setting.flag, /^([a-z][a-z0-9-]*)?$/, setting.flag);
    assert.ok(!setting.flag.startsWith("-"), setting.flag);
    assert.ok(setting.help.length > 0 && !setting.help.includes("\n"), setting.env);
    assert.ok(setting.kind === "boolean" || setting.arg !== "" || setting.flag === "", setting.env);
  }
});

Deno.test("defaultConfig is parseConfig with no input, and a fresh object each time", () => {
  assert.deepEqual(defaultConfig(), config([]));
  const a = defaultConfig();
  a.listen.push({ hostname: "::1", port: 1 });
  assert.equal(defaultConfig().listen.length, 1);
});

Deno.test("defaults of the new settings", () => {
  const c = config([]);
  assert.equal(c.cacheSize, 10_000);
  assert.equal(c.cacheMinTtl, 0);
  assert.equal(c.cacheMaxTtl, 86_400);
  assert.equal(c.cacheMaxNegativeTtl, 3600);
  assert.equal(c.serveStaleSeconds, 86_400);
  assert.equal(c.staleAnswerTimeoutMs, 1800);
  assert.equal(c.cachePrefetch, true);
  assert.equal(c.connectTimeoutMs, 1000);
  assert.equal(c.hedgeDelay, "auto");
  assert.equal(c.hedgeBudgetPercent, 10);
  assert.equal(c.healthCheckIntervalMs, 10_000);
  assert.deepEqual(c.failoverRcodes, [2, 5]);
  assert.equal(c.strategy, DEFAULT_STRATEGY);
  assert.equal(DEFAULT_STRATEGY, "least-outstanding");
  assert.ok(STRATEGIES.includes(DEFAULT_STRATEGY));
  assert.equal(c.shutdownDelayMs, 0);
  assert.equal(c.shutdownTimeoutMs, 10_000);
  assert.equal(c.upstreamNudge, true);
  assert.deepEqual(c.allow.map((a) => a.text), [
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
  ]);
  assert.equal(c.rateLimit, 0);
  assert.equal(c.rateLimitBurst, 1, "at least 1 while rate limiting is off");
  assert.equal(c.refuseAny, true);
  assert.equal(c.maxTcpConnectionsPerClient, 64);
  assert.equal(c.padding, true);
  // The settings that were there before keep their defaults.
  assert.equal(c.timeoutMs, 4000);
  assert.equal(c.udpMaxSize, 1232);
  assert.equal(c.maxTcpConnections, 1000);
  assert.equal(c.maxTcpQueriesPerConnection, 128);
  assert.equal(c.tcpIdleTimeoutMs, 10_000);
  assert.equal(c.maxInflight, 10_000);
  assert.equal(c.upstreamConnections, 8);
  assert.equal(c.upstreamIdleTimeoutMs, 30_000);
});

/** A setting, values it accepts (text, then the value it becomes) and values it refuses. */
interface Case {
  field: keyof Config;
  flag: string;
  env: string;
  good: [string, unknown][];
  bad: string[];
  show?: (value: Config[keyof Config]) => unknown;
}

const cidrTexts = (value: Config[keyof Config]) => (value as Config["allow"]).map((c) => c.text);

const CASES: Case[] = [
  {
    field: "cacheSize",
    flag: "cache-size",
    env: "DOTPROXY_CACHE_SIZE",
    good: [["0", 0], ["10000000", 10_000_000], ["500", 500]],
    bad: ["10000001", "-1", "lots", "1.5", ""],
  },
  {
    field: "cacheMinTtl",
    flag: "cache-min-ttl",
    env: "DOTPROXY_CACHE_MIN_TTL",
    good: [["0", 0], ["60", 60], ["86400", 86_400]],
    bad: ["604801", "-1", "1m"],
  },
  {
    field: "cacheMaxTtl",
    flag: "cache-max-ttl",
    env: "DOTPROXY_CACHE_MAX_TTL",
    good: [["0", 0], ["604800", 604_800], ["300", 300]],
    bad: ["604801", "-1", "a day"],
  },
  {
    field: "cacheMaxNegativeTtl",
    flag: "cache-max-negative-ttl",
    env: "DOTPROXY_CACHE_MAX_NEGATIVE_TTL",
    good: [["0", 0], ["604800", 604_800], ["30", 30]],
    bad: ["604801", "-3"],
  },
  {
    field: "serveStaleSeconds",
    flag: "serve-stale",
    env: "DOTPROXY_SERVE_STALE",
    good: [["0", 0], ["2592000", 2_592_000], ["3600", 3600]],
    bad: ["2592001", "on"],
  },
  {
    field: "staleAnswerTimeoutMs",
    flag: "stale-answer-timeout",
    env: "DOTPROXY_STALE_ANSWER_TIMEOUT_MS",
    good: [["0", 0], ["60000", 60_000], ["500", 500]],
    bad: ["60001", "1.8s"],
  },
  {
    field: "cachePrefetch",
    flag: "cache-prefetch",
    env: "DOTPROXY_CACHE_PREFETCH",
    good: [["false", false], ["true", true], ["off", false]],
    bad: ["sometimes"],
  },
  {
    field: "connectTimeoutMs",
    flag: "connect-timeout",
    env: "DOTPROXY_CONNECT_TIMEOUT_MS",
    good: [["50", 50], ["60000", 60_000], ["250", 250]],
    bad: ["49", "60001", "0", "fast"],
  },
  {
    field: "hedgeDelay",
    flag: "hedge-delay",
    env: "DOTPROXY_HEDGE_DELAY",
    good: [["auto", "auto"], ["0", 0], ["1", 1], ["60000", 60_000], [" AUTO ", "auto"]],
    bad: ["60001", "-1", "soon", "auto5"],
  },
  {
    field: "hedgeBudgetPercent",
    flag: "hedge-budget",
    env: "DOTPROXY_HEDGE_BUDGET",
    good: [["0", 0], ["100", 100], ["5", 5]],
    bad: ["101", "5%", "-1"],
  },
  {
    field: "healthCheckIntervalMs",
    flag: "health-check-interval",
    env: "DOTPROXY_HEALTH_CHECK_INTERVAL_MS",
    good: [["0", 0], ["100", 100], ["3600000", 3_600_000], ["2500", 2500]],
    bad: ["99", "1", "3600001", "often"],
  },
  {
    field: "failoverRcodes",
    flag: "failover-rcodes",
    env: "DOTPROXY_FAILOVER_RCODES",
    good: [
      ["", []],
      ["servfail", [2]],
      ["SERVFAIL, REFUSED, NXDOMAIN", [2, 5, 3]],
      ["noerror,formerr,notimp,yxdomain,yxrrset,nxrrset,notauth,notzone", [
        0,
        1,
        4,
        6,
        7,
        8,
        9,
        10,
      ]],
      ["2,15,0", [2, 15, 0]],
      ["REFUSED,5,refused", [5]],
    ],
    bad: ["16", "SERVFAIL,BOGUS", "-1", "BADVERS"],
  },
  {
    field: "strategy",
    flag: "strategy",
    env: "DOTPROXY_STRATEGY",
    good: [
      ["least-outstanding", "least-outstanding"],
      ["fastest", "fastest"],
      ["round-robin", "round-robin"],
      ["failover", "failover"],
      ["Random", "random"],
    ],
    bad: ["fast", "roundrobin", ""],
  },
  {
    field: "shutdownDelayMs",
    flag: "shutdown-delay",
    env: "DOTPROXY_SHUTDOWN_DELAY_MS",
    good: [["0", 0], ["600000", 600_000], ["5000", 5000]],
    bad: ["600001", "5s"],
  },
  {
    field: "shutdownTimeoutMs",
    flag: "shutdown-timeout",
    env: "DOTPROXY_SHUTDOWN_TIMEOUT_MS",
    good: [["0", 0], ["600000", 600_000], ["30000", 30_000]],
    bad: ["600001", "forever"],
  },
  {
    field: "upstreamNudge",
    flag: "upstream-nudge",
    env: "DOTPROXY_UPSTREAM_NUDGE",
    good: [["false", false], ["yes", true], ["0", false]],
    bad: ["nope"],
  },
  {
    field: "allow",
    flag: "allow",
    env: "DOTPROXY_ALLOW",
    good: [
      ["10.0.0.0/8", ["10.0.0.0/8"]],
      ["192.0.2.7, 2001:db8::1", ["192.0.2.7/32", "2001:db8::1/128"]],
      ["0.0.0.0/0,::/0", ["0.0.0.0/0", "::/0"]],
    ],
    bad: ["10.0.0.1/8", "10.0.0.0/33", "example.com", "1::2::3/64", "", " , "],
    show: cidrTexts,
  },
  {
    field: "rateLimit",
    flag: "rate-limit",
    env: "DOTPROXY_RATE_LIMIT",
    good: [["0", 0], ["1000000", 1_000_000], ["20", 20]],
    bad: ["1000001", "-1", "20qps"],
  },
  {
    field: "rateLimitBurst",
    flag: "rate-limit-burst",
    env: "DOTPROXY_RATE_LIMIT_BURST",
    good: [["1", 1], ["10000000", 10_000_000], ["50", 50]],
    bad: ["0", "10000001", "many"],
  },
  {
    field: "refuseAny",
    flag: "refuse-any",
    env: "DOTPROXY_REFUSE_ANY",
    good: [["false", false], ["ON", true], ["no", false]],
    bad: ["refuse"],
  },
  {
    field: "maxTcpConnectionsPerClient",
    flag: "max-tcp-connections-per-client",
    env: "DOTPROXY_MAX_TCP_CONNECTIONS_PER_CLIENT",
    good: [["1", 1], ["1000000", 1_000_000], ["8", 8]],
    bad: ["0", "1000001", "eight"],
  },
  {
    field: "padding",
    flag: "padding",
    env: "DOTPROXY_PADDING",
    good: [["false", false], ["1", true], ["No", false]],
    bad: ["128"],
  },
];

Deno.test("new settings: flag, variable, flag over variable, errors name the input", () => {
  for (const c of CASES) {
    const show = c.show ?? ((value: Config[keyof Config]) => value);
    const setting = SETTINGS.find((s) => s.field === c.field);
    assert.ok(setting, c.field);
    assert.equal(setting.flag, c.flag);
    assert.equal(setting.env, c.env);
    for (const [text, expected] of c.good) {
      const label = `${c.flag} ${JSON.stringify(text)}`;
      assert.deepEqual(show(config([`--${c.flag}`, text])[c.field]), expected, label);
      assert.deepEqual(show(config([`--${c.flag}=${text}`])[c.field]), expected, label);
      assert.deepEqual(show(config([], { [c.env]: text })[c.field]), expected, label);
    }
    // The flag wins over the variable.
    const [[first, firstValue], [second]] = c.good;
    assert.deepEqual(
      show(config([`--${c.flag}`, first], { [c.env]: second })[c.field]),
      firstValue,
    );
    for (const text of c.bad) {
      const fromFlag = failure([`--${c.flag}`, text]);
      assert.ok(fromFlag.startsWith(`--${c.flag}`), fromFlag);
      assert.ok(fromFlag.includes(text.trim().split(",").pop()?.trim() ?? ""), fromFlag);
      const fromEnv = failure([], { [c.env]: text });
      assert.ok(fromEnv.startsWith(c.env), fromEnv);
    }
  }
});

Deno.test("bounds: the error names the flag, the value and the range", () => {
  assert.equal(
    failure(["--cache-size", "10000001"]),
    "--cache-size: 10000001 is out of range 0-10000000",
  );
  assert.equal(
    failure([], { DOTPROXY_CONNECT_TIMEOUT_MS: "49" }),
    "DOTPROXY_CONNECT_TIMEOUT_MS: 49 is out of range 50-60000",
  );
  assert.equal(
    failure(["--health-check-interval", "50"]),
    "--health-check-interval: 50 is out of range (0 to turn it off, or 100-3600000)",
  );
  assert.equal(
    failure(["--hedge-delay", "soon"]),
    '--hedge-delay: "soon" is not auto or a whole number of milliseconds',
  );
  assert.match(failure(["--strategy", "fast"]), /--strategy: unknown strategy "fast" \(least-/);
  assert.match(failure(["--failover-rcodes", "SERVFAIL,BOGUS"]), /"BOGUS" is not a response code/);
});

Deno.test("cache TTLs: the largest may not be below the smallest; the error names both", () => {
  assert.equal(config(["--cache-min-ttl", "60", "--cache-max-ttl", "60"]).cacheMaxTtl, 60);
  assert.equal(
    failure(["--cache-min-ttl", "300", "--cache-max-ttl", "60"]),
    "--cache-max-ttl 60 is below --cache-min-ttl 300: " +
      "the largest cached TTL cannot be smaller than the smallest",
  );
  const fromEnv = failure([], { DOTPROXY_CACHE_MIN_TTL: "300", DOTPROXY_CACHE_MAX_TTL: "60" });
  assert.match(fromEnv, /^DOTPROXY_CACHE_MAX_TTL 60 is below DOTPROXY_CACHE_MIN_TTL 300/);
  const withDefault = failure(["--cache-min-ttl", "100000"]);
  assert.match(withDefault, /^the default --cache-max-ttl 86400 is below --cache-min-ttl 100000/);
});

Deno.test("rate-limit-burst defaults to twice the rate limit", () => {
  assert.equal(config(["--rate-limit", "20"]).rateLimitBurst, 40);
  assert.equal(config([], { DOTPROXY_RATE_LIMIT: "500" }).rateLimitBurst, 1000);
  assert.equal(config(["--rate-limit", "20", "--rate-limit-burst", "5"]).rateLimitBurst, 5);
  assert.equal(config(["--rate-limit", "1000000"]).rateLimitBurst, 2_000_000);
});

Deno.test("a value starting with - after a flag is that flag's value", () => {
  assert.equal(failure(["--timeout", "-5"]), '--timeout: "-5" is not a whole number');
  assert.equal(failure(["--timeout=-5"]), '--timeout: "-5" is not a whole number');
  assert.equal(failure(["--cache-size", "-1"]), '--cache-size: "-1" is not a whole number');
  assert.equal(failure(["--timeout", "--listen"]), '--timeout: "--listen" is not a whole number');
  assert.match(failure(["--listen", "-1"]), /^--listen "-1"/);
  assert.equal(failure(["--strategy"]), "flag --strategy needs a value");
});

Deno.test("boolean flags: bare, =value, or a boolean word as the next argument", () => {
  const forms: [string[], boolean][] = [
    [["--log-queries"], true],
    [["--log-queries=true"], true],
    [["--log-queries=false"], false],
    [["--log-queries", "false"], false],
    [["--log-queries", "true"], true],
    [["--log-queries", "TRUE"], true],
    [["--log-queries=yes"], true],
    [["--log-queries=no"], false],
    [["--log-queries", "on"], true],
    [["--log-queries", "off"], false],
    [["--log-queries=1"], true],
    [["--log-queries", "0"], false],
    [["--log-queries", "--timeout", "900"], true],
  ];
  for (const [args, expected] of forms) {
    assert.equal(config(args).logQueries, expected, args.join(" "));
  }
  // Flags win over the environment in both directions.
  assert.equal(config(["--padding=false"], { DOTPROXY_PADDING: "true" }).padding, false);
  assert.equal(config(["--log-queries"], { DOTPROXY_LOG_QUERIES: "false" }).logQueries, true);
  // A command after a bare boolean flag stays a command.
  const c = config(["--log-queries", "healthcheck"]);
  assert.deepEqual([c.logQueries, c.command], [true, "healthcheck"]);
  // The environment takes the same words; empty reads as false.
  for (const [text, expected] of [["yes", true], ["Off", false], ["1", true], ["", false]]) {
    assert.equal(config([], { DOTPROXY_CACHE_PREFETCH: String(text) }).cachePrefetch, expected);
  }
  assert.equal(
    failure(["--log-queries=maybe"]),
    '--log-queries: "maybe" is not true or false (true/false, yes/no, on/off, 1/0)',
  );
  assert.match(failure(["--padding", "flase"]), /^--padding: "flase" is not true or false/);
  assert.match(failure([], { DOTPROXY_REFUSE_ANY: "2" }), /^DOTPROXY_REFUSE_ANY: "2" is not/);
});

Deno.test("command line: last value wins, repeated lists add up, -- ends the flags", () => {
  assert.equal(config(["--timeout", "900", "--timeout", "1200"]).timeoutMs, 1200);
  assert.deepEqual(
    config(["--allow", "10.0.0.0/8,192.168.0.0/16", "--allow", "::1"]).allow.map((a) => a.text),
    ["10.0.0.0/8", "192.168.0.0/16", "::1/128"],
  );
  assert.equal(config(["--", "healthcheck"]).command, "healthcheck");
  assert.match(
    failure(["--", "--timeout"]),
    /unknown command "--timeout"; flags go before any "--"/,
  );
  assert.equal(failure(["--help=yes"]), "flag --help takes no value");
  assert.equal(failure(["-x"]), "unknown flag -x (see --help)");
  assert.equal(
    failure(["--upstreams", "1.1.1.1"]),
    "unknown flag --upstreams (did you mean --upstream? see --help)",
  );
  assert.equal(
    failure(["--cache-sise=5"]),
    "unknown flag --cache-sise (did you mean --cache-size? see --help)",
  );
  assert.match(failure(["healthcheck", "now"]), /unknown command "now"/);
  // --help wins over bad values (they are parsed only for a configuration).
  assert.equal(parseConfig(["--timeout", "soon", "--help"], () => undefined).kind, "help");
});

Deno.test("upstreams written as URLs or names get a hint in the right form", () => {
  const form = "write upstreams as IP[:PORT][#TLS_NAME], e.g. 1.1.1.1#cloudflare-dns.com";
  assert.equal(
    failure(["--upstream", "tls://1.1.1.1"]),
    `--upstream "tls://1.1.1.1": ${form} (no scheme: 1.1.1.1#cloudflare-dns.com)`,
  );
  assert.equal(
    failure(["--upstream", "tls://1.1.1.1:853"]),
    `--upstream "tls://1.1.1.1:853": ${form} (no scheme: 1.1.1.1:853#TLS_NAME)`,
  );
  assert.equal(
    failure(["--upstream", "tls://9.9.9.9"]),
    `--upstream "tls://9.9.9.9": ${form} (no scheme: 9.9.9.9#dns.quad9.net)`,
  );
  assert.equal(
    failure([], { DOTPROXY_UPSTREAMS: "9.9.9.9, https://dns.google/dns-query" }),
    `DOTPROXY_UPSTREAMS "https://dns.google/dns-query": ${form} ` +
      "(no scheme; dotproxy speaks DNS over TLS only: 8.8.8.8#dns.google)",
  );
  assert.equal(
    failure(["--upstream", "dns.google"]),
    '--upstream "dns.google": "dns.google" is not an IP address (dotproxy never resolves ' +
      "names to reach its upstreams); write IP[:PORT][#TLS_NAME], e.g. 8.8.8.8#dns.google",
  );
  assert.match(failure(["--upstream", "dns.google:853"]), /e\.g\. 8\.8\.8\.8:853#dns\.google$/);
  assert.match(failure(["--upstream", "dns.example#dns.example"]), /e\.g\. IP#dns\.example$/);
  assert.match(failure(["--upstream", "1.1.1.1@853"]), /"1.1.1.1@853" is not an IP address; write/);
});

Deno.test("parseCidr: IPv4, IPv6, bare addresses, canonical text, host bits", () => {
  const cases: [string, 4 | 6, number, string, number[]][] = [
    ["10.0.0.0/8", 4, 8, "10.0.0.0/8", [10, 0, 0, 0]],
    ["192.0.2.7", 4, 32, "192.0.2.7/32", [192, 0, 2, 7]],
    ["0.0.0.0/0", 4, 0, "0.0.0.0/0", [0, 0, 0, 0]],
    ["::/0", 6, 0, "::/0", new Array(16).fill(0)],
    ["::1", 6, 128, "::1/128", [...new Array(15).fill(0), 1]],
    ["FC00::/7", 6, 7, "fc00::/7", [0xfc, ...new Array(15).fill(0)]],
    ["2001:DB8:0:0:0:0:0:0/32", 6, 32, "2001:db8::/32", [
      0x20,
      1,
      0x0d,
      0xb8,
      ...new Array(12).fill(0),
    ]],
    ["2001:db8:0:1:0:0:0:0/64", 6, 64, "2001:db8:0:1::/64", [
      0x20,
      1,
      0x0d,
      0xb8,
      0,
      0,
      0,
      1,
      ...new Array(8).fill(0),
    ]],
    ["2001:0:0:1:0:0:0:1", 6, 128, "2001:0:0:1::1/128", [
      0x20,
      1,
      0,
      0,
      0,
      0,
      0,
      1,
      0,
      0,
      0,
      0,
      0,
      0,
      0,
      1,
    ]],
    ["1:0:2:3:4:5:6:7", 6, 128, "1:0:2:3:4:5:6:7/128", [
      0,
      1,
      0,
      0,
      0,
      2,
      0,
      3,
      0,
      4,
      0,
      5,
      0,
      6,
      0,
      7,
    ]],
    ["::ffff:192.0.2.1", 4, 32, "192.0.2.1/32", [192, 0, 2, 1]],
    ["64:ff9b::/96", 6, 96, "64:ff9b::/96", [0, 0x64, 0xff, 0x9b, ...new Array(12).fill(0)]],
    [" 172.16.0.0/12 ", 4, 12, "172.16.0.0/12", [172, 16, 0, 0]],
  ];
  for (const [text, family, prefix, canonical, bytes] of cases) {
    const cidr = parseCidr(text, "--allow");
    assert.deepEqual(
      { family: cidr.family, prefix: cidr.prefix, text: cidr.text, bytes: [...cidr.bytes] },
      { family, prefix, text: canonical, bytes },
      text,
    );
  }
  const hostBits: [string, string][] = [
    ["10.0.0.1/8", "10.0.0.0/8"],
    ["192.168.1.0/16", "192.168.0.0/16"],
    ["fe80::1/10", "fe80::/10"],
    ["2001:db8::1/32", "2001:db8::/32"],
    ["1.2.3.4/0", "0.0.0.0/0"],
  ];
  for (const [text, suggestion] of hostBits) {
    assert.throws(
      () => parseCidr(text, "--allow"),
      (error: Error) =>
        error instanceof ConfigError && error.message.startsWith(`--allow "${text}": host bits`) &&
        error.message.endsWith(`did you mean ${suggestion}?`),
      text,
    );
  }
  for (
    const bad of ["10.0.0.0/33", "::/129", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8/8", "10/8", "x"]
  ) {
    assert.throws(
      () => parseCidr(bad, "DOTPROXY_ALLOW"),
      (error: Error) =>
        error instanceof ConfigError && error.message.startsWith(`DOTPROXY_ALLOW "${bad}"`),
      bad,
    );
  }
});

Deno.test("parseCidr: an IPv4-mapped network is its IPv4 network (clients are matched as IPv4); shorter than /96 refused", () => {
  const cases: [string, string][] = [
    ["::ffff:10.0.0.0/104", "10.0.0.0/8"],
    ["::FFFF:192.0.2.7", "192.0.2.7/32"],
    ["::ffff:0:0/96", "0.0.0.0/0"],
    ["0:0:0:0:0:ffff:c000:0200/120", "192.0.2.0/24"],
  ];
  for (const [text, canonical] of cases) {
    const cidr = parseCidr(text, "--allow");
    assert.deepEqual([cidr.family, cidr.text, cidr.bytes.length], [4, canonical, 4], text);
    assert.ok(cidrContains(cidr, parseIpAddress(canonical.split("/")[0])!), text);
  }
  assert.throws(
    () => parseCidr("::ffff:10.0.0.1/104", "--allow"),
    /host bits are set after \/8; did you mean 10\.0\.0\.0\/8\?/,
  );
  assert.throws(
    () => parseCidr("::ffff:0:0/80", "--allow"),
    (error: Error) =>
      error instanceof ConfigError &&
      error.message === '--allow "::ffff:0:0/80": an IPv4-mapped network needs a prefix of at ' +
          "least /96; write the IPv4 network (IPv4 clients are matched as IPv4, mapped or not)",
  );
  // Not mapped: left as IPv6.
  assert.equal(parseCidr("::fffe:0:0/96", "--allow").family, 6);
  assert.equal(parseCidr("64:ff9b::a00:1", "--allow").family, 6);
});

Deno.test("IP literals: IPv6 parsed by its grammar, not by look", () => {
  const good = [
    "0.0.0.0",
    "255.255.255.255",
    "::",
    "::1",
    "1::",
    "1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7::",
    "::2:3:4:5:6:7:8",
    "1:2:3:4:5:6::8",
    "2606:4700:4700::1111",
    "::ffff:1.2.3.4",
    "1:2:3:4:5:6:1.2.3.4",
    "::1.2.3.4",
    "ABCD:ef01::",
    "0000:0000::0001",
  ];
  const bad = [
    "",
    "1.2.3",
    "1.2.3.4.5",
    "256.1.1.1",
    "01.2.3.4",
    "1.2.3.-4",
    ":",
    ":::",
    "1::2::3",
    "1:2:3:4:5:6:7:8:9",
    "1:2:3:4:5:6:7",
    "1:2:3:4:5:6:7:8::",
    "::1:2:3:4:5:6:7:8",
    ":1:2:3:4:5:6:7",
    "1:2:3:4:5:6:7:",
    "12345::",
    "::g",
    "1:2:3:4:5:6:7:1.2.3.4",
    "::1.2.3",
    "::1.2.3.4:5",
    "fe80::1%eth0",
    "[::1]",
    "dns.google",
  ];
  for (const text of good) assert.ok(isIpLiteral(text), `${text} is an IP literal`);
  for (const text of bad) assert.ok(!isIpLiteral(text), `${text} is not an IP literal`);
  assert.deepEqual([...parseIpAddress("::ffff:192.0.2.1")!].slice(10), [0xff, 0xff, 192, 0, 2, 1]);
  assert.equal(parseIpAddress("192.0.2.1")!.length, 4);
  assert.equal(parseIpAddress("dns.google"), null);
});

Deno.test("cidrContains matches by prefix and family", () => {
  const ip = (text: string) => parseIpAddress(text)!;
  const net = (text: string) => parseCidr(text, "t");
  assert.ok(cidrContains(net("10.0.0.0/8"), ip("10.255.1.2")));
  assert.ok(!cidrContains(net("10.0.0.0/8"), ip("11.0.0.0")));
  assert.ok(cidrContains(net("172.16.0.0/12"), ip("172.31.255.255")));
  assert.ok(!cidrContains(net("172.16.0.0/12"), ip("172.32.0.0")));
  assert.ok(cidrContains(net("fc00::/7"), ip("fd12:3456::1")));
  assert.ok(!cidrContains(net("fc00::/7"), ip("fe00::1")));
  assert.ok(cidrContains(net("0.0.0.0/0"), ip("203.0.113.9")));
  assert.ok(!cidrContains(net("0.0.0.0/0"), ip("::1")), "families never mix");
  assert.ok(cidrContains(net("::/0"), ip("2001:db8::1")));
  assert.ok(cidrContains(net("192.0.2.7"), ip("192.0.2.7")));
  assert.ok(!cidrContains(net("192.0.2.7"), ip("192.0.2.6")));
  // A mapped network is its IPv4 network: the admission unwraps mapped client addresses.
  assert.ok(cidrContains(net("::ffff:192.0.2.0/120"), ip("192.0.2.1")));
  assert.ok(!cidrContains(net("::ffff:192.0.2.0/120"), ip("::ffff:192.0.2.1")), "no magic here");
});

/** The index table of docs/configuration.md's settings reference: [flag, variable] as written. */
function referenceRows(part: string): string[][] {
  const rows = part.split("\n").filter((line) => line.startsWith("| "));
  const cells = rows.map((line) =>
    line.slice(1, -1).split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, "|"))
  );
  assert.deepEqual(cells[0], ["flag", "environment variable", "default"]);
  const code = (cell: string) => /`([^`]*)`/.exec(cell)?.[1] ?? cell;
  return cells.slice(2).map(([flag, env]) => [code(flag), code(env)]);
}

Deno.test("docs/configuration.md holds the settings reference `deno task docs` writes", async () => {
  const page = await Deno.readTextFile(new URL(`../${CONFIG_DOC_PATH}`, import.meta.url));
  const part = generatedPart(page);
  assert.ok(part !== null, `${CONFIG_DOC_PATH} has the generated-part markers`);
  // Every setting by flag and variable, in the table's order (a clearer failure than a diff).
  assert.deepEqual(referenceRows(part), SETTINGS.map((s) => [flagText(s), s.env]));
  for (const setting of SETTINGS) {
    assert.ok(part.includes(setting.env), setting.env);
    assert.ok(part.replace(/\s+/g, " ").includes(setting.defaultText), setting.defaultText);
  }
  assert.equal(
    part,
    await expectedGeneratedPart(),
    `${CONFIG_DOC_PATH} is stale: run deno task docs`,
  );
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
      [["--timeout", "-5"], {}, '--timeout: "-5" is not a whole number'],
      [["--upstream", "tls://1.1.1.1"], {}, "(no scheme: 1.1.1.1#cloudflare-dns.com)"],
      [["--allow", "10.0.0.1/8"], {}, "did you mean 10.0.0.0/8?"],
      [[], { DOTPROXY_TIMEOUT: "4000" }, "did you mean DOTPROXY_TIMEOUT_MS?"],
      [
        ["--listen", "0.0.0.0:53"],
        { DOTPROXY_CONTAINER: "true" },
        "docker run -e DOTPROXY_LISTEN=0.0.0.0:53",
      ],
      // Service links pass the variable check: the error is the bad --listen.
      [["--listen", "127.0.0.1:0x"], SERVICE_LINKS, '--listen "127.0.0.1:0x"'],
      [["--zone", "cluster.local=dns://kube-dns"], {}, '--zone "cluster.local=dns://kube-dns"'],
      [[], { DOTPROXY_ZONES: ".=1.1.1.1" }, "DOTPROXY_ZONES"],
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

Deno.test("main: --check-config exits 0 or 2; --print-config prints and exits 0", async () => {
  const ok = await runMain(["--check-config", "--listen", "127.0.0.1:5353"]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stdout, "dotproxy: the configuration is valid\n");
  const bad = await runMain(["--check-config"], { DOTPROXY_TIMEOUT: "4000" });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /^dotproxy: unknown environment variable DOTPROXY_TIMEOUT/);
  const printed = await runMain(["--print-config", "--listen", "127.0.0.1:5353"], {
    DOTPROXY_CA_CERTS: CA_PEM,
  });
  assert.equal(printed.code, 0, printed.stderr);
  assert.match(printed.stdout, /\n# --listen\nDOTPROXY_LISTEN=127\.0\.0\.1:5353\n/);
  assert.ok(printed.stdout.includes("DOTPROXY_CA_CERTS=<redacted: 1 PEM certificate>"));
  assert.ok(!printed.stdout.includes("BEGIN"));
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

Deno.test("--zone: domains and CIDRs, DoT, plain and default targets, repeatable, env by ;", () => {
  const zonesOf = (args: string[], env: Record<string, string> = {}) => {
    const request = parseConfig(args, (name) => env[name]);
    assert.equal(request.kind, "config");
    return request.kind === "config" ? request.config.zones : [];
  };
  assert.deepEqual(zonesOf([]), []);
  const [cluster, corp] = zonesOf([
    "--zone",
    "Cluster.Local.,10.96.0.0/12,fd00:10::/63=dns://10.96.0.10",
    "--zone=corp.example=10.0.0.1#dns.corp,[fd00::53]:8853",
  ]);
  const names = cluster.zones.map((z) => z.name);
  assert.equal(names[0], "cluster.local", "lowercase, no final dot");
  assert.equal(names.length, 1 + 16 + 2);
  assert.equal(names[1], "96.10.in-addr.arpa");
  assert.equal(names[16], "111.10.in-addr.arpa");
  assert.deepEqual(names.slice(17), [
    "0.0.0.0.0.0.0.0.0.1.0.0.0.0.d.f.ip6.arpa",
    "1.0.0.0.0.0.0.0.0.1.0.0.0.0.d.f.ip6.arpa",
  ]);
  assert.deepEqual(
    [...new Set(cluster.zones.map((z) => z.route))],
    ["cluster.local", "10.96.0.0/12", "fd00:10::/63"],
  );
  assert.deepEqual(cluster.targets, [{
    address: "10.96.0.10",
    port: 53,
    tlsName: "",
    label: "dns://10.96.0.10:53",
    plain: true,
  }]);
  assert.deepEqual(corp.targets.map((t) => [t.label, t.plain ?? false]), [
    ["10.0.0.1:853#dns.corp", false],
    ["[fd00::53]:8853#fd00::53", false],
  ]);
  const fromEnv = zonesOf([], {
    DOTPROXY_ZONES: "internal=dns://169.254.169.254 ; 10.in-addr.arpa=default;",
  });
  assert.deepEqual(fromEnv.map((z) => [z.zones[0].name, z.targets.map((t) => t.label)]), [
    ["internal", ["dns://169.254.169.254:53"]],
    ["10.in-addr.arpa", []],
  ]);
  const flagWins = zonesOf(["--zone", "a.example=dns://[::1]:5353"], {
    DOTPROXY_ZONES: "b.example=default",
  });
  assert.deepEqual(flagWins.map((z) => [z.zones[0].name, z.targets[0].label]), [
    ["a.example", "dns://[::1]:5353"],
  ]);
});

Deno.test("--zone: every mistake is one line naming the entry", () => {
  const failure = (value: string) => {
    try {
      parseConfig(["--zone", value], () => undefined);
    } catch (error) {
      assert.ok(error instanceof ConfigError, String(error));
      assert.ok(!error.message.includes("\n"));
      assert.ok(error.message.startsWith(`--zone "${value.trim()}"`), error.message);
      return error.message;
    }
    assert.fail(`${value} was accepted`);
  };
  assert.match(failure(".=1.1.1.1"), /root zone "\." .* --upstream/);
  assert.match(failure("cluster.local"), /no "=" between zones and targets/);
  assert.match(failure("=dns://10.0.0.1"), /no zone/);
  assert.match(failure("cluster.local="), /no target/);
  assert.match(failure("a..b=1.1.1.1"), /"a\.\.b" is not a domain name or a CIDR/);
  assert.match(failure("10.96.0.1/12=dns://10.0.0.1"), /host bits are set after \/12/);
  assert.match(failure("c.local=udp://10.0.0.1"), /IP\[:PORT\]\[#TLS_NAME\] \(DoT\), dns:\/\//);
  assert.match(failure("c.local=dns://kube-dns.kube-system"), /is not an IP address/);
  assert.match(failure("c.local=dns://10.0.0.1#name"), /no TLS name/);
  assert.match(failure("c.local=dns://10.0.0.1:0"), /port 0 is out of range/);
  assert.match(failure("c.local=default,1.1.1.1"), /"default" stands alone/);
  assert.match(failure("c.local=dns://10.0.0.1,dns://10.0.0.1:53"), /given twice/);
  assert.match(failure("c.local=dns.google"), /is not an IP address/);
  assert.throws(
    () => parseConfig(["--zone", "a=dns://10.0.0.1", "--zone", "A.=1.1.1.1"], () => undefined),
    /zone a is already routed by --zone "a=dns:\/\/10\.0\.0\.1"/,
  );
  assert.throws(
    () => parseConfig([], (name) => name === "DOTPROXY_ZONES" ? "x.local=dns://y" : undefined),
    /^ConfigError: DOTPROXY_ZONES "x.local=dns:\/\/y"/,
  );
});

Deno.test("--special-use-names: on by default, off by flag or variable", () => {
  const value = (args: string[], env: Record<string, string> = {}) => {
    const request = parseConfig(args, (name) => env[name]);
    return request.kind === "config" ? request.config.specialUseNames : undefined;
  };
  assert.equal(value([]), true);
  assert.equal(value(["--special-use-names", "false"]), false);
  assert.equal(value([], { DOTPROXY_SPECIAL_USE_NAMES: "no" }), false);
});
