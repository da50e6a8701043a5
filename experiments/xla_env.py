"""Per-process XLA settings the benchmarks compare, and the HBM bandwidth they are judged by.

XLA flags are read once when the backend starts, so `apply` must run before the first
computation. NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in every mode.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

COMMAND_BUFFERS = {
    "default": [],                                       # XLA's default command-buffer set
    "off": ["--xla_gpu_enable_command_buffer="],
    "while": ["--xla_gpu_enable_command_buffer=+WHILE,+COLLECTIVES",  # whole loop, one graph
              "--xla_gpu_graph_min_graph_size=1"],
    # Every command type XLA has: a while loop becomes one graph only if every thunk of its
    # body converts (XLA's CommandBufferConversionPass), else it stays a host-side loop
    # around graph segments.
    "while_all": ["--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,"
                  "COLLECTIVES,CONDITIONAL,WHILE,DYNAMIC_SLICE_FUSION",
                  "--xla_gpu_graph_min_graph_size=1"],
}
COLLECTIVES = {
    "default": [],                                       # XLA's own collective kernels
    "nccl": ["--xla_gpu_experimental_use_collective_kernels="],
    "one_shot": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"],
}

GEMMS = {  # how XLA emits dots: its autotuned Triton GEMM fusions, or cuBLAS / cuBLASLt
    "default": [],
    "cublas": ["--xla_gpu_enable_triton_gemm=false"],
    "cublaslt": ["--xla_gpu_enable_triton_gemm=false", "--xla_gpu_enable_cublaslt=true"],
}


def apply(command_buffers: str = "default", collectives: str = "default",
          dump_dir: str | None = None, gemm: str = "default") -> str:
  """Sets XLA_FLAGS for this process (before jax starts); returns the flags."""
  flags = COMMAND_BUFFERS[command_buffers] + COLLECTIVES[collectives] + GEMMS[gemm]
  if dump_dir:
    flags += [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text"]
  existing = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([existing, *flags]).strip()
  os.environ["NCCL_NVLS_ENABLE"] = "0"
  return os.environ["XLA_FLAGS"]


def hbm_copy_gbps(gib: float = 2.0, calls: int = 20, runs: int = 5) -> float:
  """Device-memory bandwidth on device 0, STREAM-copy style: bytes read + written per second
  by `calls` back-to-back launches of a scaled copy of a `gib` GiB array (dispatched
  asynchronously, so host work hides behind ~1 ms kernels), median over `runs`.

  Separate launches, not a loop inside one executable: XLA may add a copy of a loop-carried
  buffer per iteration (twice the traffic counted once) or fuse the iterations (a tenth).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = int(gib * 2**30) // 4
  srcs = [jax.random.normal(jax.random.key(i), (n,), jnp.float32) for i in range(2)]
  scale = jnp.float32(1.0 + 2.0**-20)
  f = jax.jit(lambda x: x * scale)
  jax.block_until_ready([f(x) for x in srcs])
  samples = []
  for _ in range(runs):
    t0 = time.perf_counter()
    for i in range(calls):  # each result dropped as the next is dispatched: two alive at most
      y = f(srcs[i % 2])
    y.block_until_ready()
    samples.append(time.perf_counter() - t0)
  return 2 * n * 4 * calls / float(np.median(samples)) / 1e9


_THUNK_KIND = re.compile(r"\bk[A-Z]\w+")


def thunk_evidence(dump_dir: str, module: str, skip: frozenset[str] = frozenset()) -> dict:
  """Excerpts of a jitted function's thunk sequence in an XLA dump (`module`: its dump name,
  e.g. `jit__loop`): whether its loop became one graph with a device-side WHILE node (a
  while command inside a command buffer) or stayed a host-side kWhile thunk around
  command-buffer segments, and which thunk kinds keep work outside the graphs (XLA converts
  a while loop only if every thunk of its body converts). Files named in `skip` (earlier
  configurations' modules of one process) are passed over."""
  files = [f for f in glob.glob(os.path.join(
      dump_dir, f"*{module}*thunk_sequence_after_thunk_passes.txt"))
           if os.path.basename(f) not in skip]
  if not files:
    return {"file": None, "candidates": sorted(os.path.basename(f) for f in glob.glob(
        os.path.join(dump_dir, "*thunk_sequence_after_thunk_passes.txt")))[:40]}
  path = max(files, key=os.path.getsize)
  lines = open(path).read().splitlines()
  pick = lambda word: [l.strip()[:200] for l in lines if word in l.lower()][:12]
  kinds = collections.Counter(m.group(0) for l in lines for m in [_THUNK_KIND.search(l)] if m)
  at = next((i for i, l in enumerate(lines) if "while" in l.lower()), None)
  # A top-level (unindented) kWhile is a host-side loop; nested in a kCommandBuffer it is
  # the graph's WHILE node. Beside a host-side loop: the body's thunks left outside graphs
  # (none when a loop-dependent kDynamicSliceFusion alone kept it there: see thunk_kinds).
  host_while = any(re.match(r"\d+: kWhile", l) for l in lines)
  outside, in_body = collections.Counter(), False
  for l in lines:
    in_body = (in_body or l.strip() == "body:") and not re.match(r"\d+: ", l)
    m = _THUNK_KIND.search(l) if in_body and re.match(r" {4}\d+: ", l) else None
    if m and m.group(0) != "kCommandBuffer":
      outside[m.group(0)] += 1
  return {"file": os.path.basename(path), "lines": len(lines),
          "loop_in_one_graph": bool(kinds["kWhile"]) and not host_while,
          "host_loop_body_outside_graphs": dict(outside) if host_while else {},
          "command_buffer_lines": pick("command"), "while_lines": pick("while"),
          "thunk_kinds": dict(kinds.most_common()),
          "around_first_while": [] if at is None else
          [l.rstrip()[:200] for l in lines[max(0, at - 15):at + 25]]}


class ChildLog:
  """A benchmark child's rows on disk, rewritten after every row.

  A case that kills its process (a segfault, a device trap) would take the child's
  remaining cases with it, so the child marks each case before measuring it; a restarted
  child records a marked case as failed and goes on with the cases not yet done.
  """

  def __init__(self, path: str):
    self.path, self._pending = path, path + ".pending"
    self.rows = json.load(open(path)) if os.path.exists(path) else []
    if os.path.exists(self._pending):
      crashed = json.load(open(self._pending))
      self.add({**crashed, "error": "the process died during this case; a restarted child"
                                     " went on after it"})

  def done(self, key: dict) -> bool:
    return any(all(row.get(k) == v for k, v in key.items()) for row in self.rows)

  def start(self, row: dict) -> None:
    """Marks `row` (the case's key, measures None) as the one being measured."""
    with open(self._pending, "w") as f:
      json.dump(row, f)

  def add(self, row: dict) -> None:
    self.rows.append(row)
    with open(self.path, "w") as f:
      json.dump(self.rows, f)
    if os.path.exists(self._pending):
      os.remove(self._pending)


def run_children(module: str, names: list[str], restarts: int = 8,
                 deadline: float | None = None) -> list[dict]:
  """Runs `python -m module <this process's argv> --child=NAME --child_out=FILE` once per name
  (XLA flags are per process, so each setting compared gets its own process) and returns
  the rows the children wrote, in order. A child that dies is restarted where it stopped
  (ChildLog), up to `restarts` times while it makes progress. At `deadline` (a
  time.monotonic() value) the running child is killed, keeping its rows, and no other starts."""
  rows = []
  for name in names:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, "-m", module, *sys.argv[1:], f"--child={name}", f"--child_out={out}"]
    cut = False
    for _ in range(restarts + 1):
      try:
        proc = subprocess.run(cmd, env={**os.environ, "NCCL_NVLS_ENABLE": "0"}, timeout=None
                              if deadline is None else max(deadline - time.monotonic(), 0.0))
      except subprocess.TimeoutExpired:
        print(f"child {name} stopped at the time limit; keeping its rows so far", flush=True)
        cut = True
        break
      if not proc.returncode or not os.path.exists(out + ".pending"):
        break  # finished, or died outside a case (no progress to resume from)
      print(f"child {name} died (rc={proc.returncode}) during a case; restarting after it",
            flush=True)
    if not cut and proc.returncode:
      print(f"child {name} failed (rc={proc.returncode}); keeping its rows so far", flush=True)
    if os.path.exists(out):
      with open(out) as f:
        rows += json.load(f)
    if cut:
      break
  return rows
