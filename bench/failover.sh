#!/usr/bin/env bash
# Failure benchmark of issue 10, one run, side by side, loopback only: every target forwards
# over DNS-over-TLS to two upstreams, the second of which is broken, and is measured at a
# fixed UDP rate with dnsperf (p50, p99, max, lost, SERVFAIL):
#
#   healthy    both upstreams are a real Unbound (the baseline)
#   dead       the broken one refuses connections (nothing listens on its port)
#   blackhole  its port drops SYNs: connects hang (a firewall that drops)
#   frozen     a real Unbound, SIGSTOPped after the warm-up, with the targets' connections
#              to it open (a hung server or host)
#   slow10     a DoT server that answers one name in ten after 200 ms (the same names every
#              time, as a resolver's slow cache misses are), the rest at once
#
# Targets: dotproxy with each --strategy, dnsdist (health checks every second, its default
# leastOutstanding policy), Unbound as a TLS forwarder with both forward-addrs (cache off), and
# Stubby (round robin over both). The broken upstream is listed first. Each target starts
# fresh in each scenario, gets a 2 s unrecorded warm-up at the same rate, then one run.
#
#   flock /work/notes/bench.lock bash bench/failover.sh            # about 10 minutes
#   flock /work/notes/bench.lock bash bench/failover.sh --quick    # smoke run, about 3 minutes
#
# Needs 2 cores, deno, unbound, dnsdist, stubby, dnsperf, dig, kdig, openssl, taskset, mawk, jq.
# Results: bench/results/failover-<UTC stamp>/ (runs.tsv, raw/, logs/, summary.md) and the
# table in bench/results/failover_latest.md. See /work/notes/bench_failover.md.
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$REPO/bench"

QUICK=0
DURATION=10        # seconds per measurement
RATE=1000          # UDP queries per second
WARMUP=2           # seconds of unrecorded load before each measurement
SLOW_MS=200        # delay of the slow upstream's slow tenth
PROXY_CORE=0       # the target under test
LOAD_CORE=1        # dnsperf and the upstreams
KEEP_TMP=0
SCENARIOS="healthy dead blackhole frozen slow10"
STRATEGIES="fastest least-outstanding round-robin failover random"
PEERS="dnsdist unbound-fwd stubby"

while (($#)); do
  case "$1" in
    --quick) QUICK=1; DURATION=3; WARMUP=1 ;;
    --duration) DURATION="$2"; shift ;;
    --rate) RATE="$2"; shift ;;
    --scenarios) SCENARIOS="${2//,/ }"; shift ;;
    --strategies) STRATEGIES="${2//,/ }"; shift ;;
    --peers) PEERS="${2//,/ }"; shift ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help)
      sed -n '2,26p' "$0"
      echo "options: --quick --duration S --rate QPS --scenarios a,b --strategies a,b --peers a,b --keep-tmp"
      exit 0
      ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

UP_TLS_PORT=18953     # the healthy upstream (DoT)
UP_PLAIN_PORT=18053   # the healthy upstream (plain, for readiness checks)
BAD_PORT=18954        # the broken upstream
BAD_PLAIN_PORT=18054 # the second Unbound's plain port
TARGET_PORT=15353

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$BENCH/results/failover-$STAMP"
TMP="$(mktemp -d /tmp/dotproxy-failover.XXXXXX)"
RUNS_TSV="$OUT/runs.tsv"
declare -A PID=()
STARTED_PIDS=()
RUN_SEQ=0

BENCH_TAG=failover
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# "STATUS FIRSTANSWER" of one query through a port.
probe() { # port name [dig opts...]
  local port="$1" name="$2"
  shift 2
  dig +tries=1 +time=2 "$@" @127.0.0.1 -p "$port" "$name" A 2>&1 |
    awk '/status:/ { s = $6; sub(/,/, "", s) } /^[^;].*\tIN\t/ && !f { f = $NF }
         END { printf "%s %s\n", (s ? s : "NO-RESPONSE"), (f ? f : "-") }'
}

# An Unbound serving the bench zones over DoT on $2 and plain DNS on $3 (as bench/run.sh's).
start_unbound_upstream() { # name tls-port plain-port
  local name="$1" f="$TMP/$1.conf"
  {
    upstream_server_clause "$name" "$2" "$3"
    numbered_names 2
    printf 'remote-control:\n  control-enable: no\n'
  } >"$f"
  unbound-checkconf "$f" >/dev/null || die "bad unbound config $f"
  spawn "$name" "$LOAD_CORE" unbound -c "$f" -d
  local i
  for ((i = 0; i < 50; i++)); do
    [[ "$(probe "$3" n1.bench.test)" == "NOERROR 10.0.0.1" ]] && break
    alive "$name" || { cat "$TMP/$name.log" >&2; die "$name died"; }
    sleep 0.2
  done
  kdig +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 +timeout=3 \
    @127.0.0.1 -p "$2" n1.bench.test A 2>&1 | grep -q '10\.0\.0\.1' || die "$name: DoT does not answer"
}

# The broken second upstream of a scenario, on BAD_PORT.
start_bad() { # scenario
  case "$1" in
    healthy | frozen) start_unbound_upstream second "$BAD_PORT" "$BAD_PLAIN_PORT" ;;
    dead) ! port_busy "$BAD_PORT" || die "port $BAD_PORT is in use" ;;
    blackhole)
      spawn second "$LOAD_CORE" deno run --allow-net "$BENCH/failover_upstream.ts" blackhole \
        --port "$BAD_PORT"
      sleep 1.5
      ;;
    slow10)
      spawn second "$LOAD_CORE" deno run --allow-net --allow-read="$TMP" \
        "$BENCH/failover_upstream.ts" slow --port "$BAD_PORT" --cert "$TMP/server.pem" \
        --key "$TMP/server.key" --slow-ms "$SLOW_MS" --every 10
      local i
      for ((i = 0; i < 50; i++)); do
        kdig +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 +timeout=2 \
          @127.0.0.1 -p "$BAD_PORT" n1.bench.test A 2>&1 | grep -q '10\.0\.0\.1' && return 0
        sleep 0.2
      done
      die "the slow upstream does not answer"
      ;;
  esac
}

start_target() { # target
  local t="$1"
  case "$t" in
    dotproxy-*)
      local strategy="${t#dotproxy-}"
      (cd "$REPO" && DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" exec taskset -c "$PROXY_CORE" \
        deno run --allow-net --allow-env --v8-flags=--max-semi-space-size=2 main.ts \
        --listen "127.0.0.1:$TARGET_PORT" --log-level warn --strategy "$strategy" \
        --upstream "127.0.0.1:$BAD_PORT#dns.test" --upstream "127.0.0.1:$UP_TLS_PORT#dns.test" \
        >"$TMP/$t.log" 2>&1 </dev/null) &
      PID[$t]=$!
      STARTED_PIDS+=("$!")
      ;;
    dnsdist)
      cat >"$TMP/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:$TARGET_PORT", {maxInFlight=100})
-- Health checks every second (the default policy, leastOutstanding, skips servers down).
newServer({address="127.0.0.1:$BAD_PORT", tls="openssl", subjectName="dns.test",
  caStore="$TMP/ca.pem", validateCertificates=true, checkName="n0.bench.test.",
  checkInterval=1, maxInFlight=100})
newServer({address="127.0.0.1:$UP_TLS_PORT", tls="openssl", subjectName="dns.test",
  caStore="$TMP/ca.pem", validateCertificates=true, checkName="n0.bench.test.",
  checkInterval=1, maxInFlight=100})
EOF
      spawn "$t" "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"
      ;;
    unbound-fwd)
      {
        unbound_server_clause unbound-fwd
        cat <<EOF
  interface: 127.0.0.1@$TARGET_PORT
  module-config: "iterator"
  do-not-query-localhost: no
  tls-cert-bundle: "$TMP/ca.pem"
  incoming-num-tcp: 1000
  num-queries-per-thread: 4096
  msg-cache-size: 0
  rrset-cache-size: 0
  cache-max-ttl: 0
  cache-max-negative-ttl: 0
  prefetch: no
  local-zone: "test." nodefault
forward-zone:
  name: "."
  forward-tls-upstream: yes
  forward-addr: 127.0.0.1@$BAD_PORT#dns.test
  forward-addr: 127.0.0.1@$UP_TLS_PORT#dns.test
remote-control:
  control-enable: no
EOF
      } >"$TMP/unbound-fwd.conf"
      unbound-checkconf "$TMP/unbound-fwd.conf" >/dev/null || die "bad unbound-fwd config"
      spawn "$t" "$PROXY_CORE" unbound -c "$TMP/unbound-fwd.conf" -d
      ;;
    stubby)
      cat >"$TMP/stubby.yml" <<EOF
resolution_type: GETDNS_RESOLUTION_STUB
dns_transport_list:
  - GETDNS_TRANSPORT_TLS
tls_authentication: GETDNS_AUTHENTICATION_REQUIRED
tls_ca_file: "$TMP/ca.pem"
round_robin_upstreams: 1
idle_timeout: 600000
dnssec_return_status: GETDNS_EXTENSION_FALSE
appdata_dir: "$TMP"
listen_addresses:
  - 127.0.0.1@$TARGET_PORT
upstream_recursive_servers:
  - address_data: 127.0.0.1
    tls_port: $BAD_PORT
    tls_auth_name: "dns.test"
  - address_data: 127.0.0.1
    tls_port: $UP_TLS_PORT
    tls_auth_name: "dns.test"
EOF
      spawn "$t" "$PROXY_CORE" stubby -C "$TMP/stubby.yml" -l
      ;;
  esac
}

# Waits (bounded) until the target answers a question; 0 when it does.
wait_ready() { # target seconds
  local t="$1" deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    alive "$t" || return 1
    [[ "$(probe "$TARGET_PORT" "ready$RANDOM.u.bench.test" +time=1)" == "NOERROR 192.0.2.1" ]] &&
      return 0
    sleep 0.3
  done
  return 1
}

# dnsperf at RATE for `seconds`; output to $2 (raw) when given.
dnsperf_run() { # seconds raw-file prefix
  local qfile="$TMP/queries.txt"
  make_queries "$qfile" "$3" $((RATE * $1 + RATE))
  taskset -c "$LOAD_CORE" timeout $(($1 + 30)) dnsperf -s 127.0.0.1 -p "$TARGET_PORT" -m udp \
    -d "$qfile" -l "$1" -Q "$RATE" -c 4 -q 500 -t 5 -v 2>&1 | taskset -c "$LOAD_CORE" mawk "$LATENCY_AWK" >"$2"
}

measure() { # scenario target
  local scenario="$1" t="$2" raw="$OUT/raw/$1-$2.txt"
  start_target "$t"
  if ! wait_ready "$t" 30; then
    warn "$t ($scenario): does not answer within 30 s; measuring anyway"
  fi
  RUN_SEQ=$((RUN_SEQ + 1))
  dnsperf_run "$WARMUP" "$OUT/raw/$scenario-$t-warmup.txt" "w$RUN_SEQ-"
  if [[ "$scenario" == frozen ]]; then
    kill -STOP "${PID[second]}"
    log "$t: second upstream frozen (SIGSTOP)"
  fi
  log "$scenario: $t ${DURATION}s at $RATE qps"
  local load0 load1
  load0=$(awk '{ print $1 }' /proc/loadavg)
  {
    echo "# scenario=$scenario target=$t rate=$RATE duration=$DURATION"
    dnsperf_run "$DURATION" /dev/stdout "m$RUN_SEQ-"
  } >"$raw"
  load1=$(awk '{ print $1 }' /proc/loadavg)
  [[ "$scenario" == frozen ]] && kill -CONT "${PID[second]}"
  local sent completed lost noerror servfail p50 p99 p999 pmax
  sent=$(stat_field "$raw" "Queries sent:" 1)
  completed=$(stat_field "$raw" "Queries completed:" 1)
  lost=$(stat_field "$raw" "Queries lost:" 1)
  noerror=$(awk '/Response codes:/ { for (i = 1; i < NF; i++) if ($i == "NOERROR") print $(i + 1) }' "$raw")
  servfail=$(awk '/Response codes:/ { for (i = 1; i < NF; i++) if ($i == "SERVFAIL") print $(i + 1) }' "$raw")
  read -r p50 p99 p999 pmax < <(awk '/^Latency percentiles/ && $4 == "p50" { print $5, $9, $11, $13; f = 1 }
    END { if (!f) print "- - - -" }' "$raw")
  # load1: the 1-minute load average before and after (the benchmark alone keeps it near 2).
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$t" "$RATE" \
    "$DURATION" "${sent:-0}" "${completed:-0}" "${lost:-0}" "${noerror:-0}" "${servfail:-0}" \
    "$p50" "$p99" "$p999" "$pmax" "$load0/$load1" >>"$RUNS_TSV"
  log "  -> p50 $p50 p99 $p99 max $pmax ms, lost ${lost:-?}, SERVFAIL ${servfail:-0}"
  cp "$TMP/$t.log" "$OUT/logs/$scenario-$t.log" 2>/dev/null || true
  stop "$t"
  # A frozen Unbound is restarted for the next target: each starts with both healthy.
  if [[ "$scenario" == frozen ]]; then
    stop second
    start_bad frozen
  fi
}

write_meta() {
  local rev
  rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
  [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | head -n 1)" ]] && rev+=" (dirty tree)"
  jq -n --arg stamp "$STAMP" --arg rate "$RATE" --arg duration "$DURATION" --arg quick "$QUICK" \
    --arg slow "$SLOW_MS" --arg dotproxy "$rev" --arg deno "$(deno --version | head -n 1)" \
    --arg unbound "$(unbound -V | sed -n 's/^Version //p' | head -n 1)" \
    --arg dnsdist "$(dnsdist --version | head -n 1)" \
    --arg stubby "$(stubby -V 2>&1 | head -n 1)" \
    --arg dnsperf "$(dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -n 1)" \
    --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" \
    '{stamp: $stamp, rate_qps: ($rate | tonumber), duration_s: ($duration | tonumber),
      quick: ($quick == "1"), slow_ms: ($slow | tonumber),
      versions: {dotproxy: $dotproxy, deno: $deno, unbound: $unbound, dnsdist: $dnsdist,
                 stubby: $stubby, dnsperf: $dnsperf},
      machine: {nproc: ($nproc | tonumber), kernel: $kernel, cpu: $cpu}}' >"$OUT/meta.json"
}

main() {
  local tool scenario t targets=()
  for tool in deno unbound unbound-checkconf dnsdist stubby dnsperf dig kdig openssl taskset \
    mawk jq ss; do need "$tool"; done
  (($(nproc) >= 2)) || die "needs 2 cores"
  for t in $TARGET_PORT $UP_TLS_PORT $UP_PLAIN_PORT $BAD_PORT $BAD_PLAIN_PORT; do
    ! port_busy "$t" || die "port $t is in use"
  done
  for t in $STRATEGIES; do targets+=("dotproxy-$t"); done
  for t in $PEERS; do targets+=("$t"); done
  mkdir -p "$OUT/raw" "$OUT/logs"
  printf 'scenario\ttarget\trate\tduration_s\tsent\tcompleted\tlost\tnoerror\tservfail\tp50_ms\tp99_ms\tp999_ms\tmax_ms\tload1\n' >"$RUNS_TSV"
  write_meta
  log "results to $OUT; scenarios: $SCENARIOS; targets: ${targets[*]}"
  make_certs
  start_unbound_upstream first "$UP_TLS_PORT" "$UP_PLAIN_PORT"
  for scenario in $SCENARIOS; do
    start_bad "$scenario"
    for t in "${targets[@]}"; do measure "$scenario" "$t"; done
    stop second
  done
  deno run --allow-read="$OUT" --allow-write="$OUT" "$BENCH/failover_summarize.ts" "$OUT"
  cp "$OUT/summary.md" "$BENCH/results/failover_latest.md"
  echo
  cat "$OUT/summary.md"
  log "results: $OUT; table: bench/results/failover_latest.md"
}

main
