#!/usr/bin/env bash
# The GPU-machine runs, by name, each sized for one device call (< 10 min):
#   bash experiments/scripts/gpu_runs.sh STEP [STEP ...]
# A `NAME=value` argument sets that variable for the steps after it, e.g.
#   gpu_runs.sh MODEL=llama3-8b BATCH=1,8 CB=off e2e CB=default e2e
# Records land in experiments/results/ and are tarred to $OUT/results.tgz after every step.
# Steps that load SmolLM2 need .carry_a and .carry_b (the wheel in two parts, see gpu_env.sh).
source experiments/scripts/gpu_env.sh
export TPDECODE_GIT_SHA=${TPDECODE_GIT_SHA:-unknown}
# XLA's autotuning results, shared by the decode, matvec and all-reduce processes of a
# session (fewer compile seconds, the same kernel choices in every process); never for
# bench_ttft, whose cold starts must autotune like any first start.
TUNED="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune${CUDA_VISIBLE_DEVICES//,/}"  # per GPU set
bench() { timeout "$1" python3 -m "experiments.$2" "${@:3}" 2>&1 | grep -v "^I1\|^W1" | tee -a $OUT/full.log | tail -40; }
decode() { XLA_FLAGS="$TUNED" bench "${DECODE_TIMEOUT:-280}" bench_decode --model "${MODEL:-llama2-7b}" --tp "${TPS:-1,2}" \
             --batch "${BATCH:-1}" "$@"; }
# Records so far, every 20 s as well: a call cut short by its limit still returns them. Written
# to a private name, then renamed: two of these scripts may run side by side (gpu_pairs.sh).
save() { tar czf $OUT/.results.$BASHPID.tgz experiments/results && mv $OUT/.results.$BASHPID.tgz $OUT/results.tgz; }
( while sleep 20; do save; done ) &
trap "kill $! 2>/dev/null" EXIT
for step in "$@"; do
  echo "=== $step"
  case $step in
    *=*)            export "$step"; continue ;;
    tests)          TEST_TIMEOUT=420 bash experiments/scripts/gpu_tests.sh -m gpu tests ;;
    tests_comm)     TEST_LOG=comm TEST_TIMEOUT=500 bash experiments/scripts/gpu_tests.sh -m gpu \
                      tests/test_gpu_all_reduce.py tests/test_gpu_fused.py ;;
    tests_model)    TEST_LOG=model TEST_TIMEOUT=540 bash experiments/scripts/gpu_tests.sh -m gpu \
                      tests/test_gpu_decode.py ;;
    tests_gemv)     TEST_LOG=gemv TEST_TIMEOUT=500 bash experiments/scripts/gpu_tests.sh -m gpu \
                      tests/test_gpu_gemv.py ;;
    smoke)          timeout 170 python3 experiments/scripts/allreduce_smoke.py 2>&1 | grep -v "^I1\|^W1" \
                      | tee -a $OUT/full.log ;;  # SMOKE_TP=4 on four GPUs
    sanitize)       bash experiments/scripts/sanitize.sh ;;
    tune)           bench 300 bench_allreduce --tp "${TP:-2}" --flavours pallas --impls one_shot,one_shot_ll,two_shot \
                      --configs 2:16,1:16,4:32,8:32 --min_bytes 8192 --max_bytes 8388608 --size_step 4 \
                      --runs 5 ;;
    allreduce)      bench 330 bench_allreduce --tp "${TP:-2}" --time_limit_s 310 | tee /tmp/sweep.log
                    rec=$(sed -n 's/^record: //p' /tmp/sweep.log)  # auto, with thresholds from it
                    [ -n "$rec" ] && bench 200 bench_allreduce --tp "${TP:-2}" --impls auto \
                      --flavours psum_default,psum_nccl,pallas --thresholds_from "$rec" \
                      --time_limit_s 180 ;;
    allreduce4)     bench 560 bench_allreduce --tp 4 --min_bytes "${MIN_BYTES:-262144}" \
                      --max_bytes 8388608 --nocupti --runs 5 --configs 2:16,8:32 \
                      --time_limit_s 530 ;;  # 4-128 KB: allreduce/20261122T094025976278Z
    tma)            bench 560 bench_allreduce --tp "${TP:-4}" --flavours psum_nccl,pallas \
                      --impls one_shot,two_shot --configs 4:128,4:128:tma,8:32:tma,32:32:tma \
                      --min_bytes 262144 --max_bytes 8388608 --nocupti --runs 5 \
                      --time_limit_s 530 ;;  # bulk copies vs thread stores; two_shot loads first
    wide2)          bench 560 bench_allreduce --tp "${TP:-2}" --flavours psum_default,psum_nccl,pallas \
                      --impls one_shot,one_shot_ll --configs 2:16,2:64,2:128,1:128,4:128 \
                      --min_bytes 32768 --max_bytes 524288 --nocupti --runs 5 \
                      --time_limit_s 530 ;;  # 64-256 KB at TP=2: one step per block (NCCL goal)
    auto4)          bench 560 bench_allreduce --tp 4 --impls auto --nocupti --max_bytes 8388608 \
                      --flavours psum_default,psum_nccl,pallas --time_limit_s 530 \
                      ${THRESHOLDS_FROM:+--thresholds_from $THRESHOLDS_FROM} ;;  # else as committed
    poll_ab)        bench 270 bench_allreduce --tp "${TP:-2}" --flavours psum_default,pallas \
                      --impls one_shot,two_shot --configs 2:16,2:16:serial --min_bytes 8192 \
                      --max_bytes 1048576 --nocupti --runs 5 --time_limit_s 250
                    bench 290 bench_allreduce --tp "${TP:-2}" --op add_norm --tokens 1,4,16 \
                      --hidden 4096,8192 --flavours psum_default,pallas --impls one_shot,fused \
                      --fused_blocks 32,32:serial --nocupti --time_limit_s 270 ;;  # flag polls
    auto)           bench 200 bench_allreduce --tp "${TP:-2}" --impls auto --nocupti \
                      --flavours psum_default,psum_nccl,pallas ;;  # THRESHOLDS as committed
    allreduce_dump) bench 150 bench_allreduce --tp 2 --min_bytes 8192 --max_bytes 8192 --nocupti \
                      --runs 3 --dump_dir /tmp/dump_ar  # is the chained loop one WHILE graph?
                    mkdir -p $OUT/dump_ar
                    for f in /tmp/dump_ar/*/*jit_chain*thunk_sequence_after_thunk_passes.txt; do
                      gzip -c "$f" > $OUT/dump_ar/$(basename $(dirname "$f"))_$(basename "$f").gz
                    done ;;
    add_norm_large) TOKENS=64,128 bash "$0" add_norm ;;  # the rest of the issue's token counts
    add_norm)       bench $((${TIME_LIMIT:-540} + 20)) bench_allreduce --tp "${TP:-2}" --op add_norm \
                      --tokens "${TOKENS:-1,4,16}" --hidden "${HIDDEN:-4096,5120,8192}" \
                      --fused_blocks "${FUSED_BLOCKS:-32,32:serial}" ${CUPTI_FLAG:---nocupti} \
                      --time_limit_s ${TIME_LIMIT:-540} ${FLAVOURS:+--flavours $FLAVOURS} ;;  # FLAVOURS=pallas: kernels alone
    diag)           for c in ${DIAG:-nocupti cupti}; do  # the abort at 256 KB (docs/allreduce.md), with copy counts
                      bench 150 bench_allreduce --tp 2 --flavours pallas --impls one_shot --$c \
                        --min_bytes 131072 --max_bytes 1048576 --runs 30; done ;;
    matvec)         XLA_FLAGS="$TUNED" bench 300 bench_matvec --tps 1,2 --forms nd --gemms default,cublas,pallas ;;
    gemv_tune)      XLA_FLAGS="$TUNED" bench 400 bench_matvec --tps "${TPS:-1,2}" --forms nd --gemms default,pallas \
                      --gemv_configs auto,128:4:1,128:4:2,128:4:4,128:8:1,128:8:2,64:8:2,64:8:4 --runs 20 ;;
    decode_gemm)    decode --backend xla --command_buffers while --gemm cublas --runs 4 ;;
    decode_gemv)    decode --backend xla,fused --matmul xla,pallas --command_buffers while --runs 4 --loops jit ;;
    decode_dump)    d=dump_${BACKENDS:-xla}_${CB:-while}  # one process per backend: one loop module
                    TPS=2 decode --backend "${BACKENDS:-xla}" --command_buffers "${CB:-while}" \
                      --dump_dir /tmp/$d --runs 2 --loops jit
                    mkdir -p $OUT/$d  # the loop's thunk sequence and optimized HLO, compressed
                    for f in /tmp/$d/*jit__loop*thunk_sequence*.txt \
                             /tmp/$d/*jit__loop*gpu_after_optimizations.txt; do
                      gzip -c "$f" > $OUT/$d/$(basename "$f").gz; done ;;
    graph)          DECODE_TIMEOUT=340 TPS=${TPS:-1,2,4} decode --backend xla,one_shot_ll,fused \
                      --command_buffers while --dump_dir /tmp/dump_graph --runs 4 --loops jit ;;
    decode_busy)    decode --backend xla,fused --matmul xla,pallas --command_buffers while --runs 2 \
                      --loops jit --cupti ;;  # kernel time vs TPOT: the idle gaps (after diag)
    decode_while)   decode --backend xla,one_shot,fused --command_buffers while --runs 4 ;;
    decode_ll)      TPS=2 decode --backend xla,one_shot,one_shot_ll,fused,fused_ll --command_buffers while \
                      --runs 4 --loops jit ;;  # flags vs LL lines, same process
    decode_l3)      MODEL=llama3-8b BATCH=1,8 TPS=2 decode --backend xla,one_shot,fused \
                      --command_buffers while --runs 4 --loops jit ;;  # issue 5: Llama-3-8B, batch 1 and 8
    decode_b8)      BATCH=8 TPS=2 decode --backend xla,fused,fused_ll --command_buffers while \
                      --runs 4 --loops jit ;;
    decode_default) decode --backend xla,fused --command_buffers default --runs 4 ;;
    graph_default)  TPS=${TPS:-2,4} decode --backend xla,one_shot_ll,fused --command_buffers default \
                      --runs 4 --loops jit ;;  # the same configurations as `graph`, default graphs
    e2e)            decode --backend "${BACKENDS:-xla,one_shot,fused}" --command_buffers "${CB:-while}" \
                      --runs 4 ${NCCL:+--xla_collectives nccl} ${LOOPS:+--loops $LOOPS} \
                      ${PROFILE:+--profile --cupti} ;;  # issue 5's matrix: MODEL BATCH TPS CB NCCL LOOPS PROFILE
    decode_nccl)    TPS=2 decode --backend xla --xla_collectives nccl --runs 4 ;;  # NCCL: no WHILE graph
    decode_off)     CB=off BACKENDS=xla,fused PROFILE=1 bash "$0" e2e ;;  # graphs off, profiled
    matrix)         for args in "--command_buffers off --profile" "--command_buffers default" \
                                "--xla_collectives nccl"; do  # issue 3's matrix, both loops, xla
                      DECODE_TIMEOUT=190 TPS=${TPS:-4} decode --backend xla --runs 4 $args; done ;;
    ttft)           bench "${TTFT_TIMEOUT:-560}" bench_ttft --model llama2-7b --tp "${TP:-1}" \
                      --policies "${POLICIES:-naive,pad_max,buckets,hybrid}" \
                      --naive_requests "${NAIVE_REQUESTS:-25}" --profile_step "${PROFILE_STEP:-64}" \
                      ${BUCKET_GRAPHS:+--bucket_graphs} ;;  # buckets with CUDA graphs
    generate)       for tp in 1 2; do timeout 90 python3 -m experiments.generate --tp $tp 2>&1 \
                      | grep -v "^I1\|^W1" | tail -7; done ;;
    *) echo "unknown step $step" ;;
  esac
  save
done
