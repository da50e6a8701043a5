"""Sanity tests of the numpy reference itself, so it cannot silently be wrong."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from hf_fixtures import random_weights, tiny_config, write_checkpoint
from numpy_llama import forward, rope_inv_freq


def test_single_token_matches_hand_expansion():
  # With T=1, RoPE at position 0 is the identity and softmax over one key is 1,
  # so each query head's attention output is the v-projection of its KV head.
  config = tiny_config()
  w = {n: a.astype(np.float64) for n, a in random_weights(config).items()}
  hq, hkv, hd = 4, 2, 8

  def norm(x, weight):
    return x / np.sqrt(np.mean(x * x) + 1e-5) * weight

  h = w["model.embed_tokens.weight"][5]
  for i in range(2):
    p = f"model.layers.{i}."
    x = norm(h, w[p + "input_layernorm.weight"])
    v = (w[p + "self_attn.v_proj.weight"] @ x).reshape(hkv, hd)
    h = h + w[p + "self_attn.o_proj.weight"] @ np.repeat(v, hq // hkv, axis=0).reshape(-1)
    x = norm(h, w[p + "post_attention_layernorm.weight"])
    gate, up = w[p + "mlp.gate_proj.weight"] @ x, w[p + "mlp.up_proj.weight"] @ x
    h = h + w[p + "mlp.down_proj.weight"] @ (gate / (1 + np.exp(-gate)) * up)
  expected = w["lm_head.weight"] @ norm(h, w["model.norm.weight"])

  np.testing.assert_allclose(forward(w, config, np.array([5]))[0], expected, rtol=1e-12, atol=1e-12)


def test_causal():
  config = tiny_config()
  w = random_weights(config)
  tokens = np.array([1, 7, 3, 9, 4, 60])
  changed = tokens.copy()
  changed[4:] = [11, 12]
  a, b = forward(w, config, tokens), forward(w, config, changed)
  np.testing.assert_array_equal(a[:4], b[:4])
  assert not np.allclose(a[4:], b[4:])


def test_gqa_equals_mha_with_repeated_kv():
  gqa = tiny_config(num_attention_heads=4, num_key_value_heads=2)
  mha = tiny_config(num_attention_heads=4, num_key_value_heads=4)
  w = random_weights(gqa, seed=1)
  w_mha = dict(w)
  for i in range(gqa["num_hidden_layers"]):
    for kv in "kv":
      name = f"model.layers.{i}.self_attn.{kv}_proj.weight"
      heads = w[name].reshape(2, 8, -1)  # [Hkv, hd, D]
      w_mha[name] = np.repeat(heads, 2, axis=0).reshape(4 * 8, -1)
  tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
  np.testing.assert_allclose(forward(w, gqa, tokens), forward(w_mha, mha, tokens), rtol=0, atol=1e-12)


def llama3_config(factor):
  scaling = {
    "rope_type": "llama3",
    "factor": factor,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
  }
  return tiny_config(head_dim=128, rope_theta=500000.0, rope_scaling=scaling)


def test_llama3_rope_scaling():
  inv_freq = rope_inv_freq(llama3_config(8.0) | {"rope_scaling": None})
  np.testing.assert_allclose(rope_inv_freq(llama3_config(1.0)), inv_freq, rtol=1e-14, atol=0)

  scaled = rope_inv_freq(llama3_config(8.0))
  wavelen = 2 * np.pi / inv_freq
  long, short = wavelen > 8192, wavelen < 8192 / 4
  medium = ~long & ~short
  assert long.any() and short.any() and medium.any()
  np.testing.assert_array_equal(scaled[long], inv_freq[long] / 8)
  np.testing.assert_array_equal(scaled[short], inv_freq[short])
  assert np.all(scaled[medium] < inv_freq[medium]) and np.all(scaled[medium] > inv_freq[medium] / 8)


def test_tied_embeddings():
  tied = tiny_config(tie_word_embeddings=True)
  w = random_weights(tied, seed=2)
  assert "lm_head.weight" not in w
  untied_w = w | {"lm_head.weight": w["model.embed_tokens.weight"].copy()}
  tokens = np.array([0, 63, 17, 2])
  np.testing.assert_array_equal(forward(w, tied, tokens), forward(untied_w, tiny_config(), tokens))


@pytest.mark.parametrize("shards", [1, 3])
def test_write_checkpoint_round_trip(tmp_path, shards):
  config = tiny_config()
  w = random_weights(config, seed=3)
  path = write_checkpoint(tmp_path / "ckpt", config, w, shards=shards)
  assert json.loads((path / "config.json").read_text()) == config
  if shards == 1:
    loaded = load_file(path / "model.safetensors")
  else:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in w.values())
    loaded = {}
    for f in files:
      shard = load_file(path / f)
      assert all(index["weight_map"][n] == f for n in shard)
      loaded |= shard
  assert loaded.keys() == w.keys()
  for name, a in w.items():
    assert loaded[name].dtype == a.dtype
    np.testing.assert_array_equal(loaded[name], a)
