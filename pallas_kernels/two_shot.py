"""Two-shot all-reduce by device-initiated peer writes (Pallas Mosaic GPU, jax 0.11.2).

Reduce-scatter, then all-gather, both as peer stores into the persistent workspace: rank
r receives every peer's part r, sums it in rank order in f32 and pushes the rounded
result to every peer. Each rank moves 2(n-1)/n of the message instead of one-shot's
(n-1) copies, at the price of a second flag round trip: the better choice for larger
messages. Part r is reduced only by rank r, so every rank holds bitwise the same result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import common, peer_sync
from pallas_kernels.workspace import Workspace

reference = common.reference


def _scatter_registers(x_ref, slots_ref, s, me, n, base, chunk, steps, part):
  """Part q of my message -> row `me` of rank q's slots, by thread stores. A step's loads are
  issued before its stores so that their latencies overlap (a store the compiler cannot
  prove apart from the next load would otherwise order them)."""
  @pl.loop(0, steps)
  def _scatter(i):
    peers = [lax.rem(me + k, n) for k in range(n)]
    sls = [pl.ds(q * part + base + i * chunk, chunk) for q in peers]
    vals = [x_ref[sl] for sl in sls]
    for q, sl, v in zip(peers, sls, vals):
      plgpu.remote_ref(slots_ref.at[s, me, sl], q)[...] = v


def _scatter_tma(x_ref, slots_ref, s, me, n, base, chunk, steps, part):
  """The same by bulk copies, one chunk and one peer per step (common.bulk_copy)."""
  def at(j):  # step j: chunk j // n of the part for rank me + j % n
    q = lax.rem(me + lax.rem(j, n), n)
    return q, pl.ds(q * part + base + lax.div(j, n) * chunk, chunk)
  common.bulk_copy(steps * n, chunk, x_ref.dtype, lambda j: x_ref.at[at(j)[1]],
                   lambda j: [plgpu.remote_ref(slots_ref.at[s, me, at(j)[1]], at(j)[0])])


_SCATTER = {"registers": _scatter_registers, "tma": _scatter_tma}


def _body(n: int, axis: str, chunk: int, steps: int, part: int, config: common.Config):
  scattered = peer_sync.epoch_flag_exchange(n, phase=1, parallel=config.poll == "parallel")
  gathered = peer_sync.epoch_flag_exchange(n, parallel=config.poll == "parallel")
  scatter = _SCATTER[config.transport]

  def body(x_ref, epoch_ref, _slots_in, _flags_in, y_ref, slots_ref, flags_ref, epoch_out):
    me = lax.axis_index(axis)
    b = lax.axis_index("blocks")
    s = common.advance_epoch(epoch_ref, epoch_out, b)
    base = b * steps * chunk  # this block's range inside every part
    mine = [plgpu.remote_ref(flags_ref.at[b, s, pl.ds(me, 1)], lax.rem(me + k, n))
            for k in range(n)]

    scatter(x_ref, slots_ref, s, me, n, base, chunk, steps, part)
    scattered(epoch_ref, flags_ref.at[b, s], *mine)

    @pl.loop(0, steps)
    def _reduce_and_gather(i):  # my part, summed in rank order, to y and to row 0 of peers
      sl = pl.ds(me * part + base + i * chunk, chunk)
      acc = slots_ref[s, 0, sl].astype(jnp.float32)
      for p in range(1, n):
        acc = acc + slots_ref[s, p, sl].astype(jnp.float32)
      out = acc.astype(y_ref.dtype)
      y_ref[sl] = out
      for k in range(1, n):  # row 0 of part `me` is free on every other rank
        plgpu.remote_ref(slots_ref.at[s, 0, sl], lax.rem(me + k, n))[...] = out

    gathered(epoch_ref, flags_ref.at[b, s], *mine)

    @pl.loop(0, steps)
    def _collect(i):
      sls = [pl.ds(lax.rem(me + k, n) * part + base + i * chunk, chunk) for k in range(1, n)]
      vals = [slots_ref[s, 0, sl] for sl in sls]
      for sl, v in zip(sls, vals):
        y_ref[sl] = v

  return body


def two_shot(x: jax.Array, ws: Workspace, axis: str, config: common.Config = common.Config()):
  """All-reduce of this rank's `x` over mesh axis `axis`; returns (sum, workspace)."""
  n = lax.axis_size(axis)
  chunk = config.chunk(x.dtype)
  return common.launch(x, ws, n, pad_to=chunk * n, chunks=lambda size: size // n // chunk,
                       make_body=lambda steps, size: _body(n, axis, chunk, steps, size // n,
                                                           config),
                       config=config, name="two_shot_all_reduce")
