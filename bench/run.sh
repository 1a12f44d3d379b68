#!/usr/bin/env bash
# The benchmarks, against podman itself on this machine; figures go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
[ -x /usr/bin/time ] || apt-get install -y -qq time >/dev/null  # peak memory of each command
exec .venv/bin/python bench/run.py "$@"
