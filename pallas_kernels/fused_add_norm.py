"""All-reduce + residual add + RMSNorm in one Pallas Mosaic GPU kernel (one-shot protocol).

For a row-parallel layer's rank-local partial output (tokens, hidden), the residual and
the next RMSNorm's weight, every rank pushes its partial rows into its slot on every peer,
exchanges epoch flags, then for each of its rows sums the n partials in rank order in f32,
adds the residual, rounds once to get the new residual, and normalizes it:

    new_residual = round(residual + sum_p partial_p)
    normed       = round(new_residual * rsqrt(mean(new_residual^2) + eps) * weight)

Both outputs are bitwise identical on every rank. One kernel replaces XLA's all-reduce,
add and norm kernels and the launches between them.

Tiling: a row is split into tiles of VECTOR columns (one 16-byte vector per thread), and the
grid is (row groups x column blocks), rows first, so that a single decode token still
spreads its exchange over several blocks while more tokens read no row twice. A block
pushes its tiles of its rows, waits for the flags of every block of its row group (between
them they pushed whole rows), then computes each row's sum of squares over the full row
(a redundant read of the row from its own memory, mostly from L2) and writes its own tiles
of both outputs.

With `protocol="ll"` the exchange uses one_shot_ll's tagged lines instead of epoch flags:
each block pushes its tiles as lines, then polls the whole rows of its group and writes
their new residual itself (every block of a group writes the same values), so no fence and
no flag round trip; the workspace slots must hold twice the padded message.

    normed, new_residual, ws = all_reduce_add_norm(partial, residual, weight, ws, "tp", eps)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import all_reduce as all_reduce_lib
from pallas_kernels import common, one_shot_ll, peer_sync
from pallas_kernels.workspace import MAX_BLOCKS, Workspace

VECTOR = 8 * common.THREADS  # bf16 elements in one 16-byte vector per thread
CONFIG = common.Config(max_blocks=32)  # grid() reads max_blocks; "flags" reads poll


def padded_hidden(hidden: int) -> int:
  """Rows pad to whole VECTOR-column tiles with zeros, which leave sums of squares unchanged
  (the mean divides by the true hidden)."""
  return -(-hidden // VECTOR) * VECTOR


def grid(tokens: int, width: int, config: common.Config) -> tuple[int, int, int, int]:
  """(row groups, rows per group, column blocks, tiles per column block): as many row
  groups as divide the tokens (up to max_blocks), then column blocks with the rest. Every
  block of a group reads its whole rows for the norm (and with LL polls them), so column
  blocks cost redundant reads: they are for the few-token case, where rows alone would
  leave most of the grid idle (2xH200: 16 x 5120 took 18.8 us flags / 35.8 us LL with 5
  column blocks per row, against 13.0 us for one_shot then XLA's add and norm)."""
  limit = min(config.max_blocks, MAX_BLOCKS)
  tiles = width // VECTOR
  row_blocks = common.largest_divisor(tokens, limit)
  col_blocks = common.largest_divisor(tiles, limit // row_blocks)
  return row_blocks, tokens // row_blocks, col_blocks, tiles // col_blocks


PROTOCOLS = {"flags": 1, "ll": 2}  # exchange protocol -> workspace elements per message element


def fits(tokens: int, hidden: int, ws: Workspace, protocol: str = "flags") -> bool:
  """Whether a (tokens, hidden) message fits the workspace once its rows are padded."""
  return PROTOCOLS[protocol] * tokens * padded_hidden(hidden) <= ws.slots.shape[-1]


def reference(partial, residual, weight, axis: str, eps: float):
  """The kernel's numerics in plain JAX."""
  acc = common.rank_order_sum(partial, axis)
  new_residual = (residual.astype(jnp.float32) + acc).astype(residual.dtype)
  r = new_residual.astype(jnp.float32)
  inv = lax.rsqrt(jnp.mean(r * r, axis=-1, keepdims=True) + eps)
  return (r * inv * weight.astype(jnp.float32)).astype(residual.dtype), new_residual


def _col(t):
  return pl.ds(t * VECTOR, VECTOR)


def _place(epoch_ref, epoch_out, tiling):
  """In a kernel body: (slot parity, row group, first row, first own tile) of this block;
  advances the epoch."""
  _, rows, col_blocks, own = tiling
  b = lax.axis_index("blocks")
  s = common.advance_epoch(epoch_ref, epoch_out, b)
  group = b // col_blocks
  return s, group, group * rows, lax.rem(b, col_blocks) * own


def _norm_row(row, new_residual, tiles: int, first_tile, own: int, hidden: int, eps: float,
              w_ref, out_ref, new_res_ref=None):
  """RMSNorm of one row whose new residual tile t is `new_residual(t)`: the sum of squares
  over the whole row (same order on every block and rank; squares accumulate per thread
  across tiles, then one warpgroup reduction per row), then this block's own tiles of the
  output (and of the new residual, if `new_res_ref`)."""
  squares = None
  for t in range(tiles):
    r32 = new_residual(t).astype(jnp.float32)
    squares = r32 * r32 if squares is None else squares + r32 * r32
  inv = lax.rsqrt(jnp.sum(squares) / hidden + eps)

  @pl.loop(first_tile, first_tile + own)
  def _write(t):
    r = new_residual(t)
    if new_res_ref is not None:
      new_res_ref[row, _col(t)] = r
    out_ref[row, _col(t)] = (r.astype(jnp.float32) * inv
                             * w_ref[_col(t)].astype(jnp.float32)).astype(out_ref.dtype)


def _body(n: int, axis: str, hidden: int, width: int, eps: float, tiling, parallel: bool):
  _, rows, col_blocks, own = tiling
  exchange = peer_sync.epoch_flag_exchange(n, waits=col_blocks, parallel=parallel)
  tiles = width // VECTOR

  def body(x_ref, res_ref, w_ref, epoch_ref, _slots_in, _flags_in,
           out_ref, new_res_ref, slots_ref, flags_ref, epoch_out):
    me = lax.axis_index(axis)
    b = lax.axis_index("blocks")
    s, group, first, first_tile = _place(epoch_ref, epoch_out, tiling)

    def slot(p, row, t):
      return slots_ref.at[s, p, pl.ds(row * width + t * VECTOR, VECTOR)]

    def new_residual(row, t):  # rank-order f32 sum of the partials, plus the residual, rounded
      acc = slot(0, row, t)[...].astype(jnp.float32)
      for p in range(1, n):
        acc = acc + slot(p, row, t)[...].astype(jnp.float32)
      return (res_ref[row, _col(t)].astype(jnp.float32) + acc).astype(new_res_ref.dtype)

    @pl.loop(first, first + rows)
    def _push(row):
      @pl.loop(first_tile, first_tile + own)
      def _tile(t):
        v = x_ref[row, _col(t)]
        for k in range(n):
          plgpu.remote_ref(slot(me, row, t), lax.rem(me + k, n))[...] = v

    mine = [plgpu.remote_ref(flags_ref.at[b, s, pl.ds(me, 1)], lax.rem(me + k, n))
            for k in range(n)]
    group_rows = [flags_ref.at[group * col_blocks + j, s] for j in range(col_blocks)]
    exchange(epoch_ref, *group_rows, *mine)

    @pl.loop(first, first + rows)
    def _add_norm(row):
      _norm_row(row, lambda t: new_residual(row, t), tiles, first_tile, own, hidden, eps,
                w_ref, out_ref, new_res_ref)

  return body


def _body_ll(n: int, axis: str, hidden: int, width: int, eps: float, tiling, dtype):
  _, rows, _, own = tiling
  per_thread = lambda elems: elems * jnp.dtype(dtype).itemsize // (common.THREADS
                                                                   * one_shot_ll.UNIT_BYTES)
  send = one_shot_ll.push(n, per_thread(own * VECTOR))
  receive = one_shot_ll.reduce(n, per_thread(width), dtype, residual=True)
  tiles = width // VECTOR

  def body(x_ref, res_ref, w_ref, epoch_ref, _slots_in, _flags_in,
           out_ref, new_res_ref, slots_ref, _flags, epoch_out):
    me = lax.axis_index(axis)
    s, _, first, first_tile = _place(epoch_ref, epoch_out, tiling)

    @pl.loop(first, first + rows)
    def _push(row):  # this block's tiles of the row, as lines into every rank's slots
      lines = pl.ds(2 * (row * width + first_tile * VECTOR), 2 * own * VECTOR)
      send(epoch_ref, x_ref.at[row, pl.ds(first_tile * VECTOR, own * VECTOR)],
           *[plgpu.remote_ref(slots_ref.at[s, me, lines], lax.rem(me + k, n)) for k in range(n)])

    @pl.loop(first, first + rows)
    def _add_norm(row):
      whole = pl.ds(2 * row * width, 2 * width)  # the whole row's lines from every rank
      receive(epoch_ref, new_res_ref.at[row], *[slots_ref.at[s, p, whole] for p in range(n)],
              res_ref.at[row])  # every block of the group writes the row's new residual
      _norm_row(row, lambda t: new_res_ref[row, _col(t)], tiles, first_tile, own, hidden, eps,
                w_ref, out_ref)

  return body


def _kernel_call(partial, residual, weight, ws: Workspace, axis: str, eps: float,
                 config: common.Config, protocol: str):
  n = lax.axis_size(axis)
  tokens, hidden = partial.shape
  width = padded_hidden(hidden)
  if config.transport != "registers":
    raise ValueError(f"transport {config.transport!r} is not an option of the fused kernel")
  if not fits(tokens, hidden, ws, protocol) or ws.slots.dtype != partial.dtype:
    raise ValueError(f"workspace slots {ws.slots.shape} {ws.slots.dtype} cannot carry a"
                     f" ({tokens}, {width}) {partial.dtype} message with protocol {protocol!r}")
  if width != hidden:
    pad = ((0, 0), (0, width - hidden))
    partial, residual = jnp.pad(partial, pad), jnp.pad(residual, pad)
    weight = jnp.pad(weight, pad[1])
  tiling = grid(tokens, width, config)
  dt = partial.dtype
  body = (_body(n, axis, hidden, width, eps, tiling, config.poll == "parallel")
          if protocol == "flags" else
          _body_ll(n, axis, hidden, width, eps, tiling, dt))
  kernel = peer_sync.aliased_kernel(
      body,
      (jax.ShapeDtypeStruct((tokens, width), dt), jax.ShapeDtypeStruct((tokens, width), dt),
       jax.ShapeDtypeStruct(ws.slots.shape, dt), jax.ShapeDtypeStruct(ws.flags.shape, jnp.int32),
       jax.ShapeDtypeStruct(ws.epoch.shape, jnp.int32)),
      num_blocks=tiling[0] * tiling[2], aliases={4: 2, 5: 3}, name="all_reduce_add_rms_norm")
  out, new_res, slots, flags, epoch = kernel(partial, residual, weight, ws.epoch, ws.slots,
                                             ws.flags)
  return out[:, :hidden], new_res[:, :hidden], Workspace(slots, flags, epoch)


def all_reduce_add_norm(partial, residual, weight, ws: Workspace, axis: str, eps: float,
                        config: common.Config = CONFIG, protocol: str = "flags"):
  """(normed, new_residual, workspace) for (tokens, hidden) inputs; call inside shard_map.
  `protocol`: "flags" (epoch flags) or "ll" (tagged lines, see the module docstring)."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, found {protocol!r}")
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
    return _kernel_call(partial, residual, weight, ws, axis, eps, config, protocol)

  def elsewhere(partial, residual, weight, ws):
    return (*reference(partial, residual, weight, axis, eps), ws._replace(epoch=ws.epoch + 1))

  return lax.platform_dependent(partial, residual, weight, ws, cuda=on_gpu, default=elsewhere)
