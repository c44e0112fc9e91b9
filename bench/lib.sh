# shellcheck shell=bash
# Helpers shared by bench/run.sh, bench/cache_bench.sh and bench/failover.sh; sourced, not run.
# Before sourcing, a script sets BENCH_TAG (its name in log lines), TMP (its temp dir) and
# KEEP_TMP, and declares `PID` (an associative array, name -> pid) and `STARTED_PIDS` (every
# pid it started). Sourcing installs the traps that stop those processes and remove TMP on
# exit.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_TAG" -1 "$*" >&2; }
warn() { printf '[%s %(%H:%M:%S)T] WARNING: %s\n' "$BENCH_TAG" -1 "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$BENCH_TAG" "$*" >&2; exit 1; }

# Stops everything started (resumed first: a scenario may have left one SIGSTOPped).
cleanup() {
  local pid i
  for pid in "${STARTED_PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; done
  for pid in "${STARTED_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STARTED_PIDS[@]}"; do
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if ((KEEP_TMP)); then echo "[$BENCH_TAG] temp dir kept: $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

need() { command -v "$1" >/dev/null || die "missing tool: $1"; }

port_busy() { ss -Hlntu "( sport = :$1 )" 2>/dev/null | grep -q .; }

# Starts "$@" in the background pinned to core $2, as the real process (taskset and the
# command exec in place, so $! is the server's own pid). Logs to $TMP/NAME.log.
spawn() { # name core cmd...
  local name="$1" core="$2"
  shift 2
  taskset -c "$core" "$@" >"$TMP/$name.log" 2>&1 </dev/null &
  # shellcheck disable=SC2004 # an associative array's key, not arithmetic
  PID[$name]=$!
  STARTED_PIDS+=("$!")
}

# Stops a process started by spawn (by its pid), resuming it first if it was stopped.
stop() { # name
  local pid="${PID[$1]:-}" i
  [[ -n "$pid" ]] || return 0
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID[$1]"
}

alive() { kill -0 "${PID[$1]:-0}" 2>/dev/null; }

# utime+stime of a process in clock ticks (all threads); fields after the ")" of comm.
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
proc_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# "busy total" jiffies of one core from /proc/stat (busy includes irq and softirq time, where
# much of loopback networking runs; processes' stime includes most of it too)
core_ticks() { awk -v c="cpu$1" '$1 == c { print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8 }' /proc/stat; }
# Stolen and all jiffies of the whole machine: time the hypervisor ran something else while this
# VM wanted the CPU. A round with steal slows every stage of every target.
steal_ticks() { awk '$1 == "cpu" { print $9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }

# A throwaway CA and a certificate for dns.test in TMP (ca.pem, server.pem, server.key).
make_certs() {
  (
    cd "$TMP"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -keyout ca.key -out ca.pem -subj "/CN=dotproxy $BENCH_TAG CA" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
      -keyout server.key -out server.csr -subj "/CN=dns.test"
    printf '%s\n' "subjectAltName=DNS:dns.test" "basicConstraints=CA:FALSE" \
      "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile server.ext -out server.pem
  ) >"$TMP/openssl.log" 2>&1 || { cat "$TMP/openssl.log" >&2; die "openssl failed"; }
}

# The start of an Unbound `server:` clause: in the foreground, unprivileged, files in TMP, one
# thread, IPv4 only. The caller adds its interfaces and the rest.
unbound_server_clause() { # name (of its pid file)
  cat <<EOF
server:
  username: ""
  chroot: ""
  directory: "$TMP"
  pidfile: "$TMP/$1.pid"
  do-daemonize: no
  use-syslog: no
  logfile: ""
  verbosity: 1
  num-threads: 1
  so-reuseport: no
  do-ip6: no
EOF
}

# The `server:` clause of an Unbound that serves the bench zones, DoT on TLS-PORT and plain
# DNS on PLAIN-PORT, and never recurses: the root (health checks' `. NS` included) is refused
# at once, and u.bench.test is a redirect zone, so every <anything>.u.bench.test answers A
# 192.0.2.1: the source of unique, uncacheable names. The caller adds its local-data.
upstream_server_clause() { # name tls-port plain-port
  unbound_server_clause "$1"
  cat <<EOF
  interface: 127.0.0.1@$2
  interface: 127.0.0.1@$3
  tls-port: $2
  tls-service-key: "$TMP/server.key"
  tls-service-pem: "$TMP/server.pem"
  module-config: "iterator"
  # Enough TCP slots that the idle timeout never shrinks under load (it does when fewer
  # than half are free), and a long idle timeout for the proxies' persistent connections.
  incoming-num-tcp: 1000
  tcp-idle-timeout: 120000
  num-queries-per-thread: 4096
  local-zone: "." refuse
  local-zone: "bench.test." static
  local-zone: "u.bench.test." redirect
  local-data: "u.bench.test. 300 IN A 192.0.2.1"
EOF
}

# local-data lines for n0..n(COUNT-1).bench.test A 10.0.x.y (TTL 300).
numbered_names() { # count
  awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++)
    printf "  local-data: \"n%d.bench.test. 300 IN A 10.0.%d.%d\"\n", i, int(i / 256), i % 256 }'
}

# Unique names, <prefix><hex>.u.bench.test: a prefix per run, so no name repeats in a benchmark.
make_queries() { # file prefix count
  mawk -v n="$3" -v p="$2" 'BEGIN { for (i = 0; i < n; i++) printf "%s%x.u.bench.test A\n", p, i }' >"$1"
}

# Reads dnsperf -v output: passes everything but the per-query lines through (timeouts
# collapsed), and appends latency percentiles from a 1-microsecond histogram:
# "Latency percentiles (ms): p50 A p90 B p99 C p99.9 D max E (of N answers)".
# shellcheck disable=SC2016,SC2034 # an awk program, used by the scripts that source this
LATENCY_AWK='
/^> / { us = int($NF * 1e6 + 0.5); h[us]++; n++; if (us > mx) mx = us; next }
/Query timed out/ { if (++to <= 5) print; next }
/unexpected \(maybe timed out\) id/ { if (++un <= 5) print; next }
{ print }
END {
  if (to > 5) printf "[Timeout] ... %d timeouts in all\n", to
  if (un > 5) printf "Warning: ... %d late responses (after their timeout) in all\n", un
  if (n == 0) { print "Latency percentiles (ms): none"; exit }
  split("50 90 99 99.9", ps, " "); k = 1; c = 0
  for (us = 0; us <= mx && k <= 4; us++) {
    if (us in h) c += h[us]
    while (k <= 4 && c >= n * ps[k] / 100) { v[k] = us; k++ }
  }
  printf "Latency percentiles (ms): p50 %.3f p90 %.3f p99 %.3f p99.9 %.3f max %.3f (of %d answers)\n",
    v[1] / 1000, v[2] / 1000, v[3] / 1000, v[4] / 1000, mx / 1000, n
}'

# A field of dnsperf's "Statistics" by its label.
stat_field() { # file label field-index
  awk -v l="$2" -v f="$3" 'index($0, l) { sub(/^.*:[ \t]+/, ""); split($0, a, /[ (]+/); print a[f]; exit }' "$1"
}
