#!/usr/bin/env bash
# The main job on the embedded default: 8 "pods" write nginx lines into pod-style directories
# under ./demo/logs (as on a shared volume), one voltail collects them into a zstd file sink
# under ./demo/data/out, with its checkpoint in ./demo/data. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p voltail
export VOLTAIL_DEMO="$PWD/demo"
mkdir -p "$VOLTAIL_DEMO/logs"
bin=target/release/voltail
"$bin" check --config deploy/local/voltail.toml >/dev/null
"$bin" generate --dir "$VOLTAIL_DEMO/logs" --pods 8 --rate 50 --rotate-bytes 4000000 &
gen=$!
trap 'kill $gen 2>/dev/null || true' EXIT
cat <<TEXT
voltail demo: 8 pods write to $VOLTAIL_DEMO/logs/nginx/*/access.log (50 lines/s each)
  metrics:     curl -s localhost:9464/metrics | grep ^voltail_
  checkpoint:  $bin checkpoint --config deploy/local/voltail.toml
  output:      zstd -dc $VOLTAIL_DEMO/data/out/*.zst | tail -n 3
Ctrl-C to stop.
TEXT
"$bin" run --config deploy/local/voltail.toml
