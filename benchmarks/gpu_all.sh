#!/usr/bin/env bash
# Every GPU-side check and benchmark, in one command, for one H100/H200 (at most 9 min 40 s in all):
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# Needs a CUDA build of torch and the dev extras (transformers; for gpu_serve.py the serve extra and httpx)
# installed; vLLM, where installed, is measured by gpu_serve.py too. PYTHON picks the interpreter (default
# python3). Each step has its own time limit, so one that hangs cannot take the others' time.
# Results: OUT_DIR/*.json and OUT_DIR/*.log.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-../bench-out}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS NAME SCRIPT ARGS...
    local limit=$1 name=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$py" "$@" --out "$out/$name.json" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "=== $name: exit status $rc"; status=1; }
}
start=$SECONDS
# limits: 100 + 135 + 50 + 90 + 125 = 500 s at most, so gpu_train gets 80 s or more
step 100 gpu_check gpu_check.py --quick  # writes its JSON after every check: a cut run keeps the ones done
step 135 gpu_decode gpu_decode.py --quick
step 50 gpu_fsdp gpu_fsdp.py --quick  # FSDP at world size 1 vs unwrapped, activation checkpointing's memory
step 90 gpu_posttrain gpu_posttrain.py --quick  # peak memory and tokens/s of LoRA vs full SFT, llama3.2-1b shape
step 125 gpu_serve gpu_serve.py --quick --budget 115  # the server through HTTP, then vLLM if installed, in budget
step $((580 - (SECONDS - start))) gpu_train gpu_train.py --quick  # the rest of 580 s: 80 s or more
exit $status
