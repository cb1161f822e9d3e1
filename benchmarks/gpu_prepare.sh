#!/usr/bin/env bash
# Prepare, on this (CPU) machine, what benchmarks/gpu_checks.sh needs on a lent GPU machine that reaches no registry:
#   .whl/  the pinned wheels its image lacks (for its Python 3.12, x86-64), versions as requirements/lock.txt has them
#   .gpu/  SmolLM2's tokenizer and config (needs the GGUF: the loopfit venv) and 400 kB of text
# Both folders are ignored by git (listed in .git/info/exclude here); carry them with the run: carry [".whl", ".gpu"].
# Usage: bash benchmarks/gpu_prepare.sh [PYTHON]   (PYTHON: a loopfit venv's python, default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
pin() { grep -i "^$1==" requirements/lock.txt | head -n1; }  # NAME==VERSION as locked
pkgs=()
for p in transformers huggingface-hub httpx2 httpcore2 truststore idna anyio h11 kernels tomlkit peft jsonargparse \
         docstring-parser typeshed-client click regex; do
  spec=$(pin "$p")
  [ -n "$spec" ] || { echo "gpu_prepare: $p is not in requirements/lock.txt" >&2; exit 1; }
  pkgs+=("$spec")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
mkdir -p .gpu
"$py" -m benchmarks.random_source --tokenizer_out .gpu/tok
text=../shared/data/text/tinyshakespeare.txt
if [ -f "$text" ]; then head -c 400000 "$text" > .gpu/text.txt; else
  "$py" -c "print(('The quick brown fox jumps over the lazy dog. ' * 20 + '\n') * 400)" > .gpu/text.txt; fi
du -sh .whl .gpu
