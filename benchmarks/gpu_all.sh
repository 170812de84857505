#!/usr/bin/env bash
# Every GPU-side check and benchmark, in one command, for one H100/H200 (about 10 minutes in all):
#   bash benchmarks/gpu_all.sh [OUT_DIR]
# Needs a CUDA build of torch and the dev extras (transformers) installed. Results: OUT_DIR/*.json.
set -uo pipefail
cd "$(dirname "$0")"
out=${1:-../bench-out}
mkdir -p "$out"
status=0
python gpu_check.py --quick --out "$out/gpu_check.json" || status=1
python gpu_decode.py --quick --out "$out/gpu_decode.json" || status=1
python gpu_train.py --quick --out "$out/gpu_train.json" || status=1
exit $status
