#!/usr/bin/env bash
# Set up a fresh machine and run the main job on the embedded SmolLM2-135M-Instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-runs/main}
rm -rf "$OUT/smol-4-6-4"
loopfit convert smollm2-135m --out "$OUT/smol-4-6-4" --prelude 4 --block 6 --coda 4
for R in 1 2 4; do
  loopfit generate "$OUT/smol-4-6-4" --prompt "What is the capital of France?" --num_steps $R --chat=true --max_new_tokens 24
done
