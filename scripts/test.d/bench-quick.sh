#!/usr/bin/env bash
# `cargo xtask bench --quick`: every workload at CI size, so the bench never rots. Fails only
# when a line was lost or duplicated or voltail crashed, never on timing. W4 mounts FUSE and is
# skipped (with a note) where that needs root or /dev/fuse and neither is there.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-run}" in
  setup) ;;
  run) cargo xtask bench --quick ;;
  *) echo "usage: $0 setup|run" >&2; exit 2 ;;
esac
