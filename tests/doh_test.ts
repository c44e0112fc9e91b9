/**
 * The DoH listener (RFC 8484) over real sockets, with real clients where they are
 * installed (curl, kdig, dig, python3-h2): GET, POST and HEAD over HTTP/1.1, HTTP/2 over TLS
 * and HTTP/2 with prior knowledge on the plain listener; every error status a client can
 * provoke, none reaching the resolver; caching headers; padding; answers never truncated;
 * many streams answered out of order and the stream cap; X-Forwarded-For from trusted
 * proxies only; the connection limits and deadlines.
 *
 * @module
 */

import assert from "node:assert/strict";
import { H2Error } from "../src/http/h2.ts";
import { encodeHeaders } from "../src/http/hpack.ts";
import { DohService } from "../src/server/doh.ts";
import { DohListener } from "../src/server/doh_listener.ts";
import { CA_PEM, SERVER_KEY, SERVER_PEM } from "./fixtures/certs.ts";
import { appendChunk, buildQuery, encodeName, parseMessage } from "./support/dns.ts";
import { base64Url, type DohSetup, hasTool, named, run, withDoh } from "./support/doh.ts";
import { H2_PREFACE, h2Frame } from "./support/h2_frames.ts";
import { parseCidr } from "../src/config.ts";

const CURL = await hasTool("curl");
const KDIG = await hasTool("kdig", ["--version"]);
const DIG = await hasTool("dig", ["-v"]);
/** A python3 with the h2 package (Debian's python3-h2), or null. */
const PYTHON = (await hasTool("/usr/bin/python3", ["-c", "import h2"]))
  ? "/usr/bin/python3"
  : (await hasTool("python3", ["-c", "import h2"]))
  ? "python3"
  : null;
const PYTHON_H2 = PYTHON !== null;
const CA_FILE = new URL("./fixtures/ca.pem", import.meta.url).pathname;

/** curl with the test CA; returns status, headers (lower-case names) and body. */
async function curl(
  url: string,
  args: string[] = [],
): Promise<{ status: number; version: string; headers: Map<string, string>; body: Uint8Array }> {
  const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-doh-" });
  try {
    const out = await run("curl", [
      "-s",
      "--max-time",
      "10",
      "--cacert",
      CA_FILE,
      "-D",
      `${dir}/headers`,
      "-o",
      `${dir}/body`,
      "-w",
      "%{http_code} %{http_version}",
      ...args,
      url,
    ]);
    const [status, version] = new TextDecoder().decode(out.stdout).split(" ");
    const headers = new Map<string, string>();
    for (const line of (await Deno.readTextFile(`${dir}/headers`)).split(/\r?\n/)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers.set(line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim());
    }
    let body = new Uint8Array(0);
    try {
      body = await Deno.readFile(`${dir}/body`);
    } catch {
      // No body (HEAD).
    }
    return { status: Number(status), version, headers, body };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function addressOf(answer: Uint8Array): string[] {
  return parseMessage(answer).answers.filter((r) => r.type === 1).map((r) => r.data.join("."));
}

Deno.test({
  name: named(
    "doh: curl GET, POST and HEAD over HTTP/1.1, HTTP/2 (TLS) and h2c prior knowledge",
    CURL,
    "curl",
  ),
  ignore: !CURL,
  async fn() {
    await withDoh(async ({ tlsPort, plainPort, upstream }) => {
      const query = buildQuery("get.example", { id: 0 });
      const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-doh-" });
      await Deno.writeFile(`${dir}/query`, query);
      try {
        const cases: [string, string[], string][] = [
          [`https://localhost:${tlsPort}`, ["--http1.1"], "1.1"],
          [`https://localhost:${tlsPort}`, ["--http2"], "2"],
          [`http://127.0.0.1:${plainPort}`, ["--http1.1"], "1.1"],
          [`http://127.0.0.1:${plainPort}`, ["--http2-prior-knowledge"], "2"],
        ];
        for (const [base, flags, version] of cases) {
          const get = await curl(`${base}/dns-query?dns=${base64Url(query)}`, flags);
          assert.equal(get.status, 200, `${base} ${flags}`);
          assert.equal(get.version, version, `${base} ${flags}`);
          assert.equal(get.headers.get("content-type"), "application/dns-message");
          assert.match(get.headers.get("cache-control") ?? "", /^max-age=(59|60)$/);
          assert.deepEqual(addressOf(get.body), addressOf(get.body).slice(0, 1));
          assert.equal(parseMessage(get.body).id, 0);
          const post = await curl(`${base}/dns-query`, [
            ...flags,
            "-H",
            "content-type: application/dns-message",
            "--data-binary",
            `@${dir}/query`,
          ]);
          assert.equal(post.status, 200);
          assert.deepEqual(addressOf(post.body), addressOf(get.body));
          // With Expect: 100-continue (curl sends it for large bodies; forced here).
          const expecting = await curl(`${base}/dns-query`, [
            ...flags,
            "-H",
            "content-type: application/dns-message",
            "-H",
            "expect: 100-continue",
            "--data-binary",
            `@${dir}/query`,
          ]);
          assert.equal(expecting.status, 200);
          assert.deepEqual(addressOf(expecting.body), addressOf(get.body));
          const head = await curl(`${base}/dns-query?dns=${base64Url(query)}`, [...flags, "-I"]);
          assert.equal(head.status, 200);
          // curl -I writes the head where the body would go: nothing follows it.
          assert.ok(new TextDecoder().decode(head.body).endsWith("\r\n\r\n"));
          assert.equal(head.headers.get("content-length"), String(get.body.length));
        }
        // One upstream question: the rest came from the cache.
        assert.equal(upstream.queries, 1);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

Deno.test({
  name: named(
    "doh: every client mistake gets its 4xx, none reaches the resolver, never a 500",
    CURL,
    "curl",
  ),
  ignore: !CURL,
  async fn() {
    await withDoh(async ({ tlsPort, plainPort, upstream, proxy }) => {
      const dir = await Deno.makeTempDir({ dir: "/tmp", prefix: "dotproxy-doh-" });
      try {
        await Deno.writeFile(`${dir}/big`, new Uint8Array(70_000));
        await Deno.writeFile(`${dir}/short`, new Uint8Array(5));
        const response = buildQuery("r.example");
        response[2] |= 0x80;
        await Deno.writeFile(`${dir}/response`, response);
        await Deno.writeFile(`${dir}/query`, buildQuery("q.example"));
        const dns = "-H";
        const type = "content-type: application/dns-message";
        for (
          const [base, flags] of [
            [`https://localhost:${tlsPort}`, ["--http1.1"]],
            [`https://localhost:${tlsPort}`, ["--http2"]],
            [`http://127.0.0.1:${plainPort}`, ["--http2-prior-knowledge"]],
          ] as const
        ) {
          const cases: [string, string[], number, RegExp][] = [
            ["/dns-query?dns=!!!notbase64", [], 400, /base64url/],
            ["/dns-query", [], 400, /missing dns parameter/],
            ["/dns-query?dns=AAAA", [], 400, /not a DNS query/],
            ["/dns-query", [dns, type, "--data-binary", `@${dir}/short`], 400, /not a DNS/],
            ["/dns-query", [dns, type, "--data-binary", `@${dir}/response`], 400, /not a DNS/],
            ["/other", [], 404, /not found/],
            ["/dns-query", ["-X", "PUT"], 405, /not allowed/],
            ["/dns-query", ["-X", "DELETE"], 405, /not allowed/],
            ["/dns-query", [dns, type, "--data-binary", `@${dir}/big`], 413, /body over/],
            [`/dns-query?dns=${"A".repeat(9000)}`, [], 414, /too long|target/],
            [
              "/dns-query",
              ["-H", "content-type: text/plain", "--data-binary", `@${dir}/query`],
              415,
              /Content-Type/,
            ],
          ];
          for (const [path, extra, status, reason] of cases) {
            const reply = await curl(`${base}${path}`, [...flags, ...extra]);
            const where = `${flags} ${path.slice(0, 40)} ${extra.join(" ").slice(0, 40)}`;
            assert.equal(reply.status, status, where);
            assert.match(new TextDecoder().decode(reply.body), reason, where);
            if (status === 405) assert.equal(reply.headers.get("allow"), "GET, HEAD, POST");
          }
          // A head over 16 KiB: 431.
          const big = await curl(`${base}/dns-query?dns=AAAA`, [
            ...flags,
            "-H",
            `x-big: ${"b".repeat(20_000)}`,
          ]);
          assert.equal(big.status, 431, `${flags} 431`);
        }
        // A chunked body (HTTP/1.1 only): 411.
        const chunked = await curl(`https://localhost:${tlsPort}/dns-query`, [
          "--http1.1",
          "-H",
          type,
          "-H",
          "transfer-encoding: chunked",
          "--data-binary",
          `@${dir}/query`,
        ]);
        assert.equal(chunked.status, 411);
        assert.equal(upstream.queries, 0, "a client mistake reached the upstream");
        for (const rcode of ["NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED"]) {
          assert.equal(proxy.metrics.queries.get("doh", rcode), 0, `doh ${rcode}`);
        }
        const scrape = proxy.metrics.registry.render();
        assert.match(scrape, /dotproxy_doh_responses_total\{status="413"\} 3/);
        assert.match(scrape, /dotproxy_doh_responses_total\{status="400"\} 15/);
        assert.doesNotMatch(scrape, /dotproxy_doh_responses_total\{status="500"\} [1-9]/);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

Deno.test({
  name: named(
    "doh: kdig +https (POST and GET) and dig +https / +https-get",
    KDIG && DIG,
    "kdig or dig",
  ),
  ignore: !(KDIG && DIG),
  async fn() {
    await withDoh(async ({ tlsPort, plainPort }) => {
      const port = String(tlsPort);
      const tls = [`+tls-ca=${CA_FILE}`, "+tls-hostname=dns.test"];
      for (const mode of ["+https", "+https-get"]) {
        const out = await run("kdig", [
          "@127.0.0.1",
          "-p",
          port,
          mode,
          ...tls,
          "kdig.example",
          "A",
        ]);
        const text = new TextDecoder().decode(out.stdout);
        assert.match(text, /status: NOERROR/, `kdig ${mode}: ${text}${out.stderr}`);
        assert.match(text, /kdig\.example\.\s+\d+\s+IN\s+A\s+10\./);
        assert.match(text, mode === "+https" ? /HTTP\/2-POST/ : /HTTP\/2-GET/);
      }
      // dig 9.18 verifies no certificate by default; the listener's certificate is the test's.
      for (const mode of ["+https", "+https-get"]) {
        const out = await run("dig", ["@127.0.0.1", "-p", port, mode, "dig.example", "A"]);
        const text = new TextDecoder().decode(out.stdout);
        assert.match(text, /status: NOERROR/, `dig ${mode}: ${text}`);
        assert.match(text, /dig\.example\.\s+\d+\s+IN\s+A\s+10\./);
      }
      const plain = await run("dig", [
        "@127.0.0.1",
        "-p",
        String(plainPort),
        "+http-plain",
        "plain.example",
      ]);
      assert.match(new TextDecoder().decode(plain.stdout), /status: NOERROR/);
    });
  },
});

Deno.test({
  name: named("doh: curl --doh-url resolves a name through dotproxy", CURL, "curl"),
  ignore: !CURL,
  async fn() {
    await withDoh(async ({ tlsPort, upstream }) => {
      // The lookup is the test; the connection to the looked-up (unroutable) address is not.
      const out = await run("curl", [
        "-sv",
        "--max-time",
        "3",
        "--cacert",
        CA_FILE,
        "--doh-url",
        `https://localhost:${tlsPort}/dns-query`,
        "http://curl-doh.example:9/",
      ]);
      assert.match(out.stderr, /DoH A: 10\.\d+\.\d+\.\d+/, out.stderr);
      assert.ok(upstream.queries >= 1);
    });
  },
});

Deno.test({
  name: named(
    "doh: Cache-Control max-age as the cache computes it; none for SERVFAIL",
    CURL,
    "curl",
  ),
  ignore: !CURL,
  async fn() {
    // Negative answers carry an SOA with TTL 900 and MINIMUM 120: the negative TTL is 120.
    const soaAnswer = (query: Uint8Array): Uint8Array | null => {
      const name = parseMessage(query).question?.name ?? "";
      if (name.startsWith("slow.")) return null;
      if (!name.startsWith("neg.")) return null;
      const questionEnd = 12 + encodeName(name).length + 4;
      const soaRdata = [
        0,
        0,
        ...[0, 0, 0, 1],
        ...[0, 0, 0, 1],
        ...[0, 0, 0, 1],
        ...[0, 0, 0, 1],
        ...[0, 0, 0, 120],
      ];
      const out = new Uint8Array([
        ...query.subarray(0, questionEnd),
        ...[0xc0, 12, 0, 6, 0, 1, 0, 0, 0x03, 0x84, 0, soaRdata.length, ...soaRdata],
      ]);
      out[2] = 0x81;
      out[3] = 0x83;
      out[7] = 0;
      out[9] = 1;
      out[11] = 0;
      return out;
    };
    const { answerFor } = await import("./support/dns.ts");
    await withDoh(
      async ({ plainPort }) => {
        const base = `http://127.0.0.1:${plainPort}/dns-query?dns=`;
        const positive = await curl(base + base64Url(buildQuery("pos.example")));
        assert.equal(positive.headers.get("cache-control"), "max-age=60");
        const negative = await curl(base + base64Url(buildQuery("neg.example")));
        assert.equal(parseMessage(negative.body).rcode, 3);
        assert.equal(negative.headers.get("cache-control"), "max-age=120");
        const failed = await curl(base + base64Url(buildQuery("slow.example")));
        assert.equal(failed.status, 200);
        assert.equal(parseMessage(failed.body).rcode, 2);
        assert.equal(failed.headers.get("cache-control"), "no-store");
      },
      { timeoutMs: 300, serveStaleSeconds: 0 },
      {
        answer: (query) => {
          const name = parseMessage(query).question?.name ?? "";
          return name.startsWith("neg.") || name.startsWith("slow.")
            ? soaAnswer(query)
            : answerFor(query);
        },
      },
    );
    // Refused by the access list: made here, not cacheable.
    await withDoh(async ({ plainPort }) => {
      const refused = await curl(
        `http://127.0.0.1:${plainPort}/dns-query?dns=${base64Url(buildQuery("acl.example"))}`,
      );
      assert.equal(refused.status, 200);
      assert.equal(parseMessage(refused.body).rcode, 5);
      assert.equal(refused.headers.get("cache-control"), "no-store");
    }, { allow: [parseCidr("10.0.0.0/8", "--allow")] });
  },
});

/** A query with an OPT record carrying an empty Padding option. */
function paddedQuery(name: string): Uint8Array {
  const query = buildQuery(name, { id: 0, ednsUdpSize: 1232 });
  const out = new Uint8Array(query.length + 4);
  out.set(query);
  // RDLENGTH of the OPT (its last two octets) grows by the option: code 12, length 0.
  out[query.length - 1] = 4;
  out.set([0, 12, 0, 0], query.length);
  return out;
}

Deno.test({
  name: named(
    "doh: padded queries get answers padded to 468 octets; answers are never truncated",
    CURL,
    "curl",
  ),
  ignore: !CURL,
  async fn() {
    await withDoh(async ({ tlsPort }) => {
      const base = `https://localhost:${tlsPort}/dns-query?dns=`;
      const padded = await curl(base + base64Url(paddedQuery("pad.example")), ["--http2"]);
      assert.equal(padded.status, 200);
      assert.equal(padded.body.length % 468, 0);
      const message = parseMessage(padded.body);
      assert.ok(message.opt?.options.some((o) => o.code === 12));
      assert.equal(addressOf(padded.body).length, 1);
      const plain = await curl(base + base64Url(buildQuery("pad.example", { ednsUdpSize: 1232 })));
      assert.notEqual(plain.body.length % 468, 0);
      // 3,000 octets of TXT: over any UDP size, whole over HTTP.
      const big = await curl(base + base64Url(buildQuery("big3000.example", { type: 16 })));
      const txt = parseMessage(big.body);
      assert.equal(txt.tc, false);
      assert.ok(big.body.length > 3000);
    });
  },
});

const MANY_STREAMS = `
import socket, ssl, sys, base64, h2.connection, h2.config, h2.events
port, count = int(sys.argv[1]), int(sys.argv[2])
queries = sys.argv[3:]
sock = socket.create_connection(("127.0.0.1", port))
conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
sock.sendall(conn.data_to_send())
# Wait for the server's SETTINGS (its stream cap) before opening streams.
settled = False
while not settled:
    for event in conn.receive_data(sock.recv(65536)):
        settled = settled or isinstance(event, h2.events.RemoteSettingsChanged)
order, bodies, statuses = [], {}, {}
sent = 0
def send_more():
    global sent
    while sent < count and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams:
        sid = conn.get_next_available_stream_id()
        q = queries[sent % len(queries)]
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":authority", "x"),
            (":path", "/dns-query?dns=" + q)], end_stream=True)
        sent += 1
    sock.sendall(conn.data_to_send())
send_more()
while len(order) < count:
    data = sock.recv(65536)
    if not data: break
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived):
            statuses[event.stream_id] = dict(event.headers)[b":status"]
        elif isinstance(event, h2.events.DataReceived):
            bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            order.append(event.stream_id)
    send_more()
print(len(order), sum(1 for s in statuses.values() if s == b"200"), int(order != sorted(order)),
      conn.remote_settings.max_concurrent_streams)
`;
import { sleep, until } from "./support/wait.ts";

Deno.test({
  name: named(
    "doh: HTTP/2, 300 streams on one connection (python3-h2), answered out of order",
    PYTHON_H2,
    "python3-h2",
  ),
  ignore: !PYTHON_H2,
  async fn() {
    // Names starting with "slow" are held back 200 ms: later streams overtake them.
    await withDoh(
      async ({ plainPort }) => {
        const queries = [
          buildQuery("slow.example", { id: 0 }),
          buildQuery("fast.example", { id: 0 }),
        ]
          .map(base64Url);
        const out = await run(PYTHON!, [
          "-c",
          MANY_STREAMS,
          String(plainPort),
          "300",
          ...queries,
        ]);
        const [done, ok, reordered, cap] = new TextDecoder().decode(out.stdout).trim().split(" ")
          .map(Number);
        assert.equal(done, 300, out.stderr);
        assert.equal(ok, 300);
        assert.equal(reordered, 1, "the fast streams were not answered before the slow ones");
        assert.equal(cap, 100, "SETTINGS_MAX_CONCURRENT_STREAMS");
      },
      {},
      { delayMs: (query) => query[13] === 0x73 ? 200 : 0 },
    );
  },
});

/** The HPACK block of a GET of `path` over plain HTTP/2 (authority "x"). */
function plainGetHeaders(path: string): Uint8Array {
  return encodeHeaders([
    [":method", "GET"],
    [":scheme", "http"],
    [":authority", "x"],
    [":path", path],
  ]);
}

/** Reads frames until `done` says stop or the connection ends; returns them. */
async function readFrames(
  conn: Deno.Conn,
  done: (frames: { type: number; flags: number; stream: number; payload: Uint8Array }[]) => boolean,
) {
  const frames: { type: number; flags: number; stream: number; payload: Uint8Array }[] = [];
  let buffer = new Uint8Array(0);
  const chunk = new Uint8Array(65536);
  for (let reads = 0; reads < 10_000 && !done(frames); reads++) {
    const n = await conn.read(chunk);
    if (n === null) break;
    buffer = appendChunk(buffer, chunk, n);
    while (buffer.length >= 9) {
      const length = (buffer[0] << 16) | (buffer[1] << 8) | buffer[2];
      if (buffer.length < 9 + length) break;
      frames.push({
        type: buffer[3],
        flags: buffer[4],
        stream: new DataView(buffer.buffer, buffer.byteOffset).getUint32(5) & 0x7fffffff,
        payload: buffer.slice(9, 9 + length),
      });
      buffer = buffer.slice(9 + length);
    }
  }
  return frames;
}

Deno.test("doh: HTTP/2 streams past SETTINGS_MAX_CONCURRENT_STREAMS get RST_STREAM REFUSED_STREAM", async () => {
  await withDoh(
    async ({ plainPort }) => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
      try {
        const path = `/dns-query?dns=${base64Url(buildQuery("slow.example", { id: 0 }))}`;
        const parts: Uint8Array[] = [H2_PREFACE];
        parts.push(h2Frame(4, 0, 0, new Uint8Array(0)));
        for (let i = 0; i < 101; i++) {
          const block = plainGetHeaders(path);
          parts.push(h2Frame(1, 0x5, 1 + 2 * i, block));
        }
        for (const part of parts) await conn.write(part);
        const frames = await readFrames(conn, (f) => f.some((x) => x.type === 3));
        const resets = frames.filter((f) => f.type === 3);
        assert.deepEqual(resets.map((f) => [f.stream, f.payload[3]]), [
          [201, H2Error.REFUSED_STREAM],
        ]);
      } finally {
        conn.close();
      }
    },
    {},
    { delayMs: () => 300 },
  );
});

Deno.test("doh: X-Forwarded-For is believed from trusted proxies only, right-most untrusted", async () => {
  const ask = async (port: number, forwardedFor?: string) => {
    const response = await fetch(
      `http://127.0.0.1:${port}/dns-query?dns=${base64Url(buildQuery("xff.example"))}`,
      { headers: forwardedFor ? { "x-forwarded-for": forwardedFor } : {} },
    );
    assert.equal(response.status, 200);
    return parseMessage(new Uint8Array(await response.arrayBuffer())).rcode;
  };
  const allow = [parseCidr("10.0.0.0/8", "--allow")];
  await withDoh(async ({ plainPort }) => {
    assert.equal(await ask(plainPort), 5, "the proxy itself is not in --allow");
    assert.equal(await ask(plainPort, "10.9.9.9"), 0);
    assert.equal(await ask(plainPort, "192.0.2.1, 10.9.9.9"), 0, "left of the client: ignored");
    assert.equal(await ask(plainPort, "10.9.9.9, 192.0.2.1"), 5, "right-most untrusted");
    assert.equal(await ask(plainPort, "[::1]:5353, 10.9.9.9"), 0);
    assert.equal(await ask(plainPort, "10.9.9.9:5353"), 0);
    assert.equal(await ask(plainPort, "garbage"), 5, "garbage: the proxy itself");
  }, { allow, trustedProxies: [parseCidr("127.0.0.1", "--trusted-proxy")] });
  await withDoh(async ({ plainPort }) => {
    assert.equal(await ask(plainPort, "10.9.9.9"), 5, "no trusted proxy: the header is ignored");
  }, { allow });
});

/** Reads until the peer closes (or `limitMs` passes); true when it closed. */
async function closedWithin(conn: Deno.Conn, limitMs: number): Promise<boolean> {
  const timer = setTimeout(() => conn.close(), limitMs);
  const sink = new Uint8Array(4096);
  try {
    for (let reads = 0; reads < 1000; reads++) {
      if (await conn.read(sink) === null) return true;
    }
    return false;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch {
      // Closed by the timer.
    }
  }
}

/** A DoH service at /dns-query on `proxy`'s resolver, logging to `logs`. */
function dohService(proxy: DohSetup["proxy"], logs: DohSetup["logs"]): DohService {
  return new DohService({
    resolver: proxy.resolver,
    path: "/dns-query",
    trustedProxies: [],
    cache: { minTtl: 0, maxTtl: 86400, maxNegativeTtl: 3600 },
    log: logs.logger(),
  });
}

Deno.test("doh: connection caps, TLS handshake deadline, request and idle deadlines", async () => {
  await withDoh(async ({ proxy, logs }) => {
    const service = dohService(proxy, logs);
    const limits = { requestTimeoutMs: 300, idleTimeoutMs: 400 };
    const tls = DohListener.listen({ hostname: "127.0.0.1", port: 0 }, service, logs.logger(), {
      tls: { cert: SERVER_PEM, key: SERVER_KEY },
      maxConnections: 4,
      maxConnectionsPerClient: 3,
      handshakeTimeoutMs: 300,
      limits,
    });
    const plain = DohListener.listen({ hostname: "127.0.0.1", port: 0 }, service, logs.logger(), {
      tls: null,
      maxConnections: 10,
      maxConnectionsPerClient: 10,
      limits,
    });
    const opened: Deno.Conn[] = [];
    try {
      // Per listener (2 here): the third connection is closed at once.
      const capped = DohListener.listen(
        { hostname: "127.0.0.1", port: 0 },
        service,
        logs.logger(),
        { tls: null, maxConnections: 2, maxConnectionsPerClient: 10, limits },
      );
      try {
        for (let i = 0; i < 2; i++) {
          opened.push(await Deno.connect({ hostname: "127.0.0.1", port: capped.addr.port }));
        }
        const third = await Deno.connect({ hostname: "127.0.0.1", port: capped.addr.port });
        assert.ok(await closedWithin(third, 500), "a third connection past the cap stayed");
      } finally {
        await capped.close(200);
      }
      // Per client (2 here): a third makes room by closing the client's longest-idle one.
      const perClient = DohListener.listen(
        { hostname: "127.0.0.1", port: 0 },
        service,
        logs.logger(),
        { tls: null, maxConnections: 10, maxConnectionsPerClient: 2, limits },
      );
      try {
        const first = await Deno.connect({ hostname: "127.0.0.1", port: perClient.addr.port });
        opened.push(first);
        opened.push(await Deno.connect({ hostname: "127.0.0.1", port: perClient.addr.port }));
        await until(() => perClient.openConnections === 2, 1000);
        opened.push(await Deno.connect({ hostname: "127.0.0.1", port: perClient.addr.port }));
        assert.ok(await closedWithin(first, 500), "the longest-idle connection stayed");
        assert.ok(perClient.openConnections <= 2);
      } finally {
        await perClient.close(200);
      }
      // TLS, three connections per client: a silent client, half a ClientHello and garbage
      // each hold a slot until the handshake deadline (300 ms) at most; then a real client is
      // served. (Deno 2.9.6 keeps the socket of a TLS connection closed before its handshake
      // open until the client sends or closes: the slot is freed, the descriptor is not.)
      const silent = await Deno.connect({ hostname: "127.0.0.1", port: tls.addr.port });
      opened.push(silent);
      const half = await Deno.connect({ hostname: "127.0.0.1", port: tls.addr.port });
      opened.push(half);
      await half.write(new Uint8Array([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01]));
      const garbage = await Deno.connect({ hostname: "127.0.0.1", port: tls.addr.port });
      opened.push(garbage);
      await garbage.write(new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"));
      await sleep(600);
      assert.equal(tls.openConnections, 0, "a failed handshake still holds its slot");
      const client = await Deno.connectTls({
        hostname: "127.0.0.1",
        port: tls.addr.port,
        caCerts: [CA_PEM],
        alpnProtocols: ["http/1.1"],
      });
      await client.write(new TextEncoder().encode(
        `GET /dns-query?dns=${base64Url(buildQuery("limits.example"))} HTTP/1.1\r\nhost: x\r\n\r\n`,
      ));
      const head = new Uint8Array(4096);
      const n = await client.read(head);
      assert.match(new TextDecoder().decode(head.subarray(0, n ?? 0)), /^HTTP\/1.1 200 OK/);
      // Idle after the answer: closed by the idle deadline.
      assert.ok(await closedWithin(client, 2000), "an idle keep-alive connection stayed");
      // Slowloris: half a request head, then nothing: closed by the request deadline.
      const slow = await Deno.connect({ hostname: "127.0.0.1", port: plain.addr.port });
      await slow.write(new TextEncoder().encode("GET /dns-query?dns="));
      assert.ok(await closedWithin(slow, 2000), "a half request head held the connection");
      // The same over HTTP/2: a preface and half a frame.
      const slowH2 = await Deno.connect({ hostname: "127.0.0.1", port: plain.addr.port });
      await slowH2.write(new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"));
      assert.ok(await closedWithin(slowH2, 2000), "half an HTTP/2 frame held the connection");
      assert.ok(logs.find("doh tls handshake").length > 0, "handshake failures are logged");
      assert.ok(logs.find("doh-plain connection limit reached").length > 0);
    } finally {
      for (const conn of opened) {
        try {
          conn.close();
        } catch {
          // Closed by the server.
        }
      }
      // Deno releases a TLS connection closed before its handshake once the client closes.
      await sleep(100);
      await tls.close(500);
      await plain.close(500);
    }
  });
});

Deno.test("doh: HTTP/1.1 pipelining: ten requests in one write, ten answers in order", async () => {
  await withDoh(async ({ plainPort }) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
    try {
      let requests = "";
      for (let i = 0; i < 10; i++) {
        const query = buildQuery(`p${i}.example`, { id: i });
        // The first in absolute form, as a forward proxy sends it.
        const target = `${i === 0 ? "http://x" : ""}/dns-query?dns=${base64Url(query)}`;
        requests += `GET ${target} HTTP/1.1\r\nhost: x\r\n\r\n`;
      }
      await conn.write(new TextEncoder().encode(requests));
      let buffer = new Uint8Array(0);
      const answers: Uint8Array[] = [];
      const chunk = new Uint8Array(65536);
      for (let reads = 0; reads < 1000 && answers.length < 10; reads++) {
        const n = await conn.read(chunk);
        if (n === null) break;
        buffer = appendChunk(buffer, chunk, n);
        for (;;) {
          const text = new TextDecoder("latin1").decode(buffer);
          const headEnd = text.indexOf("\r\n\r\n");
          if (headEnd < 0) break;
          const length = Number(/content-length: (\d+)/i.exec(text.slice(0, headEnd))?.[1]);
          if (buffer.length < headEnd + 4 + length) break;
          assert.match(text, /^HTTP\/1.1 200 OK\r\n/);
          answers.push(buffer.slice(headEnd + 4, headEnd + 4 + length));
          buffer = buffer.slice(headEnd + 4 + length);
        }
      }
      assert.deepEqual(answers.map((a) => parseMessage(a).id), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
      assert.deepEqual(
        answers.map((a) => parseMessage(a).question?.name),
        answers.map((_, i) => `p${i}.example.`),
      );
    } finally {
      conn.close();
    }
  });
});

Deno.test("doh: a client that never reads its answers is closed by the write deadline", async () => {
  await withDoh(async ({ proxy, logs }) => {
    const service = dohService(proxy, logs);
    const listener = DohListener.listen(
      { hostname: "127.0.0.1", port: 0 },
      service,
      logs.logger(),
      {
        tls: null,
        maxConnections: 10,
        maxConnectionsPerClient: 10,
        limits: { writeTimeoutMs: 300 },
      },
    );
    try {
      for (const h2 of [false, true]) {
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
        // 8 KB answers, asked 2,000 times, never read: 16 MB, more than socket buffers hold.
        const path = `/dns-query?dns=${base64Url(buildQuery("big8000.example", { type: 16 }))}`;
        const parts: Uint8Array[] = [];
        if (h2) {
          parts.push(H2_PREFACE);
          // A large window, so that flow control is not what holds the answers back.
          parts.push(h2Frame(4, 0, 0, new Uint8Array([0, 4, 0x7f, 0xff, 0xff, 0xff])));
          parts.push(h2Frame(8, 0, 0, new Uint8Array([0x7f, 0xff, 0, 0])));
          for (let i = 0; i < 2000; i++) {
            const block = plainGetHeaders(path);
            parts.push(h2Frame(1, 0x5, 1 + 2 * i, block));
            // Stay under the stream cap: a few at a time would be the polite way; the cap
            // refuses the rest, which is fine here.
          }
        } else {
          for (let i = 0; i < 2000; i++) {
            parts.push(new TextEncoder().encode(`GET ${path} HTTP/1.1\r\nhost: x\r\n\r\n`));
          }
        }
        const writing = (async () => {
          try {
            for (const part of parts) await conn.write(part);
          } catch {
            // The server closed the connection under us: the point of the test.
          }
        })();
        const closed = await until(() => listener.openConnections === 0, 5000);
        assert.ok(closed, `${h2 ? "h2" : "http/1.1"}: a client that does not read stayed open`);
        conn.close();
        await writing;
      }
    } finally {
      await listener.close(500);
    }
  });
});

/** The GOAWAY error code a connection ends with after `bytes`, or null when it sends none. */
async function goAwayAfter(port: number, bytes: Uint8Array[]): Promise<number | null> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(H2_PREFACE);
    await conn.write(h2Frame(4, 0, 0, new Uint8Array(0)));
    for (const part of bytes) await conn.write(part);
    const timer = setTimeout(() => conn.close(), 3000);
    try {
      const frames = await readFrames(conn, (f) => f.some((x) => x.type === 7));
      const goAway = frames.find((f) => f.type === 7);
      return goAway ? new DataView(goAway.payload.buffer).getUint32(4) : null;
    } finally {
      clearTimeout(timer);
    }
  } catch {
    return null;
  } finally {
    try {
      conn.close();
    } catch {
      // Closed by the timer.
    }
  }
}

Deno.test("doh: malformed HTTP/2 ends the connection with the right GOAWAY; the listener serves on", async () => {
  await withDoh(
    async ({ plainPort }) => {
      const headers = (stream: number, path = "/dns-query?dns=AAABAAABAAAAAAAAAAABAAE") =>
        h2Frame(
          1,
          0x5,
          stream,
          encodeHeaders([[":method", "GET"], [":scheme", "http"], [":path", path]]),
        );
      const cases: [string, Uint8Array[], number][] = [
        [
          "a frame over 16,384 octets",
          [h2Frame(0, 0, 1, new Uint8Array(20_000))],
          H2Error.FRAME_SIZE_ERROR,
        ],
        ["HEADERS on stream 0", [headers(0)], H2Error.PROTOCOL_ERROR],
        ["HEADERS on an even stream", [headers(2)], H2Error.PROTOCOL_ERROR],
        ["undecodable HPACK", [
          h2Frame(1, 0x5, 1, new Uint8Array([0xff, 0xff, 0xff, 0xff, 0xff, 0xff])),
        ], H2Error.COMPRESSION_ERROR],
        ["DATA on an idle stream", [h2Frame(0, 0, 9, new Uint8Array(4))], H2Error.PROTOCOL_ERROR],
        [
          "PUSH_PROMISE from a client",
          [h2Frame(5, 0x4, 1, new Uint8Array(4))],
          H2Error.PROTOCOL_ERROR,
        ],
        ["WINDOW_UPDATE of 0", [h2Frame(8, 0, 0, new Uint8Array(4))], H2Error.PROTOCOL_ERROR],
        ["a SETTINGS of 5 octets", [h2Frame(4, 0, 0, new Uint8Array(5))], H2Error.FRAME_SIZE_ERROR],
        [
          "CONTINUATION out of the blue",
          [h2Frame(9, 0x4, 1, new Uint8Array(1))],
          H2Error.PROTOCOL_ERROR,
        ],
        ["a frame inside a header block", [
          h2Frame(1, 0x1, 1, new Uint8Array(0)),
          h2Frame(6, 0, 0, new Uint8Array(8)),
        ], H2Error.PROTOCOL_ERROR],
        ["a ping of 7 octets", [h2Frame(6, 0, 0, new Uint8Array(7))], H2Error.FRAME_SIZE_ERROR],
        ["streams going backwards", [headers(5), headers(3)], H2Error.STREAM_CLOSED],
      ];
      // Floods: streams opened only to be reset (CVE-2023-44487), and a header block of empty
      // CONTINUATION frames that never ends (CVE-2024-27316).
      const resets: Uint8Array[] = [];
      for (let i = 0; i < 300; i++) {
        resets.push(headers(1 + 2 * i, `/dns-query?dns=${base64Url(buildQuery("slow.example"))}`));
        resets.push(h2Frame(3, 0, 1 + 2 * i, new Uint8Array([0, 0, 0, 8])));
      }
      cases.push(["rapid reset", resets, H2Error.ENHANCE_YOUR_CALM]);
      const continuations = [h2Frame(1, 0x1, 1, new Uint8Array(0))];
      for (let i = 0; i < 100; i++) continuations.push(h2Frame(9, 0, 1, new Uint8Array(0)));
      cases.push(["endless CONTINUATION", continuations, H2Error.ENHANCE_YOUR_CALM]);
      for (const [what, bytes, code] of cases) {
        assert.equal(await goAwayAfter(plainPort, bytes), code, what);
      }
      // A PING is answered; a bad preface is closed without a word.
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
      try {
        await conn.write(H2_PREFACE);
        await conn.write(h2Frame(6, 0, 0, new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8])));
        const frames = await readFrames(conn, (f) => f.some((x) => x.type === 6));
        const pong = frames.find((f) => f.type === 6);
        assert.deepEqual([pong?.flags, [...pong?.payload ?? []]], [1, [1, 2, 3, 4, 5, 6, 7, 8]]);
      } finally {
        conn.close();
      }
      const bad = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
      await bad.write(new TextEncoder().encode("PRI * HTTP/1.1\r\n\r\nXX\r\n\r\n"));
      const frames = await readFrames(bad, () => false);
      assert.equal(frames.filter((f) => f.type === 7).length <= 1, true);
      bad.close();
      // Random bytes after the preface, many times: never a crash, the listener still answers.
      for (let round = 0; round < 50; round++) {
        const noise = crypto.getRandomValues(new Uint8Array(64 + round * 8));
        await goAwayAfter(plainPort, [noise]);
      }
      const response = await fetch(
        `http://127.0.0.1:${plainPort}/dns-query?dns=${base64Url(buildQuery("after.example"))}`,
      );
      assert.equal(response.status, 200);
      await response.body?.cancel();
    },
    {},
    { delayMs: (query) => query[13] === 0x73 ? 300 : 0 },
  );
});

Deno.test("doh: 600 fuzzed DNS messages by GET and POST: a valid answer or 400, never more", async () => {
  const { Rng, fuzzQuery, seedFromEnv } = await import("./support/fuzz.ts");
  const seed = seedFromEnv();
  const rng = new Rng(seed ^ 0x0d0e);
  await withDoh(async ({ plainPort, proxy }) => {
    const statuses = new Map<number, number>();
    for (let i = 0; i < 600; i++) {
      const query = fuzzQuery(rng);
      const response = i % 2 === 0
        ? await fetch(`http://127.0.0.1:${plainPort}/dns-query?dns=${base64Url(query)}`)
        : await fetch(`http://127.0.0.1:${plainPort}/dns-query`, {
          method: "POST",
          headers: { "content-type": "application/dns-message" },
          body: query.slice(),
        });
      const body = new Uint8Array(await response.arrayBuffer());
      statuses.set(response.status, (statuses.get(response.status) ?? 0) + 1);
      assert.ok(
        response.status === 200 || response.status === 400,
        `FUZZ_SEED=${seed}: ${response.status} for ${Array.from(query).join(",")}`,
      );
      if (response.status === 200) {
        const message = parseMessage(body);
        assert.ok(message.qr, "a response");
        assert.equal(message.id, (query[0] << 8) | query[1], "the query's ID");
        assert.equal(message.tc, false, "never truncated");
      }
    }
    assert.ok(
      (statuses.get(200) ?? 0) > 0 && (statuses.get(400) ?? 0) > 0,
      JSON.stringify([...statuses]),
    );
    const after = await fetch(
      `http://127.0.0.1:${plainPort}/dns-query?dns=${base64Url(buildQuery("after.example"))}`,
    );
    assert.equal(after.status, 200);
    await after.body?.cancel();
    assert.ok(
      proxy.metrics.registry.render().includes('dotproxy_doh_responses_total{status="400"}'),
    );
  }, { timeoutMs: 500 });
});

Deno.test("doh: a drain answers the requests in flight (HTTP/2: GOAWAY first), then closes", async () => {
  await withDoh(
    async ({ proxy, plainPort }) => {
      const h2 = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
      const h1 = await Deno.connect({ hostname: "127.0.0.1", port: plainPort });
      try {
        const path = `/dns-query?dns=${base64Url(buildQuery("slow.example", { id: 0 }))}`;
        await h2.write(H2_PREFACE);
        await h2.write(h2Frame(4, 0, 0, new Uint8Array(0)));
        await h2.write(h2Frame(
          1,
          0x5,
          1,
          encodeHeaders([[":method", "GET"], [":scheme", "http"], [":authority", "x"], [
            ":path",
            path,
          ]]),
        ));
        await h1.write(new TextEncoder().encode(`GET ${path} HTTP/1.1\r\nhost: x\r\n\r\n`));
        await sleep(50);
        const draining = proxy.drain({ delayMs: 0, timeoutMs: 3000 });
        const frames = await readFrames(h2, (f) => f.some((x) => x.type === 0 && (x.flags & 1)));
        const types = frames.map((f) => f.type).filter((t) => t === 7 || t === 1 || t === 0);
        assert.deepEqual(types.slice(0, 1), [7], "GOAWAY before the answer");
        const data = frames.find((f) => f.type === 0);
        assert.ok(data && parseMessage(data.payload).answers.length === 1, "the answer came");
        const reply = new Uint8Array(4096);
        const n = await h1.read(reply);
        const text = new TextDecoder().decode(reply.subarray(0, n ?? 0));
        assert.match(text, /^HTTP\/1.1 200 OK\r\n/);
        assert.match(text, /connection: close/);
        await draining;
      } finally {
        h2.close();
        h1.close();
      }
    },
    {},
    { delayMs: (query) => query[13] === 0x73 ? 300 : 0 },
  );
});

Deno.test("doh: TLS handshakes and open connections count under transport=doh", async () => {
  await withDoh(async ({ tlsPort, proxy }) => {
    const client = Deno.createHttpClient({ caCerts: [CA_PEM] });
    try {
      const response = await fetch(
        `https://localhost:${tlsPort}/dns-query?dns=${base64Url(buildQuery("m.example"))}`,
        { client },
      );
      assert.equal(response.status, 200);
      await response.body?.cancel();
      assert.equal(proxy.metrics.tlsHandshakes.get("doh", "ok"), 1);
      assert.equal(proxy.metrics.clientConnections.get("doh"), 1, "the kept-alive connection");
      const garbage = await Deno.connect({ hostname: "127.0.0.1", port: tlsPort });
      await garbage.write(new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"));
      await until(() => proxy.metrics.tlsHandshakes.get("doh", "failed") === 1, 2000);
      assert.equal(proxy.metrics.tlsHandshakes.get("doh", "failed"), 1);
      garbage.close();
    } finally {
      client.close();
    }
  });
});
