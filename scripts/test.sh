#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then lints, type-checks and runs the tests.
# The tests start their own registry and use the real podman, each with private storage.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
.venv/bin/pytest -q "$@"
