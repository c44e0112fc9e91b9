#!/usr/bin/env bash
# Benchmark of the answer cache (issue 9), one run, side by side, loopback only:
#
#   hits     cache-hit UDP qps and CPU per query: dotproxy against dnsdist's packet cache,
#            Unbound's cache and the bare Deno UDP responder (the runtime's ceiling)
#   fixed    p50/p99 at a fixed 2,000 qps of hits
#   mix      80% of queries over a hot set of 1,000 names, 20% unique names: qps at
#            saturation and p99 at a fixed rate, against Unbound and dnsdist with their caches
#   miss     unique names: dotproxy with the cache on, with --cache-size 0, and the code of
#            commit 7c925b5 (before the cache): qps and CPU per query at saturation and at a
#            fixed rate
#   rss      RSS of a fresh dotproxy after each 250,000 of a million unique names, at the
#            default --cache-size, at 100,000 entries, and with the cache off
#
#   flock /work/notes/bench.lock bash bench/cache_bench.sh            # about 12 minutes
#   flock /work/notes/bench.lock bash bench/cache_bench.sh --quick    # smoke run, about 3 minutes
#
# Needs 2 cores, deno, unbound, dnsdist, dnsperf, dig, kdig, openssl, taskset, mawk, git.
# Results: bench/results/cache-<UTC stamp>/ (runs.tsv, raw/, logs/, summary.md) and the table
# in bench/results/cache_latest.md. See bench/README.md ("Cache benchmark").
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$REPO/bench"

QUICK=0
DURATION=10        # seconds per saturation measurement
ROUNDS=3           # saturation rounds (targets rotate)
FIXED_RATE=2000    # qps of the latency runs
FIXED_DURATION=10
MISS_RATE=15000    # qps of the fixed-rate miss runs (CPU per query where batching is thin)
RSS_STEP=250000    # unique names per RSS sample
RSS_STEPS=4        # samples: a million names in all
WARMUP=2
BASELINE_COMMIT=7c925b5
PROXY_CORE=0
LOAD_CORE=1
KEEP_TMP=0
PHASES="hits fixed mix miss rss"

while (($#)); do
  case "$1" in
    --quick) QUICK=1; DURATION=3; ROUNDS=1; FIXED_DURATION=3; RSS_STEP=50000; WARMUP=1 ;;
    --duration) DURATION="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    --phases) PHASES="${2//,/ }"; shift ;;
    --keep-tmp) KEEP_TMP=1 ;;
    -h | --help) sed -n '2,22p' "$0"; echo "options: --quick --duration S --rounds N --phases hits,fixed,mix,miss,rss --keep-tmp"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

UP_TLS_PORT=8863
UP_PLAIN_PORT=8063
declare -A PORT=(
  [dotproxy]=5321 [dotproxy-nocache]=5322 [dotproxy-7c925b5]=5323 [dnsdist-cache]=5324
  [unbound-cache]=5325 [deno-responder]=5326 [rss]=5327
)
declare -A DESC=(
  [dotproxy]="dotproxy, cache on (defaults: 10,000 entries, prefetch)"
  [dotproxy-nocache]="dotproxy --cache-size 0"
  [dotproxy-7c925b5]="dotproxy at $BASELINE_COMMIT (before the cache)"
  [dnsdist-cache]="dnsdist 1.7 with a 10,000-entry packet cache, DoT to Unbound"
  [unbound-cache]="Unbound as DoT forwarder with its cache (defaults, prefetch on)"
  [deno-responder]="bare Deno UDP responder, no upstream (the runtime's ceiling)"
)

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
OUT="$BENCH/results/cache-$STAMP"
TMP="$(mktemp -d /tmp/dotproxy-cache-bench.XXXXXX)"
RUNS="$OUT/runs.tsv"
declare -A PID=()
STARTED_PIDS=()
SEQ=0

BENCH_TAG=cache-bench
# shellcheck source=bench/lib.sh
source "$BENCH/lib.sh"

probe() { # port name type [dig opts]
  local port="$1" name="$2" type="$3" out
  shift 3
  out="$(dig +tries=1 +time=3 "$@" @127.0.0.1 -p "$port" "$name" "$type" 2>&1)" || true
  awk '/status:/ { s = $6; sub(/,/, "", s) }
       /^[^;].*\tIN\t/ && !f { f = $NF }
       END { printf "%s %s\n", (s ? s : "NO-RESPONSE"), (f ? f : "-") }' <<<"$out"
}

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
# The upstream (as in bench/run.sh): n0..n9999.bench.test A 10.0.x.y (TTL 300), and
# <anything>.u.bench.test A 192.0.2.1 (a redirect zone: an endless supply of unique names).
start_upstream() {
  {
    upstream_server_clause upstream "$UP_TLS_PORT" "$UP_PLAIN_PORT"
    numbered_names 10000
    printf 'remote-control:\n  control-enable: no\n'
  } >"$TMP/upstream.conf"
  spawn upstream "$LOAD_CORE" unbound -c "$TMP/upstream.conf" -d
  local i
  for ((i = 0; i < 50; i++)); do
    [[ "$(probe "$UP_PLAIN_PORT" n1.bench.test A)" == "NOERROR 10.0.0.1" ]] && break
    alive upstream || { cat "$TMP/upstream.log" >&2; die "upstream unbound died"; }
    sleep 0.2
  done
  kdig +tls-ca="$TMP/ca.pem" +tls-hostname=dns.test +retry=0 +timeout=3 @127.0.0.1 \
    -p "$UP_TLS_PORT" n1.bench.test A 2>&1 | grep -q '10\.0\.0\.1' || die "upstream DoT does not answer"
  log "upstream Unbound: DoT :$UP_TLS_PORT, plain :$UP_PLAIN_PORT (pid ${PID[upstream]}, core $LOAD_CORE)"
}

start_dotproxy() { # name dir port [args...]
  local name="$1" dir="$2" port="$3"
  shift 3
  (cd "$dir" && DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" exec taskset -c "$PROXY_CORE" \
    deno run --allow-net --allow-env --v8-flags=--max-semi-space-size=2 main.ts \
    --listen "127.0.0.1:$port" --upstream "127.0.0.1:$UP_TLS_PORT#dns.test" --log-level warn "$@" \
    >"$TMP/$name.log" 2>&1 </dev/null) &
  PID[$name]=$!
  STARTED_PIDS+=("$!")
}

start_dnsdist() {
  cat >"$TMP/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("127.0.0.1:${PORT[dnsdist-cache]}", {maxInFlight=100})
newServer({address="127.0.0.1:$UP_TLS_PORT", tls="openssl", subjectName="dns.test",
  caStore="$TMP/ca.pem", validateCertificates=true, checkName="n0.bench.test.", checkInterval=1,
  maxInFlight=100})
-- The packet cache: as many entries as dotproxy's default; TTLs aged; SERVFAIL 5 s.
pc = newPacketCache(10000, {maxTTL=86400, minTTL=0, temporaryFailureTTL=5})
getPool(""):setCache(pc)
EOF
  spawn dnsdist-cache "$PROXY_CORE" dnsdist --supervised --disable-syslog -C "$TMP/dnsdist.conf"
}

start_unbound_cache() {
  {
    unbound_server_clause unbound-cache
    cat <<EOF
  interface: 127.0.0.1@${PORT[unbound-cache]}
  module-config: "iterator"
  do-not-query-localhost: no
  tls-cert-bundle: "$TMP/ca.pem"
  incoming-num-tcp: 1000
  num-queries-per-thread: 4096
  # The cache at its defaults (msg 4 MB, rrset 4 MB), prefetch on like dotproxy's.
  prefetch: yes
  local-zone: "test." nodefault
forward-zone:
  name: "."
  forward-tls-upstream: yes
  forward-addr: 127.0.0.1@$UP_TLS_PORT#dns.test
remote-control:
  control-enable: no
EOF
  } >"$TMP/unbound-cache.conf"
  spawn unbound-cache "$PROXY_CORE" unbound -c "$TMP/unbound-cache.conf" -d
}

start_target() { # target
  case "$1" in
    dotproxy) start_dotproxy dotproxy "$REPO" "${PORT[dotproxy]}" ;;
    dotproxy-nocache) start_dotproxy dotproxy-nocache "$REPO" "${PORT[dotproxy-nocache]}" --cache-size 0 ;;
    dotproxy-7c925b5) start_dotproxy dotproxy-7c925b5 "$TMP/old" "${PORT[dotproxy-7c925b5]}" ;;
    dnsdist-cache) start_dnsdist ;;
    unbound-cache) start_unbound_cache ;;
    deno-responder)
      spawn deno-responder "$PROXY_CORE" deno run --unstable-net --allow-net \
        "$BENCH/udp_responder.ts" --listen "127.0.0.1:${PORT[deno-responder]}" ;;
  esac
}

# ---------------------------------------------------------------- query files
hot_queries() { # file: the 1,000 hot names once each
  mawk 'BEGIN { for (i = 0; i < 1000; i++) printf "n%d.bench.test A\n", i }' >"$1"
}
mix_queries() { # file prefix count: 80% over the 1,000 hot names, 20% unique
  mawk -v n="$3" -v p="$2" 'BEGIN { srand(42); for (i = 0; i < n; i++)
    if (i % 5 == 4) printf "%s%x.u.bench.test A\n", p, i
    else printf "n%d.bench.test A\n", int(rand() * 1000) }' >"$1"
}

# One dnsperf run against a target; one row in runs.tsv.
#   phase round target qfile duration latency(0|1) dnsperf-args...
measure() {
  local phase="$1" round="$2" t="$3" qfile="$4" dur="$5" verbose="$6"
  shift 6
  local args=("$@") raw pid p0 p1 c0 c1 l0 l1
  if ! alive "$t"; then warn "$t is not running; skipped"; return 0; fi
  raw="$OUT/raw/$phase-r$round-$t.txt"
  ((verbose)) && args+=(-v)
  pid="${PID[$t]}"
  p0=$(proc_ticks "$pid") c0=$(core_ticks "$PROXY_CORE") l0=$(core_ticks "$LOAD_CORE")
  {
    echo "# phase=$phase round=$round target=$t (${DESC[$t]:-}) args=${args[*]}"
    set +e
    taskset -c "$LOAD_CORE" timeout $((dur + 60)) dnsperf -s 127.0.0.1 -p "${PORT[$t]}" -m udp \
      -d "$qfile" -l "$dur" "${args[@]}" 2>&1 | taskset -c "$LOAD_CORE" mawk "$LATENCY_AWK"
    set -e
  } >"$raw"
  p1=$(proc_ticks "$pid") c1=$(core_ticks "$PROXY_CORE") l1=$(core_ticks "$LOAD_CORE")
  local qps completed lost mean p50 p99 p999 pmax tck
  qps=$(stat_field "$raw" "Queries per second:" 1)
  completed=$(stat_field "$raw" "Queries completed:" 1)
  lost=$(stat_field "$raw" "Queries lost:" 1)
  mean=$(stat_field "$raw" "Average Latency (s):" 1)
  read -r p50 p99 p999 pmax < <(awk '/^Latency percentiles/ && $4 == "p50" { print $5, $9, $11, $13; f = 1 }
    END { if (!f) print "- - - -" }' "$raw")
  [[ -n "$qps" && -n "$completed" ]] || { warn "$t: no dnsperf statistics ($raw)"; return 0; }
  tck=$(getconf CLK_TCK)
  awk -v OFS='\t' -v phase="$phase" -v round="$round" -v t="$t" -v qps="$qps" -v comp="$completed" \
    -v lost="$lost" -v mean="$mean" -v p50="$p50" -v p99="$p99" -v p999="$p999" -v pmax="$pmax" \
    -v dp=$((p1 - p0)) -v tck="$tck" -v c0="$c0" -v c1="$c1" -v l0="$l0" -v l1="$l1" \
    -v rss="$(proc_kb "$pid" VmRSS)" -v hwm="$(proc_kb "$pid" VmHWM)" -v dur="$dur" '
    function busy(a, b,   x, y) { split(a, x, " "); split(b, y, " ");
      return (y[2] - x[2]) > 0 ? sprintf("%.2f", (y[1] - x[1]) / (y[2] - x[2])) : "-" }
    function span(a, b,   x, y) { split(a, x, " "); split(b, y, " "); return (y[2] - x[2]) / tck }
    BEGIN { k = comp / 1000; b0 = busy(c0, c1); secs = span(c0, c1)
      # other0: core 0 busy with anything but the target (other load skews the numbers)
      print phase, round, t, sprintf("%.1f", qps), comp, lost, sprintf("%.3f", mean * 1000), p50, p99,
        p999, pmax, (k > 0 ? sprintf("%.5f", dp / tck / k) : "-"), b0, busy(l0, l1), rss, hwm,
        (b0 == "-" || secs <= 0 ? "-" : sprintf("%.2f", b0 - dp / tck / secs)) }' >>"$RUNS"
  log "  $phase r$round $t: $(tail -n 1 "$RUNS" | awk -F'\t' '{ printf "qps %s lost %s p50 %s p99 %s ms, CPU %s s/1k, core0 %s core1 %s, other on core 0 %s", $4, $6, $8, $9, $12, $13, $14, $17 }')"
}

warm_hot() { # target: every hot name once, then a short unrecorded load
  local t="$1"
  hot_queries "$TMP/hot.txt"
  taskset -c "$LOAD_CORE" dnsperf -s 127.0.0.1 -p "${PORT[$t]}" -d "$TMP/hot.txt" -n 1 -c 1 -q 50 \
    >"$OUT/raw/warm-$t.txt" 2>&1 || true
  taskset -c "$LOAD_CORE" timeout $((WARMUP + 30)) dnsperf -s 127.0.0.1 -p "${PORT[$t]}" \
    -d "$TMP/hot.txt" -l "$WARMUP" -c 8 -q 256 >>"$OUT/raw/warm-$t.txt" 2>&1 || true
}

# Checks that a hot name is answered from the cache: the right address, and (dotproxy) an aged
# or equal TTL; fails loudly otherwise.
check_hit() { # target
  local t="$1" res
  res="$(probe "${PORT[$t]}" n7.bench.test A)"
  [[ "$t" == deno-responder || "$res" == "NOERROR 10.0.0.7" ]] || warn "$t: n7.bench.test A gave '$res'"
}

# ---------------------------------------------------------------- phases
phase_hits() {
  local targets=(dotproxy dnsdist-cache unbound-cache deno-responder) r i t n=4
  for t in "${targets[@]}"; do warm_hot "$t"; check_hit "$t"; done
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t="${targets[$(((i + r - 1) % n))]}"
      measure hits "$r" "$t" "$TMP/hot.txt" "$DURATION" 0 -c 8 -q 256 -t 2
    done
  done
}

phase_fixed() {
  local t
  for t in dotproxy dnsdist-cache unbound-cache deno-responder; do
    warm_hot "$t"
    measure fixed 1 "$t" "$TMP/hot.txt" "$FIXED_DURATION" 1 -Q "$FIXED_RATE" -c 4 -q 100 -t 5
  done
}

phase_mix() {
  local targets=(dotproxy unbound-cache dnsdist-cache) r i t n=3
  for t in "${targets[@]}"; do warm_hot "$t"; done
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t="${targets[$(((i + r - 1) % n))]}"
      SEQ=$((SEQ + 1))
      mix_queries "$TMP/mix.txt" "x$SEQ-" $((140000 * DURATION))
      measure mix "$r" "$t" "$TMP/mix.txt" "$DURATION" 1 -c 8 -q 256 -t 2
    done
  done
  for t in "${targets[@]}"; do
    SEQ=$((SEQ + 1))
    mix_queries "$TMP/mix.txt" "y$SEQ-" $((FIXED_RATE * (FIXED_DURATION + 1)))
    measure mixfixed 1 "$t" "$TMP/mix.txt" "$FIXED_DURATION" 1 -Q "$FIXED_RATE" -c 4 -q 100 -t 5
  done
}

phase_miss() {
  local targets=(dotproxy dotproxy-nocache dotproxy-7c925b5) r i t n=3
  for t in "${targets[@]}"; do
    SEQ=$((SEQ + 1))
    make_queries "$TMP/warm.txt" "w$SEQ-" $((100000 * WARMUP))
    taskset -c "$LOAD_CORE" timeout $((WARMUP + 30)) dnsperf -s 127.0.0.1 -p "${PORT[$t]}" \
      -d "$TMP/warm.txt" -l "$WARMUP" -c 8 -q 256 -t 2 >"$OUT/raw/warm-miss-$t.txt" 2>&1 || true
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((i = 0; i < n; i++)); do
      t="${targets[$(((i + r - 1) % n))]}"
      SEQ=$((SEQ + 1))
      make_queries "$TMP/unique.txt" "m$SEQ-" $((140000 * DURATION))
      measure miss "$r" "$t" "$TMP/unique.txt" "$DURATION" 0 -c 8 -q 256 -t 2
    done
    for ((i = 0; i < n; i++)); do
      t="${targets[$(((i + r - 1) % n))]}"
      SEQ=$((SEQ + 1))
      make_queries "$TMP/unique.txt" "f$SEQ-" $((MISS_RATE * (DURATION + 1)))
      measure missfixed "$r" "$t" "$TMP/unique.txt" "$DURATION" 0 -Q "$MISS_RATE" -c 4 -q 500 -t 5
    done
  done
}

# A fresh dotproxy per setting; a million unique names in steps; RSS after each step.
phase_rss() {
  local setting size step t=rss
  for setting in default:10000 large:100000 off:0; do
    size="${setting##*:}"
    start_dotproxy rss "$REPO" "${PORT[rss]}" --cache-size "$size"
    wait_ready rss 30 || { warn "rss instance did not start"; continue; }
    printf 'rss\t%s\t0\t0\t%s\t%s\n' "$size" "$(proc_kb "${PID[rss]}" VmRSS)" \
      "$(proc_kb "${PID[rss]}" VmHWM)" >>"$OUT/rss.tsv"
    for ((step = 1; step <= RSS_STEPS; step++)); do
      SEQ=$((SEQ + 1))
      make_queries "$TMP/rss.txt" "r$SEQ-" "$RSS_STEP"
      taskset -c "$LOAD_CORE" timeout 300 dnsperf -s 127.0.0.1 -p "${PORT[rss]}" -d "$TMP/rss.txt" \
        -n 1 -c 8 -q 256 -t 2 >"$OUT/raw/rss-$size-$step.txt" 2>&1 || true
      sleep 1
      printf 'rss\t%s\t%s\t%s\t%s\t%s\n' "$size" "$step" \
        "$(stat_field "$OUT/raw/rss-$size-$step.txt" "Queries completed:" 1)" \
        "$(proc_kb "${PID[rss]}" VmRSS)" "$(proc_kb "${PID[rss]}" VmHWM)" >>"$OUT/rss.tsv"
      log "  rss cache-size $size after $((step * RSS_STEP)) names: $(tail -n 1 "$OUT/rss.tsv" | cut -f 5) kB"
    done
    kill -TERM "${PID[rss]}" 2>/dev/null || true
    wait "${PID[rss]}" 2>/dev/null || true
  done
}

# ---------------------------------------------------------------- main
main() {
  local t tool
  for tool in deno unbound dnsdist dnsperf dig kdig openssl taskset mawk git ss; do need "$tool"; done
  (($(nproc) >= 2)) || die "needs 2 cores"
  for t in "${!PORT[@]}"; do ! port_busy "${PORT[$t]}" || die "port ${PORT[$t]} ($t) is in use"; done
  ! port_busy "$UP_TLS_PORT" || die "port $UP_TLS_PORT in use"

  local a b idle
  a="$(core_ticks 0) $(core_ticks 1)"
  sleep 2
  b="$(core_ticks 0) $(core_ticks 1)"
  idle=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ")
    printf "%.2f", ((y[1] - x[1]) + (y[3] - x[3])) / ((y[2] - x[2] + y[4] - x[4]) / 2) }')
  log "machine load before start: $idle cores busy"

  mkdir -p "$OUT/raw" "$OUT/logs" "$TMP/old"
  printf 'phase\tround\ttarget\tqps\tcompleted\tlost\tmean_ms\tp50_ms\tp99_ms\tp999_ms\tmax_ms\tcpu_s_per_1k\tproxy_core_busy\tload_core_busy\tvmrss_kb\tvmhwm_kb\tother_core0\n' >"$RUNS"
  printf 'kind\tcache_size\tstep\tcompleted\tvmrss_kb\tvmhwm_kb\n' >"$OUT/rss.tsv"
  git -C "$REPO" archive "$BASELINE_COMMIT" | tar -x -C "$TMP/old"
  {
    echo "stamp=$STAMP quick=$QUICK duration=$DURATION rounds=$ROUNDS load_before=$idle"
    echo "dotproxy=$(git -C "$REPO" rev-parse --short HEAD)$([[ -n "$(git -C "$REPO" status --porcelain -- src main.ts | head -n 1)" ]] && echo ' (uncommitted changes)')"
    echo "baseline=$BASELINE_COMMIT"
    deno --version | head -n 1
    echo "unbound $(unbound -V | sed -n 's/^Version //p' | head -n 1)"
    dnsdist --version | head -n 1
    echo "dnsperf $(dnsperf -h 2>&1 | sed -n 's/^Version //p' | head -n 1)"
    echo "cpu $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) cores, $(uname -r)"
  } >"$OUT/meta.txt"

  make_certs
  start_upstream
  for t in dotproxy dotproxy-nocache dotproxy-7c925b5 dnsdist-cache unbound-cache deno-responder; do
    start_target "$t"
  done
  for t in dotproxy dotproxy-nocache dotproxy-7c925b5 dnsdist-cache unbound-cache deno-responder; do
    wait_ready "$t" 30 || { tail -n 20 "$TMP/$t.log" >&2; die "$t did not start"; }
    log "$t up: pid ${PID[$t]}, port ${PORT[$t]}: ${DESC[$t]}"
  done

  local phase
  for phase in $PHASES; do
    log "phase $phase"
    "phase_$phase"
  done
  for t in "${!PID[@]}"; do [[ -f "$TMP/$t.log" ]] && cp "$TMP/$t.log" "$OUT/logs/"; done
  cp "$TMP/dnsdist.conf" "$TMP/unbound-cache.conf" "$OUT/logs/" 2>/dev/null || true
  deno run --allow-read="$OUT" --allow-write="$OUT" "$BENCH/cache_summarize.ts" "$OUT"
  cp "$OUT/summary.md" "$BENCH/results/cache_latest.md"
  cat "$OUT/summary.md"
  log "results: $OUT"
}

main
