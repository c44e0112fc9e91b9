/**
 * Fuzzing through the listeners: a proxy in-process with a real DoT upstream (which answers
 * some questions with fuzzed answers), hostile packets over UDP and TCP in batches, and
 * after each batch a valid query over both that must be answered correctly. Shared by
 * `tests/fuzz_test.ts` and `scripts/fuzz.ts`.
 *
 * @module
 */

import { analyzeResponse, ResponseInfo } from "../../src/dns/message.ts";
import { addressFor, answerFor, appendChunk, buildQuery, formatA, parseMessage } from "./dns.ts";
import { DotServer } from "./dot_server.ts";
import { fuzzQuery, fuzzResponse, hex, Rng } from "./fuzz.ts";
import { LogCapture, TcpDnsClient, testConfig } from "./proxy.ts";
import { startProxy } from "../../src/app.ts";

/** What {@linkcode fuzzListeners} did. */
export interface ListenerTally {
  /** Hostile datagrams sent. */
  udp: number;
  /** Hostile TCP frames sent (on connections that stay open). */
  tcp: number;
  /** Connections opened to send broken framing. */
  brokenFraming: number;
  /** Replies received to hostile packets (each one checked to be a valid response). */
  replies: number;
  /** Valid queries answered correctly after a batch. */
  checks: number;
  /** Upstream answers that were fuzzed. */
  fuzzedAnswers: number;
}

/** Options of {@linkcode fuzzListeners}. */
export interface ListenerFuzzOptions {
  /** Batches to run. */
  batches: number;
  /** Hostile datagrams per batch. */
  udpPerBatch: number;
  /** Hostile TCP frames per batch. */
  tcpPerBatch: number;
  /** Called with a line of progress now and then. */
  progress?: (line: string) => void;
}

const responseInfo = new ResponseInfo();

/** Raised when the proxy did something a hostile packet must never cause. */
export class ListenerFuzzFailure extends Error {
  /** Creates a failure. */
  constructor(message: string) {
    super(message);
    this.name = "ListenerFuzzFailure";
  }
}

/** Collects datagrams for `waitMs`, or until one satisfies `last`. */
async function drainUdp(
  socket: Deno.DatagramConn,
  waitMs: number,
  out: Uint8Array[],
  last: (reply: Uint8Array) => boolean = () => false,
): Promise<void> {
  const deadline = performance.now() + waitMs;
  for (let i = 0; i < 100_000; i++) {
    const left = deadline - performance.now();
    if (left <= 0) return;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), left));
    const received = await Promise.race([socket.receive(), timeout]);
    clearTimeout(timer);
    if (received === null) return;
    out.push(received[0]);
    if (last(received[0])) return;
  }
}

/** Reads whatever a TCP connection sends until it is quiet for `quietMs`; frames out. */
async function drainTcp(conn: Deno.TcpConn, quietMs: number, out: Uint8Array[]): Promise<void> {
  let buffer = new Uint8Array(0);
  const chunk = new Uint8Array(65536);
  for (let i = 0; i < 100_000; i++) {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const quiet = new Promise<"quiet">((resolve) =>
      timer = setTimeout(() => resolve("quiet"), quietMs)
    );
    const n = await Promise.race([conn.read(chunk).catch(() => null), quiet]);
    clearTimeout(timer);
    if (n === "quiet") break;
    if (n === null) break;
    buffer = appendChunk(buffer, chunk, n);
    while (buffer.length >= 2 && buffer.length >= 2 + ((buffer[0] << 8) | buffer[1])) {
      const length = (buffer[0] << 8) | buffer[1];
      out.push(buffer.slice(2, 2 + length));
      buffer = buffer.slice(2 + length);
    }
  }
}

function checkReply(reply: Uint8Array, where: string): void {
  if (!analyzeResponse(reply, responseInfo)) {
    throw new ListenerFuzzFailure(
      `${where}: the proxy sent an invalid message (${responseInfo.reason}): ${hex(reply)}`,
    );
  }
}

async function expectGood(port: number, name: string, tcp: boolean): Promise<void> {
  const query = buildQuery(name, { ednsUdpSize: 1232 });
  let reply: Uint8Array | null = null;
  if (tcp) {
    const client = await TcpDnsClient.connect(port);
    try {
      await client.send(query);
      reply = await client.receive(5000);
    } finally {
      client.close();
    }
  } else {
    const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
    try {
      for (let attempt = 0; attempt < 3 && reply === null; attempt++) {
        await socket.send(query, { transport: "udp", hostname: "127.0.0.1", port });
        const replies: Uint8Array[] = [];
        const mine = (r: Uint8Array) => r[0] === query[0] && r[1] === query[1];
        await drainUdp(socket, 2000, replies, mine);
        reply = replies.find(mine) ?? null;
      }
    } finally {
      socket.close();
    }
  }
  const transport = tcp ? "tcp" : "udp";
  if (reply === null) throw new ListenerFuzzFailure(`no ${transport} answer for ${name}`);
  const parsed = parseMessage(reply);
  if (parsed.rcode !== 0 || parsed.answers.length !== 1) {
    throw new ListenerFuzzFailure(`${transport} answer for ${name}: rcode ${parsed.rcode}`);
  }
  if (formatA(parsed.answers[0].data) !== addressFor(name)) {
    throw new ListenerFuzzFailure(`${transport} answer for ${name}: wrong address`);
  }
}

/**
 * Runs `options.batches` batches of hostile traffic through a fresh proxy. Throws
 * {@linkcode ListenerFuzzFailure} when a reply is not a valid DNS message, a valid query
 * after a batch is not answered correctly, or the proxy logs an error (a bug).
 */
export async function fuzzListeners(
  rng: Rng,
  options: ListenerFuzzOptions,
): Promise<ListenerTally> {
  const tally: ListenerTally = {
    udp: 0,
    tcp: 0,
    brokenFraming: 0,
    replies: 0,
    checks: 0,
    fuzzedAnswers: 0,
  };
  // One upstream answers "good-" names properly and anything else, half the time, with a
  // fuzzed answer (valid or not) that the proxy must check before anything reaches a
  // client; a run of those marks it down, as it should, so a second, clean upstream keeps
  // the good queries answered.
  const upstreamRng = new Rng(rng.u32());
  const upstream = DotServer.start({
    answer: (query) => {
      const name = parseMessage(query).question?.name ?? "";
      if (name.startsWith("good-") || upstreamRng.chance(0.5)) return answerFor(query);
      tally.fuzzedAnswers++;
      return fuzzResponse(upstreamRng, query);
    },
  });
  const clean = DotServer.start();
  const logs = new LogCapture();
  const config = testConfig([upstream.upstream(), clean.upstream()], {
    timeoutMs: 1000,
    logLevel: "warn",
    maxTcpConnections: 1000,
    tcpIdleTimeoutMs: 1000,
  });
  const proxy = await startProxy(config, logs.logger("warn"));
  const port = proxy.udp[0].addr.port;
  const socket = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  try {
    for (let batch = 0; batch < options.batches; batch++) {
      const replies: Uint8Array[] = [];
      for (let i = 0; i < options.udpPerBatch; i++) {
        const packet = fuzzQuery(rng);
        await socket.send(packet, { transport: "udp", hostname: "127.0.0.1", port });
        tally.udp++;
      }
      // TCP: frames of a sane length on one connection, which must stay usable...
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      try {
        const frames: number[] = [];
        for (let i = 0; i < options.tcpPerBatch; i++) {
          let packet = fuzzQuery(rng);
          if (packet.length < 12) packet = new Uint8Array(12).fill(0x80);
          if (packet.length > 4096) packet = packet.subarray(0, 4096);
          frames.push(packet.length >> 8, packet.length & 0xff, ...packet);
          tally.tcp++;
        }
        await conn.write(new Uint8Array(frames));
        await drainTcp(conn, 300, replies);
      } finally {
        conn.close();
      }
      // ...and broken framing on connections of their own: short frames, lengths over the
      // limit, frames cut off, random bytes.
      for (let i = 0; i < 3; i++) {
        const broken = await Deno.connect({ hostname: "127.0.0.1", port });
        try {
          const bytes = rng.bytes(1 + rng.int(64));
          if (rng.chance(0.5)) bytes[0] = rng.chance(0.5) ? 0 : 0xff;
          await broken.write(bytes).catch(() => 0);
          tally.brokenFraming++;
        } finally {
          broken.close();
        }
      }
      await drainUdp(socket, 200, replies);
      for (const reply of replies) checkReply(reply, `batch ${batch}`);
      tally.replies += replies.length;
      try {
        await expectGood(port, `good-u${batch}.test`, false);
        await expectGood(port, `good-t${batch}.test`, true);
      } catch (error) {
        const recent = logs.lines.slice(-5).join("\n");
        throw new ListenerFuzzFailure(`${(error as Error).message}; last log lines:\n${recent}`);
      }
      tally.checks += 2;
      const errors = logs.lines.filter((line) => line.includes('"level":"error"'));
      if (errors.length > 0) throw new ListenerFuzzFailure(`the proxy logged: ${errors[0]}`);
      options.progress?.(
        `batch ${batch + 1}/${options.batches}: ${tally.udp} udp, ${tally.tcp} tcp, ` +
          `${tally.replies} replies`,
      );
    }
  } finally {
    socket.close();
    await proxy.close();
    await upstream.close();
    await clean.close();
  }
  return tally;
}
