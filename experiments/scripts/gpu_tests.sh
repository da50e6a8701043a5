#!/usr/bin/env bash
# Runs the test suite on the GPU machine with a provenance header; output goes to $OUT.
source experiments/scripts/gpu_env.sh
log=$OUT/pytest_gpu_${TEST_LOG:-all}.log
{
  echo "date: $(date -u +%FT%TZ)"
  echo "git_sha: ${TPDECODE_GIT_SHA:-unknown}"
  python3 -c "import jax, jaxlib, flax; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__)"
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "XLA_FLAGS (before conftest adds the fake-CPU-device flag): '${XLA_FLAGS:-}'"
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs "$@" 2>&1
} | tee "$log" | tail -12
