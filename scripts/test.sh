#!/usr/bin/env bash
# Runs every test on a fresh Debian machine: installs what the tests need, then the
# workspace's unit, property and integration tests (the real binary, real files, the real eBPF
# probe when root), and whatever extra suites the repo holds (deploy checks, bench --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need=()
# faketime: the clock-jump tests preload libfaketime.
for pkg in clang llvm libbpf-dev zstd curl faketime; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "test.sh: missing packages ${need[*]} (run as root to install them)" >&2
  fi
fi
# The sinks' tests: cmake and curl headers for librdkafka, Debian's ClickHouse server.
if [ "$(id -u)" = 0 ]; then
  bash tests/scripts/sink-deps.sh
fi
for extra in scripts/test.d/*.sh; do
  [ -e "$extra" ] && { echo "== $extra (setup)"; bash "$extra" setup; }
done
echo "== cargo test --workspace"
cargo test --workspace --no-fail-fast 2>&1
for extra in scripts/test.d/*.sh; do
  [ -e "$extra" ] && { echo "== $extra"; bash "$extra" run; }
done
echo "test.sh: all suites passed"
