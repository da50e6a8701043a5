#!/usr/bin/env bash
# Two TP=2 step lists side by side on a four-GPU host, one per GPU pair (device time counts
# per machine, so two pairs measure twice as much per call):
#   bash experiments/scripts/gpu_pairs.sh "STEP ..." "STEP ..."   # GPUs 0,1 and GPUs 2,3
# Every record names its GPUs and what ran beside it (cuda_visible_devices, concurrent_with);
# ratios are taken within one process, so both configurations of a ratio share the conditions.
a=$1 b=$2
CUDA_VISIBLE_DEVICES=0,1 TP=2 TPS=2 SMOKE_TP=2 TPDECODE_CONCURRENT="gpus 2,3: $b" \
  bash experiments/scripts/gpu_runs.sh $a > $OUT/pair_a.log 2>&1 &
CUDA_VISIBLE_DEVICES=2,3 TP=2 TPS=2 SMOKE_TP=2 TPDECODE_CONCURRENT="gpus 0,1: $a" \
  bash experiments/scripts/gpu_runs.sh $b > $OUT/pair_b.log 2>&1 &
wait
tail -n 25 $OUT/pair_a.log $OUT/pair_b.log
tar czf $OUT/results.tgz experiments/results
