"""The model's one communication interface: all-reduce + residual add + RMSNorm.

Every row-parallel output (o_proj, down_proj, the vocab-parallel embedding) leaves a
rank-local partial sum. `Comm.reduce_add_norm(partial, residual, norm_w, state)` returns
`(normed, new_residual, state)` with

    new_residual = residual + all_reduce(partial)
    normed       = rms_norm(new_residual) * norm_w

Backends are chosen by name. A backend may keep per-rank state (a communication
workspace, an epoch counter) that the decode loop carries and donates; the model never
looks inside it. Kernels plug in as entries of `BACKENDS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import all_reduce, fused_add_norm, workspace


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  """RMSNorm in f32, rounded once to x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Backend:
  """An all-reduce implementation behind `Comm`.

  reduce_add_norm(partial, residual, norm_w, eps, axis, state) -> (normed, residual, state)
  gather_words(words (b, k) int32, axis, state) -> ((b, n, k) int32 of every rank, state)
  init_state(mesh, axis, example, num_calls) -> per-rank state pytree (global arrays) or None
  """

  reduce_add_norm: Callable[..., tuple[jax.Array, jax.Array, Any]]
  gather_words: Callable[..., tuple[jax.Array, Any]] = (
      lambda words, axis, state: (lax.all_gather(words, axis, axis=1), state))
  init_state: Callable[..., Any] = lambda *args, **kwargs: None
  state_spec: Callable[[str], Any] = lambda axis: None


def _xla_reduce_add_norm(partial, residual, norm_w, eps, axis, state):
  with jax.named_scope("all_reduce"):
    total = lax.psum(partial, axis)
  return (*_add_norm(total, residual, norm_w, eps), state)


def _add_norm(total, residual, norm_w, eps):
  new_residual = (residual.astype(jnp.float32) + total.astype(jnp.float32)).astype(residual.dtype)
  return rms_norm(new_residual, norm_w, eps), new_residual


def _kernel_gather_words(words, axis, ws):
  """An exact all-gather of a few int32 words per row through the peer-write all-reduce, so
  that a decode step holds no XLA collective (XLA's own collectives keep a loop out of a
  CUDA graph's WHILE node, docs/decode_baseline.md): every word travels as four bytes, each
  an integer 0..255 (exact in bf16 and f32, the workspace's dtype), in this rank's own
  columns of a zero message; a sum with zeros is exact, so the all-reduce returns every
  rank's bytes unchanged."""
  b, k = words.shape
  n, me = lax.axis_size(axis), lax.axis_index(axis)
  shifts = jnp.arange(4, dtype=jnp.uint32) * 8
  u = lax.bitcast_convert_type(words, jnp.uint32)
  mine = ((u[..., None] >> shifts) & 0xFF).astype(ws.slots.dtype).reshape(b, 1, 4 * k)
  message = jnp.where((jnp.arange(n) == me)[None, :, None], mine, jnp.zeros_like(mine))
  with jax.named_scope("all_reduce"):
    total, ws = all_reduce.all_reduce(message.reshape(b, n * 4 * k), ws, axis, "auto")
  byte = total.astype(jnp.float32).astype(jnp.uint32).reshape(b, n, k, 4)
  return lax.bitcast_convert_type(jnp.sum(byte << shifts, axis=-1, dtype=jnp.uint32),
                                  jnp.int32), ws


def _kernel_backend(method: str) -> Backend:
  """A peer-write all-reduce kernel, then the residual add and RMSNorm in XLA.

  The workspace is sized for one decode step's message (batch x hidden); larger messages
  (prefill) go through lax.psum. The choice is static per shape, so every rank agrees.
  """

  def reduce_add_norm(partial, residual, norm_w, eps, axis, ws):
    b, t, d = partial.shape
    x = partial.reshape(b * t, d)
    chosen = method if all_reduce.fits(x, ws) else "xla"
    with jax.named_scope("all_reduce"):
      total, ws = all_reduce.all_reduce(x, ws, axis, chosen)
    return (*_add_norm(total.reshape(b, t, d), residual, norm_w, eps), ws)

  return Backend(reduce_add_norm, _kernel_gather_words, init_workspace, workspace.spec)


def workspace_capacity(example, n: int) -> int:
  """Workspace elements for one decode step's message (batch, 1, hidden) through any kernel
  over `n` ranks."""
  b, _, d = example.shape
  return max(all_reduce.workspace_capacity(b, d, example.dtype, n),
             fused_add_norm.PROTOCOLS["ll"] * b * fused_add_norm.padded_hidden(d))


def init_workspace(mesh, axis, example):
  """A workspace for one decode step's message (batch, 1, hidden) through any kernel."""
  return workspace.init(mesh, axis, workspace_capacity(example, mesh.shape[axis]),
                        example.dtype)


def fused_backend(protocol: str, config=fused_add_norm.CONFIG) -> Backend:
  """All-reduce, add and norm in one kernel (pallas_kernels/fused_add_norm.py); `config`
  caps its grid (benchmarks sweep it)."""

  def reduce_add_norm(partial, residual, norm_w, eps, axis, ws):
    b, t, d = partial.shape
    if not fused_add_norm.fits(b * t, d, ws, protocol):
      return _xla_reduce_add_norm(partial, residual, norm_w, eps, axis, ws)
    with jax.named_scope("all_reduce"):
      normed, new_residual, ws = fused_add_norm.all_reduce_add_norm(
          partial.reshape(b * t, d), residual.reshape(b * t, d), norm_w, ws, axis, eps,
          config=config, protocol=protocol)
    return normed.reshape(b, t, d), new_residual.reshape(b, t, d), ws

  return Backend(reduce_add_norm, _kernel_gather_words, init_workspace, workspace.spec)


BACKENDS: dict[str, Backend] = {
    "xla": Backend(reduce_add_norm=_xla_reduce_add_norm),
    "one_shot": _kernel_backend("one_shot"),
    "one_shot_ll": _kernel_backend("one_shot_ll"),
    "two_shot": _kernel_backend("two_shot"),
    "auto": _kernel_backend("auto"),
    "fused": fused_backend("flags"),
    "fused_ll": fused_backend("ll"),
}


@dataclasses.dataclass(frozen=True)
class Comm:
  """Static (hashable) description of how a rank talks to its tensor-parallel peers."""

  backend: str = "xla"
  axis: str = "tp"
  eps: float = 1e-5

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"unknown all-reduce backend {self.backend!r}; choose from {sorted(BACKENDS)}")

  def reduce_add_norm(self, partial, residual, norm_w, state):
    impl = BACKENDS[self.backend].reduce_add_norm
    return impl(partial, residual, norm_w, self.eps, self.axis, state)

  def gather_words(self, words, state):
    """Every rank's (b, k) int32 words, exactly: (b, n, k), and the new state."""
    return BACKENDS[self.backend].gather_words(words, self.axis, state)

  def rank(self) -> jax.Array:
    return lax.axis_index(self.axis)
