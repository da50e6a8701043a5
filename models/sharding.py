"""Tensor-parallel layout: the device mesh, the sharding table and attention-head placement.

Megatron partitioning over one mesh axis `tp`: q/k/v and gate/up are column-parallel,
o_proj and down_proj row-parallel, the embedding (and lm_head) split on the vocabulary.
Every rule lives in `PARAM_SPECS`.

Heads: rank r owns a contiguous block of query heads and the KV heads they read. When the
KV heads do not divide over `tp`, `HeadLayout` pads with zero heads (their o_proj rows
are zero, so they add exactly nothing) and replicates KV heads when `tp` exceeds them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from models.config import LlamaConfig

TP = "tp"

# Parameter name -> PartitionSpec of its global array. Names are the leaf names in
# models/llama.py. Matrices are stored (out, in) like HF's nn.Linear (d model, f MLP,
# v vocab, n heads*head_dim).
PARAM_SPECS: dict[str, P] = {
    "embed": P(TP, None),        # (v, d): vocab-parallel lookup, partial sums all-reduced
    "lm_head": P(TP, None),      # (v, d): vocab-parallel logits
    "w_qkv": P(TP, None),        # (n_q + 2 n_kv, d): column-parallel, rank-major [q_r; k_r; v_r]
    "w_o": P(None, TP),          # (d, n_q): row-parallel, output all-reduced
    "w_gate_up": P(TP, None),    # (2 f, d): column-parallel, rank-major [gate_r; up_r]
    "w_down": P(None, TP),       # (d, f): row-parallel, output all-reduced
    "attn_norm": P(None),
    "mlp_norm": P(None),
    "final_norm": P(None),
}

# KV cache arrays (batch, kv_heads, max_len, head_dim): split on heads like w_k / w_v.
CACHE_SPEC = P(None, TP, None, None)


def make_mesh(tp: int) -> Mesh:
  """A 1-D mesh over the first `tp` local devices, in `jax.devices()` order."""
  devices = jax.devices()
  if not 1 <= tp <= len(devices):
    raise ValueError(f"tp={tp} needs 1 <= tp <= {len(devices)} available devices")
  return Mesh(np.array(devices[:tp]), (TP,))


@dataclasses.dataclass(frozen=True)
class HeadLayout:
  """Where each original attention head lives at a given tensor-parallel degree.

  `q_src[i]` / `kv_src[j]` give the original head stored in global slot i / j, or -1 for
  a zero (padding) head. Slots are rank-major: rank r owns q slots
  [r * q_per_rank, (r + 1) * q_per_rank) and KV slots likewise, and within a rank local
  query head i reads local KV head i // (q_per_rank // kv_per_rank).
  """

  tp: int
  q_src: tuple[int, ...]
  kv_src: tuple[int, ...]

  @property
  def q_per_rank(self) -> int:
    return len(self.q_src) // self.tp

  @property
  def kv_per_rank(self) -> int:
    return len(self.kv_src) // self.tp

  @classmethod
  def build(cls, num_heads: int, num_kv_heads: int, tp: int) -> "HeadLayout":
    group = num_heads // num_kv_heads
    # Fewest KV slots >= num_kv_heads that either split evenly over tp or evenly divide it.
    kv_total = num_kv_heads
    while kv_total % tp and tp % kv_total:
      kv_total += 1
    replicas = max(1, tp // kv_total)              # ranks sharing one KV head
    kv_per_rank = max(1, kv_total // tp)
    q_per_kv = math.ceil(group / replicas)          # query heads of a KV head on one rank
    q_src, kv_src = [], []
    for rank in range(tp):
      first_kv = (rank // replicas) * kv_per_rank
      replica = rank % replicas
      for kv in range(first_kv, first_kv + kv_per_rank):
        real = kv < num_kv_heads
        kv_src.append(kv if real else -1)
        for m in range(q_per_kv):
          in_group = replica * q_per_kv + m
          q_src.append(kv * group + in_group if real and in_group < group else -1)
    return cls(tp=tp, q_src=tuple(q_src), kv_src=tuple(kv_src))


def check_tp(config: LlamaConfig, tp: int) -> None:
  """Raises a clear error for a tensor-parallel degree the model cannot be split over."""
  problems = []
  if config.intermediate_size % tp:
    problems.append(f"intermediate_size {config.intermediate_size} is not divisible by tp={tp}")
  if config.vocab_size % tp:
    problems.append(f"vocab_size {config.vocab_size} is not divisible by tp={tp}")
  if problems:
    raise ValueError("cannot shard the model: " + "; ".join(problems))


def rank_major(tp: int, *parts: np.ndarray) -> np.ndarray:
  """Concatenates row-split parts so that each rank's rows of every part are contiguous:
  [a_0; b_0; a_1; b_1; ...], where a_r is rank r's equal share of part a. One fused
  matmul per rank then replaces one per part (fewer, larger batch-1 products)."""
  blocks = [p.reshape(tp, p.shape[0] // tp, *p.shape[1:]) for p in parts]
  out = np.concatenate(blocks, axis=1)
  return out.reshape(-1, *parts[0].shape[1:])


def padded_rows(w: np.ndarray, src: tuple[int, ...], head_dim: int) -> np.ndarray:
  """Rearranges per-head row blocks of `w` (heads*head_dim, ...) into the slots of `src`."""
  heads = w.reshape(-1, head_dim, *w.shape[1:])
  out = np.zeros((len(src), *heads.shape[1:]), w.dtype)
  for slot, head in enumerate(src):
    if head >= 0:
      out[slot] = heads[head]
  return out.reshape(len(src) * head_dim, *w.shape[1:])
