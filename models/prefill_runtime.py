"""Batch-1 prefill in a few prompt lengths, compiled ahead of time in a background thread.

Every new prompt length is a new shape, so `jax.jit` compiles for seconds the first time it
sees one, and padding every prompt to the cache length wastes prefill compute. A
`PrefillRuntime` right-pads each prompt to the smallest of a few lengths (buckets).
`Decoder.prefill_fn` takes logits at each row's last real token and sets the cache's
lengths, and the causal mask keeps real tokens from seeing the padding, so a bucketed
prefill equals exact-length prefill and fills the KV cache that the decode loop reads
(`Decoder.loop_fn`: one executable for every prompt length).

Each bucket is lowered and compiled once (`lower(...).compile()`) and kept. With
`background=True` one thread compiles the buckets: the largest first (it serves every prompt),
then in the order of their expected saving (how likely a prompt needs the bucket, from a prior
and the requests seen, times the run time it saves over the next larger ready bucket). It runs
each new executable twice once it is ready: the first run pays one-off costs off the request
path (loading its kernels, capturing its CUDA graphs if any; 0.2-0.6 s on XLA:CPU), the second
measures its run time (`wait()` returns after both). A request
whose bucket is not ready takes whichever is estimated faster: waiting for its bucket (moved
to the front of the queue) or running now in a larger ready one. Requests may come from many
threads.

A later process can start warm two ways: `enable_persistent_cache` routes AOT `compile()`
through JAX's persistent cache (tracing and lowering still run per bucket), and a
`store` (models/executable_store.py) loads each bucket's whole executable from disk, with no
tracing, lowering or compilation; buckets missing from the store are compiled and added.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
import pathlib
import threading
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import NamedSharding, PartitionSpec as P

from models.decode import Decoder
from models.executable_store import ExecutableStore
from models.llama import KVCache

# XLA's command buffers (CUDA graphs) for the buckets: off unless asked for. Measured on one
# H200 (docs/prefill.md, "Graphs or not"): with them, a bucket that runs after a different one
# pays ~3 ms, and a server switches buckets on most requests; without them, 7B steady-state TTFT
# dropped from 14.3 to 11.0 ms (median, 210 requests).
NO_GRAPHS = {"xla_gpu_enable_command_buffer": ""}

# Measured with experiments/bench_ttft.py (docs/prefill.md, "Bucket choice"): compile time per
# bucket is flat in its length while run time grows with it; these 10 buckets for 512 slots
# prefill in 1.13x the exact-length time, 17 (step 32) would reach 1.06x.
DEFAULT_STEP = 64
DEFAULT_SMALLEST = 16


def default_buckets(max_len: int, step: int = DEFAULT_STEP,
                    smallest: int = DEFAULT_SMALLEST) -> tuple[int, ...]:
  """Powers of two from `smallest` below `step`, then multiples of `step`, then `max_len`."""
  sizes = []
  b = smallest
  while b < min(step, max_len):
    sizes.append(b)
    b *= 2
  sizes += range(step, max_len, step)
  return (*sizes, max_len)


def enable_persistent_cache(directory: str | pathlib.Path) -> None:
  """Every later compilation in this process reads and writes JAX's persistent cache in
  `directory`, however small or quick (so CPU executables are cached too)."""
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()  # the cache binds its directory once; rebind to this one


class Prefill(NamedTuple):
  """One prompt's prefill: its first generated token (1,) and logits (1, v) on device, the
  filled cache and comm state (inputs to `Decoder.loop_fn` / `step_fn`), the bucket it ran
  in and the seconds it waited for (or spent on) compilation."""

  next_b: jax.Array
  logits_bv: jax.Array
  cache: KVCache
  comm_state: Any
  bucket: int
  compile_wait_s: float


@dataclasses.dataclass
class _Built:
  executable: Any  # jax.stages.Compiled
  lower_s: float
  compile_s: float  # XLA compilation, or loading from the store
  ready_s: float  # since the runtime was created
  source: str  # "compiled" or "store"
  first_run_s: float | None = None  # background warm-up, after the bucket is ready
  run_s: float | None = None


class PrefillRuntime:
  """Batch-1 prefill over a `Decoder` in compiled buckets (see the module docstring).

  background=False compiles a bucket when a request first needs it, in that request's thread.
  `prior_lengths` (typical prompt lengths) weighs the background order; the default is uniform
  over 1..largest bucket. `store` loads buckets compiled by an earlier process and keeps the
  ones compiled here. `graphs=True` compiles the buckets with XLA's command buffers (see
  NO_GRAPHS); `compiler_options` (XLA debug options) are added to that choice. Both apply to
  the buckets alone, not to the process's other executables (the decode loop keeps its graph).
  """

  def __init__(self, decoder: Decoder, buckets: Sequence[int] | None = None, *,
               background: bool = True, prior_lengths: Sequence[int] | None = None,
               store: ExecutableStore | None = None, graphs: bool = False,
               compiler_options: dict[str, Any] | None = None):
    if buckets is None:
      buckets = default_buckets(decoder.max_len)
    buckets = tuple(sorted(set(buckets)))
    if not buckets or buckets[0] < 1 or buckets[-1] > decoder.max_len:
      raise ValueError(f"buckets {list(buckets)} must be non-empty and lie in"
                       f" [1, {decoder.max_len}] (the cache length)")
    self.decoder, self.buckets, self.background, self.store = decoder, buckets, background, store
    self.compiler_options = {**({} if graphs else NO_GRAPHS), **(compiler_options or {})}
    self._created = time.perf_counter()
    lengths = np.arange(1, buckets[-1] + 1) if prior_lengths is None else np.asarray(prior_lengths)
    slot = np.searchsorted(buckets, lengths[(lengths >= 1) & (lengths <= buckets[-1])])
    mass = np.bincount(slot, minlength=len(buckets)) / max(len(lengths), 1)
    self._mass = dict(zip(buckets, mass.tolist()))
    self._seen = dict.fromkeys(buckets, 0)
    self._built: dict[int, _Built] = {}
    self._errors: dict[int, Exception] = {}
    self._building: dict[int, float] = {}  # bucket -> start time
    self._pending = set(buckets) if background else set()  # left for the background thread
    self._waited_on: list[int] = []  # pending buckets that requests wait for, first come first
    self._paused = self._closed = False
    self._cv = threading.Condition()
    self._trace_lock = threading.Lock()  # one trace / lowering / compilation at a time
    comm = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        decoder.new_comm_state(1))
    self._arg_specs = (decoder.cache_spec(1), comm)
    self._replicated = NamedSharding(decoder.mesh, P())
    self._worker = None
    if background:
      self._worker = threading.Thread(target=self._compile_loop, name="prefill-compile",
                                      daemon=True)
      self._worker.start()

  # ---- requests ----------------------------------------------------------------------

  def bucket_for(self, length: int) -> int:
    """The smallest bucket that holds `length` tokens."""
    if not 1 <= length <= self.buckets[-1]:
      raise ValueError(f"no bucket holds {length} tokens (buckets: {list(self.buckets)})")
    return self.buckets[bisect.bisect_left(self.buckets, length)]

  def prefill(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 1,
              cache: KVCache | None = None, comm_state: Any = None) -> Prefill:
    """Prefills one prompt into `cache` (donated; a new one by default).

    Raises ValueError before any work when the prompt exceeds the largest bucket or, with
    `max_new_tokens` to generate, the cache length.
    """
    n = len(prompt_ids)
    self._check(n, max_new_tokens)
    exact = self.bucket_for(n)
    start = time.perf_counter()
    with self._cv:
      self._seen[exact] += 1
      bucket = self._route(exact) if self.background else exact
    built = self._ensure(bucket)
    waited_s = time.perf_counter() - start
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :n] = prompt_ids
    cache = self.decoder.new_cache(1) if cache is None else cache
    comm_state = self.decoder.new_comm_state(1) if comm_state is None else comm_state
    nxt, logits, cache, comm_state = built.executable(
        self.decoder.state, cache, comm_state, tokens, np.array([n], np.int32))
    return Prefill(nxt, logits, cache, comm_state, bucket, waited_s)

  def _check(self, length: int, max_new_tokens: int) -> None:
    if length < 1:
      raise ValueError("the prompt is empty")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be at least 1 (prefill makes one), found"
                       f" {max_new_tokens}")
    if length > self.buckets[-1]:
      raise ValueError(f"prompt of {length} tokens exceeds the largest bucket, {self.buckets[-1]}")
    if length + max_new_tokens > self.decoder.max_len:
      raise ValueError(f"prompt of {length} tokens + {max_new_tokens} new tokens exceeds the cache"
                       f" length {self.decoder.max_len}")

  def _route(self, exact: int) -> int:
    """The bucket with the soonest estimated first token for a request whose own bucket is
    `exact`: a larger ready one (its measured run time), the one being compiled, or `exact`
    itself (compile time left, then its run time). Called holding the lock."""
    if exact in self._built:
      return exact
    building = next(iter(self._building), None)  # the background thread builds one at a time
    if not self._built:  # nothing measured: the bucket under way is ready soonest
      return building if building is not None and building >= exact else exact
    build_s = float(np.mean([x.lower_s + x.compile_s for x in self._built.values()]))
    left_s = 0.0 if building is None else max(
        build_s - (time.perf_counter() - self._building[building]), 0.0)
    options = {b: self._run_estimate(b) for b in self._built if b > exact}
    if building is not None and building >= exact:
      options[building] = left_s + self._run_estimate(building)
    if exact not in options:  # pending: compiled next once waited on, unless paused
      options[exact] = math.inf if self._paused else left_s + build_s + self._run_estimate(exact)
    return min(options, key=options.get)

  def _run_estimate(self, bucket: int) -> float:
    """Measured run time, else interpolated between measured buckets (and 0 at length 0),
    proportional beyond the largest; 0 before any measurement."""
    measured = sorted((b, x.run_s) for b, x in self._built.items() if x.run_s is not None)
    if not measured:
      return 0.0
    xs, ys = zip(*measured)
    if bucket > xs[-1]:
      return ys[-1] * bucket / xs[-1]
    return float(np.interp(bucket, (0, *xs), (0.0, *ys)))

  # ---- compilation -------------------------------------------------------------------

  def wait(self, bucket: int | None = None) -> None:
    """Blocks until `bucket` (default: every bucket) is compiled (moved to the front of the
    background queue, or compiled in this thread without background compilation) and, in the
    background, warmed up: its one-off first-run costs are paid, and no background work is
    left to compete with requests for it."""
    for b in self.buckets if bucket is None else (bucket,):
      if b not in self.buckets:
        raise ValueError(f"{b} is not one of the buckets {list(self.buckets)}")
      built = self._ensure(b)
      if self.background:
        with self._cv:  # a failed warm-up unpublishes the bucket: _ensure then raises
          self._cv.wait_for(lambda: self._closed or self._built.get(b) is not built
                            or built.run_s is not None)
        self._ensure(b)

  def _ensure(self, bucket: int) -> _Built:
    while True:
      with self._cv:
        while True:
          if bucket in self._built:
            return self._built[bucket]
          if bucket in self._errors:
            error = self._errors[bucket]
            raise RuntimeError(f"compiling the {bucket}-token bucket failed") from error
          if self._closed:
            raise RuntimeError("the prefill runtime is closed")
          if not self.background and bucket not in self._building:
            self._building[bucket] = time.perf_counter()
            break  # compile it in this thread
          if bucket in self._pending and bucket not in self._waited_on:
            self._waited_on.append(bucket)
            self._cv.notify_all()
          self._cv.wait()
      self._build(bucket)

  def _priority(self, bucket: int) -> tuple:
    """Background order, highest first: waited on (first come first); then the expected
    saving, likelihood (requests seen, plus the prior weighing as one request) times the run
    time saved over the next larger ready bucket, infinite without one (so the largest bucket,
    a fallback for every prompt, comes first); then size."""
    waited = -self._waited_on.index(bucket) if bucket in self._waited_on else -math.inf
    likelihood = self._seen[bucket] + self._mass[bucket]
    larger = [b for b in self._built if b > bucket]
    saving = self._run_estimate(min(larger)) - self._run_estimate(bucket) if larger else math.inf
    return waited, likelihood * saving if likelihood else 0.0, bucket

  def _compile_loop(self) -> None:
    while True:
      with self._cv:
        while not self._closed and (self._paused or not self._pending):
          self._cv.wait()
        if self._closed:
          return
        bucket = max(self._pending, key=self._priority)
        self._pending.discard(bucket)
        if bucket in self._waited_on:
          self._waited_on.remove(bucket)
        self._building[bucket] = time.perf_counter()
      self._build(bucket)

  def _store_key(self, bucket: int) -> str:
    d = self.decoder
    return self.store.key(kind="prefill", bucket=bucket, config=repr(d.config),
                          mesh=repr(d.mesh), backend=d.comm.backend, matmul=d.matmul,
                          max_len=d.max_len, compiler_options=sorted(self.compiler_options.items()))

  def _compile(self, bucket: int) -> tuple[Any, float, float, str]:
    """(executable, lower s, compile or load s, source): from the store when it has the
    bucket, else traced, lowered and compiled (and added to the store)."""
    key = self.store and self._store_key(bucket)
    t0 = time.perf_counter()
    devices = self.decoder.mesh.devices.flat
    if self.store and (executable := self.store.load(key, devices)) is not None:
      return executable, 0.0, time.perf_counter() - t0, "store"
    tokens = jax.ShapeDtypeStruct((1, bucket), jnp.int32, sharding=self._replicated)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=self._replicated)
    lowered = self.decoder.prefill_fn.lower(self.decoder.state, *self._arg_specs, tokens, lengths)
    t1 = time.perf_counter()
    executable = lowered.compile(compiler_options=self.compiler_options or None)
    t2 = time.perf_counter()
    if self.store:
      self.store.save(key, executable)
    return executable, t1 - t0, t2 - t1, "compiled"

  def _build(self, bucket: int) -> None:
    """Compiles (or loads) one bucket and publishes it, or the error that requests for it
    then raise; in the background, then warms it up."""
    try:
      with self._trace_lock:
        executable, lower_s, compile_s, source = self._compile(bucket)
    except Exception as e:
      self._publish(bucket, error=e)
      return
    built = _Built(executable, lower_s, compile_s, time.perf_counter() - self._created, source)
    self._publish(bucket, built)
    if not self.background:
      return
    try:
      first_run_s, run_s = self._warm_up(executable, bucket)
    except Exception as e:  # a bucket that cannot run is no bucket
      self._publish(bucket, error=e)
      return
    with self._cv:
      built.first_run_s, built.run_s = first_run_s, run_s
      self._cv.notify_all()

  def _publish(self, bucket: int, built: _Built | None = None, error: Exception | None = None):
    with self._cv:
      self._building.pop(bucket, None)
      if error is None:
        self._built[bucket] = built
      else:
        self._built.pop(bucket, None)
        self._errors[bucket] = error
      self._cv.notify_all()

  def _warm_up(self, executable, bucket: int) -> tuple[float, float]:
    """Two runs on a scratch cache: seconds to the first token on the host, each."""
    cache, comm = self.decoder.new_cache(1), self.decoder.new_comm_state(1)
    tokens, lengths = np.zeros((1, bucket), np.int32), np.array([bucket], np.int32)
    times = []
    for _ in range(2):
      t0 = time.perf_counter()
      nxt, _, cache, comm = executable(self.decoder.state, cache, comm, tokens, lengths)
      np.asarray(nxt)
      times.append(time.perf_counter() - t0)
    return times[0], times[1]

  @contextlib.contextmanager
  def paused(self):
    """No background compilation starts inside the block; the one under way finishes first.
    Requests then fall back to larger ready buckets, or wait for the block to end."""
    with self._cv:
      self._paused = True
      while self._building:
        self._cv.wait()
    try:
      yield
    finally:
      with self._cv:
        self._paused = False
        self._cv.notify_all()

  # ---- state -------------------------------------------------------------------------

  def ready(self) -> tuple[int, ...]:
    """The compiled buckets."""
    with self._cv:
      return tuple(sorted(self._built))

  def stats(self) -> list[dict[str, Any]]:
    """One flat row per compiled bucket: seconds to lower and compile (or load) it, where it
    came from, its ready time since creation, its warm-up runs (background builds; None until
    done), memory in bytes."""
    with self._cv:
      built = dict(sorted(self._built.items()))
    rows = []
    for bucket, b in built.items():
      memory = b.executable.memory_analysis()
      rows.append({"bucket": bucket, "lower_s": b.lower_s, "compile_s": b.compile_s,
                   "source": b.source, "ready_s": b.ready_s, "first_run_s": b.first_run_s,
                   "run_s": b.run_s,
                   "code_bytes": getattr(memory, "generated_code_size_in_bytes", None),
                   "temp_bytes": getattr(memory, "temp_size_in_bytes", None)})
    return rows

  def close(self) -> None:
    """Stops background compilation (after the build under way); waiting requests raise."""
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    if self._worker is not None:
      self._worker.join()

  def __enter__(self) -> "PrefillRuntime":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
