#!/usr/bin/env bash
# GPU pass 2 (2 GPUs): batch-1 matvec lowering study, LLaMA-2-7B decode at TP=1 and TP=2.
source experiments/scripts/gpu_env.sh
timeout 150 python3 -m experiments.bench_matvec 2>&1 | grep -v "^I1\|^W1" | tee $OUT/matvec.log
for tp in 1 2; do
  timeout 150 python3 -m experiments.bench_decode --tp $tp --profile --runs 4 --dump_dir /tmp/dump_tp$tp \
    2>&1 | grep -v "^I1\|^W1" | tee $OUT/decode_tp$tp.log
done
ls /tmp/dump_tp2 | head -30 > $OUT/dump_listing.txt; ls /tmp/dump_tp2 | wc -l >> $OUT/dump_listing.txt
f=$(ls /tmp/dump_tp2/*thunk_sequence* 2>/dev/null | head -3); [ -n "$f" ] && head -c 3000 $f > $OUT/thunk_head.txt
tar czf $OUT/results.tgz experiments/results
