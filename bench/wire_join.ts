/**
 * Breaks each query of a fixed-rate run down on the wire, from a decrypted capture: the
 * client's UDP query reaching the proxy, the proxy's query leaving over TLS, the upstream's TLS
 * answer, the proxy's UDP answer. Names are unique per query, so the name joins the four.
 * `bench/run.sh --wire` writes the input with tshark; see bench/README.md ("Where the time goes
 * after the warm-up, on the wire").
 *
 *     deno run --allow-read bench/wire_join.ts FIELDS.txt PROXY_UDP_PORT UPSTREAM_TLS_PORT PREFIX
 *
 * FIELDS.txt: `tshark -T fields -E separator='|'` with frame.time_epoch, udp.srcport,
 * udp.dstport, tcp.srcport, tcp.dstport, tcp.stream, tcp.len, dns.flags.response, dns.qry.name.
 * Only names starting with PREFIX (the fixed-rate run's) count.
 *
 * An upstream answer slower than 0.3 ms counts as "held" when it left within 0.1 ms after a
 * segment from the proxy on the same connection that came after the query (Nagle: the server
 * waited for an ACK that segment carried), else as "late" (the server was slow).
 *
 * @module
 */

const SLOW_S = 0.0003;
const RELEASE_S = 0.0001;

/** Percentiles of a list of milliseconds, as one line. */
function percentiles(values: number[]): string {
  if (values.length === 0) return "n=0";
  values.sort((a, b) => a - b);
  const at = (q: number) => values[Math.min(values.length - 1, Math.floor(q * values.length))];
  return `n=${values.length} p50 ${at(0.5).toFixed(3)} p90 ${at(0.9).toFixed(3)} ` +
    `p99 ${at(0.99).toFixed(3)} max ${values[values.length - 1].toFixed(3)}`;
}

function main(): void {
  const [file, proxyPort, upstreamPort, prefix] = Deno.args;
  if (!file || !proxyPort || !upstreamPort || prefix === undefined) {
    console.error("usage: wire_join.ts FIELDS.txt PROXY_UDP_PORT UPSTREAM_TLS_PORT PREFIX");
    Deno.exit(2);
  }
  const udpIn = new Map<string, number>();
  const tlsOut = new Map<string, number>();
  const tlsIn = new Map<string, number>();
  const udpOut = new Map<string, number>();
  const lastProxySegment = new Map<string, number>();
  const perConnection = new Map<string, number>();
  let held = 0;
  let late = 0;
  for (const line of Deno.readTextFileSync(file).split("\n")) {
    const f = line.split("|");
    if (f.length < 9 || f[8] === "") continue;
    const t = Number(f[0]);
    const [udpSrc, udpDst, tcpSrc, tcpDst, stream, tcpLen] = f.slice(1, 7);
    const names = f[8].toLowerCase().split(",").filter((n) => n.startsWith(prefix));
    if (udpDst === proxyPort) {
      for (const n of names) if (!udpIn.has(n)) udpIn.set(n, t);
    } else if (udpSrc === proxyPort) {
      for (const n of names) if (!udpOut.has(n)) udpOut.set(n, t);
    } else if (tcpDst === upstreamPort) {
      if (Number(tcpLen) > 0) lastProxySegment.set(stream, t);
      for (const n of names) {
        if (tlsOut.has(n)) continue; // a nudge's duplicate
        tlsOut.set(n, t);
        perConnection.set(stream, (perConnection.get(stream) ?? 0) + 1);
      }
    } else if (tcpSrc === upstreamPort) {
      for (const n of names) {
        if (tlsIn.has(n)) continue;
        tlsIn.set(n, t);
        const sent = tlsOut.get(n);
        if (sent === undefined || t - sent <= SLOW_S) continue;
        const release = lastProxySegment.get(stream);
        if (release !== undefined && release > sent && t - release < RELEASE_S) held++;
        else late++;
      }
    }
  }
  const ingress: number[] = [];
  const upstream: number[] = [];
  const egress: number[] = [];
  const total: number[] = [];
  for (const [n, t0] of udpIn) {
    const out = tlsOut.get(n);
    const back = tlsIn.get(n);
    const answered = udpOut.get(n);
    if (out !== undefined) ingress.push((out - t0) * 1e3);
    if (out !== undefined && back !== undefined) upstream.push((back - out) * 1e3);
    if (back !== undefined && answered !== undefined) egress.push((answered - back) * 1e3);
    if (answered !== undefined) total.push((answered - t0) * 1e3);
  }
  console.log(`ingress  (UDP query in -> TLS query out): ${percentiles(ingress)}`);
  console.log(`upstream (TLS query out -> TLS answer in): ${percentiles(upstream)}`);
  console.log(`egress   (TLS answer in -> UDP answer out): ${percentiles(egress)}`);
  console.log(`total    (UDP query in -> UDP answer out): ${percentiles(total)}`);
  console.log(`upstream answers slower than 0.3 ms: held ${held}, late ${late}`);
  console.log(`queries per upstream connection: ${[...perConnection.values()].join(", ")}`);
}

main();
