"""HF checkpoint loading: round trip, sharded index, and the error report."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import random_weights, tiny_config, write_checkpoint
from model_helpers import last_logits
from models import hf_loader
from models.decode import Decoder
from models.sharding import make_mesh


def test_sharded_index_loads_like_single_file(tmp_path):
  config = tiny_config()
  weights = random_weights(config, seed=5)
  mesh = make_mesh(1)
  out = []
  for shards in (1, 3):
    d = write_checkpoint(tmp_path / f"s{shards}", config, weights, shards=shards)
    cfg, g, st = hf_loader.load(d, mesh, jnp.float32)
    out.append(np.asarray(last_logits(Decoder(cfg, g, st, mesh, max_len=16), [[1, 2, 3]])))
  np.testing.assert_array_equal(out[0], out[1])


def test_all_problems_reported_at_once(tmp_path):
  config = tiny_config()
  weights = random_weights(config, seed=6)
  del weights["model.layers.1.mlp.up_proj.weight"]
  weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)
  weights["model.layers.0.extra.weight"] = np.zeros((3,), np.float32)
  weights["model.norm.weight"] = np.zeros((32,), np.int32)
  d = write_checkpoint(tmp_path, config, weights)
  with pytest.raises(hf_loader.CheckpointError) as info:
    hf_loader.load(d, make_mesh(1))
  msg = str(info.value)
  assert "4 problem(s)" in msg
  assert "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [64, 32])" in msg
  assert ("tensor model.layers.0.self_attn.k_proj.weight: expected shape [16, 32], found [8, 32]"
          in msg)
  assert "unexpected tensor model.layers.0.extra.weight" in msg
  assert "tensor model.norm.weight: expected a float dtype" in msg and "found I32" in msg


def test_config_that_disagrees_with_tensors(tmp_path):
  config = tiny_config()
  d = write_checkpoint(tmp_path, config, random_weights(config))
  (d / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
  with pytest.raises(hf_loader.CheckpointError, match=r"model.embed_tokens.weight: expected shape "
                                                      r"\[64, 48\], found \[64, 32\]"):
    hf_loader.load(d, make_mesh(1))


@pytest.mark.parametrize("change,message", [
    ({"model_type": "mistral"}, "expected a LlamaForCausalLM config"),
    ({"attention_bias": True}, "biases are not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"num_attention_heads": 5}, "must be a multiple of num_kv_heads"),
])
def test_invalid_config(tmp_path, change, message):
  config = tiny_config()
  d = write_checkpoint(tmp_path, config, random_weights(config))
  (d / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(hf_loader.CheckpointError, match=message):
    hf_loader.load(d, make_mesh(1))
