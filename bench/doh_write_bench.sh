#!/usr/bin/env bash
# DoH answers and the client's delayed ACK (issue 26): the same h2load matrix against two
# builds of dotproxy side by side in one run, BEFORE (a git revision, default 09f12d6: before
# the fix) and AFTER (this tree), both in front of one Unbound DoT upstream, cached answers:
#
#   seq    one connection, one request at a time (-c 1 -m 1): mean time per request shows a
#          40 ms wait at once
#   conn   a new connection per request (-c 1, 200 connections of one request each, h2load
#          --rps): what a browser's first lookup pays
#   load   10 connections x 10 streams (HTTP/1.1: x 1), req/s
#
# for GET and POST, HTTP/2 and HTTP/1.1 over TLS, and HTTP/2 with prior knowledge on the plain
# listener.
#
#   flock /work/notes/bench.lock bash bench/doh_write_bench.sh [BEFORE-REV]   # about 3 minutes
#   ONLY='plain h2 GET*' ROUNDS=3 bash bench/doh_write_bench.sh     # some cases, 3 rounds
#
# Needs deno, git, unbound, h2load, openssl, python3, taskset. Results:
# bench/results/doh-writes-<UTC stamp>.md.
set -euo pipefail
export DENO_NO_UPDATE_CHECK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BEFORE_REV="${1:-09f12d6}"
KEEP_TMP=0
BENCH_TAG=doh-writes
TMP="$(mktemp -d /tmp/dotproxy-doh-writes.XXXXXX)"
declare -A PID=()
STARTED_PIDS=()
# shellcheck source=bench/lib.sh
source "$REPO/bench/lib.sh"
for tool in deno git unbound h2load openssl python3 taskset; do need "$tool"; done

UP_TLS=8875
UP_PLAIN=8075
declare -A TLS_PORT=([before]=8451 [after]=8452)
declare -A PLAIN_PORT=([before]=8051 [after]=8052)
declare -A DNS_PORT=([before]=5341 [after]=5342)
for port in "$UP_TLS" "$UP_PLAIN" "${TLS_PORT[@]}" "${PLAIN_PORT[@]}" "${DNS_PORT[@]}"; do
  port_busy "$port" && die "port $port is in use"
done
PROXY_CORE=0
LOAD_CORE=1

mkdir -p "$TMP/before"
git -C "$REPO" archive "$BEFORE_REV" | tar -x -C "$TMP/before"
declare -A TREE=([before]="$TMP/before" [after]="$REPO")

make_certs
{
  upstream_server_clause upstream "$UP_TLS" "$UP_PLAIN"
  numbered_names 10
} >"$TMP/upstream.conf"
spawn upstream "$LOAD_CORE" unbound -d -c "$TMP/upstream.conf"
for build in before after; do
  DOTPROXY_CA_CERTS="$(cat "$TMP/ca.pem")" DOTPROXY_TLS_CERT="$(cat "$TMP/server.pem")" \
    DOTPROXY_TLS_KEY="$(cat "$TMP/server.key")" \
    spawn "$build" "$PROXY_CORE" deno run --allow-net --allow-env --unstable-net \
    --v8-flags=--max-semi-space-size=2,--max-old-space-size=160 "${TREE[$build]}/main.ts" \
    --listen "127.0.0.1:${DNS_PORT[$build]}" --listen-doh "127.0.0.1:${TLS_PORT[$build]}" \
    --listen-doh-plain "127.0.0.1:${PLAIN_PORT[$build]}" \
    --upstream "127.0.0.1:$UP_TLS#dns.test" --max-tcp-connections 5000 \
    --max-tcp-connections-per-client 5000 --log-level warn
done
sleep 4
for name in upstream before after; do alive "$name" || die "$name did not start (see $TMP/$name.log)"; done

python3 - "$TMP" <<'EOF'
import base64, struct, sys
q = struct.pack(">HHHHHH", 0, 0x0100, 1, 0, 0, 0)
for label in "n1.bench.test".split("."):
    q += bytes([len(label)]) + label.encode()
q += b"\0" + struct.pack(">HH", 1, 1)
open(sys.argv[1] + "/q.bin", "wb").write(q)
open(sys.argv[1] + "/q.b64", "w").write(base64.urlsafe_b64encode(q).decode().rstrip("="))
EOF
B64="$(cat "$TMP/q.b64")"

RESULT="$REPO/bench/results/doh-writes-$(date -u +%Y%m%dT%H%M%SZ).md"
mkdir -p "$REPO/bench/results"
{
  echo "# DoH writes benchmark $(date -u +%FT%TZ): before ($BEFORE_REV) and after, one run"
  echo
  echo "h2load on core $LOAD_CORE, dotproxy on core $PROXY_CORE, cached answers (noisy shared machine)."
  echo
  echo "| listener | protocol | method | phase | build | req/s | mean ms per request |"
  echo "| -------- | -------- | ------ | ----- | ----- | ----: | ------------------: |"
} >"$RESULT"

# Runs h2load; prints "req/s mean-ms".
load() {
  local out
  out=$(taskset -c "$LOAD_CORE" timeout 120 h2load "$@" 2>&1) || true
  awk '/finished in/ { rps = int($4) } /^time for request:/ { m = $6 }
    END { if (m ~ /ms$/) { sub(/ms$/, "", m) } else if (m ~ /us$/) { sub(/us$/, "", m); m = m / 1000 }
      else if (m ~ /s$/) { sub(/s$/, "", m); m = m * 1000 }; printf "%s %s\n", rps + 0, m }' <<<"$out"
}

for ((round = 1; round <= ${ROUNDS:-1}; round++)); do
for listener in tls plain; do
  for protocol in h2 h1; do
    [[ $listener == plain && $protocol == h1 ]] && continue
    for method in GET POST; do
      for phase in seq conn load; do
        for build in before after; do
          [[ -n ${ONLY:-} && "$listener $protocol $method $phase" != $ONLY ]] && continue
          if [[ $listener == tls ]]; then base="https://127.0.0.1:${TLS_PORT[$build]}"
          else base="http://127.0.0.1:${PLAIN_PORT[$build]}"; fi
          args=()
          [[ $protocol == h1 ]] && args+=(--h1)
          if [[ $method == GET ]]; then url="$base/dns-query?dns=$B64"
          else
            url="$base/dns-query"
            args+=(-d "$TMP/q.bin" -H "content-type: application/dns-message")
          fi
          case $phase in
            seq) args+=(-n 500 -c 1 -m 1) ;;
            conn) args+=(-n 200 -c 200 -m 1 -r 20 --rate-period 100ms) ;;
            load) args+=(-n 20000 -c 10 -m "$([[ $protocol == h2 ]] && echo 10 || echo 1)") ;;
          esac
          read -r rps mean < <(load "${args[@]}" "$url")
          log "$listener $protocol $method $phase $build: $rps req/s, mean $mean ms"
          echo "| $listener | $protocol | $method | $phase | $build | $rps | $mean |" >>"$RESULT"
        done
      done
    done
  done
done
done
cat "$RESULT"
