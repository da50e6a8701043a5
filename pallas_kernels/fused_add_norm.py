"""All-reduce + residual add + RMSNorm in one Pallas Mosaic GPU kernel (one-shot protocol).

For a row-parallel layer's rank-local partial output (tokens, hidden), the residual and
the next RMSNorm's weight, every rank pushes its partial rows into its slot on every peer,
exchanges epoch flags, then for each of its rows sums the n partials in rank order in f32,
adds the residual, rounds once to get the new residual, and normalizes it:

    new_residual = round(residual + sum_p partial_p)
    normed       = round(new_residual * rsqrt(mean(new_residual^2) + eps) * weight)

Both outputs are bitwise identical on every rank. One kernel replaces XLA's all-reduce,
add and norm kernels and the launches between them.

    normed, new_residual, ws = all_reduce_add_norm(partial, residual, weight, ws, "tp", eps)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import all_reduce as all_reduce_lib
from pallas_kernels import common, peer_sync
from pallas_kernels.workspace import Workspace

VECTOR = 8 * common.THREADS  # bf16 elements in one 16-byte vector per thread


def padded_hidden(hidden: int) -> tuple[int, int]:
  """(padded hidden, column chunk): chunks of 2048 or 1024 elements; other sizes pad with
  zeros, which leave sums of squares unchanged (the mean divides by the true hidden)."""
  for chunk in (2 * VECTOR, VECTOR):
    if hidden % chunk == 0:
      return hidden, chunk
  return -(-hidden // VECTOR) * VECTOR, VECTOR


def fits(tokens: int, hidden: int, ws: Workspace) -> bool:
  """Whether a (tokens, hidden) message fits the workspace once its rows are padded."""
  return tokens * padded_hidden(hidden)[0] <= ws.slots.shape[-1]


def reference(partial, residual, weight, axis: str, eps: float):
  """The kernel's numerics in plain JAX."""
  acc = common.rank_order_sum(partial, axis)
  new_residual = (residual.astype(jnp.float32) + acc).astype(residual.dtype)
  r = new_residual.astype(jnp.float32)
  inv = lax.rsqrt(jnp.mean(r * r, axis=-1, keepdims=True) + eps)
  return (r * inv * weight.astype(jnp.float32)).astype(residual.dtype), new_residual


def _body(n: int, axis: str, rows: int, hidden: int, width: int, chunk: int, eps: float):
  exchange = peer_sync.epoch_flag_exchange(n)
  cols = [pl.ds(c * chunk, chunk) for c in range(width // chunk)]

  def body(x_ref, res_ref, w_ref, sig_ref, _slots_in, _flags_in,
           out_ref, new_res_ref, slots_ref, flags_ref):
    me = lax.axis_index(axis)
    b = lax.axis_index("blocks")
    s = lax.rem(sig_ref[1] // 2, 2)
    first = b * rows

    def slot(p, row, col):
      return slots_ref.at[s, p, pl.ds(row * width + col.start, chunk)]

    @pl.loop(first, first + rows)
    def _push(row):
      for col in cols:
        v = x_ref[row, col]
        for k in range(n):
          plgpu.remote_ref(slot(me, row, col), lax.rem(me + k, n))[...] = v

    mine = [plgpu.remote_ref(flags_ref.at[b, s, pl.ds(me, 1)], lax.rem(me + k, n))
            for k in range(n)]
    exchange(sig_ref.at[pl.ds(1, 1)], flags_ref.at[b, s], *mine)

    @pl.loop(first, first + rows)
    def _add_norm(row):
      sum_sq = jnp.float32(0.0)
      for col in cols:
        acc = slot(0, row, col)[...].astype(jnp.float32)
        for p in range(1, n):  # fixed rank order
          acc = acc + slot(p, row, col)[...].astype(jnp.float32)
        r = (res_ref[row, col].astype(jnp.float32) + acc).astype(new_res_ref.dtype)
        new_res_ref[row, col] = r
        r32 = r.astype(jnp.float32)
        sum_sq = sum_sq + jnp.sum(r32 * r32)
      inv = lax.rsqrt(sum_sq / hidden + eps)
      for col in cols:  # each thread re-reads what it wrote itself
        r32 = new_res_ref[row, col].astype(jnp.float32)
        out_ref[row, col] = (r32 * inv * w_ref[col].astype(jnp.float32)).astype(out_ref.dtype)

  return body


def _kernel_call(partial, residual, weight, ws: Workspace, axis: str, eps: float,
                 config: common.Config):
  n = lax.axis_size(axis)
  tokens, hidden = partial.shape
  width, chunk = padded_hidden(hidden)
  if not fits(tokens, hidden, ws) or ws.slots.dtype != partial.dtype:
    raise ValueError(f"workspace slots {ws.slots.shape} {ws.slots.dtype} cannot carry a"
                     f" ({tokens}, {width}) {partial.dtype} message")
  if width != hidden:
    pad = ((0, 0), (0, width - hidden))
    partial, residual, weight = jnp.pad(partial, pad), jnp.pad(residual, pad), jnp.pad(weight, pad[1])
  blocks, rows = config.grid(tokens)
  epoch = ws.epoch + 1
  dt = partial.dtype
  kernel = peer_sync.aliased_kernel(
      _body(n, axis, rows, hidden, width, chunk, eps),
      (jax.ShapeDtypeStruct((tokens, width), dt), jax.ShapeDtypeStruct((tokens, width), dt),
       jax.ShapeDtypeStruct(ws.slots.shape, dt), jax.ShapeDtypeStruct(ws.flags.shape, jnp.int32)),
      num_blocks=blocks, aliases={4: 2, 5: 3}, name="all_reduce_add_rms_norm")
  out, new_res, slots, flags = kernel(partial, residual, weight, common.signals(epoch), ws.slots,
                                      ws.flags)
  return out[:, :hidden], new_res[:, :hidden], Workspace(slots, flags, epoch)


def all_reduce_add_norm(partial, residual, weight, ws: Workspace, axis: str, eps: float,
                        config: common.Config = common.Config()):
  """(normed, new_residual, workspace) for (tokens, hidden) inputs; call inside shard_map."""
  n = all_reduce_lib.check(partial, axis, "one_shot")
  if residual.shape != partial.shape or residual.dtype != partial.dtype:
    raise ValueError(f"residual {residual.shape} {residual.dtype} must match the partial output"
                     f" {partial.shape} {partial.dtype}")
  if weight.shape != (partial.shape[1],):
    raise ValueError(f"norm weight {weight.shape} must be ({partial.shape[1]},)")
  if n == 1:
    return (*reference(partial, residual, weight, axis, eps), ws)
  all_reduce_lib.note_reference("fused")

  def on_gpu(partial, residual, weight, ws):
    return _kernel_call(partial, residual, weight, ws, axis, eps, config)

  def elsewhere(partial, residual, weight, ws):
    return (*reference(partial, residual, weight, axis, eps), ws._replace(epoch=ws.epoch + 1))

  return lax.platform_dependent(partial, residual, weight, ws, cuda=on_gpu, default=elsewhere)
