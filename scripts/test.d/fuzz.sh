#!/usr/bin/env bash
# The cargo-fuzz targets in fuzz/: `setup` installs cargo-fuzz when missing, `run` fuzzes each
# target for FUZZ_SECONDS (default 5) from the seed corpus kept in fuzz/corpus/<target>/.
# libFuzzer writes what it finds into a scratch copy of the corpus, so the repo only changes
# when someone copies an interesting input in. A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/; turn it into a regression test in the normal suite.
# Long local runs: FUZZ_SECONDS=14400 scripts/test.d/fuzz.sh run [target...]
set -euo pipefail
cd "$(dirname "$0")/../.."
# In CI each target runs FUZZ_SECONDS (default 5) from the corpus. The build is the cost:
# voltail without the kafka feature (no librdkafka) and without a sanitizer (libFuzzer still
# catches every panic; FUZZ_SANITIZER=address for the C dependencies' memory errors) took 3m38s
# on the quiet 2-core VM. VOLTAIL_FUZZ=0 skips it.
if [ "${VOLTAIL_FUZZ:-1}" = 0 ]; then
  echo "fuzz.sh ${1:-}: skipped (VOLTAIL_FUZZ=0)"
  exit 0
fi
san="${FUZZ_SANITIZER:-none}"
targets=(framing checkpoint_load config_parse ndjson_encoder http_encoder clickhouse_encoder
  elasticsearch_encoder loki_request sls_groups)
case "${1:-}" in
  setup)
    if ! rustup toolchain list | grep -q '^nightly'; then
      rustup toolchain install nightly --profile minimal
    fi
    if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
      cargo install --locked cargo-fuzz
    fi
    ;;
  run)
    shift
    [ $# -gt 0 ] && targets=("$@")
    secs="${FUZZ_SECONDS:-5}"
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    for t in "${targets[@]}"; do
      echo "== fuzz $t for ${secs}s"
      mkdir -p "$scratch/$t"
      cp -r "fuzz/corpus/$t/." "$scratch/$t/"
      if cargo +nightly fuzz run --fuzz-dir fuzz -s "$san" "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -n 6 "$scratch/$t.log"
      else
        grep -A8 -m1 'panicked at' "$scratch/$t.log" || tail -n 60 "$scratch/$t.log"
        echo "fuzz.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
      fi
    done
    ;;
  *)
    echo "usage: $0 setup|run [target...]" >&2
    exit 2
    ;;
esac
