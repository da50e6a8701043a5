"""GPU kernel times of one host call, from CUPTI (the hooks behind mosaic.gpu.profiler).

Unlike `profiler.measure`, the function is called exactly once, so it may donate and
advance persistent state (the all-reduce workspace). Kernels inside CUDA graphs count too.
"""

from __future__ import annotations

import collections
from typing import Callable

from experiments import profiling


def kernel_times(fn: Callable[[], None]) -> list[tuple[str, float]]:
  """(kernel name, ms) of every kernel `fn` launched; `fn` must block until done.

  Without the Mosaic GPU bindings (no CUDA) `fn` runs and nothing is measured.
  """
  try:
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib
  except ImportError:
    fn()
    return []

  ext = mosaic_gpu_lib._mosaic_gpu_ext
  ext._cupti_init()
  try:
    fn()
  finally:
    timings = ext._cupti_get_timings(True)
  return list(timings or [])


def kernel_ms(fn: Callable[[], None], scopes: dict[str, str] | None = None) -> dict[str, float]:
  """Kernel ms per category (profiling.CATEGORIES) summed over all devices' kernels;
  `scopes` (profiling.kernel_scopes of the executable) classifies kernels by named scope."""
  out = collections.Counter()
  for name, ms in kernel_times(fn):
    scope = profiling.scope_of(name, scopes or {})
    out[profiling.classify(profiling.Kernel("", name, 0.0, 0.0, scope))] += ms
  return dict(out)
