#!/usr/bin/env bash
# GPU pass 4 (2 GPUs): first run of the peer-write kernels: correctness and a quick timing.
source experiments/scripts/gpu_env.sh
timeout 170 python3 experiments/scripts/allreduce_smoke.py 2>&1 | grep -v "^I1\|^W1" | tail -30
