"""Building blocks shared by the peer-writing kernels (jax 0.11.2 Mosaic GPU).

- `aliased_kernel`: a Mosaic GPU kernel whose workspace inputs are aliased to outputs, so
  it runs in place on a buffer that lives across calls. `plgpu.kernel` has no alias
  argument in 0.11.2; the private `_mpmd_map` under it does. Private APIs move between
  releases, so they are used here and nowhere else.
- `epoch_flag_exchange`: the barrier-free publish/acquire of epoch flags. After all
  threads of a warpgroup have stored their data into peers, one thread issues a
  system-scope release fence and a strong store of the epoch into its flag on every peer.
  The flags this block waits for are then polled with strong system-scope loads until
  each reached the epoch, followed by an acquire fence and a warpgroup barrier: by one
  thread per flag, all at once (`parallel`), or by one thread, flag after flag (each poll
  is a round trip to memory, so a block waiting for many flags pays them in series).
  Flags only grow, so nothing is ever reset and no memset or cross-GPU barrier kernel is
  needed (docs/allreduce.md). A flag that never arrives traps after SPIN_LIMIT polls, so a
  protocol error fails the call instead of hanging the GPU.

No NVLink multicast is used anywhere: only plain peer stores and loads.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax._src import config as _jax_config
from jax._src.pallas import mpmd as _mpmd
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, scf

_utils = mgpu.utils
# Polls of one flag before a kernel gives up and traps: about a minute of system-scope loads
# (~0.5 us each), far beyond any skew between the ranks' launches (XLA's own cross-device
# rendezvous gives up after 30 s), far below "forever".
SPIN_LIMIT = 1 << 27


def aliased_kernel(body: Callable[..., None], out_types: Sequence[jax.ShapeDtypeStruct], *,
                   num_blocks: int, aliases: dict[int, int], name: str,
                   skip_device_barrier: bool = True) -> Callable[..., tuple[jax.Array, ...]]:
  """A grid of `num_blocks` single-warpgroup blocks running `body(*in_refs, *out_refs)`.

  `aliases` maps input positions to output positions that share their buffer. With
  `skip_device_barrier`, XLA does not insert its cross-GPU barrier kernel before the call:
  only for kernels whose protocol needs none (epoch flags in an aliased workspace).
  """
  mesh = plgpu.Mesh(grid=(num_blocks,), grid_names=("blocks",), kernel_name=name)
  call = _mpmd._mpmd_map(
      [(mesh, body)], tuple(out_types), input_output_aliases=aliases,
      compiler_params=plgpu.CompilerParams(skip_device_barrier=skip_device_barrier), name=name)

  def run(*args):
    with _jax_config._check_vma(False):  # as plgpu.kernel does: kernels see per-rank values
      return call(*args)

  return run


def _element_ptr(ref, index: int):
  """Generic pointer to int32 element `index` of a contiguous memref."""
  i64 = ir.IntegerType.get_signless(64)
  base = _utils.memref_ptr(ref)
  addr = llvm.add(llvm.ptrtoint(i64, base), _utils.c(4 * index, i64),
                  overflow_flags=llvm.IntegerOverflowFlags.none)
  return llvm.inttoptr(base.type, addr)


def epoch_flag_exchange(num_ranks: int, waits: int = 1, phase: int = 0, parallel: bool = True):
  """Returns f(epoch_ref (1,), *my_flags (n,) x waits, *flag_on_peer (1,) x n) for a kernel body.

  `epoch_ref` holds the previous call's epoch; call e = epoch + 1 publishes the flag value
  2e - phase (two-shot's first phase uses phase 1, every kernel's last exchange phase 0, so
  flag words only grow).

  `my_flags[j][p]` is where rank p signals this rank (one row per block this block waits
  for, `waits` rows); `flag_on_peer[k]` is this block's flag in peer k's memory (a
  `plgpu.remote_ref`). Every thread of the warpgroup must call it after issuing its peer
  stores; when it returns, every peer's stores of this epoch, from every block whose row
  was waited on, are visible. `parallel`: the waits x n flags are polled by as many threads
  at once (a warpgroup's 128 at a time), else by one thread in turn.
  """

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (1 + waits + num_ranks))
  def exchange(ctx, epoch_ref, *refs):
    del ctx
    my_flags, flag_on_peer = refs[:waits], refs[waits:]
    i32 = ir.IntegerType.get_signless(32)
    prev = memref.load(epoch_ref, [_utils.c(0, ir.IndexType.get())])
    epoch = arith.subi(arith.muli(arith.addi(prev, _utils.c(1, i32)), _utils.c(2, i32)),
                       _utils.c(phase, i32))  # the flag value 2e - phase
    _utils.warpgroup_barrier()  # every thread's data stores are issued
    with _utils.single_thread(_utils.ThreadSubset.WARPGROUP):
      _utils.inline_ptx("fence.acq_rel.sys;", has_side_effects=True)  # release
      for ref in flag_on_peer:
        _utils.inline_ptx("st.relaxed.sys.global.b32 [$0], $1;", _element_ptr(ref, 0), epoch,
                          has_side_effects=True)
    # Acquire: wait until every awaited rank published this epoch, then fence.
    flags = [_element_ptr(row, p) for row in my_flags for p in range(num_ranks)]
    reached = lambda seen: arith.cmpi(arith.CmpIPredicate.uge, seen, epoch)
    if parallel:
      lane = arith.remui(_utils.thread_idx(), _utils.c(_utils.WARPGROUP_SIZE, i32))
      for start in range(0, len(flags), _utils.WARPGROUP_SIZE):
        group = flags[start:start + _utils.WARPGROUP_SIZE]
        ptr = group[0]  # lane i polls group[i]; lanes beyond the group have none
        for i, other in enumerate(group[1:], 1):
          ptr = arith.select(arith.cmpi(arith.CmpIPredicate.eq, lane, _utils.c(i, i32)), other,
                             ptr)
        idle = arith.cmpi(arith.CmpIPredicate.uge, lane, _utils.c(len(group), i32))
        spin_until(lambda: [_load_flag(ptr)], lambda seen: arith.ori(idle, reached(seen)), [i32])
      polled = arith.cmpi(arith.CmpIPredicate.ult, lane, _utils.c(len(flags), i32))
      _utils.inline_ptx("fence.acq_rel.sys;", predicate=polled, has_side_effects=True)
    else:
      with _utils.single_thread(_utils.ThreadSubset.WARPGROUP):
        for ptr in flags:
          spin_until(lambda: [_load_flag(ptr)], reached, [i32])
        _utils.inline_ptx("fence.acq_rel.sys;", has_side_effects=True)
    _utils.warpgroup_barrier()  # the fences above order every thread's reads that follow

  return exchange


def _load_flag(ptr) -> ir.Value:
  """A strong system-scope load of the int32 flag at `ptr` (Mosaic GPU code)."""
  return _utils.inline_ptx("ld.relaxed.sys.global.b32 $0, [$1];", ptr,
                           result_types=ir.IntegerType.get_signless(32), has_side_effects=True)


def spin_until(load, ready, types: Sequence[ir.Type]) -> list[ir.Value]:
  """In Mosaic GPU code: repeats `load()` (values of `types`) until `ready(*values)`; returns
  the values that satisfied it. After SPIN_LIMIT polls the thread traps: a value that never
  comes (a broken protocol) fails the call instead of hanging the GPU."""
  i32 = ir.IntegerType.get_signless(32)
  spin = scf.WhileOp([i32, *types], [_utils.c(0, i32)])
  before = spin.before.blocks.append(i32)
  with ir.InsertionPoint(before):
    values = load()
    polls = before.arguments[0]
    waiting = arith.xori(ready(*values), _utils.c(1, ir.IntegerType.get_signless(1)))
    patient = arith.cmpi(arith.CmpIPredicate.ult, polls, _utils.c(SPIN_LIMIT, i32))
    scf.condition(arith.andi(waiting, patient), [polls, *values])
  after = spin.after.blocks.append(i32, *types)
  with ir.InsertionPoint(after):
    scf.yield_([arith.addi(after.arguments[0], _utils.c(1, i32))])
  values = list(spin.results[1:])
  lost = arith.xori(ready(*values), _utils.c(1, ir.IntegerType.get_signless(1)))
  _utils.inline_ptx("trap;", predicate=lost, has_side_effects=True)
  return values
