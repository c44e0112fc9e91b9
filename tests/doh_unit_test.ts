/**
 * The pure parts of DoH and DDR: base64url, X-Forwarded-For, answer padding, the SVCB
 * records of `_dns.resolver.arpa` (RFC 9462) answered locally through a running proxy with
 * nothing sent upstream, and the configuration of the DoH listeners.
 *
 * @module
 */

import assert from "node:assert/strict";
import { ConfigError, parseCidr, parseConfig } from "../src/config.ts";
import { analyzeResponse, ResponseInfo } from "../src/dns/message.ts";
import { padResponse } from "../src/dns/padding.ts";
import { decodeBase64Url, forwardedClient } from "../src/server/doh.ts";
import { SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { buildQuery, parseMessage } from "./support/dns.ts";
import { withDoh } from "./support/doh.ts";
import { hasOpenssl, makeCertificate } from "./support/make_cert.ts";
import { udpExchange } from "./support/proxy.ts";

const OPENSSL = await hasOpenssl();

Deno.test("doh: base64url with and without padding; anything else is null", () => {
  const query = buildQuery("b64.example", { id: 0 });
  const plain = btoa(String.fromCharCode(...query));
  const url = plain.replace(/\+/g, "-").replace(/\//g, "_");
  assert.deepEqual(decodeBase64Url(url.replace(/=+$/, "")), query);
  assert.deepEqual(decodeBase64Url(url), query);
  assert.deepEqual(decodeBase64Url("-_8"), new Uint8Array([0xfb, 0xff]));
  for (const bad of ["a+b/", "abc!", "a", "ab=c", "abcde"]) {
    assert.equal(decodeBase64Url(bad), null, bad);
  }
});

Deno.test("doh: the client behind trusted proxies is the right-most untrusted hop", () => {
  const peer = { transport: "tcp" as const, hostname: "10.0.0.5", port: 40000 };
  const trusted = [parseCidr("10.0.0.0/8", "x"), parseCidr("fd00::/8", "x")];
  const client = (header: string | undefined, list = trusted) =>
    forwardedClient(peer, header, list).hostname;
  assert.equal(client(undefined), "10.0.0.5");
  assert.equal(client("198.51.100.7"), "198.51.100.7");
  assert.equal(client("203.0.113.9, 198.51.100.7, 10.0.0.9"), "198.51.100.7");
  assert.equal(client("198.51.100.7, fd00::1"), "198.51.100.7");
  assert.equal(client("[2001:db8::1]:443, 10.1.1.1:80"), "2001:db8::1");
  assert.equal(client("10.0.0.7, 10.0.0.8"), "10.0.0.7", "all trusted: the left-most");
  assert.equal(client("junk, 10.0.0.8"), "10.0.0.8", "junk stops at the last trusted hop");
  assert.equal(client("198.51.100.7", []), "10.0.0.5", "no trusted proxies: ignored");
  const stranger = { transport: "tcp" as const, hostname: "192.0.2.1", port: 1 };
  assert.equal(forwardedClient(stranger, "10.9.9.9", trusted).hostname, "192.0.2.1");
});

Deno.test("padding: answers pad to 468-octet blocks inside their OPT record", () => {
  const query = buildQuery("pad.example", { id: 7, ednsUdpSize: 1232 });
  const answer = query.slice();
  answer[2] |= 0x80;
  const info = new ResponseInfo();
  assert.ok(analyzeResponse(answer, info));
  const padded = padResponse(answer, info.optStart, info.optEnd);
  assert.equal(padded.length, 468);
  const parsed = parseMessage(padded);
  assert.equal(parsed.opt?.options[0].code, 12);
  assert.equal(parsed.opt?.options[0].data.length, 468 - answer.length - 4);
  assert.ok(parsed.opt?.options[0].data.every((b) => b === 0));
  // Padding an already padded answer, or one without OPT, changes nothing.
  assert.ok(analyzeResponse(padded, info));
  assert.equal(padResponse(padded, info.optStart, info.optEnd), padded);
  const bare = buildQuery("pad.example");
  assert.equal(padResponse(bare, -1, -1), bare);
});

/** Reads the SVCB RDATA of RFC 9460: priority, target, params by key. */
function readSvcb(data: Uint8Array) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const priority = view.getUint16(0);
  const labels: string[] = [];
  let at = 2;
  while (data[at] !== 0) {
    labels.push(new TextDecoder().decode(data.subarray(at + 1, at + 1 + data[at])));
    at += 1 + data[at];
  }
  at++;
  const params = new Map<number, Uint8Array>();
  let last = -1;
  while (at < data.length) {
    const key = view.getUint16(at);
    const length = view.getUint16(at + 2);
    assert.ok(key > last, "keys ascending");
    last = key;
    params.set(key, data.subarray(at + 4, at + 4 + length));
    at += 4 + length;
  }
  const alpn: string[] = [];
  const raw = params.get(1) ?? new Uint8Array(0);
  for (let i = 0; i < raw.length; i += 1 + raw[i]) {
    alpn.push(new TextDecoder().decode(raw.subarray(i + 1, i + 1 + raw[i])));
  }
  return {
    priority,
    target: labels.join("."),
    alpn,
    port: params.has(3)
      ? new DataView(params.get(3)!.buffer, params.get(3)!.byteOffset).getUint16(0)
      : 0,
    ipv4hint: params.has(4) ? [...params.get(4)!].join(".") : "",
    dohpath: params.has(7) ? new TextDecoder().decode(params.get(7)) : "",
  };
}

Deno.test("ddr: _dns.resolver.arpa SVCB names each encrypted listener; nothing under resolver.arpa goes upstream", async () => {
  await withDoh(async ({ port, tlsPort, upstream }) => {
    const reply = await udpExchange(port, buildQuery("_dns.resolver.arpa", { type: 64 }));
    assert.ok(reply);
    const message = parseMessage(reply);
    assert.equal(message.rcode, 0);
    assert.equal(message.answers.length, 1, "one record: the TLS DoH listener (plain is not)");
    const svcb = readSvcb(message.answers[0].data);
    assert.deepEqual(svcb, {
      priority: 1,
      target: "dns.test",
      alpn: ["h2", "http/1.1"],
      port: tlsPort,
      ipv4hint: "127.0.0.1",
      dohpath: "/dns-query{?dns}",
    });
    // Same name, other type: NODATA; other names below resolver.arpa: NXDOMAIN.
    const a = parseMessage((await udpExchange(port, buildQuery("_dns.resolver.arpa")))!);
    assert.deepEqual([a.rcode, a.answers.length], [0, 0]);
    const other = parseMessage((await udpExchange(port, buildQuery("x.RESOLVER.arpa")))!);
    assert.equal(other.rcode, 3);
    assert.equal(upstream.queries, 0);
  });
  await withDoh(async ({ port, upstream }) => {
    const off = parseMessage(
      (await udpExchange(port, buildQuery("_dns.resolver.arpa", { type: 64 })))!,
    );
    assert.deepEqual([off.rcode, off.answers.length], [0, 0]);
    assert.equal(upstream.queries, 0);
  }, { ddr: false });
  // No encrypted listener (plain DoH only): nothing to advertise, still nothing upstream.
  await withDoh(async ({ port, upstream }) => {
    const none = parseMessage(
      (await udpExchange(port, buildQuery("_dns.resolver.arpa", { type: 64 })))!,
    );
    assert.deepEqual([none.rcode, none.answers.length], [0, 0]);
    assert.equal(upstream.queries, 0);
  }, { listenDoh: [], tlsCert: "", tlsKey: "" });
});

function failure(args: string[], env: Record<string, string> = {}): string {
  try {
    parseConfig(args, (name) => env[name]);
  } catch (error) {
    assert.ok(error instanceof ConfigError, String(error));
    assert.ok(!error.message.includes("\n"));
    return error.message;
  }
  assert.fail(`expected ${args.join(" ")} to fail`);
}

Deno.test("config: DoH listeners, the certificate they need, the plain listener's addresses, the path", () => {
  const tls = { DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY };
  assert.match(
    failure(["--listen-doh", "127.0.0.1:443"]),
    /^DOTPROXY_TLS_CERT: not set; .*needed by doh 127.0.0.1:443/,
  );
  assert.match(
    failure(["--listen-doh", "[::1]:443"], { DOTPROXY_TLS_CERT: SERVER_PEM }),
    /^DOTPROXY_TLS_KEY: not set/,
  );
  const ok = parseConfig(
    ["--listen-doh", "127.0.0.1:443", "--listen-doh", "[::1]:443"],
    (n) => ({ ...tls } as Record<string, string>)[n],
  );
  assert.equal(ok.kind, "config");
  if (ok.kind === "config") {
    assert.deepEqual(ok.config.listenDoh.map((a) => a.port), [443, 443]);
    assert.equal(ok.config.dohPath, "/dns-query");
    assert.equal(ok.config.ddr, true);
  }
  assert.match(
    failure(["--listen-doh-plain", "0.0.0.0:8053"]),
    /^--listen-doh-plain 0.0.0.0:8053: plain HTTP on an address that is not loopback or private/,
  );
  assert.match(
    failure([], { DOTPROXY_LISTEN_DOH_PLAIN: "192.0.2.10:80" }),
    /^DOTPROXY_LISTEN_DOH_PLAIN 192.0.2.10:80: .*--allow/,
  );
  for (
    const args of [["--listen-doh-plain", "10.1.2.3:8053"], ["--listen-doh-plain", "[::1]:8053"]]
  ) {
    assert.equal(parseConfig(args, () => undefined).kind, "config");
  }
  assert.equal(
    parseConfig(["--listen-doh-plain", "0.0.0.0:8053", "--allow", "10.0.0.0/8"], () => undefined)
      .kind,
    "config",
  );
  assert.match(
    failure(["--doh-path", "dns-query"]),
    /--doh-path: "dns-query" is not an absolute path/,
  );
  assert.match(failure(["--doh-path", "/q?x=1"]), /not an absolute path without query/);
  assert.match(
    failure(["--trusted-proxy", "10.0.0.1/8"]),
    /--trusted-proxy "10.0.0.1\/8": host bits/,
  );
  assert.match(failure(["--ddr", "maybe"]), /--ddr: "maybe" is not true or false/);
});

Deno.test({
  name: "ddr: a certificate with no DNS name advertises nothing and says why" +
    (OPENSSL ? "" : " (skipped: openssl is not installed)"),
  ignore: !OPENSSL,
  async fn() {
    const made = await makeCertificate({ san: "IP:127.0.0.1" });
    await withDoh(async ({ port, logs, upstream }) => {
      const reply = parseMessage(
        (await udpExchange(port, buildQuery("_dns.resolver.arpa", { type: 64 })))!,
      );
      assert.deepEqual([reply.rcode, reply.answers.length], [0, 0]);
      assert.equal(logs.find("ddr off: the certificate has no DNS name").length, 1);
      assert.equal(upstream.queries, 0);
    }, { tlsCert: made.cert, tlsKey: made.key });
  },
});

Deno.test("ddr: DoT and DoH listeners each get their SVCB record, DoT first", async () => {
  await withDoh(async ({ port, tlsPort, proxy }) => {
    const reply = parseMessage(
      (await udpExchange(port, buildQuery("_dns.resolver.arpa", { type: 64 })))!,
    );
    const records = reply.answers.map((record) => readSvcb(record.data));
    assert.deepEqual(records.map((r) => [r.priority, r.alpn, r.port, r.dohpath]), [
      [1, ["dot"], proxy.dot[0].addr.port, ""],
      [2, ["h2", "http/1.1"], tlsPort, "/dns-query{?dns}"],
    ]);
  }, { listenDot: [{ hostname: "127.0.0.1", port: 0 }] });
});

Deno.test("h2: the error codes are RFC 9113 section 7's", async () => {
  const { H2Error } = await import("../src/http/h2.ts");
  assert.deepEqual(
    [
      H2Error.NO_ERROR,
      H2Error.PROTOCOL_ERROR,
      H2Error.FLOW_CONTROL_ERROR,
      H2Error.STREAM_CLOSED,
      H2Error.REFUSED_STREAM,
      H2Error.CANCEL,
      H2Error.ENHANCE_YOUR_CALM,
      H2Error.HTTP_1_1_REQUIRED,
    ],
    [0x0, 0x1, 0x3, 0x5, 0x7, 0x8, 0xb, 0xd],
  );
});
