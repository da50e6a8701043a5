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


def workspace_copies(optimized_hlo: str, ws) -> list[str]:
  """Copy instructions of a compiled (optimized) HLO module whose shape is one of the
  per-rank workspace buffers (slots or flags) of the global workspace `ws`.

  The protocol needs every kernel to run on THE workspace buffer: peers write into it before
  this rank's kernel starts, so a copy that XLA inserts in front of a kernel (to resolve an
  alias, or around a loop-carried value) can overwrite a peer's data or flag. Run on the GPU
  machine: `jax.jit(f).lower(*args).compile().as_text()`.
  """
  n = ws.slots.shape[1]
  shapes = {f"{_hlo_type(a.dtype)}[{','.join(map(str, (a.shape[0] // n, *a.shape[1:])))}]"
            for a in (ws.slots, ws.flags)}
  inst = re.compile(r"%(\S+)\s*=\s*(.+?)\s+([\w-]+)\(")  # name = type opcode(
  hits = []
  for line in optimized_hlo.splitlines():
    m = inst.search(line)
    if not m:
      continue
    name, type_, opcode = m.groups()
    is_copy = opcode in ("copy", "copy-start") or (opcode == "fusion" and "copy" in name)
    if is_copy and any(s in type_ for s in shapes):
      hits.append(line.strip()[:200])
  return hits


def aliases(compiled_hlo: str) -> dict[int, int]:
  """{parameter: output} of a compiled module's input_output_alias (top-level outputs)."""
  header = compiled_hlo.split("\n", 1)[0]
  return {int(p): int(o) for o, p in re.findall(r"\{(\d+)\}: \((\d+), \{\}", header)}


def _hlo_type(dtype) -> str:
  import numpy as np
  name = np.dtype(dtype).name
  return {"bfloat16": "bf16", "float32": "f32", "int32": "s32", "float16": "f16"}.get(name, name)
