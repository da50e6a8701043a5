"""Tiny HF-format LLaMA configs, random weights, and checkpoint writers for tests."""

import json
import pathlib

import numpy as np
from safetensors.numpy import save_file


def tiny_config(**overrides) -> dict:
  """A HF LlamaConfig dict for a tiny model; any key can be overridden."""
  config = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "torch_dtype": "float32",
    "hidden_act": "silu",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
  }
  config.update(overrides)
  return config


def random_weights(config: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """All LlamaForCausalLM tensors, HF names and shapes. Linear weights have std
  1/sqrt(fan_in) and embeddings std 1 so activations stay O(1); norm weights are
  1 + 0.1*normal so that they matter. No lm_head.weight when embeddings are tied."""
  rng = np.random.default_rng(seed)
  D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  hd = config.get("head_dim") or D // config["num_attention_heads"]
  q_dim, kv_dim = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd

  def linear(out_dim, in_dim):
    return rng.normal(0.0, 1.0 / np.sqrt(in_dim), (out_dim, in_dim))

  def norm():
    return 1.0 + 0.1 * rng.normal(size=D)

  w = {"model.embed_tokens.weight": rng.normal(0.0, 1.0, (V, D))}
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = norm()
    w[p + "self_attn.q_proj.weight"] = linear(q_dim, D)
    w[p + "self_attn.k_proj.weight"] = linear(kv_dim, D)
    w[p + "self_attn.v_proj.weight"] = linear(kv_dim, D)
    w[p + "self_attn.o_proj.weight"] = linear(D, q_dim)
    w[p + "post_attention_layernorm.weight"] = norm()
    w[p + "mlp.gate_proj.weight"] = linear(F, D)
    w[p + "mlp.up_proj.weight"] = linear(F, D)
    w[p + "mlp.down_proj.weight"] = linear(D, F)
  w["model.norm.weight"] = norm()
  if not config.get("tie_word_embeddings"):
    w["lm_head.weight"] = linear(V, D)
  return {name: a.astype(dtype) for name, a in w.items()}


def write_checkpoint(directory, config: dict, weights: dict, shards: int = 1) -> pathlib.Path:
  """Write config.json plus model.safetensors (shards == 1), or `shards` files
  model-0000k-of-0000n.safetensors with a model.safetensors.index.json."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config, indent=2))
  tensors = {name: np.ascontiguousarray(a) for name, a in weights.items()}
  if shards == 1:
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
  assert 1 < shards <= len(tensors), shards
  names, weight_map = list(tensors), {}
  for k in range(shards):
    chunk = names[k * len(names) // shards : (k + 1) * len(names) // shards]
    filename = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    save_file({n: tensors[n] for n in chunk}, directory / filename, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(chunk, filename))
  index = {
    "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
    "weight_map": weight_map,
  }
  (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  return directory
