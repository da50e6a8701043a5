#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the small all-reduce run (2 GPUs).
source experiments/scripts/gpu_env.sh
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool"
  timeout 150 compute-sanitizer --tool $tool --target-processes all --report-api-errors no \
    python3 experiments/scripts/allreduce_smoke.py --no-timing 2>&1 | grep -v "^I1\|^W1" | tee -a $OUT/sanitize.log | tail -15
done
