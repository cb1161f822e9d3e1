#!/usr/bin/env bash
# Set up a fresh machine and run the main job: `loopfit demo` on the embedded SmolLM2-135M-Instruct and the built-in
# arithmetic word problems (about 20 minutes on 2 CPU cores). Extra flags go to `loopfit demo`, e.g.
#   bash scripts/main.sh --budget_minutes 5 --out runs/quick
# An interrupted demo resumes where it stopped when rerun with the same --out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/loopfit demo --out runs/demo "$@"  # the venv setup.sh made, never a system install
prev=""
for a in "$@"; do case $prev in --out) OUT_DIR=$a;; esac; prev=$a; done
cat "${OUT_DIR:-runs/demo}/report.md"
