#!/usr/bin/env bash
# Every GPU-side check and benchmark, in one command, for one H100/H200, in under 8 minutes:
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# Needs a CUDA build of torch and the dev extras (transformers; for gpu_serve.py the serve extra and httpx)
# installed; vLLM, where installed, is measured by gpu_serve.py too. PYTHON picks the interpreter (default
# python3); GPU_ALL_SECONDS the whole run's limit (default 470).
#
# The steps run in the order of what the GPU-speed targets need most (training MFU, decoding, int8 decoding,
# memory), each under its own limit and never past the whole run's: a step that would start with less than
# 15 s left is skipped and listed. A step cut by its limit keeps what it wrote (gpu_check.py writes its JSON
# after every check). Results: OUT_DIR/*.json and OUT_DIR/*.log, OUT_DIR/summary.txt, and at the end
# OUT_DIR/all.json: every step's JSON merged with its exit status and time, and the GPU-speed targets, which
# gpu_summary.py also prints as one table (measured, goal, best peer of the same run, met).
set -uo pipefail
out=${1:-$(dirname "$0")/../bench-out}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # OUT_DIR as given, from where the command was run
cd "$(dirname "$0")"
py=${PYTHON:-python3}
total=${GPU_ALL_SECONDS:-470}
export PYTHONUNBUFFERED=1
status=0
start=$SECONDS
: > "$out/summary.txt"
: > "$out/steps.tsv"
step() {  # step SECONDS NAME SCRIPT ARGS...
    local want=$1 name=$2
    shift 2
    local left=$((total - (SECONDS - start)))
    local limit=$((want < left ? want : left))
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: skipped ($left s left of $total)" | tee -a "$out/summary.txt"
        printf '%s\tskipped\t0\n' "$name" >> "$out/steps.tsv"
        return
    fi
    echo "=== $name (limit ${limit}s, $left s left)"
    local t0=$SECONDS
    timeout "$limit" "$py" "$@" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit status $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$out/steps.tsv"
    [ "$rc" -eq 0 ] || status=1
}
step 60 gpu_check gpu_check.py --quick  # the CUDA-only code paths against the CPU-tested ones
# training TFLOP/s and MFU, llama3.2-1b shape, seq 2,048: ours causal and with document masks, vs HF eager, compiled
step 140 gpu_train gpu_train.py --quick --doc-mask
step 85 gpu_decode gpu_decode.py --quick --batches 64  # llama3-8b shape, batch 1 vs HF and the ceiling; batch 64
step 55 gpu_train_8k gpu_train.py --quick --seq-len 8192 --batch 1 --ours flex --no-hf  # seq 8,192, document masks
# weight-only int8 (ours, then torchao's where it installs) and int4; bf16 is gpu_decode's
step 80 gpu_quant cpu_quant.py --device cuda --compile --contenders int8,torchao-int8,int4 --reps 2
step 45 gpu_memory gpu_memory.py --quick  # llama3-8b at 8,192 tokens on one GPU: bf16 states, AC, chunked loss
# float8 linears (torchao), then selective activation checkpointing: what each costs or gains at seq 2,048
step 70 gpu_train_variants gpu_train.py --quick --doc-mask --ours flex-float8,flex-ac-op --no-hf
step 25 gpu_chunked_loss cpu_chunked_loss.py --device cuda --quick  # chunked head + cross-entropy: time, peak
step 35 gpu_speculative cpu_speculative.py --device cuda --quick  # speculative vs plain greedy decoding
step 35 gpu_fsdp gpu_fsdp.py --quick  # FSDP at world size 1, activation checkpointing's memory
step 60 gpu_serve gpu_serve.py --quick --budget 50  # the server through HTTP, then vLLM if installed
step 60 gpu_posttrain gpu_posttrain.py --quick  # LoRA vs full SFT, llama3.2-1b shape
echo "=== all: $((SECONDS - start)) s of $total" | tee -a "$out/summary.txt"
"$py" gpu_summary.py --dir "$out" --out "$out/all.json" | tee "$out/targets.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
exit $status
