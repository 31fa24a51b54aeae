#!/usr/bin/env bash
# Installs Debian's clickhouse-server for the clickhouse sink tests (they start their own server
# on loopback, with their own config, ports and data directory, and stop it afterwards).
# Usage: tests/scripts/clickhouse.sh   (as root; CI runs it from .ci/run)
set -euo pipefail
if [ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq clickhouse-server >/dev/null
