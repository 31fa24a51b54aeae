#!/usr/bin/env bash
# scripts/test.sh hook: the offline checks of deploy/ (hadolint, yamllint, shellcheck,
# kustomize, kubernetes-validate, CRD schemas, `voltail check` on the ConfigMap's config).
# setup: install the tools (pip virtualenv, shellcheck) so `run` is quick; run: the checks,
# with the voltail binary that `cargo test` just built.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-run}" in
  setup) bash deploy/check.sh --tools-only ;;
  run) bash deploy/check.sh ;;
  *) echo "usage: $0 setup|run" >&2; exit 2 ;;
esac
