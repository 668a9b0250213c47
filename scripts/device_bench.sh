#!/usr/bin/env bash
# Run on the device machine from the repo root: the benchmark matrix of
# docs/benchmarks.md. Usage: scripts/device_bench.sh OUT_DIR [quick]
set -uo pipefail
out=${1:?output dir}; mode=${2:-full}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel travels as a wheel
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
bench() { python3 -m centrifuge.cli bench --out "$out" "$@" 2>&1 | grep -v "bench rounds" ; }
if [ "$mode" = quick ]; then
  bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 5
  exit
fi
bench --preset tinyllama-1.1b --seq-len 2048 --batch 8
bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --liger --ratios 0.5 1.0
bench --preset tinyllama-1.1b --seq-len 8192 --batch 2
bench --preset llama3.2-1b --seq-len 2048 --batch 8
bench --preset llama3.2-1b --seq-len 8192 --batch 2
bench --preset qwen2.5-1.5b --seq-len 2048 --batch 8
bench --preset llama3.1-8b --layers 8 --seq-len 2048 --batch 8 --no-hf
