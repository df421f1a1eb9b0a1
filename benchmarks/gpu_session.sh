#!/usr/bin/env bash
# Every GPU measurement of docs/BENCHMARKS.md in one run (a lent H100/H200 with torch, transformers and peft
# installed; softprompts from this checkout's src/). Results go to $OUT (default: gpu-results/).
#   1. train_speed anchor: random-init Llama-3.2-1B shape, bf16, 8 x 256 tokens, every method, ours/PEFT/limit
#      and ours with gradient checkpointing                          -> train_speed.jsonl
#   1b. head_loss anchor: the LM head + CE alone, HF's vs our fused chunked head -> head_loss.json
#   2. serve_throughput: 64 requests x 128 prompt tokens, 64 new tokens, 1/4/16 adapters, ours vs PEFT
#      (soft prompts, then KV prefixes)                              -> serve.json, serve_prefix.json
#   2c. decode_step: ms per decode step, ours / HF generate / the matmul floor, batch 1-64 -> decode_step.json
#   2d. load_open_loop: Poisson arrivals over 16 adapters, continuous vs window batching -> open_loop.json
#   2e. prefill_stall: a 3,900-token arrival, one-shot vs chunked prefill          -> prefill_stall.json
#   3. the CLI on CUDA with a tiny saved model: train --bf16, train --compile, eval, generate, and train + eval on a
#      quantized base (--quantize nf4: bitsandbytes' CUDA kernels; needs bitsandbytes installed) -> cli.log
#   4. train_speed with the torch.compile'd loss (compilation time reported per method) -> train_compile.jsonl
# Everything else a step prints goes to steps.log: 11 files in all, what a device call brings back from $OUT.
# Each step runs under min(its own cap, what is left of BUDGET seconds, default 540) and is skipped when under 30 s
# are left, so a slow step cannot take the others' results with it and the whole script ends within BUDGET.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
start=$(date +%s)
left() { echo $(( ${BUDGET:-540} - ($(date +%s) - start) )); }  # seconds left of the whole session
# cap CAP: the step's own limit, never more than what is left; prints 0 (skip the step) under 30 s
cap() { local l; l=$(left); (( l > $1 )) && l=$1; (( l < 30 )) && l=0; echo $l; }
limited() {  # limited CAP COMMAND...: the command under min(CAP, what is left); not run when under 30 s are left
  local l; l=$(cap "$1"); shift
  if (( l == 0 )); then echo "skipped (no time left): $*"; return 124; fi
  timeout "$l" "$@"
}
run_step() {  # run_step CAP NAME COMMAND...: one step under its cap, skipped when the session is out of time
  local limit; limit=$(cap "$1"); local name=$2; shift 2
  if (( limit == 0 )); then stamp "$name skipped (no time left)"; return; fi
  stamp "$name (limit ${limit} s)"
  timeout "$limit" "$@"
  stamp "$name rc=$?"
}
stamp() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/session.log"; }

stamp "versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$OUT/session.log" 2>&1
$PY -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)" \
    >>"$OUT/session.log" 2>&1

run_step 150 "1 train_speed anchor" bash -c "$PY benchmarks/train_speed.py --device cuda --json --checkpointing \
    --reps 20 >$OUT/train_speed.jsonl 2>>$OUT/steps.log"

run_step 40 "1b head_loss anchor" bash -c "$PY benchmarks/head_loss.py --device cuda --anchor --reps 20 --json \
    >$OUT/head_loss.json 2>>$OUT/steps.log"

run_step 120 "2 serve_throughput, soft prompts" bash -c "$PY benchmarks/serve_throughput.py --device cuda \
    --model-shape llama-1b --dtype bfloat16 --requests 64 --new-tokens 64 --prompt-tokens 128 \
    --json $OUT/serve.json >>$OUT/steps.log 2>&1"

run_step 120 "2b serve_throughput, KV prefixes" bash -c "$PY benchmarks/serve_throughput.py --device cuda \
    --model-shape llama-1b --dtype bfloat16 --requests 64 --new-tokens 64 --prompt-tokens 128 --method prefix \
    --json $OUT/serve_prefix.json >>$OUT/steps.log 2>&1"

run_step 60 "2c decode_step" bash -c "$PY benchmarks/decode_step.py --device cuda --model-shape llama-1b \
    --dtype bfloat16 --repeat 3 --json $OUT/decode_step.json >>$OUT/steps.log 2>&1"

run_step 90 "2d load_open_loop" bash -c "$PY benchmarks/load_open_loop.py --device cuda --model-shape llama-1b \
    --dtype bfloat16 --requests 400 --json $OUT/open_loop.json >>$OUT/steps.log 2>&1"

run_step 40 "2e prefill_stall" bash -c "$PY benchmarks/prefill_stall.py --device cuda --model-shape llama-1b \
    --dtype bfloat16 --long 3900 --chunks 0,1024,256 --json $OUT/prefill_stall.json >>$OUT/steps.log 2>&1"

stamp "3 CLI on CUDA (each command at most 60 s)"
(
  work=$(mktemp -d)
  $PY -c "import sys; from tiny import save_tiny; save_tiny('llama', sys.argv[1])" "$work/model"
  D=src/softprompts/data/bundled/uci_sentiment
  common=(--model "$work/model" --task classify --data $D/train.jsonl --eval-data $D/dev.jsonl
          --template 'Review: {text}\nSentiment:' --target ' {label}' --labels negative,positive
          --steps 20 --eval-limit 64 --eval-every 10 --no-progress)
  limited 60 $PY -m softprompts train --method prefix "${common[@]}" --bf16 --out "$work/prefix-bf16"
  limited 60 $PY -m softprompts train --method prompt "${common[@]}" --compile --out "$work/prompt-compiled"
  head -64 $D/test.jsonl >"$work/test64.jsonl"
  limited 60 $PY -m softprompts eval --adapter "$work/prefix-bf16" --data "$work/test64.jsonl" --json
  limited 60 $PY -m softprompts generate --adapter "$work/prompt-compiled" "A fine film."
  limited 60 $PY -m softprompts train --method prefix "${common[@]}" --quantize nf4 --out "$work/prefix-nf4"
  limited 60 $PY -m softprompts eval --adapter "$work/prefix-nf4" --quantize nf4 --data "$work/test64.jsonl" --json
  $PY -c "import json, sys; r = json.load(open(sys.argv[1])); print('device check:', r['device'], r['train_config']['autocast_bf16'], r['timings'])" "$work/prefix-bf16/training.json"
) >"$OUT/cli.log" 2>&1
stamp "3 rc=$?"

run_step 600 "4 train_speed with torch.compile" bash -c "$PY benchmarks/train_speed.py --device cuda --json \
    --compile --reps 10 >$OUT/train_compile.jsonl 2>>$OUT/steps.log"
