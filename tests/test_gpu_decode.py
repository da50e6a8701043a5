"""GPU: SmolLM2 (real weights, bf16) decodes the same tokens at TP=1 and TP=2, both loops."""

import numpy as np
import pytest

from models import factory
from models.decode import Decoder
from models.sharding import make_mesh
from models.tokenizer import Tokenizer

PROMPTS = ["What is the capital of France?", "Write a haiku about GPUs.",
           "List three prime numbers."]


def _generate(tp, loop, backend="xla"):
  mesh = make_mesh(tp)
  config, graphdef, state, ckpt = factory.build("smollm2-135m", mesh)
  tok = Tokenizer(ckpt)
  decoder = Decoder(config, graphdef, state, mesh, backend=backend, max_len=128)
  ids = [tok.chat(p) for p in PROMPTS]
  return tok, decoder.generate(ids, 48, loop=loop).tokens


@pytest.mark.gpu(count=2)
def test_smollm2_tp1_equals_tp2_on_gpus():
  tok, ref = _generate(1, "jit")
  print("\n".join(f"TP=1: {tok.decode(row)!r}" for row in ref))
  assert "Paris" in tok.decode(ref[0])
  for tp, loop in [(1, "python"), (2, "jit"), (2, "python")]:
    _, got = _generate(tp, loop)
    np.testing.assert_array_equal(got, ref, err_msg=f"tp={tp} loop={loop}")


@pytest.mark.gpu(count=2)
@pytest.mark.parametrize("backend", ["one_shot", "fused"])
def test_smollm2_kernel_backends_equal_xla_at_tp2(backend):
  _, ref = _generate(2, "jit", "xla")
  tok, got = _generate(2, "jit", backend)
  print("\n".join(f"{backend}: {tok.decode(row)!r}" for row in got))
  np.testing.assert_array_equal(got, ref)
