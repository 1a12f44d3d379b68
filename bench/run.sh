#!/usr/bin/env bash
# The benchmarks, against podman itself on this machine; figures go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
exec .venv/bin/python bench/run.py "$@"
