"""`all_reduce`: a psum-like entry point over the peer-write kernels, for use in shard_map.

    y, ws = all_reduce(x, ws, "tp", method="auto")

`x` is this rank's (tokens, hidden) message; `ws` the persistent workspace
(pallas_kernels.workspace), threaded through like any loop state. Methods:

- `one_shot` (pallas_kernels/one_shot.py), `one_shot_ll` (pallas_kernels/one_shot_ll.py: flags
  inside the data, no fence or flag round trip; for small messages) and `two_shot`
  (pallas_kernels/two_shot.py);
- `xla`: `lax.psum`, leaving the workspace untouched;
- `auto`: picks by message size and TP degree from `THRESHOLDS`.

Off the GPU the kernels are replaced by their pure-JAX reference (said once in the log),
so models run unchanged on the CPU; lowering for CUDA still emits the kernels.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common
from pallas_kernels import one_shot as one_shot_lib
from pallas_kernels import one_shot_ll as one_shot_ll_lib
from pallas_kernels import two_shot as two_shot_lib
from pallas_kernels.workspace import Workspace

METHODS = ("auto", "one_shot", "one_shot_ll", "two_shot", "xla")
TRANSPORT_METHODS = ("one_shot", "two_shot")  # the kernels that take Config.transport
MAX_TOKENS = 256
MAX_HIDDEN = 16384

_SERIAL = "serial"  # the flag poll of the records before session 7: auto runs what was measured
# `auto`'s choice by TP degree: (method, tiling, largest message in bytes per rank) ranges
# in ascending order; a message takes the first range that holds it, beyond the last psum
# (ranges may name "xla" in between). TP=2: experiments/thresholds.derive over the 2xH200
# sweep experiments/results/allreduce/20261122T060607632282Z.json, the tiling sweep
# .../20261122T063028449773Z.json, the wide grids .../20261122T161502504865Z.json (64-512 KB)
# and the bulk copies .../20261122T163818857738Z.json (1-8 MB; docs/allreduce.md has the
# tables; at 8 MB XLA's psum cannot run inside a WHILE graph, so the kernel takes it).
# TP=4: derive over the 4xH200
# sweeps .../allreduce/20261122T094025976278Z.json (4-128 KB, serial flag poll),
# .../20261122T104801796663Z.json (256 KB-8 MB) and .../20261122T112208392518Z.json (1-4 MB,
# grids up to a block per SM); 8 MB as at TP=2. TP=8 (not measured: no such machine lent
# yet) follows XLA's built-in NVLink kernel limits.
THRESHOLDS: dict[int, tuple[tuple[str, common.Config | None, int], ...]] = {
    2: (("one_shot_ll", common.Config(2, 16, _SERIAL), 32 << 10),
        ("one_shot_ll", common.Config(2, 64), 256 << 10),
        ("one_shot", common.Config(8, 32, _SERIAL), 512 << 10),
        ("one_shot", common.Config(4, 128, transport="tma"), 8 << 20)),
    4: (("one_shot_ll", common.Config(2, 16, _SERIAL), 64 << 10),
        ("one_shot", common.Config(2, 16, _SERIAL), 128 << 10),
        ("one_shot", common.Config(4, 32), 256 << 10),
        ("one_shot", common.Config(8, 32), 512 << 10),
        ("one_shot", common.Config(4, 128), 2 << 20),
        ("xla", None, 4 << 20),
        ("two_shot", common.Config(4, 32), 8 << 20)),
    8: (("one_shot", common.Config(), 128 << 10), ("two_shot", common.Config(), 2 << 20)),
}

_KERNELS = {"one_shot": (one_shot_lib.one_shot, one_shot_lib.reference),
            "one_shot_ll": (one_shot_ll_lib.one_shot_ll, one_shot_ll_lib.reference),
            "two_shot": (two_shot_lib.two_shot, two_shot_lib.reference)}
_warned_cpu = False


def workspace_capacity(tokens: int, hidden: int, dtype, n: int,
                       config: common.Config | None = None) -> int:
  """Workspace elements that carry a (tokens, hidden) message through every kernel tiled by
  `config` (default: by every tiling the kernels or `auto` use over `n` ranks); one_shot_ll's
  lines take twice the padded message."""
  configs = {config} if config else {common.Config(), *(
      c for _, c, _ in THRESHOLDS.get(n, ()) if c is not None)}

  def capacity(config):
    quantum = config.chunk(dtype) * n
    ll = one_shot_ll_lib.chunk(config, dtype)
    return max(-(-tokens * hidden // quantum) * quantum, 2 * (-(-tokens * hidden // ll) * ll))

  return max(map(capacity, configs))


def fits(x: jax.Array, ws: Workspace) -> bool:
  """Whether the kernels can carry `x` through `ws` (the model sends larger messages to psum)."""
  n = ws.slots.shape[1]
  return workspace_capacity(*x.shape, x.dtype, n) <= ws.slots.shape[-1]


def select(nbytes: int, n: int) -> tuple[str, common.Config | None]:
  """The (method, tiling) `auto` uses for a message of `nbytes` per rank over `n` ranks."""
  for method, config, largest in THRESHOLDS.get(n, THRESHOLDS[max(THRESHOLDS)]):
    if nbytes <= largest:
      return method, config
  return "xla", None


def check(x: jax.Array, axis: str, method: str) -> int:
  """Validates a call before anything is traced into a kernel; returns the axis size."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, found {method!r}")
  try:
    n = lax.axis_size(axis)
  except NameError as e:
    raise ValueError(f"axis {axis!r} is not a mesh axis of the enclosing shard_map") from e
  if jnp.dtype(x.dtype) not in common.SUPPORTED_DTYPES:
    raise ValueError(f"all_reduce supports bfloat16 and float32, found {x.dtype}")
  if x.ndim != 2:
    raise ValueError(f"all_reduce takes a (tokens, hidden) message, found shape {x.shape}")
  tokens, hidden = x.shape
  if method in _KERNELS and not (1 <= tokens <= MAX_TOKENS and 1 <= hidden <= MAX_HIDDEN):
    raise ValueError(f"the {method} kernel takes 1..{MAX_TOKENS} tokens and hidden sizes up to"
                     f" {MAX_HIDDEN}, found ({tokens}, {hidden})")
  if n not in (1, 2, 4, 8) and method in _KERNELS:
    raise ValueError(f"the {method} kernel runs on 2, 4 or 8 ranks, found {n}")
  return n


def note_reference(method: str):
  """Logs once per process that kernels run as their pure-JAX reference (no CUDA GPU)."""
  global _warned_cpu
  if not _warned_cpu and jax.default_backend() != "gpu":
    logging.warning("all_reduce(%s): no CUDA GPU; running the pure-JAX reference of the kernel",
                    method)
    _warned_cpu = True


def all_reduce(x: jax.Array, ws: Workspace, axis: str, method: str = "auto",
               config: common.Config | None = None):
  """Sum of `x` over `axis`; returns (result, workspace). Call inside shard_map.
  `config` tiles the kernels (benchmarks sweep it); by default `auto` takes the tiling of
  its range and the named kernels `common.Config()`."""
  n = check(x, axis, method)
  if method == "auto":
    tokens, hidden = x.shape
    fits = tokens <= MAX_TOKENS and hidden <= MAX_HIDDEN
    method, tuned = select(x.size * x.dtype.itemsize, n) if fits else ("xla", None)
    config = config or tuned
  config = config or common.Config()
  if config.transport != "registers" and method not in TRANSPORT_METHODS:
    raise ValueError(f"transport {config.transport!r} is a one_shot and two_shot option,"
                     f" found method {method!r}")
  if n == 1:
    return x, ws
  if method == "xla":
    return lax.psum(x, axis), ws
  kernel, reference = _KERNELS[method]
  note_reference(method)

  def on_gpu(x, ws):
    return kernel(x, ws, axis, config)

  def elsewhere(x, ws):  # same state semantics: the epoch advances, the buffers stay
    return reference(x, axis), ws._replace(epoch=ws.epoch + 1)

  return lax.platform_dependent(x, ws, cuda=on_gpu, default=elsewhere)
