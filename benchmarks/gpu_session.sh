#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md in one run (a lent H100/H200 with torch, transformers and peft
# installed; softprompts from this checkout's src/). Results go to $OUT (default: gpu-results/).
#   1. train_speed anchor: random-init Llama-3.2-1B shape, bf16, 8 x 256 tokens, every method, ours/PEFT/limit
#      and ours with gradient checkpointing                          -> train_speed.jsonl
#   2. serve_throughput: 64 requests x 128 prompt tokens, 64 new tokens, 1/4/16 adapters, ours vs PEFT
#      (soft prompts, then KV prefixes)                              -> serve.json, serve_prefix.json
#   3. the CLI on CUDA with a tiny saved model: train --bf16, train --compile, eval, generate -> cli.log
#   4. train_speed with the torch.compile'd loss (compilation time reported per method) -> train_compile.jsonl
# Each step has its own timeout so a slow one cannot take the others' results with it; step 4 gets what is left
# of BUDGET seconds (default 540).
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
start=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - start) )); }  # seconds left of the whole session
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/session.log"; }

stamp "versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/session.log" 2>&1
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    >>"$OUT/session.log" 2>&1

stamp "1 train_speed anchor"
timeout "${T1:-150}" $PY benchmarks/train_speed.py --device cuda --json --checkpointing --reps 20 \
    >"$OUT/train_speed.jsonl" 2>"$OUT/train_speed.err"
stamp "1 rc=$?"

stamp "2 serve_throughput"
timeout "${T2:-150}" $PY benchmarks/serve_throughput.py --device cuda --model-shape llama-1b --dtype bfloat16 \
    --requests 64 --new-tokens 64 --prompt-tokens 128 --json "$OUT/serve.json" >"$OUT/serve.log" 2>&1
stamp "2 rc=$?"

stamp "2b serve_throughput, KV-prefix adapters"
timeout "${T2:-150}" $PY benchmarks/serve_throughput.py --device cuda --model-shape llama-1b --dtype bfloat16 \
    --requests 64 --new-tokens 64 --prompt-tokens 128 --method prefix --json "$OUT/serve_prefix.json" \
    >"$OUT/serve_prefix.log" 2>&1
stamp "2b rc=$?"

stamp "3 CLI on CUDA"
(
  work=$(mktemp -d)
  $PY -c "import sys; from tiny import save_tiny; save_tiny('llama', sys.argv[1])" "$work/model"
  D=src/softprompts/data/bundled/uci_sentiment
  common=(--model "$work/model" --task classify --data $D/train.jsonl --eval-data $D/dev.jsonl
          --template 'Review: {text}\nSentiment:' --target ' {label}' --labels negative,positive
          --steps 20 --eval-limit 64 --eval-every 10 --no-progress)
  timeout 90 $PY -m softprompts train --method prefix "${common[@]}" --bf16 --out "$work/prefix-bf16"
  timeout 90 $PY -m softprompts train --method prompt "${common[@]}" --compile --out "$work/prompt-compiled"
  head -64 $D/test.jsonl >"$work/test64.jsonl"
  timeout 90 $PY -m softprompts eval --adapter "$work/prefix-bf16" --data "$work/test64.jsonl" --json
  timeout 90 $PY -m softprompts generate --adapter "$work/prompt-compiled" "A fine film."
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print('device check:', r['device'], r['train_config']['autocast_bf16'], r['timings'])" "$work/prefix-bf16/training.json"
) >"$OUT/cli.log" 2>&1
stamp "3 rc=$?"

stamp "4 train_speed with torch.compile"
timeout "$(left)" $PY benchmarks/train_speed.py --device cuda --json --compile --reps 10 \
    >"$OUT/train_compile.jsonl" 2>"$OUT/train_compile.err"
stamp "4 rc=$?"
