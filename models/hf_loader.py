"""Load a HuggingFace `LlamaForCausalLM` directory into the sharded Flax model, without torch.

The directory holds config.json, model.safetensors (or a sharded index) and, for
generation, tokenizer.json. Every tensor's name, shape and dtype is checked against the
config before anything is built, and all problems are reported together. Tensors are then
read one at a time (memory-mapped), re-laid out for the tensor-parallel head placement
and placed straight into their shards.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from safetensors import safe_open

from models import sharding
from models.config import LlamaConfig
from models.decode import abstract_model, state_specs

_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some exporters save


class CheckpointError(ValueError):
  """A checkpoint that does not match its config; the message lists every problem."""


def load_config(directory: str | pathlib.Path, dtype=jnp.bfloat16) -> LlamaConfig:
  path = pathlib.Path(directory) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{directory}: no config.json")
  try:
    return LlamaConfig.from_hf(json.loads(path.read_text()), dtype=dtype)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: invalid LLaMA config: {e!r}") from e


def expected_tensors(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for this config."""
  d, f, v, hd = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
  nq, nkv = config.num_heads * hd, config.num_kv_heads * hd
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (nq, d),
        p + "self_attn.k_proj.weight": (nkv, d),
        p + "self_attn.v_proj.weight": (nkv, d),
        p + "self_attn.o_proj.weight": (d, nq),
        p + "post_attention_layernorm.weight": (d,),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
    }
  return shapes


def _tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file that holds it."""
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: directory / file for name, file in weight_map.items()}
  single = directory / "model.safetensors"
  if not single.is_file():
    raise CheckpointError(f"{directory}: neither model.safetensors nor model.safetensors.index.json")
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def check_checkpoint(directory: str | pathlib.Path, config: LlamaConfig) -> dict[str, pathlib.Path]:
  """Checks names, shapes and dtypes of every tensor; raises CheckpointError listing all problems."""
  directory = pathlib.Path(directory)
  files = {n: p for n, p in _tensor_files(directory).items() if not n.endswith(_IGNORED_SUFFIXES)}
  expected = expected_tensors(config)
  problems = [f"missing tensor {n} (expected shape {list(s)})"
              for n, s in expected.items() if n not in files]
  problems += [f"unexpected tensor {n}" for n in files if n not in expected]
  for path in sorted(set(files.values())):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        if name not in expected:
          continue
        sl = f.get_slice(name)
        shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
        if shape != expected[name]:
          problems.append(f"tensor {name}: expected shape {list(expected[name])}, found {list(shape)}")
        if dtype not in _FLOAT_DTYPES:
          problems.append(f"tensor {name}: expected a float dtype {sorted(_FLOAT_DTYPES)}, found {dtype}")
  if problems:
    raise CheckpointError(f"{directory}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
  return files


def _to_model_layout(name: str, w: np.ndarray, heads: sharding.HeadLayout, hd: int):
  """(model state path, array) for one HF tensor."""
  if name == "model.embed_tokens.weight":
    return ("embed",), w
  if name == "lm_head.weight":
    return ("lm_head",), w
  if name == "model.norm.weight":
    return ("final_norm",), w
  _, _, layer, *rest = name.split(".")
  key = ".".join(rest)
  layer = int(layer)
  if key == "input_layernorm.weight":
    return ("layers", layer, "attn_norm"), w
  if key == "post_attention_layernorm.weight":
    return ("layers", layer, "mlp_norm"), w
  if key == "self_attn.q_proj.weight":
    return ("layers", layer, "w_q"), sharding.padded_rows(w, heads.q_src, hd)
  if key in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
    leaf = "w_k" if key.startswith("self_attn.k") else "w_v"
    return ("layers", layer, leaf), sharding.padded_rows(w, heads.kv_src, hd)
  if key == "self_attn.o_proj.weight":
    return ("layers", layer, "w_o"), sharding.padded_rows(w.T, heads.q_src, hd).T
  leaf = {"mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
          "mlp.down_proj.weight": "w_down"}[key]
  return ("layers", layer, leaf), w


def load(directory: str | pathlib.Path, mesh: Mesh, dtype=jnp.bfloat16):
  """Returns (config, graphdef, state) with every weight placed in its shards on `mesh`."""
  directory = pathlib.Path(directory)
  config = load_config(directory, dtype)
  tp = mesh.shape[sharding.TP]
  graphdef, abstract = abstract_model(config, tp)
  files = check_checkpoint(directory, config)
  heads = sharding.HeadLayout.build(config.num_heads, config.num_kv_heads, tp)
  specs = dict(nnx.to_flat_state(state_specs(abstract)))
  shapes = dict(nnx.to_flat_state(abstract))
  arrays = {}
  for path in sorted(set(files.values())):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        if name not in files:
          continue
        key, w = _to_model_layout(name, f.get_tensor(name), heads, config.head_dim)
        assert w.shape == shapes[key].shape, (name, w.shape, shapes[key].shape)
        w = np.asarray(w, dtype=jnp.dtype(dtype))
        arrays[key] = jax.device_put(w, NamedSharding(mesh, specs[key].get_value()))
  state = nnx.from_flat_state([(k, shapes[k].replace(arrays[k])) for k in shapes])
  return config, graphdef, state
