"""Load a HuggingFace `LlamaForCausalLM` directory into the sharded Flax model, without torch.

The directory holds config.json, model.safetensors (or a sharded index) and, for
generation, tokenizer.json. Every tensor's name, shape and dtype is checked against the
config before anything is built, and all problems are reported together. Tensors are then
read one at a time (memory-mapped), re-laid out for the tensor-parallel head placement
and placed straight into their shards.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _reader(files: dict[str, pathlib.Path]):
  """Yields name -> array, with each safetensors file opened once (memory-mapped)."""
  with contextlib.ExitStack() as stack:
    handles = {p: stack.enter_context(safe_open(p, framework="numpy"))
               for p in sorted(set(files.values()))}
    yield lambda name: handles[files[name]].get_tensor(name)


def _layer_arrays(get, i: int, heads: sharding.HeadLayout, hd: int) -> dict[str, np.ndarray]:
  """Model-layout arrays of layer i: fused rank-major q/k/v and gate/up, (out, in) matrices."""
  p = f"model.layers.{i}."
  rows = lambda name, src: sharding.padded_rows(get(p + name), src, hd)
  qkv = sharding.rank_major(heads.tp, rows("self_attn.q_proj.weight", heads.q_src),
                            rows("self_attn.k_proj.weight", heads.kv_src),
                            rows("self_attn.v_proj.weight", heads.kv_src))
  o = sharding.padded_rows(get(p + "self_attn.o_proj.weight").T, heads.q_src, hd).T
  gate_up = sharding.rank_major(heads.tp, get(p + "mlp.gate_proj.weight"),
                                get(p + "mlp.up_proj.weight"))
  return {"attn_norm": get(p + "input_layernorm.weight"), "w_qkv": qkv, "w_o": o,
          "mlp_norm": get(p + "post_attention_layernorm.weight"), "w_gate_up": gate_up,
          "w_down": get(p + "mlp.down_proj.weight")}


def _model_arrays(get, config: LlamaConfig, heads: sharding.HeadLayout):
  """Yields (model state path, host array) for every parameter, one layer at a time."""
  yield ("embed",), get("model.embed_tokens.weight")
  yield ("final_norm",), get("model.norm.weight")
  if not config.tie_word_embeddings:
    yield ("lm_head",), get("lm_head.weight")
  for i in range(config.num_layers):
    for leaf, w in _layer_arrays(get, i, heads, config.head_dim).items():
      yield ("layers", i, leaf), w


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
  with _reader(files) as get:
    for key, w in _model_arrays(get, config, heads):
      assert w.shape == shapes[key].shape, (key, w.shape, shapes[key].shape)
      w = np.asarray(w, dtype=jnp.dtype(dtype))
      arrays[key] = jax.device_put(w, NamedSharding(mesh, specs[key].get_value()))
  state = nnx.from_flat_state([(k, shapes[k].replace(arrays[k])) for k in shapes])
  return config, graphdef, state
