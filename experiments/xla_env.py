"""Per-process XLA settings the benchmarks compare, and the HBM bandwidth they are judged by.

XLA flags are read once when the backend starts, so `apply` must run before the first
computation. NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in every mode.
"""

from __future__ import annotations

import os
import time

COMMAND_BUFFERS = {
    "default": [],                                       # XLA's default command-buffer set
    "off": ["--xla_gpu_enable_command_buffer="],
    "while": ["--xla_gpu_enable_command_buffer=+WHILE,+COLLECTIVES",  # whole loop, one graph
              "--xla_gpu_graph_min_graph_size=1"],
}
COLLECTIVES = {
    "default": [],                                       # XLA's own collective kernels
    "nccl": ["--xla_gpu_experimental_use_collective_kernels="],
    "one_shot": ["--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"],
}


def apply(command_buffers: str = "default", collectives: str = "default",
          dump_dir: str | None = None) -> str:
  """Sets XLA_FLAGS for this process (before jax starts); returns the flags."""
  flags = COMMAND_BUFFERS[command_buffers] + COLLECTIVES[collectives]
  if dump_dir:
    flags += [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text"]
  existing = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = " ".join([existing, *flags]).strip()
  os.environ["NCCL_NVLS_ENABLE"] = "0"
  return os.environ["XLA_FLAGS"]


def hbm_copy_gbps(gib: float = 2.0, passes: int = 10, runs: int = 5) -> float:
  """Device-memory bandwidth on device 0: bytes read + written by an in-place elementwise
  update of a `gib` GiB array, `passes` times inside one executable (no launch or
  allocation in the timed region), median over `runs`."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = int(gib * 2**30) // 4
  x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
  scale = jnp.float32(1.0 + 2.0**-20)
  f = jax.jit(lambda x: jax.lax.fori_loop(0, passes, lambda _, x: x * scale, x), donate_argnums=0)
  x = f(x)
  x.block_until_ready()
  samples = []
  for _ in range(runs):
    t0 = time.perf_counter()
    x = f(x)
    x.block_until_ready()
    samples.append(time.perf_counter() - t0)
  return 2 * n * 4 * passes / float(np.median(samples)) / 1e9
