"""Device-side timestamps for benchmarks: the GPU's global nanosecond timer, read by a
one-thread Mosaic GPU kernel placed in the data flow.

    x, t0 = stamp(x)          # before the work that consumes x
    y = work(x)
    y, t1 = stamp(y)          # after the work that produced y
    seconds = elapsed_s(t0, t1)

`stamp` passes `x` through in place (its buffer is aliased, nothing is copied) and returns
int32[2] = (low, high) words of `%globaltimer` when the kernel ran. Because the work
consumes the first stamp's output and the second stamp consumes the work's output, the
difference is the device time of the work between them, idle gaps included, without the
host launch and synchronization around the executable. Call inside `shard_map` (one
timestamp per GPU). Off the GPU the timestamps are zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref

from pallas_kernels import peer_sync

_u = mgpu.utils


@plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
def _read_timer(ctx, t_ref):
  del ctx
  i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
  index = ir.IndexType.get()
  with _u.single_thread(_u.ThreadSubset.WARPGROUP):
    ns = _u.inline_ptx("mov.u64 $0, %globaltimer;", result_types=i64, has_side_effects=True)
    memref.store(arith.trunci(i32, ns), t_ref, [_u.c(0, index)])
    memref.store(arith.trunci(i32, arith.shrui(ns, _u.c(32, i64))), t_ref, [_u.c(1, index)])


def _body(_x_in, _x_out, t_ref):
  _read_timer(t_ref)


def stamp(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x, timestamp int32[2]); x is passed through in place."""

  def on_gpu(x):
    kernel = peer_sync.aliased_kernel(
        _body, (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((2,), jnp.int32)),
        num_blocks=1, aliases={0: 0}, name="device_clock")
    return kernel(x)

  def elsewhere(x):
    return x, jnp.zeros((2,), jnp.int32)

  return lax.platform_dependent(x, cuda=on_gpu, default=elsewhere)


def elapsed_s(t0, t1) -> np.ndarray:
  """Seconds from stamp t0 to t1: (..., 2) int32 (low, high) words each, per GPU."""
  def ns(t):
    t = np.asarray(t).astype(np.int64)
    return (t[..., 1] << 32) | (t[..., 0] & 0xFFFFFFFF)
  return (ns(t1) - ns(t0)) * 1e-9
