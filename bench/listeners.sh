#!/usr/bin/env bash
# Benchmark harness of issues 25 and 26: dotproxy's DNS-over-TLS and DNS-over-HTTPS listeners
# against dnsdist 1.7 (addTLSLocal, addDOHLocal) and Unbound (tls-port, https-port), each with
# its cache, all forwarding over DoT to the same local Unbound upstream. Measures throughput
# with answers from the cache (the listener is what is measured) and with misses, the cost of
# a new DoT connection, CPU per query, and RSS per idle DoT and DoH connection. Everything
# runs on loopback, in a temp dir deleted at exit. See bench/README.md ("Client listeners").
#
#   bash bench/listeners.sh            # full run, about 15 minutes
#   bash bench/listeners.sh --quick    # smoke run, about 1.5 minutes
#   DOTPROXY_REPO=/tmp/bench-try bash bench/listeners.sh --quick   # another dotproxy tree
#   bash bench/listeners.sh --help
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$REPO/bench"
# The dotproxy under test: this tree unless told otherwise (a scratch worktree with the
# listener branches merged, before they are merged here).
DOTPROXY_REPO="${DOTPROXY_REPO:-$REPO}"

# ---------------------------------------------------------------- settings
QUICK=0
DURATION=10          # seconds per load run
ROUNDS=2             # rounds; the target order rotates each round
WARMUP=2             # seconds of unrecorded load per target and protocol before round 1
IDLE_CONNS=3000      # idle connections opened for the RSS-per-connection measurement
SETTLE=3             # seconds between the last idle connection and the RSS reading
HOT_NAMES=1000       # names of the cache-hit runs (n0..n999.bench.test), all cached first
NAMES_PER_SECOND=60000  # unique names generated per second of a miss run
DOT_CLIENTS="${DOT_CLIENTS:-16}"            # dnsperf -c for DoT (connections)
DOT_OUTSTANDING="${DOT_OUTSTANDING:-256}"   # dnsperf -q for DoT
CONN_CLIENTS="${CONN_CLIENTS:-16}"          # dnsperf -c for the new-connection runs
CONN_OUTSTANDING="${CONN_OUTSTANDING:-64}"  # dnsperf -q for the new-connection runs
PER_CONN_LIST="1 10 100"                    # dnsperf -O num-queries-per-conn=N
H2_CLIENTS="${H2_CLIENTS:-8}"               # h2load -c for HTTP/2 hits (connections)
H2_STREAMS="${H2_STREAMS:-32}"              # h2load -m: concurrent streams per connection
H2_MISS_STREAMS="${H2_MISS_STREAMS:-128}"   # h2load -m for misses (one connection, see README)
H1_CLIENTS="${H1_CLIENTS:-32}"              # h2load --h1 -c (connections, one request each in flight)
PROXY_CORE=0         # the target under test
LOAD_CORE=1          # the load generator and the upstream Unbound
ALL_TARGETS="dotproxy dnsdist unbound"
TARGETS="$ALL_TARGETS"
ALL_TESTS="idle dot doh"
TESTS="$ALL_TESTS"
DOTPROXY_ARGS="${DOTPROXY_ARGS:-}"  # extra arguments for dotproxy's main.ts
V8_FLAGS="${V8_FLAGS:-$(grep -o -- '--v8-flags=[^ "]*' "$REPO/deno.json" | head -n 1)}"

UP_TLS_PORT=8853
UP_PLAIN_PORT=8053
# Each target: plain DNS (sanity probes), DoT and DoH ports.
declare -A PLAIN=([dotproxy]=5401 [dnsdist]=5402 [unbound]=5403)
declare -A DOT=([dotproxy]=5411 [dnsdist]=5412 [unbound]=5413)
declare -A DOH=([dotproxy]=5421 [dnsdist]=5422 [unbound]=5423)
declare -A DESC=(
  [dotproxy]="dotproxy --listen-dot / --listen-doh, its cache (default size)"
  [dnsdist]="dnsdist addTLSLocal / addDOHLocal, packet cache 100k entries"
  [unbound]="Unbound tls-port / https-port as a DoT forwarder, its cache (default sizes)"
)

usage() {
  cat <<EOF
usage: bash bench/listeners.sh [--quick] [--duration S] [--rounds N] [--targets a,b]
                               [--tests a,b] [--idle-conns N] [--keep-tmp]
  --quick            smoke run: 2 s runs, 1 round, 500 idle connections, N = 1 and 100
                     queries per connection (about 1.5 minutes)
  --duration S       seconds per load run (default $DURATION)
  --rounds N         rounds of the load runs, target order rotated (default $ROUNDS)
  --targets LIST     comma-separated subset of: ${ALL_TARGETS// /,}
  --tests LIST       comma-separated subset of: ${ALL_TESTS// /,}
                     (idle: RSS per idle DoT and DoH connection; dot: dnsperf -m dot;
                      doh: h2load over HTTP/2 and HTTP/1.1)
  --idle-conns N     idle connections per RSS measurement (default $IDLE_CONNS)
  --keep-tmp         keep the temp dir (configs, logs)
env: DOTPROXY_REPO   the dotproxy source tree under test (default: this one, $REPO)
     DOTPROXY_ARGS   extra arguments for its main.ts
     DOT_CLIENTS, DOT_OUTSTANDING   dnsperf -c/-q for DoT load (16/256)
     CONN_CLIENTS, CONN_OUTSTANDING dnsperf -c/-q for the new-connection runs (16/64)
     H2_CLIENTS, H2_STREAMS, H2_MISS_STREAMS, H1_CLIENTS   h2load shapes (8/32/128/32)
     V8_FLAGS        dotproxy's V8 flags (default: deno.json's, what ships: $V8_FLAGS)
EOF
}

KEEP_TMP=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1; DURATION=2; ROUNDS=1; WARMUP=1; IDLE_CONNS=500; SETTLE=2
      PER_CONN_LIST="1 100" ;;
    --duration) DURATION="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --targets) TARGETS="${2//,/ }"; shift ;;
    --tests) TESTS="${2//,/ }"; shift ;;
    --idle-conns) IDLE_CONNS="$2"; shift ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for t in $TARGETS; do [[ -n "${DOT[$t]:-}" ]] || { echo "unknown target: $t" >&2; exit 2; }; done
for t in $TESTS; do [[ " $ALL_TESTS " == *" $t "* ]] || { echo "unknown test: $t" >&2; exit 2; }; done
has_test() { [[ " $TESTS " == *" $1 "* ]]; }

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$BENCH/results/listeners-$STAMP"
TMP="$(mktemp -d /tmp/dotproxy-listeners.XXXXXX)"
RUNS_TSV="$OUT/runs.tsv"
IDLE_TSV="$OUT/idle.tsv"
declare -A PID=()
declare -A SKIP=()   # "target proto" (dot|doh|doh-h1) -> why it is not measured
declare -A DEAD=()   # target -> why it is out of the benchmark
STARTED_PIDS=()
IDLE_CHECK=0
RUN_SEQ=0
DOTPROXY_HAS_DOT=0
DOTPROXY_HAS_DOH=0

BENCH_TAG=listeners
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# ---------------------------------------------------------------- helpers
children_cpu() {
  times >"$TMP/times"
  printf -v "$1" '%s' "$(awk 'NR == 2 { for (i = 1; i <= 2; i++) {
    split($i, t, /[ms]/); s += t[1] * 60 + t[2] } print s }' "$TMP/times")"
}

# "STATUS FIRST-ANSWER" of one query (dig over plain DNS, kdig over DoT or DoH).
probe() { # proto(plain|dot|doh) port name
  local out
  case "$1" in
    plain) out="$(dig +tries=1 +time=3 @127.0.0.1 -p "$2" "$3" A 2>&1)" || true ;;
    dot) out="$(kdig +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 +timeout=3 \
      @127.0.0.1 -p "$2" "$3" A 2>&1)" || true ;;
    doh) out="$(kdig +https=/dns-query +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 \
      +timeout=3 @127.0.0.1 -p "$2" "$3" A 2>&1)" || true ;;
  esac
  awk '/status:/ { for (i = 1; i <= NF; i++) if ($i ~ /^status:?$/) { s = $(i + 1); gsub(/[,;]/, "", s) } }
       /^[^;].*[ \t]IN[ \t]+A[ \t]/ && !f { f = $NF }
       END { printf "%s %s\n", (s ? s : "NO-RESPONSE"), (f ? f : "-") }' <<<"$out"
}

# The answer over HTTP/1.1 (curl): "STATUS CONTENT-TYPE BYTES".
probe_h1() { # port name
  local q
  q="$(deno run "$BENCH/listener_clients.ts" urls "https://dns.test:$1/dns-query" <<<"$2")"
  curl -s --http1.1 --cacert "$TMP/ca.pem" --resolve "dns.test:$1:127.0.0.1" --max-time 3 \
    -H 'accept: application/dns-message' -o /dev/null \
    -w '%{http_code} %{content_type} %{size_download}\n' "$q" 2>/dev/null || echo "000 - 0"
}

expected_a() { echo "10.0.$(($1 / 256)).$(($1 % 256))"; }

# The right answer over each protocol this target serves; 1 (and a warning) when one is wrong.
sanity() { # target
  local t="$1" i=$((RANDOM % 10000)) res want
  want="NOERROR $(expected_a "$i")"
  res="$(probe plain "${PLAIN[$t]}" "n$i.bench.test")"
  [[ "$res" == "$want" ]] || { warn "$t: plain n$i.bench.test: got '$res', want '$want'"; return 1; }
  if [[ -z "${SKIP[$t dot]:-}" ]]; then
    res="$(probe dot "${DOT[$t]}" "n$i.bench.test")"
    [[ "$res" == "$want" ]] || { warn "$t: DoT n$i.bench.test: got '$res', want '$want'"; return 1; }
  fi
  if [[ -z "${SKIP[$t doh]:-}" ]]; then
    res="$(probe doh "${DOH[$t]}" "n$i.bench.test")"
    [[ "$res" == "$want" ]] || { warn "$t: DoH n$i.bench.test: got '$res', want '$want'"; return 1; }
  fi
  if [[ -z "${SKIP[$t doh-h1]:-}" ]]; then
    res="$(probe_h1 "${DOH[$t]}" "n$i.bench.test")"
    [[ "$res" == "200 application/dns-message "* ]] ||
      { warn "$t: DoH over HTTP/1.1: got '$res', want '200 application/dns-message N'"; return 1; }
  fi
}

wait_ready() { # target seconds
  local t="$1" deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    alive "$t" || return 1
    [[ "$(probe plain "${PLAIN[$t]}" n1.bench.test)" == NOERROR* ]] && return 0
    sleep 0.3
  done
  return 1
}

# ---------------------------------------------------------------- setup
write_upstream_conf() {
  {
    upstream_server_clause upstream "$UP_TLS_PORT" "$UP_PLAIN_PORT"
    numbered_names 10000
    printf 'remote-control:\n  control-enable: no\n'
  } >"$TMP/upstream.conf"
  unbound-checkconf "$TMP/upstream.conf" >/dev/null || die "bad upstream unbound config"
}

start_upstream() {
  write_upstream_conf
  spawn upstream "$LOAD_CORE" unbound -c "$TMP/upstream.conf" -d
  local i
  for ((i = 0; i < 50; i++)); do
    [[ "$(probe plain "$UP_PLAIN_PORT" n1.bench.test)" == "NOERROR 10.0.0.1" ]] && break
    alive upstream || { cat "$TMP/upstream.log" >&2; die "upstream unbound died"; }
    sleep 0.2
  done
  [[ "$(probe dot "$UP_TLS_PORT" n1.bench.test)" == "NOERROR 10.0.0.1" ]] ||
    die "upstream DoT does not answer"
  log "upstream Unbound up (pid ${PID[upstream]}, core $LOAD_CORE): DoT :$UP_TLS_PORT"
}

# Which listeners the dotproxy under test has (the listener branches may not be merged).
probe_dotproxy_flags() {
  local help
  if [[ ! -f "$DOTPROXY_REPO/main.ts" ]]; then
    DEAD[dotproxy]="main.ts not found in $DOTPROXY_REPO"
    return 0
  fi
  help="$(cd "$DOTPROXY_REPO" && deno run --allow-net --allow-env main.ts --help 2>&1)" || true
  grep -q -- '--listen-dot' <<<"$help" && DOTPROXY_HAS_DOT=1
  grep -q -- '--listen-doh' <<<"$help" && DOTPROXY_HAS_DOH=1
  if ((!DOTPROXY_HAS_DOT && !DOTPROXY_HAS_DOH)); then
    DEAD[dotproxy]="the dotproxy in $DOTPROXY_REPO has neither --listen-dot nor --listen-doh (listener branches not merged?); skipped, the peers are measured"
  else
    ((DOTPROXY_HAS_DOT)) || SKIP[dotproxy dot]="no --listen-dot in $DOTPROXY_REPO"
    ((DOTPROXY_HAS_DOH)) || SKIP[dotproxy doh]="no --listen-doh in $DOTPROXY_REPO"
    ((DOTPROXY_HAS_DOH)) || SKIP[dotproxy doh-h1]="no --listen-doh in $DOTPROXY_REPO"
  fi
  # Connection limits high enough for the idle test (its clients all come from 127.0.0.1)
  # and an idle timeout longer than it takes: the flags this dotproxy knows.
  DOTPROXY_LIMIT_ARGS=""
  local cap=$((IDLE_CONNS + 1000)) flag
  for flag in max-tcp-connections max-tcp-connections-per-client max-doh-connections \
    max-doh-connections-per-client; do
    grep -q -- "--$flag " <<<"$help" && DOTPROXY_LIMIT_ARGS+=" --$flag $cap"
  done
  for flag in tcp-idle-timeout doh-idle-timeout; do
    grep -q -- "--$flag " <<<"$help" && DOTPROXY_LIMIT_ARGS+=" --$flag 300000"
  done
  return 0
}

start_dotproxy() {
  local listeners="" extra="$DOTPROXY_LIMIT_ARGS $DOTPROXY_ARGS"
  ((DOTPROXY_HAS_DOT)) && listeners+=" --listen-dot 127.0.0.1:${DOT[dotproxy]}"
  ((DOTPROXY_HAS_DOH)) && listeners+=" --listen-doh 127.0.0.1:${DOH[dotproxy]}"
  # shellcheck disable=SC2086 # word lists on purpose
  (cd "$DOTPROXY_REPO" && unset DOTPROXY_ARGS DOTPROXY_REPO &&
    DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" DOTPROXY_TLS_CERT="$(cat "$TMP/server.pem")" \
    DOTPROXY_TLS_KEY="$(cat "$TMP/server.key")" exec taskset -c "$PROXY_CORE" \
    deno run --allow-net --allow-env ${V8_FLAGS:+"$V8_FLAGS"} main.ts \
    --listen "127.0.0.1:${PLAIN[dotproxy]}" $listeners \
    --upstream "127.0.0.1:$UP_TLS_PORT#dns.test" --log-level warn $extra \
    >"$TMP/dotproxy.log" 2>&1 </dev/null) &
  PID[dotproxy]=$!
  STARTED_PIDS+=("$!")
}

start_dnsdist() {
  cat >"$TMP/dnsdist.conf" <<EOF
setSecurityPollSuffix("")  -- no security polling (it would query the system resolver)
-- Idle client connections stay open 300 s (the default 2 s would close the idle test's).
setTCPRecvTimeout(300)
setLocal("127.0.0.1:${PLAIN[dnsdist]}", {maxInFlight=100})
-- maxInFlight: out-of-order answers on a client connection, as dotproxy and Unbound do.
addTLSLocal("127.0.0.1:${DOT[dnsdist]}", "$TMP/server.pem", "$TMP/server.key",
  {provider="openssl", maxInFlight=100})
addDOHLocal("127.0.0.1:${DOH[dnsdist]}", "$TMP/server.pem", "$TMP/server.key", "/dns-query",
  {idleTimeout=300})
newServer({address="127.0.0.1:$UP_TLS_PORT", tls="openssl", subjectName="dns.test",
  caStore="$TMP/ca.pem", validateCertificates=true, checkName="n0.bench.test.", checkInterval=1,
  maxInFlight=100})
-- Its packet cache, as the others have theirs: hits are answered without the backend.
getPool(""):setCache(newPacketCache(100000, {maxTTL=86400, minTTL=0}))
EOF
  spawn dnsdist "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"
}

start_unbound() {
  {
    unbound_server_clause unbound-l
    cat <<EOF
  interface: 127.0.0.1@${PLAIN[unbound]}
  interface: 127.0.0.1@${DOT[unbound]}
  interface: 127.0.0.1@${DOH[unbound]}
  tls-port: ${DOT[unbound]}
  https-port: ${DOH[unbound]}
  tls-service-key: "$TMP/server.key"
  tls-service-pem: "$TMP/server.pem"
  http-endpoint: "/dns-query"
  module-config: "iterator"
  do-not-query-localhost: no
  tls-cert-bundle: "$TMP/ca.pem"
  # Slots for every idle test connection, twice over: once more than half of them are in
  # use, Unbound gives new connections 1/100 of tcp-idle-timeout (1/500 above 65%, 0 above
  # 80%). It reserves descriptors for these slots on each of its 3 TCP ports and for
  # outgoing-range: few UDP ports (it forwards over TLS), so that the total fits ulimit -n.
  incoming-num-tcp: $((2 * IDLE_CONNS + 100))
  outgoing-range: 256
  tcp-idle-timeout: 300000
  num-queries-per-thread: 4096
  # Its cache at the default sizes (msg-cache-size 4m, rrset-cache-size 4m).
  local-zone: "test." nodefault
forward-zone:
  name: "."
  forward-tls-upstream: yes
  forward-addr: 127.0.0.1@$UP_TLS_PORT#dns.test
remote-control:
  control-enable: no
EOF
  } >"$TMP/unbound.conf"
  unbound-checkconf "$TMP/unbound.conf" >/dev/null || die "bad unbound listener config"
  spawn unbound "$PROXY_CORE" unbound -c "$TMP/unbound.conf" -d
}

start_target() { # target; 0 when it answers correctly
  local t="$1" comm
  [[ -z "${DEAD[$t]:-}" ]] || return 1
  case "$t" in
    dotproxy) start_dotproxy ;;
    dnsdist) start_dnsdist ;;
    unbound) start_unbound ;;
  esac
  if ! wait_ready "$t" 30; then
    DEAD[$t]="did not start or does not answer (log: $OUT/logs/$t.log)"
    warn "$t: ${DEAD[$t]}"
    tail -n 20 "$TMP/$t.log" >&2 2>/dev/null || true
    cp "$TMP/$t.log" "$OUT/logs/" 2>/dev/null || true
    stop "$t"
    return 1
  fi
  if ! sanity "$t"; then
    DEAD[$t]="wrong answers at start (log: $OUT/logs/$t.log)"
    cp "$TMP/$t.log" "$OUT/logs/" 2>/dev/null || true
    stop "$t"
    return 1
  fi
  comm="$(cat "/proc/${PID[$t]}/comm" 2>/dev/null || echo '?')"
  log "$t up: pid ${PID[$t]} ($comm), plain :${PLAIN[$t]} DoT :${DOT[$t]} DoH :${DOH[$t]}, core $(taskset -pc "${PID[$t]}" | awk '{print $NF}')"
}

stop_target() { # target: stops it and keeps its log
  cat "$TMP/$1.log" >>"$OUT/logs/$1.log" 2>/dev/null || true
  stop "$1"
}

# ---------------------------------------------------------------- idle connections
# RSS per idle connection: a fresh process (only the sanity queries before), COUNT TLS
# connections that each asked one question, then idle; VmRSS before and SETTLE s after the
# last one opened, and the connections the server still holds (ss). Also the target's CPU
# while they were opened: the cost of a handshake plus one answer.
measure_idle() { # target proto(dot|h2)
  local t="$1" proto="$2" port key pid cl
  [[ "$proto" == dot ]] && { port="${DOT[$t]}"; key=dot; } || { port="${DOH[$t]}"; key=doh; }
  if [[ -n "${SKIP[$t $key]:-}" ]]; then log "skip idle $t $proto: ${SKIP[$t $key]}"; return 0; fi
  start_target "$t" || return 0
  pid="${PID[$t]}"
  sleep 1
  local rss0 tick0 tick1 rss1 hwm line open failed secs held tck
  rss0=$(proc_kb "$pid" VmRSS) tick0=$(proc_ticks "$pid")
  cl="idle-$t-$proto"
  LISTENER_CA="$(cat "$TMP/ca.pem")" spawn "$cl" "$LOAD_CORE" deno run --allow-net --allow-env \
    "$BENCH/listener_clients.ts" idle "$proto" "$port" "$IDLE_CONNS" 600
  local deadline=$((SECONDS + 120))
  until grep -q '^ready ' "$TMP/$cl.log" 2>/dev/null; do
    if ! alive "$cl" || ((SECONDS > deadline)); then
      warn "idle $t $proto: the client did not report (log below)"
      tail -n 5 "$TMP/$cl.log" >&2 || true
      stop "$cl"
      stop_target "$t"
      return 0
    fi
    sleep 0.2
  done
  tick1=$(proc_ticks "$pid")
  sleep "$SETTLE"
  rss1=$(proc_kb "$pid" VmRSS) hwm=$(proc_kb "$pid" VmHWM)
  held=$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)
  line="$(grep '^ready ' "$TMP/$cl.log")"
  read -r _ open failed secs <<<"$line"
  grep -v '^ready ' "$TMP/$cl.log" | head -n 5 | sed "s/^/  [$cl] /" >&2 || true
  cp "$TMP/$cl.log" "$OUT/raw/$cl.txt"
  stop "$cl"
  tck=$(getconf CLK_TCK)
  # target proto count open failed held rss_before_kb rss_after_kb vmhwm_kb kb_per_conn
  # open_seconds cpu_ms_per_conn
  awk -v OFS='\t' -v t="$t" -v p="$proto" -v n="$IDLE_CONNS" -v o="$open" -v f="$failed" \
    -v h="$held" -v r0="$rss0" -v r1="$rss1" -v hwm="$hwm" -v s="$secs" -v d=$((tick1 - tick0)) \
    -v tck="$tck" 'BEGIN { c = (h > 0 ? h : o)
      print t, p, n, o, f, h, r0, r1, hwm, (c > 0 ? sprintf("%.2f", (r1 - r0) / c) : "-"), s,
        (o > 0 ? sprintf("%.3f", d / tck * 1000 / o) : "-") }' >>"$IDLE_TSV"
  log "  idle $t $proto: $(tail -n 1 "$IDLE_TSV" | awk -F'\t' '{ printf "%s open (%s failed), %s held by the server, RSS %s -> %s kB: %s kB per connection; CPU %s ms per connection opened", $4, $5, $6, $7, $8, $10, $12 }')"
  ((held < open * 9 / 10)) && warn "idle $t $proto: the server holds $held of $open connections (closed idle ones?)"
  stop_target "$t"
}

# ---------------------------------------------------------------- load runs
# Hot names (n0..n(HOT-1)), cached in every target before the runs; unique miss names.
make_hot() { awk -v n="$HOT_NAMES" 'BEGIN { for (i = 0; i < n; i++) printf "n%d.bench.test A\n", i }' >"$TMP/hot.txt"; }

# Reads the load generator's output into: qps sent completed lost ok mean_ms.
parse_dnsperf() { # raw
  local raw="$1" noerr
  noerr=$(awk '/Response codes:/ { for (i = 1; i < NF; i++) if ($i == "NOERROR") print $(i + 1) }' "$raw")
  printf '%s %s %s %s %s %s\n' "$(stat_field "$raw" "Queries per second:" 1)" \
    "$(stat_field "$raw" "Queries sent:" 1)" "$(stat_field "$raw" "Queries completed:" 1)" \
    "$(stat_field "$raw" "Queries lost:" 1)" "${noerr:-0}" \
    "$(awk '/Average Latency \(s\):/ { sub(/^.*:[ \t]+/, ""); split($0, a, /[ (]+/); printf "%.3f", a[1] * 1000; exit }' "$raw")"
}
parse_h2load() { # raw
  # "finished in 3.00s, 12345.67 req/s, ..."; "requests: N total, N started, N done,
  # N succeeded, N failed, N errored, N timeout"; "status codes: N 2xx, ..."; "time for
  # request:  min max mean sd"
  awk '/^finished in/ { q = $4 }
       /^requests:/ { sent = $4; done = $6; ok = $8; failed = $10 }
       /^status codes:/ { s2 = $3 }
       /^time for request:/ { m = $6; u = m; sub(/[a-z]+$/, "", u); unit = substr(m, length(u) + 1)
         mean = (unit == "us" ? u / 1000 : unit == "s" ? u * 1000 : u) }
       END { if (q == "") exit; printf "%s %s %s %s %s %.3f\n", q, sent, ok, sent - ok, s2 + 0, mean }' "$1"
}

# One load run against a target, with the target's CPU and memory. Appends to runs.tsv.
measure() { # round target case
  local round="$1" t="$2" case="$3" proto dur="$DURATION" raw gen=() port qfile
  case "$case" in dot-*) proto=dot ;; doh-h1-*) proto=doh-h1 ;; *) proto=doh ;; esac
  if [[ -n "${SKIP[$t $proto]:-}" ]]; then
    ((round == 1)) && log "skip $t $case: ${SKIP[$t $proto]}"
    return 0
  fi
  [[ -z "${DEAD[$t]:-}" ]] || return 0
  if ! alive "$t"; then
    DEAD[$t]="process exited (log: $OUT/logs/$t.log)"
    warn "$t: ${DEAD[$t]}"
    return 0
  fi
  raw="$OUT/raw/r$round-$t-$case.txt"
  RUN_SEQ=$((RUN_SEQ + 1))
  local prefix="m$RUN_SEQ-"
  [[ "$proto" == dot ]] && port="${DOT[$t]}" || port="${DOH[$t]}"
  case "$case" in
    dot-hits) gen=(dnsperf -m dot -s 127.0.0.1 -p "$port" -d "$TMP/hot.txt" -l "$dur"
      -c "$DOT_CLIENTS" -q "$DOT_OUTSTANDING" -t 2) ;;
    dot-misses)
      qfile="$TMP/q-$case.txt"
      make_queries "$qfile" "$prefix" $((NAMES_PER_SECOND * dur))
      gen=(dnsperf -m dot -s 127.0.0.1 -p "$port" -d "$qfile" -l "$dur"
        -c "$DOT_CLIENTS" -q "$DOT_OUTSTANDING" -t 2) ;;
    dot-conn*) gen=(dnsperf -m dot -s 127.0.0.1 -p "$port" -d "$TMP/hot.txt" -l "$dur"
      -c "$CONN_CLIENTS" -q "$CONN_OUTSTANDING" -t 2 -O "num-queries-per-conn=${case#dot-conn}") ;;
    doh-h2-hits) gen=(h2load -D "$dur" -c "$H2_CLIENTS" -m "$H2_STREAMS"
      -H 'accept: application/dns-message' -i "$TMP/hot-urls-$t.txt") ;;
    doh-h2-post) gen=(h2load -D "$dur" -c "$H2_CLIENTS" -m "$H2_STREAMS"
      -H 'content-type: application/dns-message' -H 'accept: application/dns-message'
      -d "$TMP/post.bin" "https://127.0.0.1:$port/dns-query") ;;
    doh-h2-misses)
      qfile="$TMP/q-$case.txt"
      make_queries "$TMP/names.txt" "$prefix" $((NAMES_PER_SECOND * dur / 2))
      deno run "$BENCH/listener_clients.ts" urls "https://127.0.0.1:$port/dns-query" \
        <"$TMP/names.txt" >"$qfile"
      gen=(h2load -D "$dur" -c 1 -m "$H2_MISS_STREAMS" -H 'accept: application/dns-message'
        -i "$qfile") ;;
    doh-h1-hits) gen=(h2load --h1 -D "$dur" -c "$H1_CLIENTS" -m 1
      -H 'accept: application/dns-message' -i "$TMP/hot-urls-$t.txt") ;;
  esac

  local pid="${PID[$t]}" up="${PID[upstream]}"
  local p0 u0 c0 l0 g0 s0 p1 u1 c1 l1 g1 s1
  children_cpu g0
  p0=$(proc_ticks "$pid") u0=$(proc_ticks "$up") c0=$(core_ticks "$PROXY_CORE") l0=$(core_ticks "$LOAD_CORE")
  s0=$(steal_ticks)
  log "round $round: $t $case ${dur}s (${gen[*]:0:1} ${gen[*]:1:12}...)"
  {
    echo "# target=$t (${DESC[$t]}) case=$case round=$round port=$port"
    echo "# ${gen[*]}"
    set +e
    taskset -c "$LOAD_CORE" timeout $((dur + 30)) "${gen[@]}" 2>&1
    set -e
  } >"$raw"
  p1=$(proc_ticks "$pid") u1=$(proc_ticks "$up") c1=$(core_ticks "$PROXY_CORE") l1=$(core_ticks "$LOAD_CORE")
  s1=$(steal_ticks)
  children_cpu g1
  [[ -n "${qfile:-}" ]] && rm -f "$qfile"

  local qps sent completed lost ok mean
  if [[ "${gen[0]}" == dnsperf ]]; then
    read -r qps sent completed lost ok mean < <(parse_dnsperf "$raw")
  else
    read -r qps sent completed lost ok mean < <(parse_h2load "$raw" || true)
  fi
  if [[ -z "${qps:-}" || -z "${completed:-}" ]]; then
    warn "$t $case: the load generator gave no statistics (see $raw)"
    printf '%s\t%s\t%s\tno-stats\n' "$round" "$t" "$case" >>"$OUT/failures.tsv"
    return 0
  fi
  local hwm rss tck
  hwm=$(proc_kb "$pid" VmHWM) rss=$(proc_kb "$pid" VmRSS) tck=$(getconf CLK_TCK)
  # round target case duration qps sent completed lost ok mean_ms cpu_s cpu_us_per_q
  # qps_per_cpu upstream_cpu_us_per_q proxy_core_busy load_core_busy vmhwm_kb vmrss_kb
  # foreign_cores steal
  awk -v OFS='\t' -v round="$round" -v t="$t" -v c="$case" -v dur="$dur" -v qps="$qps" \
    -v sent="$sent" -v comp="$completed" -v lost="$lost" -v ok="$ok" -v mean="$mean" \
    -v dp=$((p1 - p0)) -v du=$((u1 - u0)) -v tck="$tck" -v hwm="$hwm" -v rss="$rss" \
    -v c0="$c0" -v c1="$c1" -v l0="$l0" -v l1="$l1" -v s0="$s0" -v s1="$s1" \
    -v gen="$(awk -v a="$g0" -v b="$g1" 'BEGIN { print b - a }')" '
    function busy(a, b,   x, y) { split(a, x, " "); split(b, y, " ");
      return (y[2] - x[2]) > 0 ? sprintf("%.2f", (y[1] - x[1]) / (y[2] - x[2])) : "-" }
    function share(a, b,   x, y) { split(a, x, " "); split(b, y, " ");
      return (y[2] - x[2]) > 0 ? sprintf("%.4f", (y[1] - x[1]) / (y[2] - x[2])) : "-" }
    function dbusy(a, b,   x, y) { split(a, x, " "); split(b, y, " "); return y[1] - x[1] }
    BEGIN {
      cpu = dp / tck
      print round, t, c, dur, sprintf("%.1f", qps), sent, comp, lost, ok, mean,
        sprintf("%.2f", cpu), (comp > 0 ? sprintf("%.2f", cpu / comp * 1e6) : "-"),
        (cpu > 0 ? sprintf("%.0f", comp / cpu) : "-"),
        (comp > 0 ? sprintf("%.2f", du / tck / comp * 1e6) : "-"),
        busy(c0, c1), busy(l0, l1), hwm, rss,
        sprintf("%.2f", ((dbusy(c0, c1) + dbusy(l0, l1) - dp - du) / tck - gen) / dur),
        share(s0, s1)
    }' >>"$RUNS_TSV"
  log "  -> $(tail -n 1 "$RUNS_TSV" | awk -F'\t' '{ printf "qps %s, answered %s of %s, CPU %s us/q, %s q per CPU-s, core%s busy %s, load core busy %s, other load %s, steal %s", $5, $9, $6, $12, $13, '"$PROXY_CORE"', $15, $16, $19, $20 }')"
}

# Unrecorded load before round 1: JIT warm-up, upstream connections, every hot name cached.
warm_up() { # target
  local t="$1"
  [[ -z "${DEAD[$t]:-}" ]] || return 0
  if [[ -z "${SKIP[$t dot]:-}" ]]; then
    taskset -c "$LOAD_CORE" dnsperf -m dot -s 127.0.0.1 -p "${DOT[$t]}" -d "$TMP/hot.txt" \
      -n 1 -c 4 -q 64 -t 5 >"$OUT/raw/warmup-$t-fill.txt" 2>&1 || true
    taskset -c "$LOAD_CORE" timeout $((WARMUP + 30)) dnsperf -m dot -s 127.0.0.1 -p "${DOT[$t]}" \
      -d "$TMP/hot.txt" -l "$WARMUP" -c "$DOT_CLIENTS" -q "$DOT_OUTSTANDING" -t 2 \
      >"$OUT/raw/warmup-$t-dot.txt" 2>&1 || true
  fi
  if [[ -z "${SKIP[$t doh]:-}" ]]; then
    deno run "$BENCH/listener_clients.ts" urls "https://127.0.0.1:${DOH[$t]}/dns-query" \
      <"$TMP/hot.txt" >"$TMP/hot-urls-$t.txt"
    taskset -c "$LOAD_CORE" timeout $((WARMUP + 30)) h2load -D "$WARMUP" -c "$H2_CLIENTS" \
      -m "$H2_STREAMS" -H 'accept: application/dns-message' -i "$TMP/hot-urls-$t.txt" \
      >"$OUT/raw/warmup-$t-doh.txt" 2>&1 || true
  fi
}

# ---------------------------------------------------------------- report
write_meta() {
  local rev
  rev="$(git -C "$DOTPROXY_REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
  [[ -n "$(git -C "$DOTPROXY_REPO" status --porcelain 2>/dev/null | head -n 1)" ]] && rev+=" (dirty tree)"
  jq -n \
    --arg stamp "$STAMP" --arg quick "$QUICK" --arg duration "$DURATION" --arg rounds "$ROUNDS" \
    --arg idle_conns "$IDLE_CONNS" --arg hot "$HOT_NAMES" \
    --arg dot "-c $DOT_CLIENTS -q $DOT_OUTSTANDING" --arg conn "-c $CONN_CLIENTS -q $CONN_OUTSTANDING" \
    --arg h2 "-c $H2_CLIENTS -m $H2_STREAMS" --arg h2miss "-c 1 -m $H2_MISS_STREAMS" \
    --arg h1 "--h1 -c $H1_CLIENTS -m 1" \
    --arg deno "$(deno --version | head -n 1)" \
    --arg unbound "$(unbound -V | sed -n 's/^Version //p' | head -n 1)" \
    --arg dnsdist "$(dnsdist --version | head -n 1)" \
    --arg dnsperf "$(dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -n 1)" \
    --arg h2load "$(h2load --version | head -n 1)" \
    --arg openssl "$(openssl version)" \
    --arg dotproxy "$rev" --arg dotproxy_repo "$DOTPROXY_REPO" \
    --arg has_dot "$DOTPROXY_HAS_DOT" --arg has_doh "$DOTPROXY_HAS_DOH" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" \
    --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    --arg dotproxy_args "$DOTPROXY_ARGS" --arg limit_args "${DOTPROXY_LIMIT_ARGS:-}" \
    --arg idle "$IDLE_CHECK" --arg v8_flags "$V8_FLAGS" \
    '{stamp: $stamp, quick: ($quick == "1"), duration_s: ($duration | tonumber),
      rounds: ($rounds | tonumber), idle_conns: ($idle_conns | tonumber),
      hot_names: ($hot | tonumber), dnsperf_dot: $dot, dnsperf_conn: $conn, h2load_h2: $h2,
      h2load_h2_misses: $h2miss, h2load_h1: $h1,
      dotproxy_args: $dotproxy_args, dotproxy_limit_args: $limit_args, v8_flags: $v8_flags,
      dotproxy_repo: $dotproxy_repo, dotproxy_has_dot: ($has_dot == "1"),
      dotproxy_has_doh: ($has_doh == "1"), load_before_start_cores: ($idle | tonumber),
      versions: {dotproxy: $dotproxy, deno: $deno, unbound: $unbound, dnsdist: $dnsdist,
                 dnsperf: $dnsperf, h2load: $h2load, openssl: $openssl},
      machine: {nproc: ($nproc | tonumber), kernel: $kernel, cpu: $cpu}}' >"$OUT/meta.json"
}

write_skips() {
  local t k
  : >"$OUT/skipped.tsv"
  for t in $TARGETS; do
    [[ -n "${DEAD[$t]:-}" ]] && printf '%s\tall\t%s\n' "$t" "${DEAD[$t]}" >>"$OUT/skipped.tsv"
  done
  for k in "${!SKIP[@]}"; do
    [[ " $TARGETS " == *" ${k% *} "* && -z "${DEAD[${k% *}]:-}" ]] || continue
    printf '%s\t%s\t%s\n' "${k% *}" "${k#* }" "${SKIP[$k]}" >>"$OUT/skipped.tsv"
  done
  return 0
}

report() {
  write_skips
  write_meta
  deno run --allow-read="$OUT" --allow-write="$OUT" "$BENCH/listeners_summarize.ts" "$OUT"
  cp "$OUT/summary.md" "$BENCH/results/listeners_latest.md"
  echo
  cat "$OUT/summary.md"
  echo
  log "results: $OUT (summary.md, summary.json, runs.tsv, idle.tsv, raw/, logs/), table: bench/results/listeners_latest.md"
}

# ---------------------------------------------------------------- main
main() {
  local t tool
  for tool in deno unbound unbound-checkconf dnsdist dnsperf h2load dig kdig curl openssl \
    taskset mawk jq ss getconf; do need "$tool"; done
  (($(nproc) >= 2)) || die "needs 2 cores (target on core $PROXY_CORE, load on core $LOAD_CORE)"
  dnsperf -H 2>&1 | grep -q num-queries-per-conn || PER_CONN_LIST=""
  for t in "${PLAIN[@]}" "${DOT[@]}" "${DOH[@]}" $UP_TLS_PORT $UP_PLAIN_PORT; do
    ! port_busy "$t" || die "port $t is in use"
  done
  # Idle clients and their servers need a descriptor each, plus room.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  (($(ulimit -n) > IDLE_CONNS + 1000)) || die "ulimit -n $(ulimit -n) is too low for $IDLE_CONNS idle connections"
  if [[ " $TARGETS " == *" unbound "* ]] && ((3 * (2 * IDLE_CONNS + 100) + 1000 > $(ulimit -n))); then
    die "ulimit -n $(ulimit -n) is too low for Unbound's slots for $IDLE_CONNS idle connections (3 ports x $((2 * IDLE_CONNS + 100))): lower --idle-conns"
  fi

  local a b
  a="$(core_ticks 0) $(core_ticks 1)"
  sleep 2
  b="$(core_ticks 0) $(core_ticks 1)"
  read -r IDLE_CHECK < <(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ")
    printf "%.2f\n", ((y[1] - x[1]) + (y[3] - x[3])) / ((y[2] - x[2] + y[4] - x[4]) / 2) }')
  log "machine load before start: $IDLE_CHECK cores busy"
  awk -v l="$IDLE_CHECK" 'BEGIN { exit !(l > 0.1) }' &&
    warn "the machine is not idle ($IDLE_CHECK cores busy): numbers will be noisy"

  mkdir -p "$OUT/raw" "$OUT/logs"
  printf 'round\ttarget\tcase\tduration_s\tqps\tsent\tcompleted\tlost\tok\tmean_ms\tcpu_s\tcpu_us_per_q\tqps_per_cpu\tupstream_cpu_us_per_q\tproxy_core_busy\tload_core_busy\tvmhwm_kb\tvmrss_kb\tforeign_cores\tsteal\n' >"$RUNS_TSV"
  printf 'target\tproto\tcount\topen\tfailed\theld\trss_before_kb\trss_after_kb\tvmhwm_kb\tkb_per_conn\topen_seconds\tcpu_ms_per_conn\n' >"$IDLE_TSV"
  : >"$OUT/failures.tsv"
  log "results to $OUT; temp dir $TMP; targets: $TARGETS; tests: $TESTS"

  # The test CA and server certificate of tests/fixtures (names dns.test, localhost,
  # 127.0.0.1, ::1), for the upstream and for every listener.
  cp "$REPO/tests/fixtures/ca.pem" "$REPO/tests/fixtures/server.pem" \
    "$REPO/tests/fixtures/server.key" "$TMP/"
  # Unbound (the listener peer) never serves HTTP/1.1: its DoH is HTTP/2 only.
  SKIP[unbound doh-h1]="Unbound's https-port speaks HTTP/2 only"
  if [[ " $TARGETS " == *" dotproxy "* ]]; then
    probe_dotproxy_flags
    [[ -n "${DEAD[dotproxy]:-}" ]] && warn "dotproxy: ${DEAD[dotproxy]}"
  fi
  start_upstream
  make_hot
  deno run "$BENCH/listener_clients.ts" body n1.bench.test >"$TMP/post.bin"

  if has_test idle; then
    log "idle connections: $IDLE_CONNS per target and protocol, each in a fresh process"
    for t in $TARGETS; do
      [[ -z "${DEAD[$t]:-}" ]] || { log "skip idle $t: ${DEAD[$t]}"; continue; }
      measure_idle "$t" dot
      measure_idle "$t" h2
    done
  fi

  local cases=()
  if has_test dot; then
    cases+=(dot-hits dot-misses)
    if [[ -n "$PER_CONN_LIST" ]]; then
      for t in $PER_CONN_LIST; do cases+=("dot-conn$t"); done
    else
      warn "this dnsperf has no -O num-queries-per-conn: the new-connection runs are skipped"
    fi
  fi
  has_test doh && cases+=(doh-h2-hits doh-h2-post doh-h2-misses doh-h1-hits)
  if ((${#cases[@]})); then
    for t in $TARGETS; do
      if [[ -n "${DEAD[$t]:-}" ]]; then log "skip $t: ${DEAD[$t]}"; else start_target "$t" || true; fi
    done
    log "warm-up: the hot names cached, ${WARMUP}s of load per target and protocol"
    for t in $TARGETS; do warm_up "$t"; done
    local -a order
    read -ra order <<<"$TARGETS"
    local n=${#order[@]} r i c
    for ((r = 1; r <= ROUNDS; r++)); do
      for ((i = 0; i < n; i++)); do
        t="${order[$(((i + r - 1) % n))]}"
        for c in "${cases[@]}"; do measure "$r" "$t" "$c"; done
      done
    done
    for t in $TARGETS; do [[ -n "${PID[$t]:-}" ]] && stop_target "$t"; done
  fi
  cp "$TMP/dnsdist.conf" "$TMP/unbound.conf" "$OUT/logs/" 2>/dev/null || true
  report
}

main
