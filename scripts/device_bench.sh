#!/usr/bin/env bash
# Run on the device machine from the repo root: the GPU tests and the benchmark
# matrix of docs/benchmarks.md. Usage:
#   scripts/device_bench.sh OUT_DIR [quick|tests|part1|part2|full|hf|hf-1b|small|profile|knobs|sft|graphs|graphs-train]
# (each mode but full fits one 10-minute device call; full = part1 + part2;
# hf: the patched transformers model against native, plain and with Liger;
# hf-1b: the same on llama3.2-1b; small: the amplified backward's compact and
# dense paths where launches and host syncs weigh on the step; knobs: the price of
# continued-full's quality knobs, for scripts/utility_experiment.py --prices;
# sft: supervised fine-tuning steps, half of every row a prompt, both context semantics;
# graphs: steps captured as CUDA graphs against eager ones; graphs-train: the same in centrifuge train).
set -uo pipefail
out=${1:?output dir}; mode=${2:-full}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl >/dev/null 2>&1; then  # Liger-Kernel travels as a wheel
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
mkdir -p "$out"
res=/tmp/bench-results; mkdir -p $res
# Results are tarred after every run, so a call cut off at its limit keeps what finished.
bench() {
  python3 -m centrifuge.cli bench --out $res "$@" 2>&1 | grep -v "bench rounds"
  tar -czf "$out/bench-$mode.tar.gz" -C $res .
}
# The whole log comes back (a failure's traceback is what the next call needs); the
# device image has pytest-xdist, and four workers share the GPU's memory comfortably.
gpu_tests() {
  python3 -m pytest -p no:cacheprovider -o addopts="" -q --tb=short -n "${GPU_TEST_WORKERS:-4}" "${@:-tests/gpu}" \
    > "$out/gpu-tests.log" 2>&1; tail -5 "$out/gpu-tests.log"
}
case "$mode" in
  quick)
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 5 ;;
  tests)
    gpu_tests ;;
  hf)
    gpu_tests tests/gpu/test_hf_gpu.py tests/gpu/test_rowwise_gpu.py tests/gpu/test_step_gpu.py
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 5
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --liger --ratios 0.5 --repeats 5 ;;
  small)  # the compact and dense paths of the amplified backward across GEMM work per layer
    paths="--ratios 0.5 --no-hf --repeats 5 --knob path=compact --knob path=dense"
    bench --preset small --seq-len 512 --batch 16 $paths
    bench --preset byte-110m --seq-len 512 --batch 16 $paths
    bench --preset byte-110m --seq-len 1024 --batch 16 $paths
    bench --preset tinyllama-1.1b --seq-len 512 --batch 8 $paths
    bench --preset byte-110m --seq-len 2048 --batch 16 $paths
    bench --preset tinyllama-1.1b --seq-len 1024 --batch 8 $paths ;;
  profile)  # the step profile (host syncs, kernels, device idle) of a host-bound and a FLOP-bound shape
    bench --preset byte-110m --seq-len 512 --batch 16 --ratios 0.5 --no-hf --repeats 5 --knob path=compact
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --no-hf --repeats 5 ;;
  knobs)
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 --no-hf --repeats 5 \
      --knob exact_layers=2 --knob exact_top=1 --knob exact_top=2 --knob kv_projections=1 \
      --knob backward_ratio=0.6 --knob backward_ratio=0.75 --knob extra=0.5,extra_weight=1.5 ;;
  sft)
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 0.7 1.0 --no-hf --repeats 5 \
      --prompt-share 0.5 ;;
  graphs)  # captured steps: their GPU tests, then host-bound shapes and tinyllama with and without graphs
    gpu_tests tests/gpu/test_cuda_graphs_gpu.py
    paths="--ratios 0.5 --no-hf --repeats 5 --cuda-graphs --knob path=compact"
    bench --preset small --seq-len 512 --batch 16 $paths
    bench --preset byte-110m --seq-len 512 --batch 16 $paths
    bench --preset byte-110m --seq-len 2048 --batch 16 $paths
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --ratios 0.5 --no-hf --repeats 5 --cuda-graphs ;;
  graphs-train)  # centrifuge train's own captured step next to the bench's, with the device's busy time
    for shape in byte-110m:512 byte-110m:2048 small:512; do
      model=${shape%%:*}; len=${shape#*:}; res=/tmp/train-times-$model-$len
      python3 scripts/train_step_times.py $res --model $model --seq-len $len --batch-size 16 --modes graphs \
        --profile 10 2>&1 | grep -v "^\[" | tee "$out/train-step-times-$model-$len.md"
      cp $res/train-step-times.json "$out/train-step-times-$model-$len.json"
    done ;;
  hf-1b)
    bench --preset llama3.2-1b --seq-len 2048 --batch 8 --ratios 0.5 --repeats 3 ;;
  part1|full)
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 ;;&
  part2|full)
    bench --preset tinyllama-1.1b --seq-len 8192 --batch 2 --ratios 0.5 1.0 --repeats 5
    bench --preset tinyllama-1.1b --seq-len 2048 --batch 8 --liger --ratios 0.5 1.0 --repeats 5
    bench --preset llama3.2-1b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 5
    bench --preset qwen2.5-1.5b --seq-len 2048 --batch 8 --ratios 0.5 1.0 --repeats 5
    bench --preset llama3.2-1b --seq-len 8192 --batch 2 --ratios 0.5 1.0 --repeats 5
    bench --preset llama3.1-8b --layers 8 --seq-len 2048 --batch 8 --no-hf --ratios 0.5 1.0 --repeats 5 ;;
esac
