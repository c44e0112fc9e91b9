#!/usr/bin/env bash
# Build the dotproxy release binaries into dist/ and write dist/SHA256SUMS.
#
#   scripts/release.sh                            # every release target
#   scripts/release.sh x86_64-unknown-linux-gnu   # only the targets named
#
# Each binary is `deno compile`d with the same permissions as `deno task compile`: network
# (listen + dial upstreams) and environment (configuration), nothing else. deno compile
# downloads the Deno runtime for each target, so this needs access to Deno's download host.
# Users check a download with `sha256sum -c --ignore-missing SHA256SUMS` in its directory.
set -euo pipefail

readonly ALL_TARGETS=(
  x86_64-unknown-linux-gnu
  aarch64-unknown-linux-gnu
  x86_64-apple-darwin
  aarch64-apple-darwin
  x86_64-pc-windows-msvc
)
readonly DIST=dist

die() {
  echo "release.sh: $*" >&2
  exit 1
}

# Print "HASH  NAME" lines like GNU sha256sum (macOS has only shasum).
sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum -- "$@"
  elif command -v shasum >/dev/null 2>&1; then
    shasum -a 256 -- "$@"
  else
    die "neither sha256sum nor shasum is installed"
  fi
}

main() {
  local root
  root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
  cd -- "${root}"

  command -v deno >/dev/null 2>&1 || die "deno is not installed"
  [[ -f main.ts ]] || die "main.ts not found in ${root}"

  local targets=("$@")
  if [[ ${#targets[@]} -eq 0 ]]; then
    targets=("${ALL_TARGETS[@]}")
  fi
  local target known t
  for target in "${targets[@]}"; do
    known=false
    for t in "${ALL_TARGETS[@]}"; do
      [[ "${target}" == "${t}" ]] && known=true
    done
    "${known}" || die "unknown target '${target}' (known: ${ALL_TARGETS[*]})"
  done

  rm -rf -- "${DIST}"
  mkdir -p -- "${DIST}"

  local out
  local outputs=()
  for target in "${targets[@]}"; do
    out="${DIST}/dotproxy-${target}"
    if [[ "${target}" == *windows* ]]; then
      out="${out}.exe"
    fi
    echo "==> ${out}" >&2
    # V8 heap flags as in the Dockerfile: a small young generation, and an old generation capped
    # at 160 MiB, sized for a 256 MiB memory limit (deploy/kubernetes/deployment.yaml).
    deno compile --allow-net --allow-env --unstable-net --v8-flags=--max-semi-space-size=2,--max-old-space-size=160 --target "${target}" --output "${out}" main.ts
    [[ -f "${out}" ]] || die "deno compile did not write ${out}"
    outputs+=("${out#"${DIST}/"}")
  done

  # Names in SHA256SUMS are relative to dist/, so `sha256sum -c` works next to the downloads.
  (cd -- "${DIST}" && sha256 "${outputs[@]}" >SHA256SUMS)
  echo "==> ${DIST}/SHA256SUMS" >&2
  cat -- "${DIST}/SHA256SUMS"
}

main "$@"
