"""The persistent communication workspace of the peer-writing all-reduce kernels.

Per rank: `slots` (2, n, capacity) receive the peers' data, double-buffered by epoch
parity; `flags` (max_blocks, 2, n) int32 hold, per grid block and parity, the last epoch
each peer published; `epoch` (1,) int32 counts calls (identical on every rank, +1 per
call, starting at 1 on the first call).

The workspace must be the same device buffer in every call: it is a kernel input aliased
to an output, donated through jit and carried through loops. It is created zeroed and
complete on every GPU before any kernel runs, which is what makes skipping XLA's
cross-GPU barrier safe from the first call on. Compile functions that carry it with
`sharded_jit`: a plain `jax.jit` may hand the donated buffer to another output of the same
size and copy the workspace in front of the kernel.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MAX_BLOCKS = 128  # flag rows per rank: the largest grid any kernel config may use (one per SM)


class Workspace(NamedTuple):
  slots: jax.Array
  flags: jax.Array
  epoch: jax.Array


def spec(axis: str) -> Workspace:
  """PartitionSpecs of the global workspace: every array is split on its leading axis."""
  return Workspace(P(axis), P(axis), P(axis))


def check_mesh(mesh: Mesh, axis: str) -> int:
  """Checks that `axis` is a mesh axis over the local devices in order; returns its size."""
  if axis not in mesh.axis_names:
    raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
  if mesh.devices.ndim != 1:
    raise ValueError(f"the all-reduce kernels need a 1-D mesh over {axis!r}, found shape "
                     f"{dict(mesh.shape)}")
  devices = list(mesh.devices.flat)
  local = jax.local_devices(backend=devices[0].platform)
  if devices != local[:len(devices)]:
    raise ValueError("the mesh must be the first local devices in jax.devices() order, found "
                     f"{[d.id for d in devices]} (local: {[d.id for d in local]})")
  return len(devices)


def init(mesh: Mesh, axis: str, capacity: int, dtype) -> Workspace:
  """A zeroed workspace for messages of up to `capacity` elements, ready on every device."""
  n = check_mesh(mesh, axis)
  dtype = jnp.dtype(dtype)
  shapes = Workspace(slots=((n * 2, n, capacity), dtype),
                     flags=((n * MAX_BLOCKS, 2, n), jnp.int32),
                     epoch=((n,), jnp.int32))
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec(axis))
  make = jax.jit(lambda: Workspace(*(jnp.zeros(s, d) for s, d in shapes)), out_shardings=shardings)
  ws = make()
  jax.block_until_ready(ws)  # flags are zero on every GPU before any kernel starts
  return ws


def sharded_jit(fn: Callable[..., Any], mesh: Mesh, in_specs, out_specs,
                donate_argnums: int | tuple[int, ...] = ()) -> Callable[..., Any]:
  """`jax.jit(jax.shard_map(fn, ...))` whose donated inputs alias the outputs of the same
  shape and sharding, for functions that carry a workspace (or any donated state).

  Without out_shardings jax leaves donation to XLA, which aliases a donated buffer to the
  first output of the same per-device byte size: a (1, 2048) bf16 output took the 4 KB flags
  of a 4-rank workspace (MAX_BLOCKS=128), XLA copied the flags in front of the kernel, the
  copy overwrote flags a fast peer had already written and the kernel hung (4xH200,
  session 8). Naming every output's sharding makes jax alias by shape instead: each output,
  in order, takes the first unmatched donated input of its per-rank shape and dtype, so an
  earlier output shaped like `slots` or `flags` would still take theirs (none of this
  package's signatures has one; tests check the model's and the kernels')."""
  mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), out_specs,
                           is_leaf=lambda s: isinstance(s, P))
  return jax.jit(mapped, donate_argnums=donate_argnums, out_shardings=shardings)
