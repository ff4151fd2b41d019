#!/usr/bin/env bash
# The GPU check of issue 20, one prepared run of at most ~8 minutes on one H200 (bf16, random weights at the paper's
# geometry). Run from the repository root: `OUT=/some/dir bash scripts/gpu_check.sh` (the device tool sets $OUT).
# Each step writes its table to $OUT as soon as it finishes, most important first, so a run cut short keeps what
# it measured. Tables: ratios against vanilla measured side by side in the same run.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-470}))  # the whole check stays within 8 minutes
step() {  # step NAME SECONDS ARGS...: one command, its table in $OUT/NAME.md, its JSON in $OUT/NAME.json
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)); shift 2
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name skipped: the 8 minutes are spent" | tee -a "$OUT/log.txt"; return; fi
  echo "== $name ($(date +%T), at most ${limit} s)" | tee -a "$OUT/log.txt"
  timeout "$limit" python3 -m skipvision "$@" --out "$OUT/$name.json" > "$OUT/$name.md" 2>> "$OUT/log.txt"
  echo "   exit $? ($(date +%T))" | tee -a "$OUT/log.txt"
  cat "$OUT/$name.md"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$OUT/device.txt"
# 1. the paper's latency protocol at batch 1 (256 new tokens), dynamic cache, with a decode profile per variant
step latency_llava_b1_dynamic 100 bench --preset llava-1.5-7b --device cuda --dtypes bf16 --latency --batch-sizes 1 \
  --new-tokens 256 --repeats 1 --caches dynamic --profile
# 2. prefill, decode and train step at batch 1 and 8 (time / FLOPs), and the op counts at the paper's 32 layers
step bench_llava 100 bench --preset llava-1.5-7b --device cuda --dtypes bf16 --batch-sizes 1 8 --repeats 3
step ops_llava 45 bench --preset llava-1.5-7b --device cuda --dtypes bf16 --count-ops --batch-sizes 1 8
# 3. batch 1, static cache (HF compiles the decode step: the first round also compiles)
step latency_llava_b1_static 120 bench --preset llava-1.5-7b --device cuda --dtypes bf16 --latency --batch-sizes 1 \
  --new-tokens 256 --repeats 1 --caches static
# 4. batch 64 decode, dynamic cache (64 new tokens: the KV cache outweighs the weights there)
step latency_llava_b64 80 bench --preset llava-1.5-7b --device cuda --dtypes bf16 --latency --batch-sizes 64 \
  --new-tokens 64 --repeats 1 --caches dynamic
# 5. Qwen2.5-VL-7B at 672 px, batch 8, the full layout then in place
step bench_qwen_full 80 bench --preset qwen2.5-vl-7b --device cuda --dtypes bf16 --batch-sizes 8 --repeats 3 \
  --image-size 672 --new-tokens 8
step bench_qwen_inplace 80 bench --preset qwen2.5-vl-7b --device cuda --dtypes bf16 --batch-sizes 8 --repeats 3 \
  --image-size 672 --new-tokens 8 --layout inplace --num-retained 0.25
