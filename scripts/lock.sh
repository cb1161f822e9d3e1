#!/usr/bin/env bash
# Refresh requirements/lock.txt: every dependency of loopfit and its extras dev, eval and trl, resolved together at the
# newest versions pyproject.toml allows, for Python 3.11 on linux x86_64, by `uv pip compile` (never edit it by hand).
# `bash scripts/lock.sh peers` refreshes requirements/peers-lock.txt instead, the set benchmarks/run_peers.sh installs:
# loopfit with its trl extra and requirements/peers.in (torchtune, torchao), with requirements/lock.txt's versions as
# constraints (refresh the main lock first), so the peers run against the very versions loopfit is tested with.
# torch is not in the lock: it is resolved as exactly requirements/torch.txt (an override) and left out of the output;
# setup.sh installs it first. No nvidia-*, cuda-* or triton package may end up in the lock: the script fails if one
# does. They come from the PyPI torch wheel's metadata; the local CPU wheel in $PIP_FIND_LINKS (passed to uv as
# --find-links) has none. Extra arguments go to uv, e.g. `bash scripts/lock.sh --exclude-newer 2026-06-01`.
# uv is installed with pip into a throwaway venv under $TMPDIR (or /tmp), not into the project's venvs.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.9
if [ "${1:-}" = peers ]; then
  shift
  LOCK=requirements/peers-lock.txt
  inputs=(pyproject.toml requirements/peers.in --extra trl -c requirements/lock.txt)
  command="bash scripts/lock.sh peers"
  needs=(transformers trl torchtune torchao)
else
  LOCK=requirements/lock.txt
  inputs=(pyproject.toml --extra dev --extra eval --extra trl)
  command="bash scripts/lock.sh"
  needs=(transformers)
fi
tool=${TMPDIR:-/tmp}/loopfit-uv-$UV_VERSION
if [ ! -x "$tool/bin/uv" ]; then
  rm -rf "$tool"
  python3 -m venv "$tool"
  "$tool/bin/python" -m pip install -q "uv==$UV_VERSION" >"$tool/pip.log" 2>&1 || { cat "$tool/pip.log" >&2; exit 1; }
fi
links=()
for d in ${PIP_FIND_LINKS:-}; do links+=(--find-links "$d"); done
[ ${#links[@]} -gt 0 ] || echo "lock.sh: PIP_FIND_LINKS is not set; uv sees only the PyPI torch wheel" >&2
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
"$tool/bin/uv" pip compile "${inputs[@]}" \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
  --override requirements/torch.txt --no-emit-package torch -c requirements/lock-constraints.txt \
  "${links[@]}" --upgrade --quiet --custom-compile-command "$command" -o "$tmp" "$@"
if bad=$(grep -E '^(nvidia-|cuda-|triton)' "$tmp"); then
  echo "lock.sh: CUDA packages in the resolution (the PyPI torch wheel's, not the CPU one's); $LOCK left as it was:" >&2
  echo "$bad" >&2
  echo "lock.sh: set PIP_FIND_LINKS to a folder holding the torch $(sed -n "s/^torch==//p" requirements/torch.txt)+cpu wheel" >&2
  exit 1
fi
for n in "${needs[@]}"; do
  grep -q "^$n==" "$tmp" || { echo "lock.sh: no $n in the resolution?" >&2; exit 1; }
done
{ head -2 "$tmp"; echo "# For Python 3.11, linux x86_64. torch is not here: scripts/setup.sh installs requirements/torch.txt first."; tail -n +3 "$tmp"; } >"$LOCK"
echo "lock.sh: wrote $LOCK ($(grep -c '^[a-z0-9]' "$LOCK") packages):"
shown='transformers|peft|datasets|lm-eval|trl|accelerate|huggingface-hub|tokenizers|torchtune|torchao'
grep -E "^($shown)==" "$LOCK" | tr '\n' ' '
echo
