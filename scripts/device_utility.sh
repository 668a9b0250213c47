#!/usr/bin/env bash
# Run on the device machine from the repo root: scripts/utility_experiment.py,
# one shard of the run list per GPU, resuming from the shards' results under
# docs/utility-data/DIR/shardK (copy each returned shardK.tar.gz back there).
# Usage:
#   scripts/device_utility.sh OUT SCALE DIR BUDGET_S [GPU:SHARD ...] [-- UTILITY_ARGS ...]
# e.g. scripts/device_utility.sh "$OUT" continued-full continued-h200-2k 520 0:0/2 1:1/2
#      scripts/device_utility.sh "$OUT" continued-full knobs-h200 520 0:0/2 1:1/2 -- \
#          --inits base --seeds 0 1 2 3 4 --side-seeds --knobs kv_projections=1 backward_ratio=0.75
# (UTILITY_ARGS: more utility_experiment.py options, the same on every call of a DIR)
# (DIR: one folder per run list and shard count, which decide a shard's runs)
# Each shard trains until BUDGET_S seconds after its start; its results are
# tarred into OUT/shardK.tar.gz (the device returns no deeper files).
set -uo pipefail
out=${1:?OUT}; scale=${2:?SCALE}; dir=${3:?DIR}; budget=${4:?BUDGET_S}; shift 4
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
specs=()
while (($#)) && [[ $1 != -- ]]; do specs+=("$1"); shift; done
(($#)) && shift  # the rest: utility_experiment.py options
for spec in "${specs[@]}"; do
  gpu=${spec%%:*}; shard=${spec#*:}; k=${shard%%/*}
  res=/tmp/utility-$dir/shard$k
  mkdir -p "$res" && cp -r "docs/utility-data/$dir/shard$k/." "$res/" 2>/dev/null
  ( CUDA_VISIBLE_DEVICES=$gpu python3 scripts/utility_experiment.py --scale "$scale" --out "$res" \
      --work "/tmp/utility-work-$k" --prune --time-budget "$budget" --shard "$shard" "$@" \
      >"$out/shard$k.log" 2>&1
    tar -czf "$out/shard$k.tar.gz" -C "$res" . ) &
done
wait
