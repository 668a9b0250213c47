#!/usr/bin/env bash
# Issue 12 on one GPU (H100/H200), from the repo root: GPU tests of the compact
# recompute and LoRA, then the activation-checkpointing and LoRA benchmarks of
# docs/benchmarks.md ("Activation checkpointing and LoRA").
# Usage: scripts/device_bench_ckpt.sh OUT_DIR [tests|part1|part2|full]
# (each part fits one 10-minute device call; full = tests + part1 + part2).
set -uo pipefail
out=${1:?output dir}; mode=${2:-full}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then  # peft (and its missing deps) travel as wheels
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import peft" 2>/dev/null || echo "peft is missing: the LoRA test and bench will be skipped / fail"
mkdir -p "$out"
res=/tmp/bench-ckpt-results; mkdir -p $res
# Results are tarred after every run, so a call cut off at its limit keeps what finished.
bench() {
  python3 -m centrifuge.cli bench --out $res "$@" 2>&1 | grep -v "bench rounds"
  tar -czf "$out/bench-ckpt-$mode.tar.gz" -C $res .
}
case "$mode" in
  tests|full)
    python3 -m pytest -q -p no:cacheprovider tests/gpu/test_recompute_gpu.py tests/gpu/test_model_gpu.py 2>&1 \
      | tail -15 | tee "$out/gpu-tests-ckpt.log" ;;&
  part1|full)
    # tinyllama 2x8192 with the HF peers (transformers' checkpointing, and patched)
    bench --preset tinyllama-1.1b --seq-len 8192 --batch 2 --activation-checkpointing --ratios 0.5 1.0 --repeats 5 --warmup 2
    bench --preset tinyllama-1.1b --seq-len 32768 --batch 1 --activation-checkpointing --no-hf --ratios 0.5 1.0 --repeats 3 --warmup 1 ;;&
  part2|full)
    bench --preset llama3.2-3b --seq-len 8192 --batch 1 --activation-checkpointing --no-hf --ratios 0.5 1.0 --repeats 5 --warmup 2
    bench --preset llama3.2-3b --seq-len 2048 --batch 8 --lora 16 --no-hf --ratios 0.5 1.0 --repeats 5 --warmup 2 ;;
esac
