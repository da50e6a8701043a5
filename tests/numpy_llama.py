"""Plain-numpy LLaMA forward pass: the ground truth the JAX model is tested against.

Written from the math in float64, one sequence at a time, with no caching and no
tensor parallelism. It deliberately shares no code with the package (it imports
only numpy), so a bug in the package cannot hide by being repeated here.
Tensor names and layouts are those of HuggingFace ``LlamaForCausalLM``.
"""

import math

import numpy as np


def head_dim(config: dict) -> int:
  return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_inv_freq(config: dict) -> np.ndarray:
  """RoPE inverse frequencies [hd/2], with Llama-3 scaling as in HF `_compute_llama3_parameters`."""
  hd = head_dim(config)
  inv_freq = 1.0 / config["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  scaling = config.get("rope_scaling")
  if not scaling:
    return inv_freq
  assert scaling["rope_type"] == "llama3", scaling
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  orig = scaling["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen, high_freq_wavelen = orig / low, orig / high
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (orig / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled)


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * w


def rotate_half(x: np.ndarray) -> np.ndarray:
  x1, x2 = np.split(x, 2, axis=-1)
  return np.concatenate([-x2, x1], axis=-1)


def apply_rope(x: np.ndarray, config: dict) -> np.ndarray:
  """x: [T, H, hd] at positions 0..T-1."""
  angles = np.arange(x.shape[0], dtype=np.float64)[:, None] * rope_inv_freq(config)[None, :]
  angles = np.concatenate([angles, angles], axis=-1)[:, None, :]  # [T, 1, hd]
  return x * np.cos(angles) + rotate_half(x) * np.sin(angles)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def silu(x: np.ndarray) -> np.ndarray:
  return x / (1 + np.exp(-x))


def attention(x: np.ndarray, w: dict, p: str, config: dict) -> np.ndarray:
  T = x.shape[0]
  hq, hkv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
  q = (x @ w[p + "q_proj.weight"].T).reshape(T, hq, hd)
  k = (x @ w[p + "k_proj.weight"].T).reshape(T, hkv, hd)
  v = (x @ w[p + "v_proj.weight"].T).reshape(T, hkv, hd)
  q, k = apply_rope(q, config), apply_rope(k, config)
  causal = np.tril(np.ones((T, T), dtype=bool))
  out = np.empty((T, hq, hd))
  for h in range(hq):
    kv = h // (hq // hkv)
    scores = q[:, h] @ k[:, kv].T / math.sqrt(hd)  # [T, T]
    scores = np.where(causal, scores, -np.inf)
    out[:, h] = softmax(scores) @ v[:, kv]
  return out.reshape(T, hq * hd) @ w[p + "o_proj.weight"].T


def mlp(x: np.ndarray, w: dict, p: str) -> np.ndarray:
  gate = x @ w[p + "gate_proj.weight"].T
  up = x @ w[p + "up_proj.weight"].T
  return (silu(gate) * up) @ w[p + "down_proj.weight"].T


def forward(weights: dict[str, np.ndarray], config: dict, tokens: np.ndarray) -> np.ndarray:
  """Logits [T, V] (float64) for one sequence `tokens` [T] at positions 0..T-1."""
  w = {name: np.asarray(a, dtype=np.float64) for name, a in weights.items()}
  eps = config["rms_norm_eps"]
  h = w["model.embed_tokens.weight"][np.asarray(tokens)]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = h + attention(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", config)
    h = h + mlp(rms_norm(h, w[p + "post_attention_layernorm.weight"], eps), w, p + "mlp.")
  h = rms_norm(h, w["model.norm.weight"], eps)
  lm_head = w["model.embed_tokens.weight" if config.get("tie_word_embeddings") else "lm_head.weight"]
  return h @ lm_head.T
