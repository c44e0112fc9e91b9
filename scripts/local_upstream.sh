#!/usr/bin/env bash
# A DNS-over-TLS upstream on loopback for trying dotproxy without the internet: writes an
# Unbound configuration that serves DoT on 127.0.0.1 with the test certificate from
# tests/fixtures/ (valid for dns.test, signed by the test CA) and a small local zone,
# prints the dotproxy command that uses it, and runs Unbound in the foreground until Ctrl-C.
#
#   scripts/local_upstream.sh [PORT]        # default port 8853
#   scripts/local_upstream.sh --print-only  # write the configuration and print, do not run
#
# The test keys protect nothing but loopback: never use them anywhere else.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
port=8853
run=1
for arg in "$@"; do
  case "$arg" in
    --print-only) run=0 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *[!0-9]* | "") echo "local_upstream: unknown argument '$arg' (PORT or --print-only)" >&2; exit 2 ;;
    *) port="$arg" ;;
  esac
done

if ! command -v unbound >/dev/null 2>&1; then
  echo "local_upstream: unbound is not installed (Debian/Ubuntu: sudo apt-get install unbound)" >&2
  exit 1
fi

dir="${TMPDIR:-/tmp}/dotproxy-local-upstream-$(id -u)-$port"
mkdir -p "$dir"
cp "$repo/tests/fixtures/server.pem" "$repo/tests/fixtures/server.key" "$dir/"
chmod 600 "$dir/server.key"
cat >"$dir/unbound.conf" <<CONF
# Written by scripts/local_upstream.sh: DNS over TLS on 127.0.0.1:$port. It answers from the
# local zone "dotproxy.test" and REFUSES every other name at once (no internet needed).
server:
  interface: 127.0.0.1@$port
  tls-port: $port
  tls-service-key: "$dir/server.key"
  tls-service-pem: "$dir/server.pem"
  username: ""
  chroot: ""
  directory: "$dir"
  pidfile: "$dir/unbound.pid"
  do-daemonize: no
  use-syslog: no
  verbosity: 1
  num-threads: 1
  module-config: "iterator"
  local-zone: "." refuse
  local-zone: "dotproxy.test." static
  local-data: 'dotproxy.test. 300 IN SOA ns.dotproxy.test. admin.dotproxy.test. 1 3600 600 86400 60'
  local-data: 'www.dotproxy.test. 300 IN A 192.0.2.10'
  local-data: 'www.dotproxy.test. 300 IN AAAA 2001:db8::10'
  local-data: 'mail.dotproxy.test. 300 IN MX 10 www.dotproxy.test.'
  local-data: 'txt.dotproxy.test. 300 IN TXT "hello from the local upstream"'
remote-control:
  control-enable: no
CONF

unbound-checkconf "$dir/unbound.conf" >/dev/null

cat <<MSG
Unbound configuration: $dir/unbound.conf
DoT upstream:          127.0.0.1:$port, certificate for dns.test (test CA: tests/fixtures/ca.pem)

In another terminal, from $repo:

  DOTPROXY_CA_CERTS="\$(cat tests/fixtures/ca.pem)" deno task start --upstream 127.0.0.1:$port#dns.test

and then:

  dig @127.0.0.1 -p 5300 www.dotproxy.test
MSG

if [ "$run" -eq 1 ]; then
  echo
  echo "Starting unbound in the foreground (Ctrl-C stops it)..."
  exec unbound -d -c "$dir/unbound.conf"
fi
