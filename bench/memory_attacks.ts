/**
 * Peak memory (RSS) of dotproxy under each attack of issue 11, with the default limits and
 * the V8 heap flags we ship. dotproxy runs as its own process (`deno run main.ts` with
 * `--v8-flags`), a real Unbound serves DoT on loopback, and each attack runs against a fresh
 * proxy so that each peak (VmHWM in /proc) is its own. Needs Linux, unbound, dnsperf.
 *
 *   flock /work/notes/bench.lock deno run -A bench/memory_attacks.ts [--seconds 15]
 *     [--flags "--max-semi-space-size=2,--max-old-space-size=160"] [--only NAME,...]
 *     [--env NAME=VALUE]   (environment for the proxy, e.g. MALLOC_ARENA_MAX=2)
 *     [--proxy-args "--max-tcp-connections 500"]   (for every attack)
 *
 * Prints a Markdown table: attack, what was attempted, peak and final RSS, whether the
 * proxy still answered afterwards.
 *
 * @module
 */

import { CA_PEM, SERVER_KEY, SERVER_PEM } from "../tests/fixtures/certs.ts";
import { buildQuery, parseMessage } from "../tests/support/dns.ts";
import { freeStablePort } from "../tests/support/fault_upstream.ts";
import { fuzzQuery, Rng } from "../tests/support/fuzz.ts";
import { h2NoReadClientBytes, hpackLiteral } from "../tests/support/h2_frames.ts";
import { UnboundUpstream } from "../tests/support/unbound.ts";

const ROOT = new URL("../", import.meta.url);

interface Args {
  /** Extra environment for the proxy (e.g. MALLOC_ARENA_MAX=2). */
  env: Record<string, string>;
  /** Extra proxy arguments for every attack (e.g. "--max-tcp-connections 500"). */
  extra: string[];
  seconds: number;
  flags: string[];
  only: string[] | null;
}

function parseArgs(): Args {
  const args: Args = {
    env: {},
    extra: [],
    seconds: 15,
    flags: ["--max-semi-space-size=2", "--max-semi-space-size=2,--max-old-space-size=160"],
    only: null,
  };
  for (let i = 0; i < Deno.args.length; i++) {
    const flag = Deno.args[i];
    const value = Deno.args[++i];
    if (flag === "--seconds") args.seconds = Number(value);
    else if (flag === "--flags") args.flags = value.split(";");
    else if (flag === "--only") args.only = value.split(",");
    else if (flag === "--proxy-args") args.extra.push(...value.split(/\s+/).filter(Boolean));
    else if (flag === "--env") {
      const [name, ...rest] = value.split("=");
      args.env[name] = rest.join("=");
    } else throw new Error(`unknown argument ${flag}`);
  }
  return args;
}

/** VmRSS and VmHWM of a process, in MiB. */
async function memoryOf(pid: number): Promise<{ rss: number; peak: number }> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+)`, "m").exec(status)?.[1]);
  return { rss: kib("VmRSS") / 1024, peak: kib("VmHWM") / 1024 };
}

/** Kernel memory of all TCP sockets (both ends, the whole host), MiB, from /proc/net/sockstat. */
async function tcpSocketMemory(): Promise<number> {
  const text = await Deno.readTextFile("/proc/net/sockstat");
  const pages = Number(/^TCP:.* mem (\d+)/m.exec(text)?.[1] ?? 0);
  return (pages * 4096) / 2 ** 20;
}

interface Proxy {
  child: Deno.ChildProcess;
  dnsPort: number;
  httpPort: number;
  /** The DoT listener's port (0 unless the attack asked for TLS listeners). */
  dotPort: number;
  /** The DoH (TLS) listener's port (0 unless the attack asked for TLS listeners). */
  dohPort: number;
  stderr: () => string;
  stop: () => Promise<void>;
}

let proxyEnv: Record<string, string> = {};

async function startProxy(
  upstream: string,
  v8Flags: string,
  extra: string[],
  tls = false,
): Promise<Proxy> {
  const dnsPort = freeStablePort();
  const httpPort = freeStablePort();
  const dotPort = tls ? freeStablePort() : 0;
  const dohPort = tls ? freeStablePort() : 0;
  const tlsArgs = tls
    ? ["--listen-dot", `127.0.0.1:${dotPort}`, "--listen-doh", `127.0.0.1:${dohPort}`]
    : [];
  const tlsEnv: Record<string, string> = tls
    ? { DOTPROXY_TLS_CERT: SERVER_PEM, DOTPROXY_TLS_KEY: SERVER_KEY }
    : {};
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net",
      "--allow-env",
      `--v8-flags=${v8Flags}`,
      "main.ts",
      "--listen",
      `127.0.0.1:${dnsPort}`,
      "--http",
      `127.0.0.1:${httpPort}`,
      "--upstream",
      upstream,
      "--log-level",
      "warn",
      ...tlsArgs,
      ...extra,
    ],
    cwd: ROOT,
    env: {
      DOTPROXY_CA_CERTS: CA_PEM,
      DENO_NO_UPDATE_CHECK: "1",
      NO_COLOR: "1",
      ...tlsEnv,
      ...proxyEnv,
    },
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let text = "";
  const reading = (async () => {
    const decoder = new TextDecoder();
    for await (const chunk of child.stderr) text = (text + decoder.decode(chunk)).slice(-20000);
  })();
  for (let i = 0; i < 200; i++) {
    if (await answers(dnsPort, 200)) break;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return {
    child,
    dnsPort,
    httpPort,
    dotPort,
    dohPort,
    stderr: () => text,
    stop: async () => {
      try {
        child.kill("SIGKILL");
      } catch {
        // gone
      }
      await child.status;
      await reading;
    },
  };
}

/** True when a query for www.unbound.test gets NOERROR over UDP within `timeoutMs`. */
async function answers(
  port: number,
  timeoutMs = 2000,
  name = "www.unbound.test",
): Promise<boolean> {
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await socket.send(buildQuery(name), { transport: "udp", hostname: "127.0.0.1", port });
    const reply = await Promise.race([
      socket.receive(),
      new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), timeoutMs)),
    ]);
    return reply !== null && parseMessage(reply[0]).rcode === 0;
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    socket.close();
  }
}

async function dnsperf(
  port: number,
  datafile: string,
  seconds: number,
  qps: number,
  transport = "udp",
): Promise<string> {
  const output = await new Deno.Command("dnsperf", {
    args: [
      "-s",
      "127.0.0.1",
      "-p",
      String(port),
      "-m",
      transport,
      "-d",
      datafile,
      "-l",
      String(seconds),
      "-Q",
      String(qps),
      "-q",
      "20000",
      "-c",
      "16",
      "-T",
      "2",
      "-t",
      "2",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(output.stdout);
  const sent = /Queries sent:\s+(\d+)/.exec(text)?.[1] ?? "?";
  const completed = /Queries completed:\s+(\d+)/.exec(text)?.[1] ?? "?";
  return `${Math.round(Number(sent) / seconds)} q/s sent, ${completed} of ${sent} answered`;
}

const FLOODER = `
import socket, struct, sys, time
port, seconds, pps, mode = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
def q(name, i):
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    return struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0) + labels + b"\\x00\\x00" + (b"\\x10" if mode == "big" else b"\\x01") + b"\\x00\\x01"
addr = ("127.0.0.1", port)
start = time.time(); sent = 0; i = int(sys.argv[5]) * 10000000
while time.time() - start < seconds:
    if sent > pps * (time.time() - start):
        time.sleep(0.0005)
        continue
    for _ in range(100):
        i += 1
        name = "www.unbound.test" if mode == "hits" else "big.unbound.test" if mode == "big" else ("n%d.unbound.test" if mode == "misses" else "n%d.never.example") % i
        try:
            s.sendto(q(name, i), addr)
            sent += 1
        except OSError:
            pass
print(sent)
`;

/**
 * A UDP flood from three python3 senders (one Deno or dnsperf sender does not reach 150k
 * q/s here; dnsperf also waits on answers), fire and forget, as an attacker sends.
 */
async function flood(port: number, seconds: number, pps: number, mode: string): Promise<string> {
  const senders = Array.from({ length: 3 }, (_, i) =>
    new Deno.Command("python3", {
      args: [
        "-c",
        FLOODER,
        String(port),
        String(seconds),
        String(Math.ceil(pps / 3)),
        mode,
        String(i),
      ],
      stdout: "piped",
      stderr: "inherit",
    }).output());
  const outputs = await Promise.all(senders);
  const sent = outputs.reduce((n, o) => n + Number(new TextDecoder().decode(o.stdout).trim()), 0);
  return `${Math.round(sent / seconds / 1000)}k q/s sent (${Math.round(pps / 1000)}k attempted)`;
}

async function writeNames(path: string, count: number, name: (i: number) => string) {
  const lines: string[] = [];
  for (let i = 0; i < count; i++) lines.push(`${name(i)} A`);
  await Deno.writeTextFile(path, lines.join("\n") + "\n");
}

/** Opens TCP connections (reads nothing) and pipelines `queries` each. */
async function tcpClients(
  port: number,
  count: number,
  frames: Uint8Array,
): Promise<Deno.TcpConn[]> {
  const conns: Deno.TcpConn[] = [];
  for (let i = 0; i < count; i++) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conns.push(conn);
      if (frames.length > 0) conn.write(frames).catch(() => {});
    } catch {
      break;
    }
  }
  return conns;
}

/**
 * `count` connections, each pipelining 128 queries for `name` (default: a 60 KB answer) and
 * reading nothing.
 */
async function noRead(
  proxy: Proxy,
  seconds: number,
  count: number,
  name = "big.unbound.test",
): Promise<string> {
  const queries = Array.from(
    { length: 128 },
    (_, i) => buildQuery(name, { id: i, type: 16 }),
  );
  const conns = await tcpClients(proxy.dnsPort, count, framed(queries));
  await sleep(seconds * 1000);
  for (const conn of conns) conn.close();
  return `${conns.length} connections`;
}

/** Opens `count` TLS connections (ALPN `alpn`) to `port` and writes `bytes` on each. */
async function tlsClients(
  port: number,
  count: number,
  alpn: string[],
  bytes: Uint8Array,
): Promise<Deno.TlsConn[]> {
  const conns: Deno.TlsConn[] = [];
  for (let i = 0; i < count; i += 50) {
    const batch = await Promise.all(
      Array.from({ length: Math.min(50, count - i) }, async () => {
        try {
          const conn = await Deno.connectTls({
            hostname: "127.0.0.1",
            port,
            caCerts: [CA_PEM],
            alpnProtocols: alpn,
          });
          await conn.handshake();
          conn.write(bytes).catch(() => {});
          return conn;
        } catch {
          return null;
        }
      }),
    );
    for (const conn of batch) if (conn !== null) conns.push(conn);
  }
  return conns;
}

/** `noRead` over DoT: `count` TLS connections x 128 pipelined queries, never read. */
async function dotNoRead(proxy: Proxy, seconds: number, count: number): Promise<string> {
  const queries = Array.from(
    { length: 128 },
    (_, i) => buildQuery("big.unbound.test", { id: i, type: 16 }),
  );
  const conns = await tlsClients(proxy.dotPort, count, ["dot"], framed(queries));
  await sleep(seconds * 1000);
  for (const conn of conns) conn.close();
  return `${conns.length} connections`;
}

/**
 * What a DoH client that never reads sends on one HTTP/2 connection: the preface, SETTINGS
 * with the largest stream window and a connection window to match (so flow control holds
 * nothing back), and `streams` GETs for the 60 KB answer.
 */
function h2NoReadBytes(port: number, streams: number): Uint8Array {
  const query = buildQuery("big.unbound.test", { id: 0, type: 16 });
  const dns = btoa(String.fromCharCode(...query)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
  const block = new Uint8Array([
    0x82, // :method GET
    0x87, // :scheme https
    0x04, // :path, literal without indexing, name index 4
    ...hpackLiteral(`/dns-query?dns=${dns}`),
    0x01, // :authority
    ...hpackLiteral(`127.0.0.1:${port}`),
  ]);
  return h2NoReadClientBytes(block, streams);
}

/** DoH over HTTP/2: `count` TLS connections x `streams` GETs for 60 KB answers, never read. */
async function dohNoRead(
  proxy: Proxy,
  seconds: number,
  count: number,
  streams = 100,
): Promise<string> {
  const bytes = h2NoReadBytes(proxy.dohPort, streams);
  const conns = await tlsClients(proxy.dohPort, count, ["h2"], bytes);
  await sleep(seconds * 1000);
  for (const conn of conns) conn.close();
  return `${conns.length} connections x ${streams} streams`;
}

/** Fills the cache with 12,000 answers of 16,381 octets over `seconds` (UDP, TC=1 to us). */
async function fillCache(proxy: Proxy, seconds: number, tmp: string): Promise<string> {
  const lines = Array.from(
    { length: 12_000 },
    (_, i) => `f${String(i).padStart(5, "0")}.fill.unbound.test TXT`,
  );
  await Deno.writeTextFile(`${tmp}/fill.txt`, lines.join("\n") + "\n");
  const size = await tcpAnswerLength(proxy.dnsPort, "f99999.fill.unbound.test");
  const sent = await dnsperf(proxy.dnsPort, `${tmp}/fill.txt`, seconds, 12_000 / seconds);
  const metrics = await fetch(`http://127.0.0.1:${proxy.httpPort}/metrics`).then((r) => r.text());
  const gauge = (name: string) => new RegExp(`^${name} (\\S+)`, "m").exec(metrics)?.[1];
  return `${sent}; answers of ${size} octets; ${gauge("dotproxy_cache_entries")} entries, ` +
    `dotproxy_cache_bytes ${gauge("dotproxy_cache_bytes") ?? "(none)"}`;
}

/** The length of the answer to a TXT query for `name` over TCP (with EDNS, as dnsperf asks). */
async function tcpAnswerLength(port: number, name: string): Promise<number> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(framed([buildQuery(name, { type: 16, ednsUdpSize: 4096 })]));
    const prefix = new Uint8Array(2);
    let got = 0;
    while (got < 2) {
      const n = await conn.read(prefix.subarray(got));
      if (n === null) return -1;
      got += n;
    }
    return (prefix[0] << 8) | prefix[1];
  } finally {
    conn.close();
  }
}

function framed(queries: Uint8Array[]): Uint8Array {
  const total = queries.reduce((n, q) => n + 2 + q.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const q of queries) {
    out[at] = q.length >> 8;
    out[at + 1] = q.length & 0xff;
    out.set(q, at + 2);
    at += 2 + q.length;
  }
  return out;
}

async function sleep(ms: number) {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

interface Attack {
  name: string;
  what: string;
  extraFlags?: string[];
  /** Start the proxy with --listen-dot and --listen-doh (test certificate). */
  tls?: boolean;
  run: (proxy: Proxy, seconds: number, tmp: string) => Promise<string>;
}

const ATTACKS: Attack[] = [
  {
    name: "idle",
    what: "started, a few queries",
    run: async (proxy) => {
      for (let i = 0; i < 10; i++) await answers(proxy.dnsPort);
      await sleep(2000);
      return "-";
    },
  },
  {
    name: "udp-flood-hits",
    what: "UDP flood, 150k q/s attempted, one name (cache hits)",
    run: (proxy, seconds) => flood(proxy.dnsPort, seconds, 150_000, "hits"),
  },
  {
    name: "udp-flood-misses",
    what: "UDP flood, 150k q/s attempted, unique names (cache misses, NXDOMAIN)",
    run: (proxy, seconds) => flood(proxy.dnsPort, seconds, 150_000, "misses"),
  },
  {
    name: "udp-flood-unanswered",
    what: "UDP flood, 150k q/s attempted, names the upstream never answers in time",
    run: (proxy, seconds) => flood(proxy.dnsPort, seconds, 150_000, "never"),
  },
  {
    name: "udp-flood-big",
    what: "UDP flood, 150k q/s attempted, one name with a 60 KB answer (TC=1 to the client)",
    run: (proxy, seconds) => flood(proxy.dnsPort, seconds, 150_000, "big"),
  },
  {
    name: "cache-fill-large",
    what: "12,000 unique names under a wildcard with a 16.38 KB TXT answer, over UDP " +
      "(clients get TC=1, the whole answer is cached)",
    run: (proxy, seconds, tmp) => fillCache(proxy, seconds, tmp),
  },
  {
    name: "cache-fill-then-tcp-no-read-1000",
    what: "cache-fill-large, then tcp-no-read-1000 with the cache full",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    run: async (proxy, seconds, tmp) =>
      `${await fillCache(proxy, seconds, tmp)}; ${await noRead(proxy, seconds, 1000)}`,
  },

  {
    name: "tcp-flood",
    what: "TCP, 64 pipelining connections (one client's cap), unique names",
    run: async (proxy, seconds, tmp) =>
      await dnsperf(proxy.dnsPort, `${tmp}/misses.txt`, seconds, 150_000, "tcp"),
  },
  {
    name: "tcp-no-read",
    what: "64 TCP connections (one client's cap) x 128 pipelined 60 KB answers, never read",
    run: (proxy, seconds) => noRead(proxy, seconds, 64),
  },
  {
    name: "tcp-no-read-1000",
    what: "1,000 TCP connections x 128 pipelined 60 KB answers, never read " +
      "(per-client cap lifted: 16 attacker addresses)",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    run: (proxy, seconds) => noRead(proxy, seconds, 1000),
  },
  {
    name: "tcp-no-read-1000-cached",
    what: "1,000 TCP connections x 128 pipelined 16 KB answers from the cache, never read " +
      "(per-client cap lifted: 16 attacker addresses)",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    run: async (proxy, seconds) => {
      await tcpAnswerLength(proxy.dnsPort, "f00000.fill.unbound.test");
      return await noRead(proxy, seconds, 1000, "f00000.fill.unbound.test");
    },
  },
  {
    name: "dot-no-read-1000",
    what: "tcp-no-read-1000 over DoT (--listen-dot): 1,000 TLS connections x 128 pipelined " +
      "60 KB answers, never read",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    tls: true,
    run: (proxy, seconds) => dotNoRead(proxy, seconds, 1000),
  },
  {
    name: "doh-no-read-64",
    what: "DoH over HTTP/2 (--listen-doh): 64 connections (one client's cap) x 100 streams " +
      "(the stream cap) of GETs for 60 KB answers, windows opened wide, never read",
    tls: true,
    run: (proxy, seconds) => dohNoRead(proxy, seconds, 64),
  },
  {
    name: "doh-no-read-1000",
    what: "the same with 1,000 connections (per-client cap lifted)",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    tls: true,
    run: (proxy, seconds) => dohNoRead(proxy, seconds, 1000),
  },
  {
    name: "idle-connections",
    what: "1,000 idle TCP (cap lifted) + 3,000 idle HTTP connections",
    extraFlags: ["--max-tcp-connections-per-client", "1000"],
    run: async (proxy, seconds) => {
      const dns = await tcpClients(proxy.dnsPort, 1000, new Uint8Array(0));
      const http = await tcpClients(proxy.httpPort, 3000, new Uint8Array(0));
      await sleep(seconds * 1000);
      for (const conn of [...dns, ...http]) conn.close();
      return `${dns.length} + ${http.length} connections`;
    },
  },
  {
    name: "spoofed-sources",
    what: "--rate-limit 100, 65,536 distinct source addresses (127.1.0.0/16)",
    extraFlags: ["--rate-limit", "100"],
    run: async (proxy) => {
      let sent = 0;
      const query = buildQuery("www.unbound.test");
      for (let i = 0; i < 65536; i++) {
        const socket = Deno.listenDatagram({
          transport: "udp",
          hostname: `127.1.${i >> 8}.${i & 0xff}`,
          port: 0,
        });
        try {
          await socket.send(query, {
            transport: "udp",
            hostname: "127.0.0.1",
            port: proxy.dnsPort,
          });
          sent++;
        } finally {
          socket.close();
        }
      }
      return `${sent} sources`;
    },
  },
  {
    name: "fuzz-flood",
    what: "hostile UDP packets (fuzzed) as fast as one Deno sender goes",
    run: async (proxy, seconds) => {
      const rng = new Rng(11);
      const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.2", port: 0 });
      const target = { transport: "udp" as const, hostname: "127.0.0.1", port: proxy.dnsPort };
      const packets = Array.from({ length: 4096 }, () => fuzzQuery(rng));
      const stopAt = performance.now() + seconds * 1000;
      let sent = 0;
      try {
        while (performance.now() < stopAt) {
          await Promise.all(
            Array.from({ length: 64 }, (_, i) => socket.send(packets[(sent + i) & 4095], target)),
          );
          sent += 64;
        }
      } finally {
        socket.close();
      }
      return `${Math.round(sent / seconds)} packets/s`;
    },
  },
];

/**
 * The strings of the `i`th TXT record of fill.unbound.test: 4,070 octets of RDATA, so that
 * four of them answer f<5 digits>.fill.unbound.test in 16,381 octets with an OPT record.
 */
function fillText(i: number): string {
  const strings = [`"${i}"`, `"${"y".repeat(254)}"`];
  for (let j = 0; j < 15; j++) strings.push(`"${"y".repeat(250)}"`);
  strings.push(`"${"y".repeat(47)}"`);
  return strings.join(" ");
}

async function main() {
  const args = parseArgs();
  proxyEnv = args.env;
  const tmp = await Deno.makeTempDir({ prefix: "dotproxy-memory-" });
  const bigText = Array.from({ length: 16 }, () => `"${"x".repeat(250)}"`).join(" ");
  const unbound = await UnboundUpstream.start({
    localData: [
      "www.unbound.test. 300 IN A 192.0.2.10",
      // 15 records of 4 KB: a 60 KB answer (TCP only; UDP clients get TC=1).
      ...Array.from({ length: 15 }, (_, i) => `big.unbound.test. 300 IN TXT "${i}" ${bigText}`),
    ],
    extraServerConfig: [
      "  incoming-num-tcp: 1000",
      "  num-queries-per-thread: 4096",
      // Every name under fill.unbound.test gets the same answer: 4 TXT records, 16,377 to
      // 16,384 octets with the question of f<i>.fill.unbound.test and an OPT record, the
      // largest cached and the worst case for the arena (20 KiB slots).
      `  local-zone: "fill.unbound.test." redirect`,
      ...Array.from(
        { length: 4 },
        (_, i) => `  local-data: 'fill.unbound.test. 300 IN TXT ${fillText(i)}'`,
      ),
    ],
  });
  try {
    await writeNames(`${tmp}/misses.txt`, 3_000_000, (i) => `n${i}.unbound.test`);
    const rows: string[] = [];
    for (const flags of args.flags) {
      for (const attack of ATTACKS) {
        if (args.only && !args.only.includes(attack.name)) continue;
        const proxy = await startProxy(
          unbound.upstream(),
          flags,
          [...(attack.extraFlags ?? []), ...args.extra],
          attack.tls ?? false,
        );
        const pid = proxy.child.pid;
        const before = await memoryOf(pid);
        let highest = before.rss;
        let socketsPeak = 0;
        const sampler = setInterval(async () => {
          try {
            highest = Math.max(highest, (await memoryOf(pid)).rss);
            socketsPeak = Math.max(socketsPeak, await tcpSocketMemory());
          } catch {
            // exited
          }
        }, 100);
        let result = "";
        try {
          result = await attack.run(proxy, args.seconds, tmp);
        } catch (error) {
          result = `attack failed: ${error}`;
        }
        clearInterval(sampler);
        await sleep(1000);
        let alive = true;
        let mem = { rss: 0, peak: highest };
        try {
          mem = await memoryOf(pid);
        } catch {
          alive = false;
        }
        const ok = alive && await answers(proxy.dnsPort, 3000);
        const row = `| \`${flags}\` | ${attack.name} | ${attack.what} | ${result} | ` +
          `${before.rss.toFixed(0)} | ${mem.peak.toFixed(0)} | ${mem.rss.toFixed(0)} | ` +
          `${socketsPeak.toFixed(0)} | ${ok ? "yes" : "NO"} |`;
        console.log(row);
        rows.push(row);
        if (!ok) console.log(proxy.stderr().slice(-2000));
        await proxy.stop();
      }
    }
    console.log(
      "\n| flags | attack | what | load | start MiB | peak MiB | after MiB " +
        "| TCP socket buffers, host, peak MiB | answers after |",
    );
    console.log("|---|---|---|---|---|---|---|---|---|");
    for (const row of rows) console.log(row);
  } finally {
    await unbound.close();
    await Deno.remove(tmp, { recursive: true });
  }
}

await main();
