#!/usr/bin/env bash
# System packages CI needs beyond Python: Debian's `prometheus` package, which provides the
# `prometheus` server and `promtool` that tests/docker/ run (config/rule checks, alert unit
# tests, the live scrape test). Idempotent: does nothing when both are already on PATH.
# Under CI=true those tests fail rather than skip when the binaries are missing.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    echo "install-system-deps: prometheus already installed"
else
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-system-deps: need root for apt-get (run as root or install 'prometheus')" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # The package's postinst tries to start a systemd service; in a container policy-rc.d
    # denies it, which is harmless: the tests start their own server on loopback.
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -n 1
prometheus --version 2>&1 | head -n 1
