/**
 * Does a lone length octet release an answer a DoT server holds under Nagle's algorithm?
 *
 * Writes two queries back to back on one TLS connection, 120 times, and times the second
 * answer after the first: without a nudge (the client's ACK waits for Linux's delayed-ACK
 * timer) and with one (the first octet of the next frame's length prefix sent alone, the
 * frame completed by the next query). Prints p50, p90 and max of each.
 *
 *   deno run --allow-net --allow-read --allow-env bench/nagle_nudge.ts HOST:PORT TLS_NAME CA_PEM_FILE
 *
 * For example against the harness's upstream Unbound: `bash bench/run.sh --keep-tmp` leaves
 * its configuration and test CA in the temp directory it prints; there, `unbound -c
 * upstream.conf -d &` serves DoT on 127.0.0.1:8853 for `dns.test`, then
 * `deno run --allow-net --allow-read --allow-env bench/nagle_nudge.ts 127.0.0.1:8853 dns.test ca.pem`.
 * Names under `u.bench.test` (or `NUDGE_ZONE`) must be answered from memory.
 *
 * @module
 */

const [target, tlsName, caFile] = Deno.args;
if (!target || !tlsName || !caFile) {
  console.error("usage: nagle_nudge.ts HOST:PORT TLS_NAME CA_PEM_FILE");
  Deno.exit(2);
}
const [hostname, port] = [
  target.slice(0, target.lastIndexOf(":")),
  Number(target.slice(target.lastIndexOf(":") + 1)),
];
const ZONE = Deno.env.get("NUDGE_ZONE") ?? "u.bench.test";

function query(id: number, name: string): Uint8Array {
  const parts = [id >> 8, id & 255, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
  for (const label of name.split(".")) parts.push(label.length, ...new TextEncoder().encode(label));
  parts.push(0, 0, 1, 0, 1);
  return new Uint8Array(parts);
}

function frame(message: Uint8Array): Uint8Array {
  const out = new Uint8Array(message.length + 2);
  out[0] = message.length >> 8;
  out[1] = message.length & 255;
  out.set(message, 2);
  return out;
}

const tcp = await Deno.connect({ hostname, port });
tcp.setNoDelay(true);
const tls = await Deno.startTls(tcp, {
  hostname: tlsName,
  caCerts: [Deno.readTextFileSync(caFile)],
});
await tls.handshake();
const buffer = new Uint8Array(65536);
let have = 0;
async function readAnswer(): Promise<void> {
  for (let reads = 0; reads < 1000; reads++) {
    if (have >= 2) {
      const length = (buffer[0] << 8) | buffer[1];
      if (have >= 2 + length) {
        buffer.copyWithin(0, 2 + length, have);
        have -= 2 + length;
        return;
      }
    }
    const n = await tls.read(buffer.subarray(have));
    if (n === null) throw new Error("the server closed the connection");
    have += n;
  }
  throw new Error("no whole answer in 1000 reads");
}

const pause = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
// Past the session tickets sent after the handshake (they too wait for an ACK).
await tls.write(frame(query(1, `settle.${ZONE}`)));
await readAnswer();
await pause(200);
const delays: Record<string, number[]> = { "no nudge": [], "length octet": [] };
for (let i = 0; i < 120; i++) {
  const nudge = i % 2 === 1;
  const tag = `${i}-${Math.floor(Math.random() * 1e9)}`;
  await tls.write(frame(query(10, `a${tag}.${ZONE}`)));
  await tls.write(frame(query(11, `b${tag}.${ZONE}`)));
  await readAnswer();
  const first = performance.now();
  if (nudge) await tls.write(new Uint8Array([0]));
  await readAnswer();
  delays[nudge ? "length octet" : "no nudge"].push(performance.now() - first);
  if (nudge) {
    // Complete the frame the octet started: the low octet of the length, then the query.
    const next = query(12, `c${tag}.${ZONE}`);
    const rest = new Uint8Array(next.length + 1);
    rest[0] = next.length;
    rest.set(next, 1);
    await tls.write(rest);
    await readAnswer();
  }
  await pause(5);
}
tls.close();
for (const [what, list] of Object.entries(delays)) {
  list.sort((a, b) => a - b);
  const at = (q: number) => list[Math.min(list.length - 1, Math.floor(q * list.length))].toFixed(2);
  console.log(
    `${what.padEnd(12)} second answer after the first: p50 ${at(0.5)} ms, p90 ${at(0.9)} ms, ` +
      `max ${list.at(-1)!.toFixed(2)} ms (${list.length} pairs)`,
  );
}
