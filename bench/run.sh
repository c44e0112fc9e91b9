#!/usr/bin/env bash
# Benchmark harness of issue 5: dotproxy against Stubby, dnsdist and Unbound as DNS-over-TLS
# forwarders, plus a bare Deno DoT forwarder (a Deno forwarder's floor), a trivial Deno
# responder (the runtime's ceiling) and Unbound answering directly (the load generator's
# ceiling). Everything runs on loopback, in a temp dir that is deleted at exit. See
# bench/README.md.
#
#   bash bench/run.sh            # full run, about 10 minutes
#   bash bench/run.sh --quick    # smoke run, about 1.5 minutes
#   bash bench/run.sh --before 7c925b5   # also runs that commit as "dotproxy-before"
#   bash bench/run.sh --help
set -euo pipefail
# Deno would otherwise look up its own update server through the system resolver.
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$REPO/bench"

# ---------------------------------------------------------------- settings
QUICK=0
DURATION=10          # seconds per saturation run
ROUNDS=3             # saturation rounds; the target order rotates each round
WARMUP=2             # seconds of unrecorded load per target and transport before round 1
FIXED_RATE=2000      # queries per second of the fixed-rate run
FIXED_DURATION=10    # seconds of the fixed-rate run
# dnsperf load shape; each can be overridden from the environment.
UDP_CLIENTS="${UDP_CLIENTS:-8}"          # dnsperf -c for UDP (source sockets)
UDP_OUTSTANDING="${UDP_OUTSTANDING:-256}"  # dnsperf -q for UDP
TCP_CLIENTS="${TCP_CLIENTS:-16}"         # dnsperf -c for TCP (pipelined connections)
TCP_OUTSTANDING="${TCP_OUTSTANDING:-256}"  # dnsperf -q for TCP
NAMES_PER_SECOND=140000  # unique names generated per second of a run (more than any DoT target does)
SAT_LATENCY=0        # per-query latencies (dnsperf -v) in saturation runs too, for p99:
                     # off by default, it costs dnsperf ~6 us of load-core CPU per query
PROXY_CORE=0         # the target under test
LOAD_CORE=1          # dnsperf and the upstream Unbound
ALL_TARGETS="dotproxy stubby dnsdist unbound-fwd deno-forwarder deno-responder unbound-direct"
TARGETS="$ALL_TARGETS"
DOTPROXY_ARGS="${DOTPROXY_ARGS:-}"  # extra arguments for main.ts (e.g. to turn a cache off)
BEFORE_REV=""        # --before REV: that commit of dotproxy runs beside the working tree
BEFORE_ARGS="${BEFORE_ARGS:-}"  # extra arguments for the "before" build's main.ts
# The V8 flags dotproxy ships with (deno.json's compile task; the Dockerfile, scripts/release.sh
# and `deno task start` carry the same), so that peak RSS and CPU are those of what users run. The
# --before build and the bare Deno forwarder get them too. Override with V8_FLAGS=... to compare.
V8_FLAGS="${V8_FLAGS:-$(grep -o -- '--v8-flags=[^ "]*' "$REPO/deno.json" | head -n 1)}"

# Ports (all on 127.0.0.1).
UP_TLS_PORT=8853
UP_PLAIN_PORT=8053
declare -A PORT=(
  [dotproxy]=5301 [stubby]=5302 [dnsdist]=5303 [unbound-fwd]=5304
  [deno-responder]=5305 [unbound-direct]=$UP_PLAIN_PORT [dotproxy-before]=5306
  [deno-forwarder]=5307
)
declare -A DESC=(
  [dotproxy]="dotproxy (main.ts), DoT to Unbound"
  [dotproxy-before]="dotproxy at the --before commit, DoT to Unbound"
  [stubby]="Stubby, DoT to Unbound"
  [dnsdist]="dnsdist, DoT to Unbound, no packet cache"
  [unbound-fwd]="Unbound as TLS forwarder, cache off"
  [deno-responder]="trivial Deno responder, no upstream (runtime ceiling)"
  [deno-forwarder]="bare Deno DoT forwarder, 8 connections (a Deno forwarder's floor)"
  [unbound-direct]="upstream Unbound plain DNS, no proxy (load ceiling)"
)

usage() {
  cat <<EOF
usage: bash bench/run.sh [--quick] [--duration S] [--rounds N] [--targets a,b,...]
                         [--sat-latency] [--keep-tmp] [--before REV] [--wire]
  --quick            smoke run: 3 s runs, 1 round, 1 s warm-up
  --duration S       seconds per saturation run (default $DURATION)
  --rounds N         saturation rounds, target order rotated (default $ROUNDS)
  --targets LIST     comma-separated subset of: ${ALL_TARGETS// /,}
  --sat-latency      dnsperf -v in saturation runs too, for their p99 (costs load-core CPU)
  --keep-tmp         keep the temp dir (configs, logs) for debugging
  --before REV       also run dotproxy as of git commit REV (target dotproxy-before, port 5306),
                     for a before/after comparison in one run (BEFORE_ARGS: its extra args)
  --wire             capture loopback from before dotproxy starts (its TLS keys via SSLKEYLOGFILE)
                     and break each query of its fixed-rate run down on the wire (wire.txt);
                     needs --targets dotproxy, dumpcap and tshark
env: DOTPROXY_ARGS   extra arguments passed to main.ts
     UDP_CLIENTS, UDP_OUTSTANDING, TCP_CLIENTS, TCP_OUTSTANDING   dnsperf -c/-q (8/256, 16/256)
     V8_FLAGS        V8 flags of dotproxy, the --before build and the bare forwarder
                     (default: those of deno.json's tasks, what ships: $V8_FLAGS)
EOF
}

KEEP_TMP=0
WIRE=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1; DURATION=3; ROUNDS=1; FIXED_DURATION=3; WARMUP=1 ;;
    --duration) DURATION="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --targets) TARGETS="${2//,/ }"; shift ;;
    --sat-latency) SAT_LATENCY=1 ;;
    --keep-tmp) KEEP_TMP=1 ;;
    --before) BEFORE_REV="$2"; shift ;;
    --wire) WIRE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [[ -n "$BEFORE_REV" && " $TARGETS " != *" dotproxy-before "* ]]; then
  TARGETS="dotproxy-before $TARGETS"
fi
for t in $TARGETS; do
  [[ -n "${PORT[$t]:-}" ]] || { echo "unknown target: $t" >&2; exit 2; }
done
if ((WIRE)) && [[ "$TARGETS" != dotproxy ]]; then
  echo "--wire needs --targets dotproxy (the capture would hold every target's traffic)" >&2
  exit 2
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$BENCH/results/$STAMP"
TMP="$(mktemp -d /tmp/dotproxy-bench.XXXXXX)"
RUNS_TSV="$OUT/runs.tsv"
declare -A PID=()   # target (or "upstream") -> pid of the real server process
declare -A DEAD=()  # target -> reason it is out of the benchmark
STARTED_PIDS=()
IDLE_CHECK=0
RUN_SEQ=0           # measurements so far: each gets its own name prefix

BENCH_TAG=bench
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

# ---------------------------------------------------------------- helpers
# CPU seconds (user+system) of this shell's reaped children so far (dnsperf and its mawk),
# into the variable named $1. `times` must run in this shell, not in a $(...) subshell.
children_cpu() {
  times >"$TMP/times"
  printf -v "$1" '%s' "$(awk 'NR == 2 { for (i = 1; i <= 2; i++) {
    split($i, t, /[ms]/); s += t[1] * 60 + t[2] } print s }' "$TMP/times")"
}

# dig a name through a target; prints "STATUS ANSWERCOUNT FIRSTANSWER"
probe() { # port name type [dig opts...]
  local port="$1" name="$2" type="$3"
  shift 3
  local out
  out="$(dig +tries=1 +time=3 "$@" @127.0.0.1 -p "$port" "$name" "$type" 2>&1)" || true
  awk '/status:/ { s = $6; sub(/,/, "", s) }
       /ANSWER:/ { for (i = 1; i <= NF; i++) if ($i == "ANSWER:") { a = $(i + 1); sub(/,/, "", a) } }
       /^[^;].*\tIN\t/ && !f { f = $NF }
       END { printf "%s %s %s\n", (s ? s : "NO-RESPONSE"), (a ? a : 0), (f ? f : "-") }' <<<"$out"
}

expected_a() { echo "10.0.$(($1 / 256)).$(($1 % 256))"; }

# One sanity query over UDP and over TCP: NOERROR with the right A record. Fails loudly.
sanity() { # target
  local t="$1" i=$((RANDOM % 10000)) proto res want
  want="$(expected_a "$i")"
  for proto in +notcp +tcp; do
    res="$(probe "${PORT[$t]}" "n$i.bench.test" A "$proto")"
    if [[ "$t" == deno-responder ]]; then
      [[ "$res" == "NOERROR "* ]] && continue
    elif [[ "$res" == "NOERROR "[1-9]*" $want" ]]; then
      continue
    fi
    warn "$t: sanity check failed ($proto n$i.bench.test A): got '$res', want 'NOERROR n $want'"
    return 1
  done
}

# Waits (bounded) until a target answers; 0 when it does.
wait_ready() { # target seconds
  local t="$1" deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    alive "$t" || return 1
    [[ "$(probe "${PORT[$t]}" n1.bench.test A +time=1)" == NOERROR* ]] && return 0
    sleep 0.3
  done
  return 1
}

# ---------------------------------------------------------------- setup
# Unbound serving the zone: DoT on UP_TLS_PORT, plain UDP/TCP on UP_PLAIN_PORT.
# bench.test: n0..n9999 A 10.0.x.y and big TXT records; u.bench.test is a redirect zone, so
# every <anything>.u.bench.test answers A 192.0.2.1: the source of unique, uncacheable names.
write_upstream_conf() {
  local f="$TMP/upstream.conf" s250
  s250="$(printf 'x%.0s' {1..250})"
  {
    upstream_server_clause upstream "$UP_TLS_PORT" "$UP_PLAIN_PORT"
    numbered_names 10000
    local name n strings i
    for spec in big1:12 big2:6 big3:32; do # ~3000, ~1500 and ~8000 bytes of TXT
      name="${spec%%:*}" n="${spec##*:}" strings=""
      for ((i = 0; i < n; i++)); do strings+=" \\\"${s250}\\\""; done
      printf '  local-data: "%s.bench.test. 300 IN TXT%s"\n' "$name" "$strings"
    done
    printf 'remote-control:\n  control-enable: no\n'
  } >"$f"
  unbound-checkconf "$f" >/dev/null || die "bad upstream unbound config $f"
}

start_upstream() {
  write_upstream_conf
  spawn upstream "$LOAD_CORE" unbound -c "$TMP/upstream.conf" -d
  local i
  for ((i = 0; i < 50; i++)); do
    [[ "$(probe "$UP_PLAIN_PORT" n1.bench.test A)" == "NOERROR 1 10.0.0.1" ]] && break
    alive upstream || { cat "$TMP/upstream.log" >&2; die "upstream unbound died"; }
    sleep 0.2
  done
  local res
  res="$(kdig +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 +timeout=3 \
    @127.0.0.1 -p "$UP_TLS_PORT" n1.bench.test A 2>&1)" || true
  grep -q '10\.0\.0\.1' <<<"$res" || { echo "$res" >&2; die "upstream DoT does not answer"; }
  res="$(kdig +tls-ca="$TMP/ca.pem" +tls-hostname=wrong.test +retry=0 +timeout=3 \
    @127.0.0.1 -p "$UP_TLS_PORT" n1.bench.test A 2>&1)" || true
  grep -q '10\.0\.0\.1' <<<"$res" && die "kdig accepted the wrong TLS name: verification is off?"
  PID[unbound-direct]="${PID[upstream]}"
  log "upstream Unbound up (pid ${PID[upstream]}, core $LOAD_CORE): DoT :$UP_TLS_PORT, plain :$UP_PLAIN_PORT"
}

start_dotproxy() { # target source-dir extra-args
  local t="$1" dir="$2" extra="$3"
  if [[ ! -f "$dir/main.ts" ]]; then
    DEAD[$t]="main.ts not found in $dir"
    return 1
  fi
  # DOTPROXY_ARGS is the harness's own setting, not the proxy's (it would warn about it).
  # shellcheck disable=SC2086 # the extra arguments are a word list on purpose
  local keylog=""
  ((WIRE)) && [[ "$t" == dotproxy ]] && keylog="$TMP/tls-keys.log"
  (cd "$dir" && unset DOTPROXY_ARGS && if [[ -n "$keylog" ]]; then export SSLKEYLOGFILE="$keylog"; fi &&
    DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" exec taskset -c "$PROXY_CORE" \
    deno run --allow-net --allow-env ${V8_FLAGS:+"$V8_FLAGS"} main.ts --listen "127.0.0.1:${PORT[$t]}" \
    --upstream "127.0.0.1:$UP_TLS_PORT#dns.test" --log-level warn $extra \
    >"$TMP/$t.log" 2>&1 </dev/null) &
  PID[$t]=$!
  STARTED_PIDS+=("$!")
}

# The --before commit, exported from git into the temp dir (no worktree left behind).
start_dotproxy_before() {
  mkdir -p "$TMP/before"
  if ! git -C "$REPO" archive "$BEFORE_REV" | tar -x -C "$TMP/before"; then
    DEAD[dotproxy-before]="git archive $BEFORE_REV failed"
    return 1
  fi
  start_dotproxy dotproxy-before "$TMP/before" "$BEFORE_ARGS"
}

start_stubby() {
  cat >"$TMP/stubby.yml" <<EOF
# getdns in stub mode has no cache: every query goes upstream.
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
  - 127.0.0.1@${PORT[stubby]}
upstream_recursive_servers:
  - address_data: 127.0.0.1
    tls_port: $UP_TLS_PORT
    tls_auth_name: "dns.test"
EOF
  spawn stubby "$PROXY_CORE" stubby -C "$TMP/stubby.yml" -l
}

start_dnsdist() {
  cat >"$TMP/dnsdist.conf" <<EOF
setSecurityPollSuffix("")  -- no security polling (it would query the system resolver)
-- maxInFlight: out-of-order processing, on client TCP connections and on the DoT
-- connections to the upstream (Unbound answers out of order). Without it dnsdist 1.7 gives
-- each in-flight query its own upstream connection (~180 of them at -q 256) and does about
-- a third of the UDP qps at three times the CPU per query.
setLocal("127.0.0.1:${PORT[dnsdist]}", {maxInFlight=100})
-- No packet cache, no console. The health check asks a name that the upstream answers.
newServer({address="127.0.0.1:$UP_TLS_PORT", tls="openssl", subjectName="dns.test",
  caStore="$TMP/ca.pem", validateCertificates=true, checkName="n0.bench.test.", checkInterval=1,
  maxInFlight=100})
EOF
  spawn dnsdist "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"
}

start_unbound_fwd() {
  {
    unbound_server_clause unbound-fwd
    cat <<EOF
  interface: 127.0.0.1@${PORT[unbound-fwd]}
  module-config: "iterator"
  do-not-query-localhost: no
  tls-cert-bundle: "$TMP/ca.pem"
  incoming-num-tcp: 1000
  tcp-idle-timeout: 120000
  num-queries-per-thread: 4096
  # Cache off as far as Unbound allows: minimal caches and TTL 0. The queries are unique
  # names anyway, so the cache can never answer one.
  msg-cache-size: 0
  rrset-cache-size: 0
  cache-max-ttl: 0
  cache-max-negative-ttl: 0
  prefetch: no
  # test. is one of Unbound's default local zones (NXDOMAIN): let it through.
  local-zone: "test." nodefault
forward-zone:
  name: "."
  forward-tls-upstream: yes
  forward-addr: 127.0.0.1@$UP_TLS_PORT#dns.test
remote-control:
  control-enable: no
EOF
  } >"$TMP/unbound-fwd.conf"
  unbound-checkconf "$TMP/unbound-fwd.conf" >/dev/null || die "bad unbound-fwd config"
  spawn unbound-fwd "$PROXY_CORE" unbound -c "$TMP/unbound-fwd.conf" -d
}

start_deno_responder() {
  spawn deno-responder "$PROXY_CORE" deno run --unstable-net --allow-net \
    "$BENCH/udp_responder.ts" --listen "127.0.0.1:${PORT[deno-responder]}"
}

start_deno_forwarder() {
  DENO_FORWARDER_CA="$(cat "$TMP/ca.pem")" spawn deno-forwarder "$PROXY_CORE" \
    deno run --unstable-net --allow-net --allow-env ${V8_FLAGS:+"$V8_FLAGS"} \
    "$BENCH/deno_forwarder.ts" \
    --listen "127.0.0.1:${PORT[deno-forwarder]}" --upstream "127.0.0.1:$UP_TLS_PORT#dns.test"
}

start_target() { # target
  local t="$1"
  case "$t" in
    unbound-direct) return 0 ;; # the upstream itself
    dotproxy) start_dotproxy dotproxy "$REPO" "$DOTPROXY_ARGS" || { warn "dotproxy: ${DEAD[dotproxy]}"; return 0; } ;;
    dotproxy-before) start_dotproxy_before || { warn "dotproxy-before: ${DEAD[dotproxy-before]}"; return 0; } ;;
    stubby) start_stubby ;;
    dnsdist) start_dnsdist ;;
    unbound-fwd) start_unbound_fwd ;;
    deno-responder) start_deno_responder ;;
    deno-forwarder) start_deno_forwarder ;;
  esac
}

check_target_started() { # target
  local t="$1" comm
  [[ -n "${DEAD[$t]:-}" ]] && return 0
  if ! wait_ready "$t" 30; then
    DEAD[$t]="did not start or does not answer (log: $OUT/logs/$t.log)"
    warn "$t: ${DEAD[$t]}"
    tail -n 20 "$TMP/$t.log" >&2 2>/dev/null || true
    return 0
  fi
  comm="$(cat "/proc/${PID[$t]}/comm" 2>/dev/null || echo '?')"
  if ! sanity "$t"; then
    DEAD[$t]="wrong answers at start"
    return 0
  fi
  # A large answer: over UDP it comes back truncated and dig retries over TCP.
  local big
  big="$(probe "${PORT[$t]}" big1.bench.test TXT)"
  [[ "$t" == deno-responder || "$big" == "NOERROR 1 "* ]] ||
    warn "$t: big1.bench.test TXT (about 3000 bytes, TC then TCP) got '$big'"
  log "$t up: pid ${PID[$t]} ($comm), port ${PORT[$t]}, core $(taskset -pc "${PID[$t]}" | awk '{print $NF}')"
}

# ---------------------------------------------------------------- measuring
# One measurement: dnsperf against a target, with CPU and memory of the target process.
# Appends one row to runs.tsv.
measure() { # kind(sat|fixed) round target mode
  local kind="$1" round="$2" t="$3" mode="$4"
  local port="${PORT[$t]}" dur qfile raw prefix verbose=0 args=()
  if [[ -n "${DEAD[$t]:-}" ]]; then
    log "skip $t $mode: ${DEAD[$t]}"
    return 0
  fi
  if ! alive "$t"; then
    DEAD[$t]="process exited (log: $OUT/logs/$t.log)"
    warn "$t: ${DEAD[$t]}"
    printf '%s\t%s\t%s\t%s\tdead\n' "$kind" "$round" "$t" "$mode" >>"$OUT/failures.tsv"
    return 0
  fi
  if ! sanity "$t"; then
    printf '%s\t%s\t%s\t%s\tsanity\n' "$kind" "$round" "$t" "$mode" >>"$OUT/failures.tsv"
    return 0
  fi
  raw="$OUT/raw/$kind-r$round-$t-$mode.txt"
  qfile="$TMP/queries.txt"
  RUN_SEQ=$((RUN_SEQ + 1))
  prefix="m$RUN_SEQ-"
  if [[ "$kind" == fixed ]]; then
    dur=$FIXED_DURATION
    args=(-Q "$FIXED_RATE" -c 4 -q 100 -t 5)
    verbose=1
    make_queries "$qfile" "$prefix" $((FIXED_RATE * dur + FIXED_RATE))
  else
    dur=$DURATION
    if [[ "$mode" == tcp ]]; then args=(-c "$TCP_CLIENTS" -q "$TCP_OUTSTANDING" -t 2); else
      args=(-c "$UDP_CLIENTS" -q "$UDP_OUTSTANDING" -t 2); fi
    verbose=$SAT_LATENCY
    make_queries "$qfile" "$prefix" $((NAMES_PER_SECOND * dur))
  fi
  ((verbose)) && args+=(-v)
  local lines
  lines=$(wc -l <"$qfile")

  local pid="${PID[$t]}" up="${PID[upstream]}"
  local p0 u0 c0 l0 g0 s0 p1 u1 c1 l1 g1 s1
  children_cpu g0
  p0=$(proc_ticks "$pid") u0=$(proc_ticks "$up") c0=$(core_ticks "$PROXY_CORE") l0=$(core_ticks "$LOAD_CORE")
  s0=$(steal_ticks)
  log "$kind round $round: $t $mode ${dur}s (${args[*]})"
  {
    echo "# target=$t (${DESC[$t]}) mode=$mode kind=$kind round=$round port=$port"
    set +e
    taskset -c "$LOAD_CORE" timeout $((dur + 30)) dnsperf -s 127.0.0.1 -p "$port" -m "$mode" \
      -d "$qfile" -l "$dur" "${args[@]}" 2>&1 | taskset -c "$LOAD_CORE" mawk "$LATENCY_AWK"
    set -e
  } >"$raw"
  p1=$(proc_ticks "$pid") u1=$(proc_ticks "$up") c1=$(core_ticks "$PROXY_CORE") l1=$(core_ticks "$LOAD_CORE")
  s1=$(steal_ticks)
  children_cpu g1

  local sent completed lost qps mean sd noerror p50 p99 p999 pmax hwm rss wrapped=0
  sent=$(stat_field "$raw" "Queries sent:" 1)
  completed=$(stat_field "$raw" "Queries completed:" 1)
  lost=$(stat_field "$raw" "Queries lost:" 1)
  qps=$(stat_field "$raw" "Queries per second:" 1)
  mean=$(stat_field "$raw" "Average Latency (s):" 1)
  sd=$(stat_field "$raw" "Latency StdDev (s):" 1)
  noerror=$(awk '/Response codes:/ { for (i = 1; i < NF; i++) if ($i == "NOERROR") print $(i + 1) }' "$raw")
  read -r p50 p99 p999 pmax < <(awk '/^Latency percentiles/ && $4 == "p50" { print $5, $9, $11, $13; f = 1 }
    END { if (!f) print "- - - -" }' "$raw")
  if [[ -z "$qps" || -z "$completed" ]]; then
    warn "$t $mode: dnsperf gave no statistics (see $raw)"
    printf '%s\t%s\t%s\t%s\tno-stats\n' "$kind" "$round" "$t" "$mode" >>"$OUT/failures.tsv"
    return 0
  fi
  ((sent > lines)) && wrapped=1
  hwm=$(proc_kb "$pid" VmHWM) rss=$(proc_kb "$pid" VmRSS)
  local tck
  tck=$(getconf CLK_TCK)
  # kind round target mode duration qps sent completed lost noerror mean_ms sd_ms p50 p99 p999
  # max cpu_s cpu_s_per_1k upstream_cpu_s_per_1k core0_busy core1_busy vmhwm_kb vmrss_kb wrapped
  # foreign_cores: CPU (in cores) used on both cores by anything but the target, the upstream,
  # dnsperf and mawk: other load on the machine. /proc/stat is sampled at ticks and
  # undercounts short bursts, so it is only meaningful in saturation runs.
  awk -v OFS='\t' -v kind="$kind" -v round="$round" -v t="$t" -v mode="$mode" -v dur="$dur" \
    -v qps="$qps" -v sent="$sent" -v comp="$completed" -v lost="$lost" -v noerr="${noerror:-0}" \
    -v mean="$mean" -v sd="$sd" -v p50="$p50" -v p99="$p99" -v p999="$p999" -v pmax="$pmax" \
    -v dp=$((p1 - p0)) -v du=$((u1 - u0)) -v tck="$tck" -v hwm="$hwm" -v rss="$rss" -v wrapped="$wrapped" \
    -v c0="$c0" -v c1="$c1" -v l0="$l0" -v l1="$l1" -v s0="$s0" -v s1="$s1" -v gen="$(awk -v a="$g0" -v b="$g1" 'BEGIN { print b - a }')" \
    -v same="$([[ "$pid" == "$up" ]] && echo 1 || echo 0)" '
    function busy(a, b,   x, y) { split(a, x, " "); split(b, y, " ");
      return (y[2] - x[2]) > 0 ? sprintf("%.2f", (y[1] - x[1]) / (y[2] - x[2])) : "-" }
    function share(a, b,   x, y) { split(a, x, " "); split(b, y, " ");
      return (y[2] - x[2]) > 0 ? sprintf("%.4f", (y[1] - x[1]) / (y[2] - x[2])) : "-" }
    function dbusy(a, b,   x, y) { split(a, x, " "); split(b, y, " "); return y[1] - x[1] }
    BEGIN {
      cpu = dp / tck; k = comp / 1000
      print kind, round, t, mode, dur, sprintf("%.1f", qps), sent, comp, lost, noerr,
        sprintf("%.3f", mean * 1000), sprintf("%.3f", sd * 1000), p50, p99, p999, pmax,
        sprintf("%.2f", cpu), (k > 0 ? sprintf("%.5f", cpu / k) : "-"),
        (k > 0 ? sprintf("%.5f", du / tck / k) : "-"), busy(c0, c1), busy(l0, l1), hwm, rss, wrapped,
        sprintf("%.2f", ((dbusy(c0, c1) + dbusy(l0, l1) - dp - (same ? 0 : du)) / tck - gen) / dur),
        share(s0, s1)
    }' >>"$RUNS_TSV"
  log "  -> $(tail -n 1 "$RUNS_TSV" | awk -F'\t' '{ printf "qps %s, lost %s, mean %s ms, p99 %s ms, CPU %s s/1k, core%s busy %s, load core busy %s, other load %s cores, steal %s", $6, $9, $11, $14, $18, '"$PROXY_CORE"', $20, $21, $25, $26 }')"
  if ((wrapped)) && [[ "$t" == dotproxy* || "$t" == unbound-fwd ]]; then
    warn "$t: names repeated within the run (sent $sent > $lines names): a cache could help"
  fi
}

# Unrecorded load before the first round: JIT warm-up, upstream connections established.
warm_up() { # target
  local t="$1" mode
  [[ -z "${DEAD[$t]:-}" ]] || return 0
  for mode in udp tcp; do
    make_queries "$TMP/warm.txt" "warm${t//-/}${mode}-" $((NAMES_PER_SECOND * WARMUP))
    taskset -c "$LOAD_CORE" timeout $((WARMUP + 30)) dnsperf -s 127.0.0.1 -p "${PORT[$t]}" \
      -m "$mode" -d "$TMP/warm.txt" -l "$WARMUP" -c 8 -q 256 -t 2 \
      >"$OUT/raw/warmup-$t-$mode.txt" 2>&1 || true
  done
}

# ---------------------------------------------------------------- --wire
# dumpcap on lo from before dotproxy's upstream handshakes (tshark needs them, with the keys
# Deno writes to SSLKEYLOGFILE, to decrypt the TLS leg).
start_capture() {
  spawn capture "$LOAD_CORE" dumpcap -q -i lo -B 64 \
    -f "udp port ${PORT[dotproxy]} or tcp port $UP_TLS_PORT" -w "$TMP/wire.pcapng"
  sleep 1
  alive capture || die "dumpcap did not start (see $TMP/capture.log)"
}

wire_breakdown() { # name prefix of the fixed-rate run
  sleep 0.5
  kill -TERM "${PID[capture]}" 2>/dev/null || true
  wait "${PID[capture]}" 2>/dev/null || true
  log "wire breakdown: decrypting the capture (tshark)"
  tshark -r "$TMP/wire.pcapng" -o "tls.keylog_file:$TMP/tls-keys.log" \
    -d "tcp.port==$UP_TLS_PORT,tls" -d "tls.port==$UP_TLS_PORT,dns" -T fields -E separator='|' \
    -e frame.time_epoch -e udp.srcport -e udp.dstport -e tcp.srcport -e tcp.dstport \
    -e tcp.stream -e tcp.len -e dns.flags.response -e dns.qry.name >"$TMP/wire-fields.txt" 2>/dev/null
  deno run --allow-read "$BENCH/wire_join.ts" "$TMP/wire-fields.txt" "${PORT[dotproxy]}" \
    "$UP_TLS_PORT" "$1" >"$OUT/wire.txt"
  rm -f "$TMP/wire.pcapng"
  log "wire breakdown (ms, $OUT/wire.txt):"
  sed 's/^/  /' "$OUT/wire.txt" >&2
}

# ---------------------------------------------------------------- report
write_meta() {
  local dotproxy_rev
  dotproxy_rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit')"
  [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null | head -n 1)" ]] && dotproxy_rev+=" (dirty tree)"
  jq -n \
    --arg stamp "$STAMP" --arg quick "$QUICK" --arg duration "$DURATION" --arg rounds "$ROUNDS" \
    --arg fixed_rate "$FIXED_RATE" --arg fixed_duration "$FIXED_DURATION" \
    --arg udp "-c $UDP_CLIENTS -q $UDP_OUTSTANDING" --arg tcp "-c $TCP_CLIENTS -q $TCP_OUTSTANDING" \
    --arg sat_latency "$SAT_LATENCY" \
    --arg deno "$(deno --version | head -n 1)" \
    --arg unbound "$(unbound -V | sed -n 's/^Version //p' | head -n 1)" \
    --arg stubby "$(stubby -V 2>&1 | head -n 1) / getdns $(dpkg-query -W -f='${Version}' libgetdns10 2>/dev/null || echo '?')" \
    --arg dnsdist "$(dnsdist --version | head -n 1)" \
    --arg dnsperf "$(dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -n 1)" \
    --arg openssl "$(openssl version)" \
    --arg dotproxy "$dotproxy_rev" \
    --arg nproc "$(nproc)" --arg kernel "$(uname -r)" \
    --arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
    --arg dotproxy_args "$DOTPROXY_ARGS" --arg idle "$IDLE_CHECK" --arg v8_flags "$V8_FLAGS" \
    --arg before_rev "$BEFORE_REV" --arg before_args "$BEFORE_ARGS" \
    '{stamp: $stamp, quick: ($quick == "1"), duration_s: ($duration | tonumber),
      rounds: ($rounds | tonumber), fixed_rate_qps: ($fixed_rate | tonumber),
      fixed_duration_s: ($fixed_duration | tonumber), dnsperf_udp: $udp, dnsperf_tcp: $tcp,
      saturation_latency: ($sat_latency == "1"), dotproxy_args: $dotproxy_args, v8_flags: $v8_flags,
      before_rev: $before_rev, before_args: $before_args,
      load_before_start_cores: ($idle | tonumber),
      versions: {dotproxy: $dotproxy, deno: $deno, unbound: $unbound, stubby: $stubby,
                 dnsdist: $dnsdist, dnsperf: $dnsperf, openssl: $openssl},
      machine: {nproc: ($nproc | tonumber), kernel: $kernel, cpu: $cpu}}' >"$OUT/meta.json"
}

write_dead() {
  local t
  : >"$OUT/dead.tsv"
  for t in $TARGETS; do
    [[ -n "${DEAD[$t]:-}" ]] && printf '%s\t%s\n' "$t" "${DEAD[$t]}" >>"$OUT/dead.tsv"
  done
  return 0
}

report() {
  write_dead
  deno run --allow-read="$OUT" --allow-write="$OUT" "$BENCH/summarize.ts" "$OUT"
  cp "$OUT/summary.md" "$BENCH/results/latest.md"
  echo
  cat "$OUT/summary.md"
  echo
  log "results: $OUT (summary.json, summary.md, runs.tsv, raw/), table: bench/results/latest.md"
}

# ---------------------------------------------------------------- main
main() {
  local t tool
  for tool in deno unbound unbound-checkconf stubby dnsdist dnsperf dig kdig openssl taskset \
    mawk jq ss getconf; do need "$tool"; done
  if ((WIRE)); then for tool in dumpcap tshark; do need "$tool"; done; fi
  (($(nproc) >= 2)) || die "needs 2 cores (proxy on core $PROXY_CORE, load on core $LOAD_CORE)"
  for t in $TARGETS; do
    [[ "$t" == unbound-direct ]] && continue
    ! port_busy "${PORT[$t]}" || die "port ${PORT[$t]} ($t) is in use"
  done
  for t in $UP_TLS_PORT $UP_PLAIN_PORT; do ! port_busy "$t" || die "port $t is in use"; done

  # Anything else running skews the numbers: sample both cores for 2 s first.
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
  printf 'kind\tround\ttarget\tmode\tduration_s\tqps\tsent\tcompleted\tlost\tnoerror\tmean_ms\tsd_ms\tp50_ms\tp99_ms\tp999_ms\tmax_ms\tcpu_s\tcpu_s_per_1k\tupstream_cpu_s_per_1k\tproxy_core_busy\tload_core_busy\tvmhwm_kb\tvmrss_kb\tnames_wrapped\tforeign_cores\tsteal\n' >"$RUNS_TSV"
  : >"$OUT/failures.tsv"
  log "results to $OUT; temp dir $TMP; targets: $TARGETS"
  write_meta

  log "throwaway CA and certificate for dns.test"
  make_certs
  start_upstream
  ((WIRE)) && start_capture
  for t in $TARGETS; do start_target "$t"; done
  for t in $TARGETS; do check_target_started "$t"; done

  log "warm-up: ${WARMUP}s per target and transport"
  for t in $TARGETS; do warm_up "$t"; done

  # Fixed rate first, UDP: latency on a warmed-up but not yet exhausted upstream (after
  # minutes of saturation the upstream Unbound itself answers every target more slowly).
  for t in $TARGETS; do measure fixed 1 "$t" udp; done
  ((WIRE)) && wire_breakdown "m$RUN_SEQ-"

  # Saturation runs: each round visits every target, UDP then TCP; the order rotates.
  local -a order
  read -ra order <<<"$TARGETS"
  local n=${#order[@]} r i mode
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t="${order[$(((i + r - 1) % n))]}"
      for mode in udp tcp; do measure sat "$r" "$t" "$mode"; done
    done
  done

  for t in $TARGETS upstream; do
    if [[ -f "$TMP/$t.log" ]]; then cp "$TMP/$t.log" "$OUT/logs/"; fi
  done
  # The peers' configs (the upstream's is 10,000 lines of zone: only its head).
  cp "$TMP"/stubby.yml "$TMP"/dnsdist.conf "$TMP"/unbound-fwd.conf "$OUT/logs/" 2>/dev/null || true
  head -n 40 "$TMP/upstream.conf" >"$OUT/logs/upstream.conf.head"
  report
}

main
