#!/usr/bin/env bash
# tests/deploy/image-build.sh: builds deploy/Dockerfile for real with podman, without pulling
# from any registry, and checks the image it makes.
#
# The Dockerfile's two base images are stood in for by local images of the same names, both
# made from a debootstrap'ed Debian bookworm (see kube-play.sh, which makes
# localhost/debian-rootfs:bookworm):
#   docker.io/library/debian:bookworm-slim       = that root filesystem;
#   docker.io/library/rust:<ver>-slim-bookworm   = that + gcc/libc6-dev (apt) + the host's Rust
#                                                  toolchain, bind-mounted read-only at build time.
# Everything in the Dockerfile then runs as written: apt-get in both stages, the cargo build with
# cache mounts, the non-root user, tini as the entrypoint.
#
# Crates: where crates.io is reached only through a TLS-intercepting proxy whose CA the build
# container does not trust (this sandbox: "SSL certificate problem: self-signed certificate in
# certificate chain" from index.crates.io), the script vendors the crates on the host
# (`cargo vendor`) and builds from a copy of the repository's tracked files plus a
# .cargo/config.toml that replaces crates.io with that vendor directory. The Dockerfile itself
# is built unchanged. VOLTAIL_IMAGE_ONLINE=1 skips that and lets cargo fetch in the container.
#
# Needs root and the Debian mirror (apt-get in the Dockerfile). Takes ~6-10 min (a release
# build of voltail inside the container on 2 cores).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${VOLTAIL_KP_WORK:-/var/tmp/voltail-kube-play}"
start=$SECONDS
say() { printf '[image-build %3ss] %s\n' "$((SECONDS - start))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

export CONTAINERS_CONF="$WORK/containers.conf"
if ! podman image exists localhost/debian-rootfs:bookworm || [ ! -f "$CONTAINERS_CONF" ]; then
  die "run tests/deploy/kube-play.sh first (it makes the Debian base image and containers.conf)"
fi

toolchain="$(rustc --print sysroot)"
rust_version="$(rustc --version | awk '{split($2, v, "."); print v[1] "." v[2]}')"
podman tag localhost/debian-rootfs:bookworm docker.io/library/debian:bookworm-slim

if ! podman image exists "docker.io/library/rust:${rust_version}-slim-bookworm"; then
  say "making docker.io/library/rust:${rust_version}-slim-bookworm (gcc + the host toolchain $toolchain)"
  mkdir -p "$WORK/rust-image"
  cat >"$WORK/rust-image/Containerfile" <<'CF'
FROM localhost/debian-rootfs:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/cargo/bin \
 && for b in cargo rustc rustdoc; do ln -s "/opt/rust/bin/$b" "/usr/local/cargo/bin/$b"; done
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CF
  podman build -q --pull=never -t "docker.io/library/rust:${rust_version}-slim-bookworm" "$WORK/rust-image" >/dev/null \
    || die "building the stand-in rust image"
fi

context="$REPO"
if [ "${VOLTAIL_IMAGE_ONLINE:-0}" != 1 ]; then
  context="$WORK/context"
  rm -rf "$context" && mkdir -p "$context/.cargo"
  (cd "$REPO" && git ls-files -z | xargs -0 cp --parents -t "$context")
  say "cargo vendor (host) into the build context"
  (cd "$context" && cargo vendor -q --locked vendor) || die "cargo vendor"
  printf '[source.crates-io]\nreplace-with = "vendored"\n[source.vendored]\ndirectory = "vendor"\n' \
    >"$context/.cargo/config.toml"
fi
say "podman build -f deploy/Dockerfile (RUST_VERSION=$rust_version)"
podman build --pull=never --build-arg "RUST_VERSION=$rust_version" \
  -v "$toolchain:/opt/rust:ro" \
  -f "$REPO/deploy/Dockerfile" -t localhost/voltail:dockerfile "$context" >"$WORK/image-build.log" 2>&1 \
  || { tail -30 "$WORK/image-build.log"; die "podman build"; }

user="$(podman inspect -f '{{.Config.User}}' localhost/voltail:dockerfile)"
entry="$(podman inspect -f '{{json .Config.Entrypoint}}' localhost/voltail:dockerfile)"
size="$(podman image inspect -f '{{.Size}}' localhost/voltail:dockerfile)"
say "image: user $user, entrypoint $entry, $((size / 1024 / 1024)) MiB"
[ "$user" = 65532:65532 ] || die "image user is '$user'"
podman run --rm localhost/voltail:dockerfile --version || die "voltail --version in the image"
podman run --rm -v "$REPO/deploy/kubernetes/components/collector-config:/etc/voltail:ro" \
  -e VOLTAIL_SHARD=0/1 localhost/voltail:dockerfile check --config /etc/voltail/voltail.toml >/dev/null \
  || die "voltail check in the image"
podman run --rm --entrypoint /bin/ls localhost/voltail:dockerfile /etc/ssl/certs/ca-certificates.crt >/dev/null \
  || die "no CA certificates in the image"
# The eBPF probe must be compiled in (clang + libbpf-dev in the build stage). Unprivileged,
# `probe = "on"` must then fail for lack of privileges, not with "compiled out".
mkdir -p "$WORK/probe-check"
cat >"$WORK/probe-check/voltail.toml" <<'TOML'
data_dir = "/tmp/voltail"
probe = "on"
[metrics]
address = ""
[[sources]]
name = "none"
include = ["/tmp/none/*.log"]
[sink]
type = "file"
path = "/tmp/voltail/out"
TOML
probe_rc=0
probe_out="$(timeout 30 podman run --rm -v "$WORK/probe-check:/etc/voltail:ro" localhost/voltail:dockerfile \
  run --config /etc/voltail/voltail.toml 2>&1)" || probe_rc=$?
if grep -qi 'compiled out\|not compiled in' <<<"$probe_out"; then
  die "the eBPF probe is compiled out of the image: $(tail -3 <<<"$probe_out")"
fi
if [ "$probe_rc" = 0 ] || [ "$probe_rc" = 124 ] || ! grep -qi probe <<<"$probe_out"; then
  die "unprivileged probe = \"on\" should refuse to start naming the probe (exit $probe_rc): $(tail -3 <<<"$probe_out")"
fi
say "probe compiled in; unprivileged probe = \"on\" says: $(grep -i probe <<<"$probe_out" | tail -1 | cut -c1-160)"
say "PASS in $((SECONDS - start))s"
