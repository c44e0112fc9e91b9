#!/usr/bin/env bash
# DoH listener benchmark (issue 26), one run, side by side, loopback only, with h2load
# (dnsperf -m doh loses answers when two arrive in one read):
#
#   h2-hits   HTTP/2 over TLS, 10 connections x 10 streams, one cached name: req/s and CPU ms
#             per 1,000 requests of dotproxy --listen-doh, dnsdist addDOHLocal (packet cache)
#             and Unbound https-port (its cache), all in front of the same Unbound upstream
#   h1-hits   the same over HTTP/1.1 keep-alive (h2load --h1), one request at a time per
#             connection
#   h2-miss   HTTP/2, unique names (every query goes upstream)
#   idle      RSS per idle DoH connection: 2,000 idle HTTP/2 connections to dotproxy
#
#   flock /work/notes/bench.lock bash bench/doh_bench.sh            # about 2 minutes
#   flock /work/notes/bench.lock bash bench/doh_bench.sh --quick    # smoke run
#
# Needs deno, unbound (https-port: built with libnghttp2), dnsdist 1.7 (DoH), h2load, openssl,
# python3, taskset, mawk. Results: bench/results/doh-<UTC stamp>.md and bench/results/doh_latest.md.
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
REQUESTS=200000
MISSES=40000
IDLE=2000
KEEP_TMP=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1; REQUESTS=20000; MISSES=5000; IDLE=200 ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

BENCH_TAG=doh-bench
TMP="$(mktemp -d /tmp/dotproxy-doh-bench.XXXXXX)"
declare -A PID=()
STARTED_PIDS=()
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
for tool in deno unbound dnsdist h2load openssl python3 taskset mawk; do need "$tool"; done

UP_TLS=8873
UP_PLAIN=8073
declare -A PORT=([dotproxy]=8443 [dnsdist]=8444 [unbound]=8445)
DOTPROXY_DNS=5331
for port in "$UP_TLS" "$UP_PLAIN" "${PORT[@]}" "$DOTPROXY_DNS"; do
  port_busy "$port" && die "port $port is in use"
done
PROXY_CORE=0
LOAD_CORE=1

make_certs
log "upstream: Unbound on $UP_TLS (DoT) and $UP_PLAIN"
{
  upstream_server_clause upstream "$UP_TLS" "$UP_PLAIN"
  numbered_names 1000
} >"$TMP/upstream.conf"
spawn upstream "$LOAD_CORE" unbound -d -c "$TMP/upstream.conf"

log "dotproxy --listen-doh on ${PORT[dotproxy]}"
DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" DOTPROXY_TLS_CERT="$(cat "$TMP/server.pem")" \
  DOTPROXY_TLS_KEY="$(cat "$TMP/server.key")" \
  spawn dotproxy "$PROXY_CORE" deno run --allow-net --allow-env --unstable-net \
  --v8-flags=--max-semi-space-size=2,--max-old-space-size=160 "$REPO/main.ts" \
  --listen "127.0.0.1:$DOTPROXY_DNS" --listen-doh "127.0.0.1:${PORT[dotproxy]}" \
  --upstream "127.0.0.1:$UP_TLS#dns.test" --max-tcp-connections 5000 \
  --max-tcp-connections-per-client 5000 --log-level warn

log "dnsdist addDOHLocal on ${PORT[dnsdist]}"
cat >"$TMP/dnsdist.conf" <<EOF
setLocal("127.0.0.1:5332")
setSecurityPollSuffix("")
addDOHLocal("127.0.0.1:${PORT[dnsdist]}", "$TMP/server.pem", "$TMP/server.key", "/dns-query")
newServer({address="127.0.0.1:$UP_PLAIN"})
getPool(""):setCache(newPacketCache(100000))
EOF
spawn dnsdist "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"

log "Unbound https-port on ${PORT[unbound]}"
{
  unbound_server_clause front
  cat <<EOF
  interface: 127.0.0.1@${PORT[unbound]}
  https-port: ${PORT[unbound]}
  tls-service-key: "$TMP/server.key"
  tls-service-pem: "$TMP/server.pem"
  incoming-num-tcp: 1000
  access-control: 127.0.0.0/8 allow
  tls-cert-bundle: "$TMP/ca.pem"
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$UP_TLS#dns.test
  forward-tls-upstream: yes
EOF
} >"$TMP/front.conf"
spawn unbound "$PROXY_CORE" unbound -d -c "$TMP/front.conf"
sleep 3
for name in upstream dotproxy dnsdist unbound; do alive "$name" || die "$name did not start (see $TMP/$name.log)"; done

# A GET URI per query name (RFC 8484 base64url, ID 0).
uri() { # port name
  python3 - "$1" "$2" <<'EOF'
import base64, struct, sys
port, name = sys.argv[1], sys.argv[2]
q = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0)
for label in name.split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
print(f"https://127.0.0.1:{port}/dns-query?dns=" + base64.urlsafe_b64encode(q).decode().rstrip("="))
EOF
}

RESULT="$REPO/bench/results/doh-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$REPO/bench/results"
{
  echo "# DoH benchmark $(date -u +%FT%TZ) ($( ((QUICK)) && echo quick || echo full ))"
  echo
  echo "h2load on core $LOAD_CORE, servers on core $PROXY_CORE; CPU is the server process's user+system time."
  echo
  echo "| phase | target | requests | req/s | 2xx | CPU ms per 1,000 requests |"
  echo "| ----- | ------ | -------: | ----: | --: | ------------------------: |"
} >"$RESULT"

measure() { # phase target h2load-args...
  local phase="$1" target="$2"
  shift 2
  local pid="${PID[$target]}" before after out rps ok
  before=$(proc_ticks "$pid")
  out=$(taskset -c "$LOAD_CORE" h2load "$@" 2>&1) || true
  after=$(proc_ticks "$pid")
  rps=$(awk '/finished in/ { print int($4) }' <<<"$out")
  ok=$(awk '/status codes:/ { print $3 }' <<<"$out")
  local total
  total=$(awk '/^requests:/ { print $2 }' <<<"$out")
  local ms
  ms=$(awk -v t=$((after - before)) -v n="${ok:-0}" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (n > 0) printf "%.1f", t * 1000 / hz / n * 1000; else print "-" }')
  log "$phase $target: ${rps:-0} req/s, ${ok:-0}/${total:-0} 2xx, $ms CPU ms/1k"
  echo "| $phase | $target | ${total:-0} | ${rps:-0} | ${ok:-0} | $ms |" >>"$RESULT"
}

for target in dotproxy dnsdist unbound; do
  url=$(uri "${PORT[$target]}" n1.bench.test)
  taskset -c "$LOAD_CORE" h2load -n 1000 -c 2 "$url" >/dev/null 2>&1 || true # warm the cache
  measure h2-hits "$target" -n "$REQUESTS" -c 10 -m 10 "$url"
  measure h1-hits "$target" --h1 -n "$((REQUESTS / 4))" -c 10 -m 1 "$url"
done

for target in dotproxy dnsdist unbound; do
  prefix="m${target:0:2}$RANDOM"
  : >"$TMP/miss-$target.txt"
  for ((i = 0; i < MISSES; i++)); do printf '%s%x.u.bench.test\n' "$prefix" "$i"; done |
    python3 -c '
import base64, struct, sys
port = sys.argv[1]
for name in sys.stdin:
    q = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0)
    for label in name.strip().split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", 1, 1)
    print(f"https://127.0.0.1:{port}/dns-query?dns=" + base64.urlsafe_b64encode(q).decode().rstrip("="))
' "${PORT[$target]}" >"$TMP/miss-$target.txt"
  measure h2-miss "$target" -n "$MISSES" -c 10 -m 10 -i "$TMP/miss-$target.txt"
done

# Idle connections: RSS of dotproxy before and with IDLE idle HTTP/2 connections (each did one
# request and stays open; h2load holds them while it waits on a long --duration).
rss_before=$(proc_kb "${PID[dotproxy]}" VmRSS)
url=$(uri "${PORT[dotproxy]}" n2.bench.test)
timeout 30 taskset -c "$LOAD_CORE" h2load -c "$IDLE" -n "$IDLE" -r "$IDLE" -T 20 --rate-period 1 "$url" \
  >/dev/null 2>&1 &
holder=$!
STARTED_PIDS+=("$holder")
sleep 5
rss_during=$(proc_kb "${PID[dotproxy]}" VmRSS)
kill "$holder" 2>/dev/null || true
{
  echo
  echo "Idle HTTP/2 connections to dotproxy: RSS $rss_before kB before, $rss_during kB with $IDLE" \
    "connections open ($(((rss_during - rss_before) * 1024 / IDLE)) bytes each)."
} >>"$RESULT"
cp "$RESULT" "$REPO/bench/results/doh_latest.md"
cat "$RESULT"
