#!/usr/bin/env bash
# Installs what the sinks need beyond Rust, as root (CI runs it from .ci/run):
#  - cmake, a C/C++ compiler and the curl headers: the kafka feature builds librdkafka from source
#    (librdkafka 2.12's cmake build includes curl.h even with curl off), and the OpenSSL headers
#    (pkg-config + libssl-dev) for the kafka sink's TLS (rdkafka's `ssl` feature);
#  - clickhouse-server: the clickhouse sink tests start their own server on loopback, with their
#    own config, ports and data directory, and stop it afterwards.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
[ -e /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -e /usr/include/curl/curl.h ] || need+=(libcurl4-openssl-dev)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
[ -x /usr/sbin/clickhouse-server ] || command -v clickhouse-server >/dev/null 2>&1 || need+=(clickhouse-server)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${need[@]}" >/dev/null
