#!/usr/bin/env bash
# Set up and run the whole test suite (what CI runs). pytest's exit 5 (no tests ran) is a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check src tests benchmarks scripts
python3 -m ruff format --check src tests benchmarks scripts
python3 -m pytest tests -q --durations=10 "$@"
