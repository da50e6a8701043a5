#!/usr/bin/env bash
# The GPU-machine runs, by name, each sized for one device call (< 10 min):
#   bash experiments/scripts/gpu_runs.sh STEP [STEP ...]
# Records land in experiments/results/ and are tarred to $OUT/results.tgz after every step.
# Steps that load SmolLM2 need .carry_a and .carry_b (the wheel in two parts, see gpu_env.sh).
source experiments/scripts/gpu_env.sh
export TPDECODE_GIT_SHA=${TPDECODE_GIT_SHA:-unknown}
decode() { timeout 280 python3 -m experiments.bench_decode --model llama2-7b --tp "${TPS:-1,2}" "$@" \
             2>&1 | grep -v "^I1\|^W1" | tail -30; }
for step in "$@"; do
  echo "=== $step"
  case $step in
    tests)          TEST_TIMEOUT=500 bash experiments/scripts/gpu_tests.sh tests ;;
    smoke)          timeout 170 python3 experiments/scripts/allreduce_smoke.py 2>&1 | grep -v "^I1\|^W1" ;;
    sanitize)       bash experiments/scripts/sanitize.sh ;;
    allreduce)      timeout 560 python3 -m experiments.bench_allreduce --tp "${TP:-2}" 2>&1 \
                      | grep -v "^I1\|^W1" | tail -40 ;;
    add_norm)       timeout 560 python3 -m experiments.bench_allreduce --tp "${TP:-2}" --op add_norm \
                      2>&1 | grep -v "^I1\|^W1" | tail -40 ;;
    decode_while)   decode --backend xla,one_shot,fused --command_buffers while --dump_dir /tmp/dump_w ;;
    decode_default) decode --backend xla,fused --command_buffers default ;;
    decode_nccl)    decode --backend xla --xla_collectives nccl --command_buffers while ;;
    decode_off)     decode --backend xla,fused --command_buffers off --profile --loops jit ;;
    ttft)           timeout 560 python3 -m experiments.bench_ttft --model llama2-7b --tp "${TP:-1}" \
                      --policies "${POLICIES:-buckets,hybrid,pad_max}" 2>&1 | grep -v "^I1\|^W1" | tail -30 ;;
    generate)       for tp in 1 2; do timeout 90 python3 -m experiments.generate --tp $tp 2>&1 \
                      | grep -v "^I1\|^W1" | tail -7; done ;;
    *) echo "unknown step $step" ;;
  esac
  tar czf $OUT/results.tgz experiments/results
done
