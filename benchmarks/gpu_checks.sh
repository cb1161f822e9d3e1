#!/usr/bin/env bash
# Issue 22's GPU checks in one run on a lent GPU machine (no registry there): the CUDA tests (CUDA-graph decoding,
# the compiled fused-loss kernel), then the benchmarks, each result under $OUT (default /tmp/gpu-checks).
#
# Prepared here, carried there (both ignored by git): `bash benchmarks/gpu_prepare.sh` writes
#   .whl/  the pinned wheels the GPU image lacks (transformers 5.25, huggingface_hub 2.4, peft 0.21.2, ...)
#   .gpu/  tok/ (SmolLM2's tokenizer and config) and text.txt (the first 400 kB of tiny-shakespeare)
# then, through the device tool: run command "OUT=$OUT bash benchmarks/gpu_checks.sh", carry [".whl", ".gpu"],
# timeout_s 590.
# The model is SmolLM2-shaped with random weights (benchmarks/random_source.py): speed does not depend on them.
set -u
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG=$OUT/log.txt  # one log: the device tool brings back at most 8 files
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$LOG"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__)" | tee -a "$LOG"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log under $OUT, never stop the script
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 30
  echo "exit ${PIPESTATUS[0]} after $SECONDS s total" | tee -a "$LOG"
}

# Limits: ~500 s in all, inside the device tool's 600 s per command (with the wheels' install and imports).
step tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_graphed.py tests/test_losses_fused.py \
  -k "cuda and not autocast"
step source 30 python3 -m benchmarks.random_source --tokenizer .gpu/tok --out /tmp/smol-rand
step decoding 100 python3 -m benchmarks.graphed_decoding --source /tmp/smol-rand --repeats 2 \
  --out "$OUT/graphed_decoding_cuda.json"
step train 170 python3 -m benchmarks.train_throughput --device cuda --source /tmp/smol-rand --data .gpu/text.txt \
  --batch_size 16 --seq_len 1024 --precisions bf16 --compile --steps 5 --warmup 2 \
  --out "$OUT/train_throughput_cuda.json"
step kd_loss 70 python3 benchmarks/kd_loss.py --device cuda --ns 8192 --dtypes bfloat16 float32 \
  --methods floor fused --chunk_size 2048 --repeats 10 --rounds 10 --out "$OUT/kd_loss_cuda.json"
step kd_loss_eager 40 env LOOPFIT_COMPILED_LOSS=0 python3 benchmarks/kd_loss.py --device cuda --ns 8192 \
  --dtypes bfloat16 --methods floor fused --chunk_size 2048 --repeats 10 --rounds 10 \
  --out "$OUT/kd_loss_cuda_eager.json"
# Last, so that a slow compile here cannot cost the results above: the fused loss under bf16 autocast on CUDA.
step autocast_tests 45 python3 -m pytest -q -p no:cacheprovider tests/test_losses_fused.py -k "cuda and autocast"
echo "=== done after $SECONDS s"
