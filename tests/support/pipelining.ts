/**
 * The heaviest legitimate client of the stream listeners (issue 21): 1,000 queries, a sixth
 * of them for 54 kB TXT RRsets, the rest small answers, NXDOMAIN and wildcard (redirect zone)
 * answers, some with DO; against a real Unbound upstream. Shared by the TCP, DoT and DoH
 * pipelining tests.
 *
 * @module
 */

import { buildQuery, lengthFramed, parseMessage } from "./dns.ts";
import { UnboundUpstream } from "./unbound.ts";

/** The zone Unbound serves. */
export const ZONE = "unbound.test";
/** Queries the client pipelines. */
export const QUERIES = 1000;
/** TXT records of 255 octets per big RRset: about 54 kB on the wire. */
const BIG_RECORDS = 200;

function bigRecords(name: string): string[] {
  const records: string[] = [];
  for (let i = 0; i < BIG_RECORDS; i++) {
    const text = `${String(i).padStart(3, "0")}${"x".repeat(252)}`;
    records.push(`${name} 300 IN TXT "${text}"`);
  }
  return records;
}

/** What query `i` asks (its ID is `i`), and what its answer must look like. */
export interface Expected {
  query: Uint8Array;
  big: boolean;
  rcode: number;
}

/** Query `i` of the mix. */
export function queryFor(i: number): Expected {
  const kind = i % 6;
  const dnssecOk = i % 12 >= 6;
  const edns = dnssecOk ? { ednsUdpSize: 1232, dnssecOk } : {};
  if (kind === 0) {
    const query = buildQuery(`big${i % 3}.${ZONE}`, { id: i, type: 16, ...edns });
    return { query, big: true, rcode: 0 };
  }
  if (kind === 1 || kind === 4) {
    return { query: buildQuery(`www.${ZONE}`, { id: i, ...edns }), big: false, rcode: 0 };
  }
  if (kind === 2) {
    return { query: buildQuery(`nx${i}.${ZONE}`, { id: i, ...edns }), big: false, rcode: 3 };
  }
  const query = buildQuery(`w${i}.wild.${ZONE}`, { id: i, ...edns });
  return { query, big: false, rcode: 0 };
}

/** Starts Unbound with the zone the mix asks. */
export function startPipeliningUpstream(): Promise<UnboundUpstream> {
  return UnboundUpstream.start({
    zone: ZONE,
    localData: [
      `www.${ZONE} 300 IN A 192.0.2.10`,
      ...bigRecords(`big0.${ZONE}`),
      ...bigRecords(`big1.${ZONE}`),
      ...bigRecords(`big2.${ZONE}`),
    ],
    extraServerConfig: [
      `  local-zone: "wild.${ZONE}." redirect`,
      `  local-data: "wild.${ZONE}. 300 IN A 192.0.2.20"`,
    ],
  });
}

/** Tallies answers against the mix. */
export class Tally {
  answered = 0;
  big = 0;
  readonly failures: string[] = [];
  readonly #seen = new Set<number>();

  /** Checks `reply` as the answer to query `index` (its ID when undefined). */
  check(reply: Uint8Array, index?: number): void {
    const message = parseMessage(reply);
    const i = index ?? message.id;
    const want = queryFor(i);
    if (this.#seen.has(i)) this.failures.push(`answer ${i} twice`);
    this.#seen.add(i);
    if (message.rcode !== want.rcode) this.failures.push(`answer ${i}: rcode ${message.rcode}`);
    else if (want.big && reply.length < 50_000) {
      this.failures.push(`answer ${i}: ${reply.length} octets`);
    } else {
      this.answered++;
      if (want.big) this.big++;
    }
  }
}

/**
 * Writes the 1,000 framed queries on `conn` (in one write, or one write per query) while
 * reading the answers as they come (a client reading at its own pace); returns the tally.
 */
export async function pipelineFramed(conn: Deno.Conn, oneWrite: boolean): Promise<Tally> {
  const tally = new Tally();
  const writing = (async () => {
    const frames = Array.from({ length: QUERIES }, (_, i) => lengthFramed(queryFor(i).query));
    const write = async (bytes: Uint8Array) => {
      for (let at = 0; at < bytes.length;) at += await conn.write(bytes.subarray(at));
    };
    if (oneWrite) {
      const all = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
      frames.reduce((at, f) => (all.set(f, at), at + f.length), 0);
      await write(all);
    } else {
      for (const f of frames) await write(f);
    }
  })();
  let buffer = new Uint8Array(128 * 1024);
  let have = 0;
  let received = 0;
  try {
    while (received < QUERIES) {
      while (have >= 2 && have >= 2 + ((buffer[0] << 8) | buffer[1])) {
        const length = (buffer[0] << 8) | buffer[1];
        tally.check(buffer.slice(2, 2 + length));
        buffer.copyWithin(0, 2 + length, have);
        have -= 2 + length;
        received++;
      }
      if (received >= QUERIES) break;
      if (have === buffer.length) {
        const bigger = new Uint8Array(buffer.length * 2);
        bigger.set(buffer);
        buffer = bigger;
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const n = await Promise.race([
        conn.read(buffer.subarray(have)),
        new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), 10_000)),
      ]);
      clearTimeout(timer);
      if (n === "timeout") {
        tally.failures.push(`no answer for 10 s after ${received} answers`);
        break;
      }
      if (n === null) {
        tally.failures.push(`connection closed after ${received} answers`);
        break;
      }
      have += n;
    }
  } finally {
    await writing.catch((error) => tally.failures.push(`write: ${error}`));
  }
  return tally;
}
