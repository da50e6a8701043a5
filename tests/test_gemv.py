"""The decode GEMV kernel: its numerics in GPU interpret mode, its lowering for CUDA at the
model's per-rank shapes, tiling choices, input validation, and the model with matmul=pallas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from hf_fixtures import random_weights, tiny_config
from model_helpers import decoder_from_weights
from models.config import preset
from pallas_kernels import gemv, lowering_checks

# Every per-rank projection of this model tiles for the kernel at TP=1, 2 and 4.
GEMV_MODEL = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
PROMPTS = [[5, 9, 23, 7], [11, 3]]


def _operands(b, n, k, seed=0):
  kx, kw = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (b, k), jnp.bfloat16),
          jax.random.normal(kw, (n, k), jnp.bfloat16))


@pytest.mark.parametrize("b, n, k, config", [
    (1, 128, 256, gemv.Config()),
    (3, 128, 512, gemv.Config(tile_k=64, splits=2, stages=2)),
    (16, 64, 384, gemv.Config(stages=1)),
    (8, 192, 512, gemv.Config(splits=4)),
    (2, 64, 96, gemv.Config(tile_k=32))])
def test_matches_reference_in_interpret_mode(b, n, k, config):
  x, w = _operands(b, n, k)
  got = gemv.gemv(x, w, config, interpret=plgpu.InterpretGPUParams())
  ref = gemv.reference(x, w)
  assert got.shape == (b, n) and got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-1)


def test_f32_output_in_interpret_mode():
  x, w = _operands(2, 128, 256)
  got = gemv.gemv(x, w, out_dtype=jnp.float32, interpret=plgpu.InterpretGPUParams())
  ref = gemv.reference(x, w, out_dtype=jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-4)


def _projection_shapes(model, tp):
  """(n, k) of every per-rank weight of `model` at TP degree `tp`, as models/llama.py stores
  them: fused q/k/v and gate/up, o_proj, down_proj and the vocab-parallel lm_head."""
  c = preset(model)
  d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
  return {((c.num_heads + 2 * c.num_kv_heads) * hd // tp, d), (d, c.num_heads * hd // tp),
          (2 * f // tp, d), (d, f // tp), (c.vocab_size // tp, d)}


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_lowers_for_cuda_at_llama2_7b_shapes(tp):
  for n, k in sorted(_projection_shapes("llama2-7b", tp)):
    if n % gemv.Config.tile_n:  # lm_head at TP=8: 4000 rows, to be padded to 4032 by the caller
      with pytest.raises(ValueError, match=f"{n} weight rows are not a multiple of tile_n=64"):
        gemv.check(jnp.zeros((1, k), jnp.bfloat16), jnp.zeros((n, k), jnp.bfloat16),
                   gemv.Config())
      continue
    config = gemv.config_for(n, k)
    f = jax.jit(lambda x, w: gemv.gemv(x, w, config))
    text = lowering_checks.lower_for_cuda(f, jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
                                          jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    assert len(lowering_checks.mosaic_calls(text)) == 1, (n, k)
    assert lowering_checks.multicast_uses(text) == []


@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 11008), (4096, 5504), (4096, 2752),
                                  (32000, 4096), (576, 576)])
def test_config_tiles_exactly_and_fills_the_gpu_where_k_allows(n, k):
  c = gemv.config_for(n, k)
  gemv.check(jnp.zeros((1, k), jnp.bfloat16), jnp.zeros((n, k), jnp.bfloat16), c)
  blocks = n // c.tile_n * c.splits
  steps = k // c.tile_k // c.splits
  assert steps >= 4 or c.splits == 1
  if (n, k) not in ((4096, 2752), (576, 576)):  # 2752 = 43 x 64: no split divides it
    assert blocks >= 0.9 * 132


def test_bad_input_is_rejected_before_any_kernel():
  x, w = _operands(1, 128, 256)
  with pytest.raises(ValueError, match="bfloat16 operands"):
    gemv.gemv(x.astype(jnp.float32), w)
  with pytest.raises(ValueError, match=r"x \(b, k\) and w \(n, k\)"):
    gemv.gemv(x, w[:, :128])
  with pytest.raises(ValueError, match="1..16 rows of activations"):
    gemv.gemv(jnp.zeros((17, 256), jnp.bfloat16), w)
  with pytest.raises(ValueError, match="100 weight rows are not a multiple of tile_n=64"):
    gemv.gemv(jnp.zeros((1, 256), jnp.bfloat16), jnp.zeros((100, 256), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"k=320 is not a multiple of tile_k x splits = 128 x 1"):
    gemv.gemv(jnp.zeros((1, 320), jnp.bfloat16), jnp.zeros((64, 320), jnp.bfloat16))


@pytest.mark.parametrize("tp", [2, 4])  # bf16 at TP=1 hits an XLA:CPU dot limitation
def test_model_with_pallas_matmul_gives_xla_tokens(tmp_path, tp):
  """Off the GPU `matmul="pallas"` runs the kernel's reference: the same greedy tokens."""
  weights = random_weights(GEMV_MODEL, seed=3)
  got = {m: decoder_from_weights(tmp_path / m, GEMV_MODEL, weights, tp=tp, dtype=jnp.bfloat16,
                                 matmul=m).generate(PROMPTS, 8, stop_at_eos=False).tokens
         for m in ("xla", "pallas")}
  np.testing.assert_array_equal(got["pallas"], got["xla"])


def test_decode_loop_lowers_with_a_gemv_per_projection(tmp_path):
  dec = decoder_from_weights(tmp_path, GEMV_MODEL, random_weights(GEMV_MODEL), tp=2,
                             dtype=jnp.bfloat16, matmul="pallas")
  cache, comm = dec.new_cache(2), dec.new_comm_state(2)
  text = lowering_checks.lower_for_cuda(dec.loop_fn(4, False), dec.state, cache, comm,
                                        jnp.zeros((2,), jnp.int32))
  calls = lowering_checks.mosaic_calls(text)
  assert len(calls) == 5  # qkv, o, gate_up, down (shared by the layers) and the lm_head
  assert all("gemv" in c for c in calls)
  assert lowering_checks.multicast_uses(text) == []


def test_unknown_matmul_is_rejected(tmp_path):
  with pytest.raises(ValueError, match=r"unknown matmul 'cublas'; choose from \('xla', 'pallas'\)"):
    decoder_from_weights(tmp_path, GEMV_MODEL, random_weights(GEMV_MODEL), matmul="cublas")
