# syntax=docker/dockerfile:1
#
# dotproxy container image: a DNS (UDP+TCP) to DNS-over-TLS proxy.
#
#   docker build -t ghcr.io/dotproxy/dotproxy:0.1.0 --build-arg VERSION=0.1.0 .
#   docker run --rm -p 127.0.0.1:53:5300/udp -p 127.0.0.1:53:5300/tcp \
#     -p 127.0.0.1:5380:5380 ghcr.io/dotproxy/dotproxy:0.1.0
#
# Stage 1 compiles the proxy into one self-contained executable with the official Deno image.
# Stage 2 copies only that executable onto distroless (glibc + libgcc, no shell, no package
# manager) and runs it as the unprivileged user 65532.
#
# The base images are pinned by tag. For release builds pin them by digest as well
# (e.g. `FROM denoland/deno:2.9.6@sha256:...`), so that a rebuild uses byte-identical bases.
#
# Multi-platform: `docker buildx build --platform linux/amd64,linux/arm64 .` (the release
# workflow, .github/workflows/release.yml, does this). The build stage always runs on the
# builder's own platform and cross-compiles with `deno compile --target` for TARGETARCH, so no
# emulation (QEMU) is needed; only the final stage, which runs nothing, is per platform.

FROM --platform=$BUILDPLATFORM denoland/deno:2.9.6 AS build
ARG TARGETARCH
WORKDIR /app
# Only what `deno compile` needs; .dockerignore keeps everything else out of the context.
COPY deno.json deno.lock main.ts ./
COPY src/ ./src/
# The same permissions as `deno task compile`: network (listen + dial upstreams) and
# environment (configuration). Nothing else: the proxy reads no files.
# V8 heap: a small young generation (latency, see bench/README.md) and an old generation capped
# at 160 MiB, sized for the 256 MiB memory limit of deploy/kubernetes/deployment.yaml: V8 then
# collects before the container is OOM-killed, leaving ~90 MiB for code, stacks, TLS and
# socket buffers. Keep scripts/release.sh in step.
RUN case "${TARGETARCH}" in \
      amd64) target=x86_64-unknown-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu ;; \
      "") target="" ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac && \
    deno compile --allow-net --allow-env --unstable-net \
      --v8-flags=--max-semi-space-size=2,--max-old-space-size=160 \
      ${target:+--target "${target}"} --output /out/dotproxy main.ts

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="dotproxy" \
      org.opencontainers.image.description="DNS to DNS-over-TLS proxy (UDP and TCP in, TLS out)" \
      org.opencontainers.image.source="https://github.com/dotproxy/dotproxy" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/dotproxy /dotproxy
# Container conventions: listen on all interfaces, IPv6 and (dual-stack) IPv4, on the
# unprivileged port 5300 (UDP and TCP),
# serve /metrics, /healthz, /readyz and /healthz/upstreams on 5380, log JSON lines to stderr.
# DOTPROXY_CONTAINER: Docker runs the HEALTHCHECK below with this environment but without the
# arguments given after the image name, so --listen, --http and --allow are refused as flags
# (exit 2, naming the variable to set instead: `docker run -e DOTPROXY_LISTEN=...`) and the
# check always looks where the server serves. Other settings may still be flags.
ENV DOTPROXY_LISTEN=[::]:5300 \
    DOTPROXY_HTTP=[::]:5380 \
    DOTPROXY_LOG_FORMAT=json \
    DOTPROXY_CONTAINER=true
# nonroot:nonroot is 65532:65532 in the distroless image.
USER nonroot:nonroot
EXPOSE 5300/udp 5300/tcp 5380/tcp
# Exec form: there is no shell. `dotproxy healthcheck` reads the same env as the server: it asks
# the DNS listener (DOTPROXY_LISTEN, [::] mapped to [::1]) for version.bind CH TXT, which
# only dotproxy answers as dotproxy, and GET /readyz on DOTPROXY_HTTP; it exits 0 or 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/dotproxy", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/dotproxy"]
