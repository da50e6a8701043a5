#!/usr/bin/env bash
# GPU pass 1 (2 GPUs): test suite, generate records, matvec lowering study.
source experiments/scripts/gpu_env.sh
sha256sum "$TPDECODE_SMOLLM2_WHEEL"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
nvidia-smi topo -m | head -5
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests 2>&1 | tee $OUT/pytest_gpu.log | tail -15
timeout 60 python3 -m experiments.generate --tp 1 2>&1 | grep -v "^I1\|^W1" | tail -7
timeout 60 python3 -m experiments.generate --tp 2 2>&1 | grep -v "^I1\|^W1" | tail -7
timeout 200 python3 -m experiments.bench_matvec 2>&1 | grep -v "^I1\|^W1" | tee $OUT/matvec.log
tar czf $OUT/results.tgz experiments/results
