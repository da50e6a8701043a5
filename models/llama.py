"""LLaMA-2/3 in flax.nnx, written per tensor-parallel rank.

The forward pass runs inside `shard_map` (models/decode.py): every weight it sees is the
rank's shard (models/sharding.PARAM_SPECS) and every cross-rank sum goes through
`Comm.reduce_add_norm`. With tp=1 the same code is the plain single-device model.

Shape suffixes: b batch, t tokens, s cache slots, d model, f MLP, v vocab (local shard),
k KV heads, g query heads per KV head, h head_dim.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from models.collectives import Comm
from models.config import LlamaConfig
from models.sharding import HeadLayout, rank_major
from pallas_kernels import gemv


class KVCache(NamedTuple):
  """Per-layer keys and values (b, k, s, h), preallocated to s = max_len.

  `lengths` (b,) counts the valid slots of each row: the next token is written at
  position lengths[b]. A pytree outside the module, donated on every step.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse RoPE frequencies (h/2,), with Llama-3 scaling when configured."""
  hd = config.head_dim
  inv = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  s = config.rope_scaling
  if s is None:
    return inv.astype(np.float32)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  medium = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
  scaled = np.where(medium, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
  return scaled.astype(np.float32)


def apply_rope(x: jax.Array, pos_bt: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotate-half RoPE (HF convention) on x (b, t, ..., h) in f32."""
  angle = pos_bt.astype(jnp.float32)[..., None] * inv_freq  # (b, t, h/2)
  angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + angle.shape[-1:])
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


MATMULS = ("xla", "pallas")


def _dense(x, w, matmul: str):
  """x (b, t, in) @ w.T for w stored (out, in). `xla`: XLA's dot; the contracted axis is the
  minor one, so a batch-1 product that XLA strength-reduces to multiply + reduce is a fast
  row reduction (docs/design.md, "Batch-1 matmuls"). `pallas`: the decode GEMV kernel
  (pallas_kernels/gemv.py) for decode-sized products, XLA's dot for the rest."""
  with jax.named_scope("matmul"):
    if matmul == "pallas":
      b, t, d = x.shape
      return gemv.dense(x.reshape(b * t, d), w).reshape(b, t, -1)
    return jnp.einsum("btd,nd->btn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape, fan_in: int, dtype, row_mask=None) -> nnx.Param:
  w = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in)
  if row_mask is not None:  # zero padding heads (see HeadLayout)
    w = w * row_mask
  return nnx.Param(w.astype(dtype))


def _slot_mask(src: tuple[int, ...], head_dim: int) -> np.ndarray:
  return np.repeat(np.array(src) >= 0, head_dim).astype(np.float32)


class Block(nnx.Module):
  """Pre-norm decoder block; its norms are applied by the caller's reduce_add_norm."""

  def __init__(self, config: LlamaConfig, heads: HeadLayout, rngs: nnx.Rngs):
    d, f, hd, dt = config.hidden_size, config.intermediate_size, config.head_dim, config.dtype
    q_mask, kv_mask = _slot_mask(heads.q_src, hd), _slot_mask(heads.kv_src, hd)
    qkv_mask = rank_major(heads.tp, q_mask, kv_mask, kv_mask)
    self.attn_norm = nnx.Param(jnp.ones((d,), dt))
    self.w_qkv = _param(rngs, (qkv_mask.size, d), d, dt, qkv_mask[:, None])
    self.w_o = _param(rngs, (d, q_mask.size), config.num_heads * hd, dt, q_mask[None, :])
    self.mlp_norm = nnx.Param(jnp.ones((d,), dt))
    self.w_gate_up = _param(rngs, (2 * f, d), d, dt)
    self.w_down = _param(rngs, (d, f), f, dt)
    self.head_dim = hd
    self.q_per_rank, self.kv_per_rank = heads.q_per_rank, heads.kv_per_rank

  def attention(self, x_btd, pos_bt, k_bksh, v_bksh, inv_freq, prefill: bool, matmul: str):
    """Returns the rank's o_proj partial (b, t, d) and the updated cache (b, k, s, h)."""
    b, t, _ = x_btd.shape
    hd, nq, nkv = self.head_dim, self.q_per_rank, self.kv_per_rank
    qkv = _dense(x_btd, self.w_qkv[...], matmul)  # this rank's [q; k; v] heads
    q = qkv[..., :nq * hd].reshape(b, t, nkv, nq // nkv, hd)
    k = qkv[..., nq * hd:(nq + nkv) * hd].reshape(b, t, nkv, hd)
    v = qkv[..., (nq + nkv) * hd:].reshape(b, t, nkv, hd)
    q, k = apply_rope(q, pos_bt, inv_freq), apply_rope(k, pos_bt, inv_freq)
    k_new, v_new = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, k, t, h)
    if prefill:  # the prompt starts at slot 0 and attends only to itself
      k_bksh = lax.dynamic_update_slice(k_bksh, k_new.astype(k_bksh.dtype), (0, 0, 0, 0))
      v_bksh = lax.dynamic_update_slice(v_bksh, v_new.astype(v_bksh.dtype), (0, 0, 0, 0))
      keys, values, kv_pos = k_new, v_new, jnp.arange(t)
    else:  # one token per row, written at that row's own position
      write = jax.vmap(lambda c, x, p: lax.dynamic_update_slice(c, x.astype(c.dtype), (0, p, 0)))
      k_bksh = write(k_bksh, k_new, pos_bt[:, 0])
      v_bksh = write(v_bksh, v_new, pos_bt[:, 0])
      keys, values, kv_pos = k_bksh, v_bksh, jnp.arange(k_bksh.shape[2])
    with jax.named_scope("attention"):
      scores = jnp.einsum("btkgh,bksh->bkgts", q, keys, preferred_element_type=jnp.float32)
      scores = scores / math.sqrt(hd)
      visible = kv_pos[None, None, :] <= pos_bt[:, :, None]  # (b, t, s)
      scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
      probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
      out = jnp.einsum("bkgts,bksh->btkgh", probs, values, preferred_element_type=jnp.float32)
      out = out.astype(x_btd.dtype).reshape(b, t, -1)
    return _dense(out, self.w_o[...], matmul), k_bksh, v_bksh

  def mlp(self, x_btd, matmul: str):
    """Returns the rank's down_proj partial (b, t, d)."""
    gate_up = _dense(x_btd, self.w_gate_up[...], matmul)
    gate, up = jnp.split(gate_up, 2, axis=-1)  # this rank's halves
    return _dense(jax.nn.silu(gate) * up, self.w_down[...], matmul)


class Llama(nnx.Module):
  """LlamaForCausalLM. Parameters have global (padded) shapes; see models/sharding.py."""

  def __init__(self, config: LlamaConfig, heads: HeadLayout, rngs: nnx.Rngs):
    d, v, dt = config.hidden_size, config.vocab_size, config.dtype
    self.config = config
    self.embed = nnx.Param(jax.random.normal(rngs.params(), (v, d), jnp.float32).astype(dt))
    self.layers = nnx.List([Block(config, heads, rngs) for _ in range(config.num_layers)])
    self.final_norm = nnx.Param(jnp.ones((d,), dt))
    self.lm_head = None if config.tie_word_embeddings else _param(rngs, (v, d), d, dt)

  def embed_partial(self, tokens_bt: jax.Array, comm: Comm) -> jax.Array:
    """This rank's share of the embedding lookup (rows outside its vocab slice are 0)."""
    table = self.embed[...]
    local = tokens_bt - comm.rank() * table.shape[0]
    mine = (local >= 0) & (local < table.shape[0])
    rows = jnp.take(table, jnp.where(mine, local, 0), axis=0)
    return jnp.where(mine[..., None], rows, jnp.zeros_like(rows))

  def logits(self, x_btd: jax.Array, matmul: str = "xla") -> jax.Array:
    """The rank's vocab slice of the logits, in f32."""
    w = (self.embed if self.lm_head is None else self.lm_head)[...]
    if matmul == "pallas":
      b, t, d = x_btd.shape
      return gemv.dense(x_btd.reshape(b * t, d), w, out_dtype=jnp.float32).reshape(b, t, -1)
    return jnp.einsum("btd,vd->btv", x_btd, w, preferred_element_type=jnp.float32)

  def __call__(self, tokens_bt, pos_bt, cache: KVCache, comm: Comm, comm_state: Any,
               *, prefill: bool, logits_at: jax.Array | None = None, matmul: str = "xla"):
    """Runs the stack on (b, t) tokens at positions pos_bt; `matmul` picks how the
    projections run (MATMULS), the lm_head's with f32 output.

    Returns (logits, cache, comm_state). Logits are the rank's vocab slice, f32, at every
    position, or only at per-row indices `logits_at` (b,) giving (b, 1, v).
    """
    layers = self.layers
    inv_freq = jnp.asarray(rope_frequencies(self.config))
    norms = [blk.attn_norm[...] for blk in layers] + [self.final_norm[...]]
    partial = self.embed_partial(tokens_bt, comm)
    x, h, comm_state = comm.reduce_add_norm(partial, jnp.zeros_like(partial), norms[0], comm_state)
    new_k, new_v = [], []
    for i, blk in enumerate(layers):
      partial, k, v = blk.attention(x, pos_bt, cache.k[i], cache.v[i], inv_freq, prefill,
                                    matmul)
      new_k.append(k)
      new_v.append(v)
      x, h, comm_state = comm.reduce_add_norm(partial, h, blk.mlp_norm[...], comm_state)
      x, h, comm_state = comm.reduce_add_norm(blk.mlp(x, matmul), h, norms[i + 1], comm_state)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    return (self.logits(x, matmul), KVCache(tuple(new_k), tuple(new_v), cache.lengths),
            comm_state)
