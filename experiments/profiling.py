"""Where decode time goes: GPU kernel times from a jax.profiler trace, by category.

Kernels are classified by name (cuBLAS/cuBLASLt/CUTLASS GEMMs, NCCL and XLA collective
kernels, Mosaic kernels) and otherwise by the JAX named scope recorded with them
(`matmul`, `attention`, `all_reduce` in models/). Trace files stay out of git.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re

from jax import profiler

CATEGORIES = ("all_reduce", "matmul", "attention", "other")
_COMM = re.compile(r"nccl|all_?reduce|allreduce|psum|one_shot|two_shot|reduce_add_norm|"
                   r"MultiGpuBarrier|collective|cross_device", re.I)
_COMPUTE_LINE = re.compile(r"stream\b.*\bcompute\b", re.I)
_NOT_KERNEL = re.compile(r"memcpy|memset", re.I)
_GEMM = re.compile(r"gemm|gemv|cublas|cutlass|xmma|nvjet|sm90_|matmul|triton_gemm", re.I)


@dataclasses.dataclass(frozen=True)
class Kernel:
  device: str
  name: str
  start_ns: float
  dur_ns: float
  scope: str


def device_kernels(trace_dir: str, lines_seen: dict[str, int] | None = None) -> list[Kernel]:
  """All GPU kernel events (per-stream lines) of the newest trace under `trace_dir`.

  `lines_seen`, if given, receives event counts of every line of the GPU planes: evidence of
  what the trace held when kernels are missing from it."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
  data = profiler.ProfileData.from_file(paths[-1])
  out = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if lines_seen is not None:
        key = f"{plane.name} | {line.name}"
        lines_seen[key] = lines_seen.get(key, 0) + sum(1 for _ in line.events)
      # A stream line lists the kinds of work it carried: "Stream #50(Memset,MemcpyD2D,Compute)"
      # is the main compute stream, which also carries copies.
      if not _COMPUTE_LINE.match(line.name):
        continue
      for ev in line.events:
        if _NOT_KERNEL.match(ev.name):
          continue
        # The op's JAX name scope sits in one of the string stats (tf_op / long_name / ...).
        scope = " ".join(str(v) for _, v in ev.stats if isinstance(v, str))
        out.append(Kernel(plane.name, ev.name, ev.start_ns, ev.duration_ns, scope))
  return out


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s.*?\s(fusion|custom-call)\(")


def kernel_scopes(optimized_hlo: str) -> dict[str, str]:
  """Kernel name -> JAX op name (with its named scopes) of the fusion or custom call of an
  optimized HLO module that XLA emits it for: XLA names a fusion's kernel after the
  instruction, '.' and '-' turned into '_'. Lets CUPTI's kernel names, which carry no
  scope, be classified like trace events."""
  out = {}
  for line in optimized_hlo.splitlines():
    inst, op = _INSTRUCTION.match(line), re.search(r'op_name="([^"]*)"', line)
    if inst and op:
      out[re.sub(r"[.\-]", "_", inst.group(1))] = op.group(1)
  return out


def scope_of(name: str, scopes: dict[str, str]) -> str:
  """The op name `kernel_scopes` gives a kernel: exact, else the longest instruction name
  the kernel name starts with (XLA may add a suffix)."""
  if name in scopes:
    return scopes[name]
  best = max((k for k in scopes if name.startswith(k + "_")), key=len, default=None)
  return scopes[best] if best else ""


def classify(k: Kernel) -> str:
  if _COMM.search(k.name) or "all_reduce" in k.scope:
    return "all_reduce"
  if _GEMM.search(k.name) or "/matmul" in k.scope:
    return "matmul"
  if "/attention" in k.scope:
    return "attention"
  return "other"


def breakdown(kernels: list[Kernel], steps: int) -> dict[str, float]:
  """Per-step GPU time by category in µs, averaged over devices (flat keys)."""
  per_device = collections.defaultdict(lambda: collections.Counter())
  for k in kernels:
    per_device[k.device][classify(k)] += k.dur_ns
  if not per_device:
    return {}
  out = {}
  for cat in CATEGORIES:
    out[f"gpu_{cat}_us"] = sum(c[cat] for c in per_device.values()) / len(per_device) / steps / 1e3
  out["gpu_total_us"] = sum(out[f"gpu_{c}_us"] for c in CATEGORIES)
  out["profiled_devices"] = len(per_device)
  return out


def outside_compute_share(row: dict) -> float | None:
  """1 - (matmul + attention + other kernel µs per step) / TPOT: the part of a decode step
  the GPU spends outside compute kernels, i.e. in communication (its kernels, their waits for
  peers) and idle gaps. Unlike the collectives' own kernel time, it does not count a wait that
  overlaps compute or that the profiler lengthens. CUPTI's count, else the trace's; None when
  neither saw the compute kernels (traces before the main stream was kept)."""
  for prefix in ("cupti_", "gpu_"):
    compute = [row.get(f"{prefix}{c}_us") for c in CATEGORIES if c != "all_reduce"]
    if row.get(f"{prefix}matmul_us"):
      return max(0.0, 1 - sum(c or 0.0 for c in compute) / (row["tpot_ms_median"] * 1e3))
  return None


def top_kernels(kernels: list[Kernel], n: int = 15) -> list[tuple[str, str, float, int]]:
  """(category, name, total µs, count) of the n most expensive kernel names on one device."""
  if not kernels:
    return []
  first = kernels[0].device
  agg = collections.defaultdict(lambda: [0.0, 0, ""])
  for k in kernels:
    if k.device == first:
      agg[k.name][0] += k.dur_ns / 1e3
      agg[k.name][1] += 1
      agg[k.name][2] = classify(k)
  rows = sorted(agg.items(), key=lambda kv: -kv[1][0])[:n]
  return [(v[2], name, v[0], v[1]) for name, v in rows]
