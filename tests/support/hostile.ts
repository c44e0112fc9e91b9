/**
 * Helpers for the hardening tests: clients on other loopback addresses (127.0.0.2 and up
 * are distinct sources to the proxy), forwarders that answer at once or only when told, a
 * TSIG-signed query, and a small python3 bridge for what Deno's sockets cannot do (bind a
 * TCP client to a chosen source address, reset a connection with SO_LINGER 0).
 *
 * @module
 */

import assert from "node:assert/strict";
import { buildQuery, encodeName } from "./dns.ts";
import { TcpDnsClient } from "./proxy.ts";

/**
 * Sends `queries` from a UDP socket bound to `source`; collects replies for `waitMs`, or
 * until `expected` replies came.
 */
export async function udpFrom(
  source: string,
  port: number,
  queries: Uint8Array[],
  waitMs = 300,
  expected = Infinity,
  target = "127.0.0.1",
): Promise<Uint8Array[]> {
  const socket = Deno.listenDatagram({ transport: "udp", hostname: source, port: 0 });
  const replies: Uint8Array[] = [];
  try {
    for (const query of queries) {
      await socket.send(query, { transport: "udp", hostname: target, port });
    }
    const deadline = performance.now() + waitMs;
    for (let i = 0; i < 100_000; i++) {
      const left = deadline - performance.now();
      if (left <= 0) break;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), left));
      const received = await Promise.race([socket.receive(), timeout]);
      clearTimeout(timer);
      if (received === null) break;
      replies.push(received[0]);
      if (replies.length >= expected) break;
    }
  } finally {
    socket.close();
  }
  return replies;
}

/** `query` with a TSIG record (RFC 8945) for key `key.` appended, ARCOUNT raised by one. */
export function signWithTsig(query: Uint8Array): Uint8Array {
  const algorithm = encodeName("hmac-sha256");
  const rdata = [
    ...algorithm,
    0,
    0,
    0x65,
    0x43,
    0x21,
    0x00, // time signed
    1,
    0x2c, // fudge 300
    0,
    32, // MAC size
    ...new Array(32).fill(0xab),
    query[0],
    query[1], // original ID
    0,
    0, // error
    0,
    0, // other length
  ];
  const record = [...encodeName("key"), 0, 250, 0, 255, 0, 0, 0, 0, 0, rdata.length, ...rdata];
  const out = new Uint8Array(query.length + record.length);
  out.set(query);
  out.set(record, query.length);
  out[11] += 1;
  return out;
}

/** True when `python3` runs here (the source-address and reset helpers need it). */
export async function pythonAvailable(): Promise<boolean> {
  try {
    const output = await new Deno.Command("python3", {
      args: ["-c", "import socket"],
      stdout: "null",
      stderr: "null",
    }).output();
    return output.success;
  } catch {
    return false;
  }
}

async function python(script: string, args: string[], timeoutMs: number): Promise<string> {
  const child = new Deno.Command("python3", {
    args: ["-c", script, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }, timeoutMs);
  try {
    const output = await child.output();
    const text = new TextDecoder().decode(output.stdout).trim();
    if (!output.success) {
      throw new Error(`python3 failed: ${new TextDecoder().decode(output.stderr)}`);
    }
    return text;
  } finally {
    clearTimeout(timer);
  }
}

const TCP_QUERY_FROM = `
import socket, sys, binascii
source, port, query = sys.argv[1], int(sys.argv[2]), binascii.unhexlify(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
s.bind((source, 0))
s.connect(("127.0.0.1", port))
s.sendall(len(query).to_bytes(2, "big") + query)
data = b""
try:
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
s.close()
print(binascii.hexlify(data[2:]).decode() if len(data) >= 2 else "closed")
`;

/**
 * Sends one query over TCP from `source` (a loopback address) and returns the answer, or
 * null when the connection closed without one.
 */
export async function tcpQueryFrom(
  source: string,
  port: number,
  query: Uint8Array,
): Promise<Uint8Array | null> {
  const hex = Array.from(query, (b) => b.toString(16).padStart(2, "0")).join("");
  const out = await python(TCP_QUERY_FROM, [source, String(port), hex], 10_000);
  if (out === "closed" || out === "") return null;
  return new Uint8Array(out.match(/../g)!.map((h) => parseInt(h, 16)));
}

const RESET_BEFORE_ACCEPT = `
import socket, struct, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
done = 0
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        s.connect(("127.0.0.1", port))
        done += 1
    except OSError:
        pass
    s.close()  # SO_LINGER 0: an RST, likely before the server's accept()
print(done)
`;

/** Opens `count` TCP connections and resets each at once (SO_LINGER 0); returns how many. */
export async function resetConnections(port: number, count: number): Promise<number> {
  return Number(await python(RESET_BEFORE_ACCEPT, [String(port), String(count)], 20_000));
}

const TCP_PIPELINE_FROM = `
import socket, sys, binascii
source, port = sys.argv[1], int(sys.argv[2])
queries = [binascii.unhexlify(q) for q in sys.argv[3:]]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(8)
s.bind((source, 0))
s.connect(("127.0.0.1", port))
s.sendall(b"".join(len(q).to_bytes(2, "big") + q for q in queries))
data = b""
answers = 0
try:
    while answers < len(queries):
        while len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
            data = data[2 + int.from_bytes(data[:2], "big"):]
            answers += 1
        if answers == len(queries):
            break
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except socket.timeout:
    pass
s.close()
print(answers)
`;

/**
 * Pipelines `queries` in one write over one TCP connection from `source` (a loopback
 * address), then reads; returns how many answers arrived (within 8 s).
 */
export async function tcpPipelineFrom(
  source: string,
  port: number,
  queries: Uint8Array[],
): Promise<number> {
  const hex = queries.map((q) => Array.from(q, (b) => b.toString(16).padStart(2, "0")).join(""));
  return Number(await python(TCP_PIPELINE_FROM, [source, String(port), ...hex], 15_000));
}

/**
 * The TCP answer budget's worst case: one query for a 60 KB answer (`big60000.test`, TXT) on a
 * first connection, read, so that the proxy estimates every answer at 60 KB; then
 * `connections` more connections with `each` queries on each (`s<i>-<j>.test`), not read. All
 * the connections, the first one first, are pushed to `clients`: the caller closes them.
 */
export async function bigAnswersThenHeldQueries(
  port: number,
  clients: TcpDnsClient[],
  connections = 60,
  each = 16,
): Promise<void> {
  const first = await TcpDnsClient.connect(port);
  clients.push(first);
  await first.send(buildQuery("big60000.test", { id: 1, type: 16 }));
  assert.ok((await first.receive())!.length > 60_000, "a 60 KB answer first");
  for (let i = 0; i < connections; i++) {
    const client = await TcpDnsClient.connect(port);
    clients.push(client);
    for (let j = 0; j < each; j++) await client.send(buildQuery(`s${i}-${j}.test`, { id: j }));
  }
}
