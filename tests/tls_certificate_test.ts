/**
 * The server certificate machinery (src/tls/certificate.ts): DOTPROXY_TLS_CERT and
 * DOTPROXY_TLS_KEY checked at start, the info line per TLS listener, the expiry warning at
 * start and daily, the expiry gauge. Certificates beyond the fixtures are made with openssl.
 *
 * @module
 */

import assert from "node:assert/strict";
import { ConfigError, parseConfig } from "../src/config.ts";
import { Logger } from "../src/log.ts";
import { Registry } from "../src/metrics.ts";
import { ManualClock, TimerQueue } from "../src/timers.ts";
import {
  CertificateError,
  CertificateMonitor,
  checkCertificateText,
  checkKeyText,
  EXPIRY_CHECK_INTERVAL_MS,
  expiryProblem,
  loadServerCertificate,
  registerCertificateMetrics,
} from "../src/tls/certificate.ts";
import { CA_PEM, SERVER_KEY, SERVER_PEM, WRONG_KEY, WRONG_PEM } from "./fixtures/certs.ts";
import { hasOpenssl, makeCertificate } from "./support/make_cert.ts";
import { parsePrometheus } from "./support/prometheus.ts";

const OPENSSL = await hasOpenssl();
/** Tests that make certificates say so in their name when they are skipped. */
const NEEDS_OPENSSL = OPENSSL ? "" : " (skipped: openssl is not installed)";
const DAY = 24 * 60 * 60 * 1000;

function certificateError(fn: () => unknown): CertificateError {
  try {
    fn();
  } catch (error) {
    assert.ok(error instanceof CertificateError, `expected CertificateError, got ${error}`);
    assert.ok(!error.message.includes("\n"), `one line: ${error.message}`);
    return error;
  }
  assert.fail("expected a CertificateError");
}

Deno.test("certificate: the fixture's names, subject and dates", () => {
  const certificate = loadServerCertificate(SERVER_PEM, SERVER_KEY);
  assert.deepEqual(certificate.names, ["dns.test", "localhost", "127.0.0.1", "::1"]);
  assert.deepEqual(certificate.dnsNames, ["dns.test", "localhost"]);
  assert.equal(certificate.subject, "CN=dns.test");
  assert.equal(new Date(certificate.notAfterMs).toISOString(), "2126-10-29T01:00:26.000Z");
  assert.ok(certificate.notBeforeMs < certificate.notAfterMs);
  assert.ok(certificate.cert.startsWith("-----BEGIN CERTIFICATE-----"));
});

Deno.test("certificate: a chain (leaf then CA) is read leaf first", () => {
  const certificate = loadServerCertificate(SERVER_PEM + CA_PEM, SERVER_KEY);
  assert.equal(certificate.subject, "CN=dns.test");
  assert.equal(certificate.cert.match(/BEGIN CERTIFICATE/g)?.length, 2);
});

Deno.test("certificate: missing, not PEM, a path, swapped, mismatched: one line naming the variable", () => {
  const cases: [() => unknown, string, RegExp][] = [
    [() => loadServerCertificate("", SERVER_KEY), "DOTPROXY_TLS_CERT", /not set/],
    [() => loadServerCertificate(SERVER_PEM, " \n"), "DOTPROXY_TLS_KEY", /not set/],
    [() => loadServerCertificate("hello", SERVER_KEY), "DOTPROXY_TLS_CERT", /no PEM certificate/],
    [() => loadServerCertificate(SERVER_PEM, "hello"), "DOTPROXY_TLS_KEY", /no PEM private key/],
    [
      () => loadServerCertificate("/etc/dotproxy/tls.crt", SERVER_KEY),
      "DOTPROXY_TLS_CERT",
      /file path.*DOTPROXY_TLS_CERT="\$\(cat \/etc\/dotproxy\/tls.crt\)"/,
    ],
    [
      () => loadServerCertificate(SERVER_PEM, "tls.key"),
      "DOTPROXY_TLS_KEY",
      /file path.*"\$\(cat tls.key\)"/,
    ],
    [() => loadServerCertificate(SERVER_KEY, SERVER_PEM), "DOTPROXY_TLS_CERT", /private key/],
    [
      () => loadServerCertificate(SERVER_PEM, SERVER_PEM),
      "DOTPROXY_TLS_KEY",
      /goes in DOTPROXY_TLS_CERT/,
    ],
    [
      () => loadServerCertificate(SERVER_PEM, SERVER_KEY + WRONG_KEY),
      "DOTPROXY_TLS_KEY",
      /2 private keys/,
    ],
    [
      () => loadServerCertificate(SERVER_PEM, WRONG_KEY),
      "DOTPROXY_TLS_KEY",
      /does not belong to the certificate in DOTPROXY_TLS_CERT/,
    ],
    [
      () => loadServerCertificate(WRONG_PEM + SERVER_PEM, SERVER_KEY),
      "DOTPROXY_TLS_KEY",
      /does not belong.*wrong.test/,
    ],
    [
      () =>
        loadServerCertificate(
          "-----BEGIN CERTIFICATE-----\nMIIBnTCCAUOgAwIBAgIU\n-----END CERTIFICATE-----",
          SERVER_KEY,
        ),
      "DOTPROXY_TLS_CERT",
      /certificate 1 cannot be read/,
    ],
  ];
  for (const [fn, variable, pattern] of cases) {
    const error = certificateError(fn);
    assert.equal(error.variable, variable, error.message);
    assert.ok(error.message.startsWith(`${variable}: `), error.message);
    assert.match(error.message, pattern);
  }
  // The key never appears in a message.
  const error = certificateError(() => loadServerCertificate(SERVER_PEM, WRONG_KEY));
  assert.ok(!error.message.includes(WRONG_KEY.split("\n")[1]));
});

Deno.test({
  name: "certificate: encrypted keys (PKCS #8 and traditional) are refused" + NEEDS_OPENSSL,
  ignore: !OPENSSL,
  fn: async () => {
    for (const keyForm of ["encrypted", "encrypted-traditional"] as const) {
      const made = await makeCertificate({ keyForm });
      const error = certificateError(() => loadServerCertificate(made.cert, made.key));
      assert.equal(error.variable, "DOTPROXY_TLS_KEY");
      assert.match(error.message, /encrypted/);
      certificateError(() => checkKeyText(made.key));
    }
  },
});

Deno.test({
  name: "certificate: EC (SEC1) and RSA (PKCS #1) keys load and Deno.listenTls serves with them" +
    NEEDS_OPENSSL,
  ignore: !OPENSSL,
  fn: async () => {
    for (
      const request of [
        { keyType: "ec", keyForm: "traditional" },
        { keyType: "rsa", keyForm: "traditional" },
        { keyType: "rsa", keyForm: "pkcs8" },
      ] as const
    ) {
      const made = await makeCertificate(request);
      const certificate = loadServerCertificate(made.cert, made.key);
      assert.deepEqual(certificate.dnsNames, ["made.test", "localhost"]);
      const listener = Deno.listenTls({
        hostname: "127.0.0.1",
        port: 0,
        cert: certificate.cert,
        key: certificate.key,
      });
      try {
        const accepted = listener.accept().then(async (conn) => {
          await conn.handshake();
          await conn.write(new Uint8Array([42]));
          conn.close();
        });
        const client = await Deno.connectTls({
          hostname: "127.0.0.1",
          port: listener.addr.port,
          caCerts: [CA_PEM],
        });
        const byte = new Uint8Array(1);
        assert.equal(await client.read(byte), 1, JSON.stringify(request));
        assert.equal(byte[0], 42);
        client.close();
        await accepted;
      } finally {
        listener.close();
      }
    }
  },
});

Deno.test({
  name: "certificate: an RSA key for an EC certificate does not belong to it" + NEEDS_OPENSSL,
  ignore: !OPENSSL,
  fn: async () => {
    const rsa = await makeCertificate({ keyType: "rsa" });
    const error = certificateError(() => loadServerCertificate(SERVER_PEM, rsa.key));
    assert.match(error.message, /does not belong.*rsa key/);
  },
});

Deno.test("certificate: expiry problems at a moved wall clock", () => {
  const certificate = loadServerCertificate(SERVER_PEM, SERVER_KEY);
  const end = certificate.notAfterMs;
  assert.equal(expiryProblem(certificate, Date.now()), null);
  assert.equal(expiryProblem(certificate, end - 8 * DAY), null);
  assert.match(expiryProblem(certificate, end - 6.5 * DAY)!, /^expires in 6 days/);
  assert.match(expiryProblem(certificate, end - 5 * 60 * 60 * 1000)!, /^expires in 5 hours/);
  assert.match(expiryProblem(certificate, end + 1000)!, /^expired less than a day ago/);
  assert.match(expiryProblem(certificate, end + 3.2 * DAY)!, /^expired 3 days ago/);
  assert.match(expiryProblem(certificate, certificate.notBeforeMs - 1000)!, /not valid before/);
});

/** A logger whose lines land in an array, parsed. */
function capture(): { log: Logger; records: () => Record<string, unknown>[] } {
  const lines: string[] = [];
  return {
    log: new Logger({ level: "debug", format: "json", sink: (line) => lines.push(line) }),
    records: () => lines.map((line) => JSON.parse(line)),
  };
}

Deno.test("certificate monitor: one info line per listener; no warning for a valid certificate", () => {
  const certificate = loadServerCertificate(SERVER_PEM, SERVER_KEY);
  const clock = new ManualClock();
  const timers = new TimerQueue(clock);
  const { log, records } = capture();
  const monitor = new CertificateMonitor({
    certificate,
    listeners: ["dot 127.0.0.1:853", "doh [::1]:443"],
    log,
    timers,
  });
  const infos = records().filter((r) => r.msg === "tls listener certificate");
  assert.deepEqual(infos.map((r) => r.listener), ["dot 127.0.0.1:853", "doh [::1]:443"]);
  assert.equal(infos[0].names, "dns.test,localhost,127.0.0.1,::1");
  assert.equal(infos[0].expires, "2126-10-29T01:00:26.000Z");
  assert.equal(infos[0].level, "info");
  clock.advance(3 * EXPIRY_CHECK_INTERVAL_MS);
  assert.equal(records().filter((r) => r.level === "warn").length, 0);
  monitor.close();
  assert.equal(timers.size, 0);
  timers.close();
});

Deno.test("certificate monitor: an expiring certificate is warned about at start and daily, until closed", () => {
  const certificate = loadServerCertificate(SERVER_PEM, SERVER_KEY);
  const clock = new ManualClock();
  const timers = new TimerQueue(clock);
  const { log, records } = capture();
  // The wall clock follows the manual clock, starting 3 days before expiry.
  const wallStart = certificate.notAfterMs - 3 * DAY;
  const startedAt = clock.now();
  const monitor = new CertificateMonitor({
    certificate,
    listeners: ["doh 127.0.0.1:443"],
    log,
    timers,
    wallClock: () => wallStart + (clock.now() - startedAt),
  });
  const warnings = () => records().filter((r) => r.level === "warn").map((r) => String(r.msg));
  assert.deepEqual(warnings(), [
    "tls certificate expires in 3 days (2126-10-29T01:00:26.000Z); renew it and restart",
  ]);
  clock.advance(EXPIRY_CHECK_INTERVAL_MS - 1);
  assert.equal(warnings().length, 1);
  clock.advance(1);
  assert.equal(warnings().length, 2);
  assert.match(warnings()[1], /expires in 2 days/);
  clock.advance(3 * EXPIRY_CHECK_INTERVAL_MS);
  assert.equal(warnings().length, 5);
  assert.match(warnings()[3], /expired less than a day ago/);
  assert.match(warnings()[4], /expired 1 day ago/);
  monitor.close();
  clock.advance(3 * EXPIRY_CHECK_INTERVAL_MS);
  assert.equal(warnings().length, 5);
  timers.close();
});

Deno.test({
  name: "certificate monitor: real expired and expiring certificates warn at start" + NEEDS_OPENSSL,
  ignore: !OPENSSL,
  fn: async () => {
    const expired = await makeCertificate({
      startDate: "20200101000000Z",
      endDate: "20200201000000Z",
    });
    const expiring = await makeCertificate({ days: 3 });
    for (
      const [made, pattern] of [[expired, /^tls certificate expired \d+ days ago/], [
        expiring,
        /^tls certificate expires in (2 days|7\d hours)/,
      ]] as const
    ) {
      const timers = new TimerQueue(new ManualClock());
      const { log, records } = capture();
      new CertificateMonitor({
        certificate: loadServerCertificate(made.cert, made.key),
        listeners: ["dot 127.0.0.1:853"],
        log,
        timers,
      }).close();
      const warnings = records().filter((r) => r.level === "warn");
      assert.equal(warnings.length, 1);
      assert.match(String(warnings[0].msg), pattern);
      assert.equal(warnings[0].names, "made.test,localhost,127.0.0.1");
      timers.close();
    }
  },
});

Deno.test("certificate gauge: the expiry in Unix seconds by name; no series without a certificate", () => {
  const registry = new Registry();
  registerCertificateMetrics(registry, loadServerCertificate(SERVER_PEM, SERVER_KEY));
  const family = parsePrometheus(registry.render()).get(
    "dotproxy_tls_certificate_expiry_timestamp_seconds",
  );
  assert.equal(family?.type, "gauge");
  assert.deepEqual(family?.samples.map((s) => [s.labels, s.value]), [
    [{ name: "dns.test" }, Date.parse("2126-10-29T01:00:26Z") / 1000],
  ]);
  const empty = new Registry();
  registerCertificateMetrics(empty, null);
  const none = parsePrometheus(empty.render()).get(
    "dotproxy_tls_certificate_expiry_timestamp_seconds",
  );
  assert.equal(none?.type, "gauge");
  assert.deepEqual(none?.samples, []);
});

Deno.test("config: DOTPROXY_TLS_CERT and DOTPROXY_TLS_KEY are environment only and checked for form", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  const ok = parseConfig([], env({ DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY }));
  assert.equal(ok.kind, "config");
  if (ok.kind === "config") {
    assert.equal(ok.config.tlsCert, SERVER_PEM);
    assert.equal(ok.config.tlsKey, SERVER_KEY);
  }
  for (
    const [vars, pattern] of [
      [
        { DOTPROXY_TLS_CERT: "/etc/tls/tls.crt" },
        /^DOTPROXY_TLS_CERT: .*\$\(cat \/etc\/tls\/tls.crt\)/,
      ],
      [{ DOTPROXY_TLS_KEY: "./tls.key" }, /^DOTPROXY_TLS_KEY: .*file path/],
      [{ DOTPROXY_TLS_CERT: "garbage" }, /^DOTPROXY_TLS_CERT: no PEM certificate/],
      [{ DOTPROXY_TLS_KEY: SERVER_PEM }, /^DOTPROXY_TLS_KEY: no private key/],
    ] as const
  ) {
    assert.throws(() => parseConfig([], env(vars)), (error) => {
      assert.ok(error instanceof ConfigError);
      assert.match(error.message, pattern);
      return true;
    });
  }
  assert.throws(() => parseConfig(["--tls-cert", "x"], env({})), /unknown flag --tls-cert/);
  assert.ok(checkCertificateText(SERVER_PEM) === undefined);
});

Deno.test("main: a bad DOTPROXY_TLS_KEY is one line on stderr naming it, exit code 2", async () => {
  for (
    const [env, expected] of [
      [
        { DOTPROXY_TLS_KEY: "/run/secrets/tls.key" },
        'DOTPROXY_TLS_KEY="$(cat /run/secrets/tls.key)"',
      ],
      [{ DOTPROXY_TLS_CERT: "not pem" }, "DOTPROXY_TLS_CERT: no PEM certificate"],
    ] as const
  ) {
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-net", "--allow-env", "main.ts"],
      cwd: new URL("../", import.meta.url),
      env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1", ...env },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(output.stderr);
    assert.equal(output.code, 2, stderr);
    assert.equal(stderr.trim().split("\n").length, 1, stderr);
    assert.ok(stderr.includes(expected), stderr);
  }
});
