#!/usr/bin/env bash
# Install redis-server (used by tests/serve/test_store.py's Redis backend tests) when it is absent.
# Idempotent: does nothing when `redis-server` is already on PATH. Needs root or sudo for apt.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server present: $(redis-server --version | head -n1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_redis.sh: need root (or sudo) to apt-get install redis-server" >&2; exit 1; fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_redis.sh: no apt-get here; install redis-server with your package manager" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
# The package may start a system service on 6379; the tests start their own server on a free
# port and do not need it.
echo "installed: $(redis-server --version | head -n1)"
