"""Checks that run on a CPU host: lower a jitted function for CUDA and inspect the kernels.

The full Pallas -> Mosaic GPU lowering runs without a GPU, so layout errors, peer-id
errors and forbidden instructions surface before any GPU time is spent.
"""

from __future__ import annotations

import re

# NVLink multicast can take shared GPUs out of service: none of these may ever appear.
MULTICAST_MARKERS = ("multimem", "multicast", "nvshmemx_mc_ptr", "symmetric_memory_parameters")


def lower_for_cuda(jitted, *avals) -> str:
  """StableHLO text of `jitted` lowered for CUDA (works on a CPU-only host)."""
  return jitted.trace(*avals).lower(lowering_platforms=("cuda",)).as_text()


def mosaic_calls(hlo_text: str) -> list[str]:
  """The Mosaic GPU custom-call lines of a lowered module."""
  return [line for line in hlo_text.splitlines() if "mosaic_gpu" in line and "custom_call" in line]


def multicast_uses(hlo_text: str) -> list[str]:
  """Forbidden multicast markers found in the module (including serialized kernels)."""
  return [m for m in MULTICAST_MARKERS if re.search(m, hlo_text, re.IGNORECASE)]
