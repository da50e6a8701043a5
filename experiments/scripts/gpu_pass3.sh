#!/usr/bin/env bash
# GPU pass 3 (2 GPUs): LLaMA-2-7B decode baseline across TP, loops, command buffers and
# collective implementations, most important first; results are saved after every run.
source experiments/scripts/gpu_env.sh
run() {
  echo "=== bench_decode $*"
  timeout 150 python3 -m experiments.bench_decode "$@" 2>&1 | grep -v "^I1\|^W1" | tail -25
  tar czf $OUT/results.tgz experiments/results
}
run --tp 2 --profile --dump_dir /tmp/d_default
run --tp 1 --profile
run --tp 2 --command_buffers while --dump_dir /tmp/d_while
ls /tmp/d_while | grep -i thunk | head -5 > $OUT/while_dump.txt
f=$(ls /tmp/d_while/*thunk_sequence* 2>/dev/null | tail -1); [ -n "$f" ] && grep -i -m 20 "while\|command" "$f" >> $OUT/while_dump.txt
run --tp 2 --xla_collectives nccl
run --tp 1 --command_buffers while
run --tp 2 --command_buffers off
run --tp 1 --command_buffers off
run --tp 2 --command_buffers while --xla_collectives nccl
