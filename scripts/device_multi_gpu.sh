#!/usr/bin/env bash
# Run on a multi-GPU device machine from the repo root: centrifuge train under
# torchrun (FSDP2 and DDP, bf16, sharded checkpoint, resume) and the multi-GPU
# bench of docs/benchmarks.md. Usage: scripts/device_multi_gpu.sh OUT_DIR [train|tiny|8b|all]
set -uo pipefail
out=${1:?output dir}; mode=${2:-all}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=4
n=$(python3 -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$out"; res=/tmp/multi-results; mkdir -p $res
echo "GPUs: $n"
run() { torchrun --standalone --nproc-per-node "$n" -m centrifuge.cli "$@"; }
bench() {
  run bench --out $res "$@" 2>&1 | grep -v "^W1\|OMP_NUM\|\*\*\*\*\|%|"
  tar -czf "$out/multi-bench-$mode.tar.gz" -C $res .
}
case "$mode" in train|all)
  for par in fsdp ddp; do
    d=/tmp/train-$par; rm -rf $d
    run train --model small --select loss --ratio 0.5 --dtype bf16 --parallel $par --steps 40 \
      --save-interval 20 --seq-len 512 --batch-size 8 --out-dir $d --quiet 2>&1 | tail -12
    # Resume from the step-20 checkpoint: the final weights must match the uninterrupted run.
    r=/tmp/resume-$par; rm -rf $r; mkdir -p $r; cp -r $d/checkpoint-20 $r/; echo checkpoint-20 > $r/latest
    run train --model small --select loss --ratio 0.5 --dtype bf16 --parallel $par --steps 40 \
      --save-interval 20 --seq-len 512 --batch-size 8 --out-dir $r --resume --quiet 2>&1 | tail -3
    python3 - $d $r <<'PY' 2>&1 | tee -a "$out/train-resume.log"
import sys, torch
from safetensors.torch import load_file
a, b = (load_file(f"{d}/checkpoint-40/model.safetensors") for d in sys.argv[1:])
print(sys.argv[1], "resume max |diff|:", max(float((a[k] - b[k]).abs().max()) for k in a))
PY
    cp $d/metrics.jsonl "$out/train-$par-metrics.jsonl"
  done ;;
esac
case "$mode" in tiny|all)
  bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 10 \
    --parallel ddp fsdp fsdp-no-reshard ;;
esac
case "$mode" in 8b|all)
  bench --preset llama3.1-8b --seq-len 2048 --batch 4 --ratios 0.5 1.0 --repeats 5 --warmup 2 \
    --parallel fsdp --no-single ;;
esac
