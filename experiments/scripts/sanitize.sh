#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over the small all-reduce run (2 GPUs).
source experiments/scripts/gpu_env.sh
for tool in memcheck racecheck; do
  echo "=== compute-sanitizer --tool $tool"
  timeout 240 compute-sanitizer --tool $tool --target-processes all \
    python3 experiments/scripts/allreduce_smoke.py 2>&1 | grep -v "^I1\|^W1" | tail -15
done
