"""One-shot all-reduce with flags inside the data: the low-latency (LL) protocol.

`one_shot` publishes a message with a system-scope fence and a separate flag store, and
its reader spins on that flag, fences again and only then loads the data: two dependent
NVLink crossings plus two fences per call. Here every 8 bytes of message travel as one
16-byte line `{data0, flag, data1, flag}` (NCCL's LL format), so a line carries its own
proof of arrival: each thread stores its lines straight into every rank's slots and then
polls the lines it reduces until both flags show this call's tag. No fence, no flag round
trip, no barrier; the price is twice the bytes on the wire, which is why this kernel is for
small messages (`auto` picks it where a sweep measured it fastest).

Every 8-byte half of a line is written by one store and read by one load, so a reader that
sees the tag sees the data beside it. The tag is `TAG_BITS | (epoch mod 2^20)`, a NaN bit
pattern as f32 and as bf16, so neither a stale line (epoch parity as in `one_shot`: a rank
writes slot parity s of call e+2 only after seeing its peers' lines of call e+1, which they
store only after finishing call e) nor data that another kernel left in the slots matches it.
The tag repeats every 2^20 calls: a line that no call rewrote for exactly a multiple of
2^20 calls and is then read again would pass as current. Calls of one message size rewrite
all their lines every call (decode's case); a workspace shared by messages of different
sizes must not leave a region unused that long.
Sums run in rank order in f32 and round once (to nearest even), as `common.reference`.

Call inside `shard_map` with a workspace from `pallas_kernels.workspace.init` whose slots
hold twice the padded message (`all_reduce.workspace_capacity` sizes them so).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref

from pallas_kernels import common, peer_sync
from pallas_kernels.workspace import Workspace

reference = common.reference
_u = mgpu.utils
TAG_BITS = 0xFFF00000  # the tag's high bits: a NaN as f32 and as the high bf16 of a pair
UNIT_BYTES = 8  # message bytes per line (two 32-bit words, each with its own flag)


def chunk(config: common.Config, dtype) -> int:
  """Message elements per grid step: every thread moves `config.vectors` 8-byte units."""
  return common.THREADS * config.vectors * UNIT_BYTES // jnp.dtype(dtype).itemsize


def _context(epoch_ref):
  """What both halves of the protocol use, per thread: (this call's tag, at(ref, j, width) ->
  the address of this thread's unit j in `ref` at `width` bytes per unit)."""
  i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
  epoch = arith.addi(memref.load(epoch_ref, [_u.c(0, ir.IndexType.get())]), _u.c(1, i32))
  tag = arith.ori(arith.andi(epoch, _u.c(0xFFFFF, i32)), _u.c(TAG_BITS - (1 << 32), i32))
  tid = arith.extui(i64, _u.thread_idx())
  ptr_ty = _u.memref_ptr(epoch_ref).type

  def at(ref, j, width):  # coalesced: unit j of thread t is unit j * THREADS + t of the ref
    unit = arith.addi(arith.muli(arith.extui(i64, j), _u.c(common.THREADS, i64)), tid)
    addr = arith.addi(llvm.ptrtoint(i64, _u.memref_ptr(ref)), arith.muli(unit, _u.c(width, i64)))
    return llvm.inttoptr(ptr_ty, addr)

  return tag, at


def push(n: int, units: int):
  """f(epoch, src, *outs (n)) for a kernel body: every thread sends `units` 8-byte units of
  `src` as tagged lines to each of `outs` (this rank's lines on rank me+k)."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (2 + n))
  def run(ctx, epoch_ref, src, *outs):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    tag, at = _context(epoch_ref)

    @_u.fori(_u.c(units, i32), [])
    def _push(j, _):
      d0, d1 = _u.inline_ptx("ld.global.v2.b32 {$0, $1}, [$2];", at(src, j, UNIT_BYTES),
                             result_types=[i32, i32], has_side_effects=True)
      for out in outs:
        _u.inline_ptx("st.volatile.global.v4.b32 [$0], {$1, $2, $3, $4};",
                      at(out, j, 2 * UNIT_BYTES), d0, tag, d1, tag, has_side_effects=True)
      return []

  return run


def reduce(n: int, units: int, dtype, residual: bool = False):
  """f(epoch, dst, *ins (n)[, res]) for a kernel body: every thread waits for its `units`
  lines from each rank (ins[p]: rank p's lines here), sums them in rank order in f32, adds
  `res` (same layout as dst) if `residual`, and stores the sum rounded once to `dst`; then
  the warpgroup synchronizes, so the block may read all of `dst`."""
  is_bf16 = jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (2 + n + residual))
  def run(ctx, epoch_ref, dst, *refs):
    del ctx
    ins, res = refs[:n], (refs[n] if residual else None)
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    tag, at = _context(epoch_ref)

    def arrived(_d0, f0, _d1, f1):
      return arith.andi(arith.cmpi(arith.CmpIPredicate.eq, f0, tag),
                        arith.cmpi(arith.CmpIPredicate.eq, f1, tag))

    def floats(word):  # one 32-bit word -> its f32 values (two for a bf16 pair)
      if not is_bf16:
        return [arith.bitcast(f32, word)]
      lo = arith.shli(word, _u.c(16, i32))
      hi = arith.andi(word, _u.c(0xFFFF0000 - (1 << 32), i32))
      return [arith.bitcast(f32, lo), arith.bitcast(f32, hi)]

    def packed(values):  # f32 values -> one 32-bit word, rounded to nearest even
      if not is_bf16:
        return arith.bitcast(i32, values[0])
      lo, hi = values
      return _u.inline_ptx("cvt.rn.bf16x2.f32 $0, $1, $2;", hi, lo, result_types=i32)

    def load8(ref, j):
      return _u.inline_ptx("ld.global.v2.b32 {$0, $1}, [$2];", at(ref, j, UNIT_BYTES),
                           result_types=[i32, i32], has_side_effects=True)

    @_u.fori(_u.c(units, i32), [])
    def _reduce(j, _):
      acc = None
      for src in ins:  # rank order: bitwise the same sum on every rank
        addr = at(src, j, 2 * UNIT_BYTES)
        d0, _f0, d1, _f1 = peer_sync.spin_until(
            lambda: list(_u.inline_ptx("ld.volatile.global.v4.b32 {$0, $1, $2, $3}, [$4];", addr,
                                       result_types=[i32] * 4, has_side_effects=True)),
            arrived, [i32] * 4)
        vals = floats(d0) + floats(d1)
        acc = vals if acc is None else [arith.addf(a, v) for a, v in zip(acc, vals)]
      if residual:
        r0, r1 = load8(res, j)
        acc = [arith.addf(r, a) for r, a in zip(floats(r0) + floats(r1), acc)]
      half = len(acc) // 2
      _u.inline_ptx("st.global.v2.b32 [$0], {$1, $2};", at(dst, j, UNIT_BYTES),
                    packed(acc[:half]), packed(acc[half:]), has_side_effects=True)
      return []

    _u.warpgroup_barrier()

  return run


def _body(n: int, axis: str, span: int, units: int, dtype):
  send, receive = push(n, units), reduce(n, units, dtype)

  def body(x_ref, epoch_ref, _slots_in, _flags_in, y_ref, slots_ref, _flags, epoch_out):
    me = lax.axis_index(axis)
    b = lax.axis_index("blocks")
    s = common.advance_epoch(epoch_ref, epoch_out, b)
    mine, rows = pl.ds(b * span, span), pl.ds(2 * b * span, 2 * span)
    send(epoch_ref, x_ref.at[mine],
         *[plgpu.remote_ref(slots_ref.at[s, me, rows], lax.rem(me + k, n)) for k in range(n)])
    receive(epoch_ref, y_ref.at[mine], *[slots_ref.at[s, p, rows] for p in range(n)])

  return body


def one_shot_ll(x: jax.Array, ws: Workspace, axis: str, config: common.Config = common.Config()):
  """All-reduce of this rank's `x` over mesh axis `axis`; returns (sum, workspace)."""
  n = lax.axis_size(axis)
  step = chunk(config, x.dtype)
  padded = -(-x.size // step) * step
  if 2 * padded > ws.slots.shape[-1]:
    raise ValueError(f"one_shot_ll needs workspace slots of {2 * padded} elements (twice the"
                     f" padded message of {padded}), found {ws.slots.shape[-1]}")
  return common.launch(
      x, ws, n, pad_to=step, chunks=lambda size: size // step,
      make_body=lambda steps, _: _body(n, axis, steps * step, steps * config.vectors, x.dtype),
      config=config, name="one_shot_ll_all_reduce")
