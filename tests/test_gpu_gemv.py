"""GPU: the decode GEMV kernel against XLA's dot at the model's shapes, and SmolLM2 decoding
through it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import factory
from models.decode import Decoder
from models.sharding import make_mesh
from models.tokenizer import Tokenizer
from pallas_kernels import gemv


@pytest.mark.gpu(count=1)
@pytest.mark.parametrize("b, n, k", [(1, 4096, 4096), (1, 12288, 4096), (1, 22016, 4096),
                                     (1, 4096, 11008), (1, 4096, 5504), (4, 6144, 4096),
                                     (16, 4096, 2048), (1, 4096, 1376)])
def test_matches_xla_dot(b, n, k):
  kx, kw = jax.random.split(jax.random.key(n + k + b))
  x = jax.random.normal(kx, (b, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (n, k), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  config = gemv.config_for(n, k)
  got = np.asarray(jax.jit(lambda x, w: gemv.gemv(x, w, config))(x, w), np.float32)
  exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32).T
  xla = np.asarray(jax.jit(gemv.reference)(x, w), np.float32)
  # Both accumulate in f32 and round once: equal up to bf16 rounding of the result.
  np.testing.assert_allclose(got, exact, rtol=1e-2, atol=1e-2)
  assert np.abs(got - exact).max() <= 1.5 * np.abs(xla - exact).max() + 1e-6


@pytest.mark.gpu(count=2)
@pytest.mark.parametrize("tp", [1, 2])
def test_smollm2_decodes_through_the_kernel(tp):
  mesh = make_mesh(tp)
  config, graphdef, state, ckpt = factory.build("smollm2-135m", mesh)
  tok = Tokenizer(ckpt)
  ids = [tok.chat("What is the capital of France?")]
  xla, kernel = (Decoder(config, graphdef, state, mesh, max_len=128, matmul=m)
                 for m in ("xla", "pallas"))
  got = kernel.generate(ids, 24).tokens
  print(f"TP={tp} pallas: {tok.decode(got[0])!r}")
  assert "Paris" in tok.decode(got[0])
  cache, comm = xla.new_cache(1), xla.new_comm_state(1)
  first_xla, _, cache, comm = xla.prefill(cache, comm, ids)
  step_xla = xla.step_fn(xla.state, cache, comm, first_xla)[1]
  cache, comm = kernel.new_cache(1), kernel.new_comm_state(1)
  first_k, _, cache, comm = kernel.prefill(cache, comm, ids)  # prefill: XLA dots in both
  step_k = kernel.step_fn(kernel.state, cache, comm, first_k)[1]  # decode step: the kernel
  assert int(first_k[0]) == int(first_xla[0])
  np.testing.assert_allclose(np.asarray(step_k), np.asarray(step_xla), rtol=0.05, atol=0.3)
