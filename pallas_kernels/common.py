"""Pieces shared by the peer-write all-reduce kernels: tiling, padding, epoch, reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import peer_sync
from pallas_kernels.workspace import MAX_BLOCKS, Workspace

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
THREADS = 128  # one warpgroup per block
SMEM_BYTES = 227 * 1024  # shared memory one block may use on Hopper


def largest_divisor(n: int, limit: int) -> int:
  """The largest divisor of `n` that is at most `limit` (at least 1)."""
  return max(d for d in range(1, max(1, min(limit, n)) + 1) if n % d == 0)


POLLS = ("parallel", "serial")  # how a block polls the flags it waits for (peer_sync)
TRANSPORTS = ("registers", "tma")  # how one_shot and two_shot move data to peers


@dataclasses.dataclass(frozen=True)
class Config:
  """Tiling: one chunk is THREADS x `vectors` 16-byte vectors; blocks split the chunks.
  `poll`: how the flag-protocol kernels wait for their flags (peer_sync.epoch_flag_exchange:
  one thread per flag at once, or one thread in turn, the protocol before session 6).
  `transport` (one_shot, two_shot's scatter): thread stores from registers, or bulk copies
  (TMA) through shared memory, one per chunk and peer (`bulk_copy`)."""

  vectors: int = 2
  max_blocks: int = 16
  poll: str = "parallel"
  transport: str = "registers"

  def __post_init__(self):
    if self.poll not in POLLS:
      raise ValueError(f"poll must be one of {POLLS}, found {self.poll!r}")
    if self.transport not in TRANSPORTS:
      raise ValueError(f"transport must be one of {TRANSPORTS}, found {self.transport!r}")

  def chunk(self, dtype) -> int:
    return THREADS * self.vectors * 16 // jnp.dtype(dtype).itemsize

  def grid(self, chunks: int) -> tuple[int, int]:
    """(blocks, chunks per block): the most blocks <= max_blocks that divide `chunks`."""
    blocks = largest_divisor(chunks, min(self.max_blocks, MAX_BLOCKS))
    return blocks, chunks // blocks


def rank_order_sum(x: jax.Array, axis: str) -> jax.Array:
  """The sum over `axis` the kernels compute: f32, in rank order (same on every rank)."""
  parts = lax.all_gather(x, axis)
  acc = parts[0].astype(jnp.float32)
  for i in range(1, parts.shape[0]):
    acc = acc + parts[i].astype(jnp.float32)
  return acc


def reference(x: jax.Array, axis: str) -> jax.Array:
  """The all-reduce kernels' numerics: the rank-order f32 sum, rounded once."""
  return rank_order_sum(x, axis).astype(x.dtype)


def flatten_padded(x: jax.Array, ws: Workspace, n: int, quantum: int) -> jax.Array:
  """x as a flat message zero-padded to a multiple of `quantum`; checks it fits `ws`."""
  size = -(-x.size // quantum) * quantum
  if size > ws.slots.shape[-1] or ws.slots.shape[:2] != (2, n) or ws.slots.dtype != x.dtype:
    raise ValueError(f"workspace slots {ws.slots.shape} {ws.slots.dtype} cannot carry a message"
                     f" of {x.size} {x.dtype} elements (padded to {size}) over {n} ranks")
  flat = x.reshape(-1)
  return jnp.pad(flat, (0, size - x.size)) if size != x.size else flat


def advance_epoch(epoch_ref, epoch_out_ref, block) -> jax.Array:
  """In a kernel body: this call's epoch e is the previous one + 1; block 0 writes it to the
  epoch output (no separate XLA kernel before the call). Returns e's slot parity."""
  e = epoch_ref[0] + 1

  @pl.when(block == 0)
  def _():
    epoch_out_ref[0] = e

  return lax.rem(e, 2)


def bulk_copy(steps: int, chunk: int, dtype, src, dsts):
  """In a kernel body: for i in range(steps), copies the `chunk`-element GMEM ref `src(i)` to
  every ref of `dsts(i)` (GMEM, here or on peers) by bulk copies (TMA without a tensor map,
  so no box limit) through two shared-memory buffers: chunk i+1 comes in while chunk i goes
  out. Returns once the stores are complete, not just issued, so a flag may publish them."""
  smem = 2 * chunk * jnp.dtype(dtype).itemsize
  if smem > SMEM_BYTES:
    raise ValueError(f"bulk copies of {chunk}-element chunks need {smem} bytes of shared memory"
                     f" (two buffers), more than a block has ({SMEM_BYTES}): use fewer vectors")

  def scoped(buf, loaded):
    fetch = lambda i, b: plgpu.copy_gmem_to_smem(src(i), buf.at[b], loaded.at[b],
                                                 oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)
    fetch(0, 0)

    @pl.loop(0, steps)
    def _step(i):
      b = lax.rem(i, 2)
      plgpu.barrier_wait(loaded.at[b])
      out = dsts(i)
      for k, dst in enumerate(out):  # one bulk group per step
        plgpu.copy_smem_to_gmem(buf.at[b], dst, commit_group=k == len(out) - 1)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # step i-1's stores have read its buffer

      @pl.when(i + 1 < steps)
      def _():
        fetch(i + 1, 1 - b)

    plgpu.wait_smem_to_gmem(0)

  pl.run_scoped(scoped, plgpu.SMEM((2, chunk), dtype),
                plgpu.Barrier(num_arrivals=1, num_barriers=2))


def launch(x: jax.Array, ws: Workspace, n: int, *, pad_to: int, chunks, make_body,
           config: Config, name: str):
  """Runs an all-reduce kernel in place on `ws`: `x` flattened and zero-padded to a multiple
  of `pad_to`, a grid over `chunks(size)` chunks, `make_body(steps, size)` per block; the
  kernel advances the epoch. Returns (sum shaped like x, workspace)."""
  flat = flatten_padded(x, ws, n, pad_to)
  blocks, steps = config.grid(chunks(flat.size))
  out_types = (jax.ShapeDtypeStruct((flat.size,), ws.slots.dtype),
               jax.ShapeDtypeStruct(ws.slots.shape, ws.slots.dtype),
               jax.ShapeDtypeStruct(ws.flags.shape, jnp.int32),
               jax.ShapeDtypeStruct(ws.epoch.shape, jnp.int32))
  kernel = peer_sync.aliased_kernel(make_body(steps, flat.size), out_types, num_blocks=blocks,
                                    aliases={2: 1, 3: 2}, name=name)
  y, slots, flags, epoch = kernel(flat, ws.epoch, ws.slots, ws.flags)
  return y[:x.size].reshape(x.shape), Workspace(slots, flags, epoch)
