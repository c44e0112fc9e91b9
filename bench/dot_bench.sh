#!/usr/bin/env bash
# DoT listener benchmark (issue 25), one run, side by side, loopback only, dnsperf -m dot:
#
#   hits      1,000 cached names, 10 clients x 100 outstanding, persistent connections:
#             queries/s and CPU ms per 1,000 queries of dotproxy --listen-dot, dnsdist
#             addTLSLocal (packet cache) and Unbound tls-port (its cache), all in front of the
#             same Unbound upstream
#   miss      unique names (every query goes upstream)
#   conn-N    cached names, a new TLS connection every N queries (1, 10, 100): the cost of a
#             connection
#   idle      RSS per idle DoT connection: IDLE idle TLS connections to dotproxy
#
# The machine is shared and noisy: compare the targets of one run with each other (ratios),
# not runs with runs.
#
#   bash bench/dot_bench.sh            # about 3 minutes
#   bash bench/dot_bench.sh --quick    # smoke run
#
# Needs deno, unbound, dnsdist 1.7, dnsperf 2.10, openssl, python3, taskset, mawk.
# Results: bench/results/dot-<UTC stamp>.md and bench/results/dot_latest.md.
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
QUICK=0
SECONDS_PER=10
IDLE=2000
KEEP_TMP=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1; SECONDS_PER=3; IDLE=200 ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

BENCH_TAG=dot-bench
TMP="$(mktemp -d /tmp/dotproxy-dot-bench.XXXXXX)"
declare -A PID=()
STARTED_PIDS=()
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
for tool in deno unbound dnsdist dnsperf openssl python3 taskset mawk; do need "$tool"; done

UP_TLS=18883
UP_PLAIN=18083
declare -A PORT=([dotproxy]=18853 [dnsdist]=18854 [unbound]=18855)
DOTPROXY_DNS=15341
for port in "$UP_TLS" "$UP_PLAIN" "${PORT[@]}" "$DOTPROXY_DNS" 15342; do
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

log "dotproxy --listen-dot on ${PORT[dotproxy]}"
DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" DOTPROXY_TLS_CERT="$(cat "$TMP/server.pem")" \
  DOTPROXY_TLS_KEY="$(cat "$TMP/server.key")" \
  spawn dotproxy "$PROXY_CORE" deno run --allow-net --allow-env --unstable-net \
  --v8-flags=--max-semi-space-size=2,--max-old-space-size=160 "$REPO/main.ts" \
  --listen "127.0.0.1:$DOTPROXY_DNS" --listen-dot "127.0.0.1:${PORT[dotproxy]}" \
  --upstream "127.0.0.1:$UP_TLS#dns.test" --max-tcp-connections 5000 \
  --max-tcp-connections-per-client 5000 --log-level warn

log "dnsdist addTLSLocal on ${PORT[dnsdist]}"
cat >"$TMP/dnsdist.conf" <<EOF
setLocal("127.0.0.1:15342")
setSecurityPollSuffix("")
addTLSLocal("127.0.0.1:${PORT[dnsdist]}", "$TMP/server.pem", "$TMP/server.key")
newServer({address="127.0.0.1:$UP_PLAIN"})
getPool(""):setCache(newPacketCache(100000))
EOF
spawn dnsdist "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"

log "Unbound tls-port on ${PORT[unbound]}"
{
  unbound_server_clause front
  cat <<EOF
  interface: 127.0.0.1@${PORT[unbound]}
  tls-port: ${PORT[unbound]}
  tls-service-key: "$TMP/server.key"
  tls-service-pem: "$TMP/server.pem"
  incoming-num-tcp: 4096
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

awk 'BEGIN { for (i = 0; i < 1000; i++) printf "n%d.bench.test A\n", i }' >"$TMP/hits.txt"

RESULT="$REPO/bench/results/dot-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$REPO/bench/results"
{
  echo "# DoT benchmark $(date -u +%FT%TZ) ($( ((QUICK)) && echo quick || echo full ))"
  echo
  echo "dnsperf -m dot on core $LOAD_CORE, servers on core $PROXY_CORE, ${SECONDS_PER} s per row;"
  echo "CPU is the server process's user+system time. A shared, noisy machine: read the"
  echo "ratios between targets of this run, not the absolute figures."
  echo
  echo "| phase | target | completed | lost | q/s | CPU ms per 1,000 queries | q/s per CPU-second |"
  echo "| ----- | ------ | --------: | ---: | --: | -----------------------: | -----------------: |"
} >"$RESULT"

measure() { # phase target dnsperf-args...
  local phase="$1" target="$2"
  shift 2
  local pid="${PID[$target]}" before after out qps done lost
  before=$(proc_ticks "$pid")
  out=$(taskset -c "$LOAD_CORE" dnsperf -m dot -s 127.0.0.1 -p "${PORT[$target]}" \
    -l "$SECONDS_PER" "$@" 2>&1) || true
  after=$(proc_ticks "$pid")
  qps=$(awk '/Queries per second:/ { print int($4) }' <<<"$out")
  done=$(awk '/Queries completed:/ { print $3 }' <<<"$out")
  lost=$(awk '/Queries lost:/ { print $3 }' <<<"$out")
  local ms per
  ms=$(awk -v t=$((after - before)) -v n="${done:-0}" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (n > 0) printf "%.1f", t * 1000 / hz / n * 1000; else print "-" }')
  per=$(awk -v t=$((after - before)) -v n="${done:-0}" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (t > 0) printf "%d", n / (t / hz); else print "-" }')
  log "$phase $target: ${qps:-0} q/s, ${done:-0} done, ${lost:-0} lost, $ms CPU ms/1k"
  echo "| $phase | $target | ${done:-0} | ${lost:-0} | ${qps:-0} | $ms | $per |" >>"$RESULT"
}

for target in dotproxy dnsdist unbound; do
  # Warm the caches.
  taskset -c "$LOAD_CORE" dnsperf -m dot -s 127.0.0.1 -p "${PORT[$target]}" -d "$TMP/hits.txt" \
    -n 1 -c 2 >/dev/null 2>&1 || true
  measure hits "$target" -d "$TMP/hits.txt" -c 10 -q 100
done
for target in dotproxy dnsdist unbound; do
  make_queries "$TMP/miss-$target.txt" "m${target:0:2}$RANDOM" 2000000
  measure miss "$target" -d "$TMP/miss-$target.txt" -c 10 -q 100
done
for n in 1 10 100; do
  for target in dotproxy dnsdist unbound; do
    measure "conn-$n" "$target" -d "$TMP/hits.txt" -c 10 -q 10 -O "num-queries-per-conn=$n"
  done
done

# Idle connections: RSS of dotproxy before and with IDLE idle DoT connections (each completed
# its handshake and one query, then stays open).
rss_before=$(proc_kb "${PID[dotproxy]}" VmRSS)
python3 - "${PORT[dotproxy]}" "$IDLE" "$TMP/ca.pem" >"$TMP/idle.log" 2>&1 <<'EOF' &
import socket, ssl, struct, sys, time
port, count, ca = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
held = []
query = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x02n1\x05bench\x04test\x00" + struct.pack(">HH", 1, 1)
for i in range(count):
    raw = socket.create_connection(("127.0.0.1", port))
    conn = context.wrap_socket(raw, server_hostname="dns.test")
    conn.sendall(struct.pack(">H", len(query)) + query)
    conn.recv(65535)
    held.append(conn)
print("held", len(held), flush=True)
time.sleep(30)
EOF
holder=$!
STARTED_PIDS+=("$holder")
for ((i = 0; i < 120; i++)); do grep -q held "$TMP/idle.log" 2>/dev/null && break; sleep 0.5; done
rss_during=$(proc_kb "${PID[dotproxy]}" VmRSS)
kill "$holder" 2>/dev/null || true
{
  echo
  echo "Idle DoT connections to dotproxy: RSS $rss_before kB before, $rss_during kB with $IDLE" \
    "connections open ($(((rss_during - rss_before) * 1024 / IDLE)) bytes each; $(cat "$TMP/idle.log" | tr '\n' ' '))."
} >>"$RESULT"
cp "$RESULT" "$REPO/bench/results/dot_latest.md"
cat "$RESULT"
