"""Time to first token of batch-1 prefill under four compilation policies.

  python -m experiments.bench_ttft --model smollm2-135m --requests 210

A seeded workload (half the prompts uniform in 10..500 tokens, half the paper's grid 10, 50,
100, ..., 500, shuffled) is served one request after another, each policy in a fresh process
that starts serving as soon as the weights are loaded:

- naive: one executable per exact prompt length, compiled when first seen (what `jax.jit`
  does; here through the same runtime with one bucket per length);
- pad_max: one executable at the cache length, compiled on the first request;
- buckets: the bucket set, each bucket compiled on the first request that needs it;
- hybrid: the bucket set compiled in the background from the start, with JAX's persistent
  cache and a store of compiled executables (models/executable_store.py) in one directory;
  run from an empty directory (cold start) and again from it (warm start: executables load
  without tracing, lowering or compiling).

TTFT is prompt in -> first token on the host. Each request prefills the cache the previous
one returned (a server takes it from a pool), so cache allocation is not counted. After the
workload (and, for hybrid, the rest of the background compilation) every policy serves the
same requests again: the steady state. naive's steady pass is exact-length prefill, served
the same way, against which the bins compare the others. A first
phase compiles and times every candidate bucket (powers of two from 16, then multiples of
--profile_step) and scores bucket sets on the workload; this is how
models/prefill_runtime.default_buckets was chosen.
Writes a record under experiments/results/ttft/.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from experiments import records, xla_env
from models import factory, prefill_runtime
from models.executable_store import ExecutableStore
from models.decode import Decoder
from models.sharding import make_mesh

GRID = (10, 50, 100, 200, 300, 400, 500)  # the paper's prompt lengths; also the bins' upper edges
POLICIES = ("naive", "pad_max", "buckets", "hybrid")

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Preset (models/config.py).")
_TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel degree.")
_REQUESTS = flags.DEFINE_integer("requests", 210, "Requests in the workload (>= 200 to record).")
_NAIVE_REQUESTS = flags.DEFINE_integer(
    "naive_requests", None, "Serve only the workload's first N requests under `naive` (a 7B model"
    " compiles for seconds per new length: ~100 lengths outlast a GPU call); recorded.")
_POLICIES = flags.DEFINE_list("policies", list(POLICIES), f"Subset of {POLICIES}.")
_BUCKETS = flags.DEFINE_list("buckets", [], "Bucket lengths (default: default_buckets(max_len)).")
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed (lengths and token ids).")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "KV cache slots; pad_max pads to it.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Empty or new persistent-cache directory for"
                                 " hybrid (default: a new temp dir).")
_CB = flags.DEFINE_enum("command_buffers", "default", list(xla_env.COMMAND_BUFFERS),
                        "XLA command buffers on GPU (experiments/xla_env.py).")
_PROFILE = flags.DEFINE_bool("profile_buckets", True, "Time every candidate bucket first.")
_BUCKET_GRAPHS = flags.DEFINE_bool("bucket_graphs", False, "Compile the prefill executables"
                                   " with XLA's command buffers (CUDA graphs; PrefillRuntime"
                                   " graphs=True); the runtime's default is without.")
_PROFILE_STEP = flags.DEFINE_integer(
    "profile_step", 32, "Candidate buckets: powers of two below this, then its multiples (a 7B"
    " model compiles for seconds per bucket: 64 halves the profile's time on a GPU call).")
_RECORD = flags.DEFINE_bool("record", True, "Write a record under experiments/results/.")


def workload(requests: int, seed: int, lo: int = GRID[0], hi: int = GRID[-1]) -> list[int]:
  """Prompt lengths: half cycling through GRID, half uniform in [lo, hi], shuffled."""
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([np.resize(GRID, requests // 2),
                            rng.integers(lo, hi + 1, requests - requests // 2)])
  rng.shuffle(lengths)
  return lengths.tolist()


def _bin(length: int) -> tuple[int, int]:
  hi = next(g for g in GRID if length <= g)
  return (GRID[GRID.index(hi) - 1] + 1 if hi > GRID[0] else 1), hi


# ---- one policy, in a fresh process ------------------------------------------------------


def _decoder(job) -> Decoder:
  mesh = make_mesh(job["tp"])
  config, graphdef, state, _ = factory.build(job["model"], mesh)
  jax.block_until_ready(state)
  return Decoder(config, graphdef, state, mesh, max_len=job["max_len"])


class _Server:
  """One request at a time over a runtime, each prefilling the cache the last one returned."""

  def __init__(self, decoder: Decoder, runtime: prefill_runtime.PrefillRuntime):
    self.runtime = runtime
    self.cache, self.comm = decoder.new_cache(1), decoder.new_comm_state(1)

  def request(self, prompt: list[int]):
    """(TTFT in s: prompt in -> first token on the host, the runtime's Prefill)."""
    start = time.perf_counter()
    out = self.runtime.prefill(prompt, cache=self.cache, comm_state=self.comm)
    int(out.next_b[0])
    self.cache, self.comm = out.cache, out.comm_state
    return time.perf_counter() - start, out


def _serve(job: dict) -> dict:
  """Serves the workload under one policy; per-request timings and per-executable stats."""
  if job["policy"] == "hybrid":
    prefill_runtime.enable_persistent_cache(job["cache_dir"])  # before anything compiles
  decoder = _decoder(job)
  rng = np.random.default_rng(job["seed"])
  lengths = job["lengths"][:job["naive_requests"]] if job["policy"] == "naive" else job["lengths"]
  prompts = [rng.integers(3, decoder.config.vocab_size, n).tolist() for n in lengths]
  buckets = {"naive": range(1, job["max_len"] + 1), "pad_max": (job["max_len"],)}.get(
      job["policy"], job["buckets"])
  t0 = time.perf_counter()
  hybrid = job["policy"] == "hybrid"
  store = ExecutableStore(pathlib.Path(job["cache_dir"]) / "executables") if hybrid else None
  runtime = prefill_runtime.PrefillRuntime(decoder, buckets, background=hybrid, store=store,
                                           graphs=job["graphs"])
  server, requests = _Server(decoder, runtime), []

  def serve(phase):
    for prompt in prompts:
      t_s = time.perf_counter() - t0
      ttft, out = server.request(prompt)
      requests.append({"phase": phase, "t_s": t_s, "length": len(prompt),
                       "bucket": out.bucket, "exact_bucket": runtime.bucket_for(len(prompt)),
                       "ttft_ms": ttft * 1e3, "compile_wait_ms": out.compile_wait_s * 1e3})

  serve("arrival")
  serve_s = time.perf_counter() - t0
  if hybrid:
    runtime.wait()  # the rest of the background compilation, for its cold/warm start time
  serve("steady")  # the same requests again: every executable they need is ready
  runtime.close()
  return {"requests": requests, "executables": runtime.stats(), "serve_s": serve_s}


def _profile(job: dict) -> list[dict]:
  """Compiles and times each candidate bucket: lower, compile, first run, steady run."""
  decoder = _decoder(job)
  runtime = prefill_runtime.PrefillRuntime(decoder, job["candidates"], background=False,
                                           graphs=job["graphs"])
  server, rows = _Server(decoder, runtime), []
  # One token short of the bucket: room for the next one.
  timed = lambda bucket: server.request(list(range(3, 2 + bucket)))[0]

  def after(other, bucket):  # median ms of `bucket` right after a run of `other`
    return float(np.median([(timed(other), timed(bucket))[1] for _ in range(3)])) * 1e3

  buckets = runtime.buckets
  for bucket in buckets:  # compiled on its first request here
    times = [timed(bucket) for _ in range(4)]
    stats = next(s for s in runtime.stats() if s["bucket"] == bucket)
    rows.append({"length": bucket, "lower_s": stats["lower_s"], "compile_s": stats["compile_s"],
                 "first_run_s": times[0] - stats["lower_s"] - stats["compile_s"],
                 "run_ms": float(np.median(times[1:])) * 1e3,
                 "code_bytes": stats["code_bytes"], "temp_bytes": stats["temp_bytes"]})
  for i, row in enumerate(rows):
    # Right after another bucket (a server's usual order): what switching executables adds,
    # after the next smaller one and after the largest (whose temporaries are the largest).
    row["after_switch_ms"] = after(buckets[i - 1], buckets[i]) if i else None
    row["after_largest_ms"] = after(buckets[-1], buckets[i]) if i < len(rows) - 1 else None
    print(f"  bucket {buckets[i]:4d}: lower {row['lower_s']:.2f} s  compile {row['compile_s']:.2f}"
          f" s  first run {row['first_run_s']:.2f} s  run {row['run_ms']:.1f} ms  after the"
          f" next smaller {row['after_switch_ms'] or 0:.1f} ms, after the largest"
          f" {row['after_largest_ms'] or 0:.1f} ms", flush=True)
  return rows


def _in_fresh_process(fn, job):
  """fn(job) in a new interpreter: no compiled code or JAX caches carried over."""
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
    return pool.submit(fn, job).result()


# ---- analysis ----------------------------------------------------------------------------


def _bucket_sets(max_len: int, default: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
  pow2 = tuple(b for b in (16, 32, 64, 128, 256, 512, 1024, 2048) if b < max_len)
  return {"pad_max": (max_len,), "pow2": (*pow2, max_len),
          "mult128": (*range(128, max_len, 128), max_len),
          "mult64": (*range(64, max_len, 64), max_len), "default": default,
          "mult32": (16, *range(32, max_len, 32), max_len)}


def _score_sets(profile: list[dict], lengths: list[int], max_len: int, default: tuple[int, ...]):
  """Expected prefill time per bucket set on the workload, if every bucket is compiled, against
  exact-length prefill (run time interpolated between profiled lengths)."""
  xs = np.array([p["length"] for p in profile])
  run = dict(zip(xs.tolist(), (p["run_ms"] for p in profile)))
  build = {p["length"]: p["lower_s"] + p["compile_s"] + p["first_run_s"] for p in profile}
  lens = np.array(lengths)
  exact = np.interp(lens, xs, [run[x] for x in xs.tolist()])
  short = lens <= 100
  rows = []
  for name, sizes in _bucket_sets(max_len, default).items():
    if any(s not in run for s in sizes):
      continue
    padded = np.array([run[sizes[np.searchsorted(sizes, n)]] for n in lens])
    rows.append({"set": name, "buckets": ",".join(map(str, sizes)), "count": len(sizes),
                 "expected_prefill_ms": float(padded.mean()),
                 "vs_exact": float(padded.mean() / exact.mean()),
                 "expected_prefill_ms_short": float(padded[short].mean()),
                 "vs_exact_short": float(padded[short].mean() / exact[short].mean()),
                 "build_s_total": float(sum(build[s] for s in sizes)),
                 "temp_bytes_total": sum(p["temp_bytes"] or 0 for p in profile
                                         if p["length"] in sizes)})
  return rows


def _interpolated(xs, ys):
  """Time (ms) at any length, linear between the measured lengths `xs`."""
  return lambda n: float(np.interp(n, xs, ys))


def _naive_exact_ms(requests: list[dict]):
  """Exact-length prefill TTFT by length: naive's steady pass (each prompt in its own
  executable, already compiled), median per length, interpolated between lengths."""
  by_len = {}
  for r in requests:
    if r["phase"] == "steady":
      by_len.setdefault(r["length"], []).append(r["ttft_ms"])
  return _interpolated(sorted(by_len), [float(np.median(by_len[x])) for x in sorted(by_len)])


def _policy_rows(name: str, start: str, result: dict, job: dict, exact=None) -> list[dict]:
  """Summary, per-length-bin, per-executable and per-request rows of one policy's run.

  TTFT statistics are of the arrival pass (compilation included); `steady_*` of the second
  pass over the same requests, every executable they need ready. `exact = (source,
  exact_ms(length))` is exact-length prefill time: bins compare their steady median with it."""
  reqs, execs = result["requests"], result["executables"]
  arrival = [r for r in reqs if r["phase"] == "arrival"]
  ttft = [r["ttft_ms"] for r in arrival]
  tag = {"policy": name, "start": start, "model": job["model"], "tp": job["tp"]}

  def steady_stats(mine):
    times = [r["ttft_ms"] for r in mine if r["phase"] == "steady"]
    stats = records.summarize(times, "steady_ttft_ms_")
    return {"steady_requests": len(times), **stats,
            "steady_p99_over_p50": stats["steady_ttft_ms_p99"] / stats["steady_ttft_ms_median"]}

  summary = {"row": "policy", **tag, "requests": len(arrival),
             **records.summarize(ttft, "ttft_ms_"), "first_ttft_ms": ttft[0],
             "executables": len(execs),
             "exec_code_bytes": sum(e["code_bytes"] or 0 for e in execs),
             "exec_temp_bytes": sum(e["temp_bytes"] or 0 for e in execs),
             "compile_s_total": sum(e["lower_s"] + e["compile_s"] for e in execs),
             "ready_all_s": max(e["ready_s"] for e in execs) if name == "hybrid" else None,
             "fallbacks": sum(r["bucket"] != r["exact_bucket"] for r in arrival),
             "blocked_on_compile": sum(r["compile_wait_ms"] > 1.0 for r in arrival),
             "padding_frac": float(np.mean([r["bucket"] / r["length"] - 1 for r in arrival])),
             "serve_s": result["serve_s"], **steady_stats(reqs)}
  bins = {}
  for r in reqs:
    bins.setdefault(_bin(r["length"]), []).append(r)
  rows = [summary]
  for (lo, hi), mine in sorted(bins.items()):
    row = {"row": "bin", **tag, "bin": f"{lo}-{hi}", "len_lo": lo, "len_hi": hi,
           **records.summarize([r["ttft_ms"] for r in mine if r["phase"] == "arrival"],
                               "ttft_ms_"), **steady_stats(mine)}
    if exact is not None:
      source, exact_ms = exact
      row["exact_source"] = source
      row["exact_ms_median"] = float(np.median([exact_ms(r["length"]) for r in mine
                                                if r["phase"] == "steady"]))
      row["steady_vs_exact"] = row["steady_ttft_ms_median"] / row["exact_ms_median"]
    rows.append(row)
  rows += [{"row": "executable", **tag, **e} for e in execs]
  rows += [{"row": "request", **tag, "index": i, **r} for i, r in enumerate(reqs)]
  return rows


def main(argv):
  del argv
  policies = _POLICIES.value
  if unknown := sorted(set(policies) - set(POLICIES)):
    raise app.UsageError(f"unknown --policies {unknown}; choose from {POLICIES}")
  if _RECORD.value and _REQUESTS.value < 200:
    raise app.UsageError(f"a recorded run needs --requests >= 200, found {_REQUESTS.value}"
                         " (or pass --norecord)")
  max_len = _MAX_LEN.value
  if GRID[-1] + 1 > max_len:
    raise app.UsageError(f"--max_len {max_len} has no room for {GRID[-1]}-token prompts and a"
                         " new token")
  buckets = tuple(int(b) for b in _BUCKETS.value) or prefill_runtime.default_buckets(max_len)
  cache_dir = pathlib.Path(_CACHE_DIR.value or tempfile.mkdtemp(prefix="ttft_jax_cache_"))
  if cache_dir.exists() and any(cache_dir.iterdir()):
    raise app.UsageError(f"--cache_dir {cache_dir} is not empty; hybrid's first run must start"
                         " cold")
  lengths = workload(_REQUESTS.value, _SEED.value)
  job = {"model": _MODEL.value, "tp": _TP.value, "max_len": max_len, "seed": _SEED.value,
         "lengths": lengths, "buckets": buckets, "cache_dir": str(cache_dir),
         "naive_requests": _NAIVE_REQUESTS.value,
         "graphs": _BUCKET_GRAPHS.value}
  xla_flags = xla_env.apply(_CB.value)  # inherited by the policies' processes
  print(f"{len(lengths)} requests, buckets {list(buckets)}, persistent cache {cache_dir}",
        flush=True)

  rows, t_start, load_start = [], time.perf_counter(), os.getloadavg()
  exact = None
  if _PROFILE.value:
    print("profiling candidate buckets", flush=True)
    candidates = prefill_runtime.default_buckets(max_len, step=_PROFILE_STEP.value)
    profile = _in_fresh_process(_profile, {**job, "candidates": candidates})
    rows += [{"row": "bucket_profile", **p} for p in profile]
    xs, ys = [p["length"] for p in profile], [p["run_ms"] for p in profile]
    exact = ("bucket profile", _interpolated(xs, ys))
    sets = _score_sets(profile, lengths, max_len, prefill_runtime.default_buckets(max_len))
    rows += [{"row": "bucket_set", **s} for s in sets]
    for s in sets:
      print(f"  {s['set']:8s} {s['count']:3d} buckets: expected prefill"
            f" {s['expected_prefill_ms']:6.1f} ms ({s['vs_exact']:.2f}x exact; prompts <= 100:"
            f" {s['vs_exact_short']:.2f}x), build {s['build_s_total']:5.1f} s", flush=True)
  runs = [(p, s) for p in policies for s in (("cold", "warm") if p == "hybrid" else ("cold",))]
  config = {"model": _MODEL.value, "tp": _TP.value, "requests": len(lengths),
            "seed": _SEED.value, "max_len": max_len, "buckets": ",".join(map(str, buckets)),
            "policies": ",".join(policies), "naive_requests": _NAIVE_REQUESTS.value,
            "grid": ",".join(map(str, GRID)), "dtype": "bfloat16", "batch": 1,
            "profile_step": _PROFILE_STEP.value,
            "command_buffers": _CB.value, "bucket_graphs": _BUCKET_GRAPHS.value,
            "xla_flags_set": xla_flags, "cpu_count": os.cpu_count()}
  path, results = None, []
  for done, (policy, start) in enumerate(runs, 1):
    results.append((policy, start, _in_fresh_process(_serve, {**job, "policy": policy})))
    if policy == "naive":  # exact-length executables, served like the others: the comparator
      exact = ("naive steady", _naive_exact_ms(results[-1][2]["requests"]))
    # Every run's rows again: all bins against the newest comparator.
    by_run = [_policy_rows(p, st, res, job, exact) for p, st, res in results]
    policy_rows, s = [row for run_rows in by_run for row in run_rows], by_run[-1][0]
    ready = "" if s["ready_all_s"] is None else f"  all buckets ready at {s['ready_all_s']:.1f} s"
    print(f"{policy:8s} {start}: TTFT P50 {s['ttft_ms_median']:7.1f} ms"
          f"  P90 {s['ttft_ms_p90']:7.1f}  P99 {s['ttft_ms_p99']:7.1f}"
          f"  first {s['first_ttft_ms']:7.1f}  executables {s['executables']}"
          f"  fallbacks {s['fallbacks']}  blocked {s['blocked_on_compile']}{ready}"
          f"  [{time.perf_counter() - t_start:.0f} s]", flush=True)
    if _RECORD.value:  # after every policy, so that a run cut short keeps what it measured
      # Load averages show whether anything else shared the CPU while this ran.
      extra = {"persistent_cache_bytes": sum(f.stat().st_size for f in cache_dir.rglob("*")
                                             if f.is_file()),
               "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
               "runs_done": f"{done} of {len(runs)}"}
      path = records.write("ttft", config, rows + policy_rows, extra=extra, path=path)
  if path is not None:
    print(f"record: {path}")


if __name__ == "__main__":
  app.run(main)
