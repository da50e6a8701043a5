"""Batch decode latency of the tensor-parallel LLaMA: time per output token and where it goes.

  python -m experiments.bench_decode --model llama2-7b --tp 2 --loop jit --command_buffers while

Reports TPOT (median, P90, P99), tokens/s, achieved weight-read GB/s per device and the
fraction of the HBM floor (weight bytes per GPU / measured copy bandwidth). With
--profile, a jax.profiler trace of decode steps splits GPU time into all-reduce, matmul,
attention and other. Writes a record under experiments/results/decode/.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time

from absl import app, flags

from experiments import records, xla_env

_MODEL = flags.DEFINE_string("model", "llama2-7b", "Preset (models/config.py); random weights.")
_TP = flags.DEFINE_integer("tp", 1, "Tensor-parallel degree.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
_GEN = flags.DEFINE_integer("gen_len", 256, "Generated tokens per sequence.")
_BACKEND = flags.DEFINE_string("backend", "xla", "All-reduce backend (models/collectives.py).")
_LOOPS = flags.DEFINE_list("loops", ["jit", "python"], "Decode loops to time (jit, python).")
_CB = flags.DEFINE_enum("command_buffers", "default", list(xla_env.COMMAND_BUFFERS),
                        "XLA command buffers: default set, off, or the whole loop (+WHILE).")
_COLL = flags.DEFINE_enum("xla_collectives", "default", list(xla_env.COLLECTIVES),
                          "How lax.psum runs: XLA's kernels, NCCL, or XLA's one-shot kernel.")
_RUNS = flags.DEFINE_integer("runs", 8, "Timed generations per loop (after one warm-up).")
_PROFILE = flags.DEFINE_bool("profile", False, "Trace decode steps and break GPU time down.")
_DUMP = flags.DEFINE_string("dump_dir", None, "XLA dump directory (checks the WHILE graph).")
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where traces go (default: a temp dir).")


def _while_in_command_buffer(dump_dir: str) -> bool | None:
  """Whether any thunk sequence in the dump runs a WHILE inside a command buffer."""
  files = glob.glob(os.path.join(dump_dir, "*thunk_sequence*"))
  if not files:
    return None
  text = "\n".join(open(f).read() for f in files)
  return "WhileCmd" in text or "kWhileCmd" in text or "while_cmd" in text.lower()


def main(argv):
  del argv
  flags_str = xla_env.apply(_CB.value, _COLL.value, _DUMP.value)
  import jax
  import numpy as np

  from experiments import profiling
  from models import factory
  from models.decode import Decoder
  from models.sharding import make_mesh

  t_start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)
  mesh = make_mesh(_TP.value)
  config, graphdef, state, _ = factory.build(_MODEL.value, mesh)
  jax.block_until_ready(state)
  log(f"{_MODEL.value} weights ready, {config.weight_bytes / 1e9:.2f} GB at tp={_TP.value}")
  max_len = -(-(_PROMPT.value + _GEN.value) // 128) * 128
  decoder = Decoder(config, graphdef, state, mesh, backend=_BACKEND.value, max_len=max_len)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, config.vocab_size, (_BATCH.value, _PROMPT.value)).tolist()
  copy_gbps = xla_env.hbm_copy_gbps()
  weight_bytes = config.weight_bytes / _TP.value
  floor_ms = weight_bytes / (copy_gbps * 1e9) * 1e3
  steps = _GEN.value - 1

  def timed(loop):
    return decoder.generate(prompts, _GEN.value, loop=loop, stop_at_eos=False)

  rows, tokens = [], {}
  log(f"copy bandwidth {copy_gbps:.0f} GB/s; HBM floor {floor_ms:.3f} ms per token")
  for loop in _LOOPS.value:
    timed(loop)  # compile + warm up
    log(f"{loop} loop compiled and warm")
    samples, ttft = [], []
    for _ in range(_RUNS.value):
      gen = timed(loop)
      ttft.append(gen.prefill_s * 1e3)
      s = np.array(gen.steps_s) * 1e3
      samples.extend(s if loop == "python" else s[:1])
    tokens[loop] = gen.tokens
    stats = records.summarize(samples, "tpot_ms_")
    med = stats["tpot_ms_median"]
    row = {"model": _MODEL.value, "tp": _TP.value, "batch": _BATCH.value, "backend": _BACKEND.value,
           "loop": loop, "command_buffers": _CB.value, "xla_collectives": _COLL.value,
           **stats, "tokens_per_s": _BATCH.value * 1e3 / med,
           "weight_gbps_per_device": weight_bytes / (med * 1e-3) / 1e9,
           "hbm_copy_gbps": copy_gbps, "hbm_floor_ms": floor_ms, "floor_fraction": floor_ms / med,
           "ttft_ms_median": float(np.median(ttft)),
           "samples": "per step" if loop == "python" else f"per run of {steps} steps"}
    rows.append(row)
    print(f"{loop:6s} TPOT median {med:.3f} ms  P90 {stats['tpot_ms_p90']:.3f}  "
          f"P99 {stats['tpot_ms_p99']:.3f}  floor {floor_ms:.3f} ms ({floor_ms / med:.0%})", flush=True)
  if len(tokens) > 1:
    vals = list(tokens.values())
    assert all((v == vals[0]).all() for v in vals), "loops disagree on greedy tokens"

  extra = {}
  if _PROFILE.value:
    trace_dir = _TRACE_DIR.value or tempfile.mkdtemp(prefix="decode_trace_")
    cache, comm = decoder.new_cache(_BATCH.value), decoder.new_comm_state(_BATCH.value)
    first, _, cache, comm = decoder.prefill(cache, comm, prompts)
    n = steps
    fn = decoder.loop_fn(n, False)  # compiled by the jit-loop timing above
    jax.profiler.start_trace(trace_dir)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(decoder.state, cache, comm, first))
    wall_ms = (time.perf_counter() - t0) * 1e3
    jax.profiler.stop_trace()
    kernels = profiling.device_kernels(trace_dir)
    split = profiling.breakdown(kernels, n)
    ref = next(r for r in rows if r["loop"] == "jit") if "jit" in _LOOPS.value else rows[0]
    tpot_us = ref["tpot_ms_median"] * 1e3
    for row in rows:
      row.update(split)
      row["all_reduce_share_of_tpot"] = split.get("gpu_all_reduce_us", 0.0) / tpot_us
      row["all_reduce_share_of_gpu"] = split.get("gpu_all_reduce_us", 0.0) / max(split.get("gpu_total_us", 1.0), 1e-9)
    extra["profile"] = {"trace_dir": trace_dir, "steps": n, "profiled_wall_ms_per_step": wall_ms / n,
                        "top_kernels": profiling.top_kernels(kernels)}
    print("profile per step (µs):", {k: round(v, 1) for k, v in split.items()})
    for cat, name, us, count in profiling.top_kernels(kernels):
      print(f"  {cat:10s} {us / n:9.1f} µs/step  x{count / n:.0f}  {name[:90]}")
  if _DUMP.value:
    extra["while_in_command_buffer"] = _while_in_command_buffer(_DUMP.value)
    print("WHILE inside a command buffer:", extra["while_in_command_buffer"])
  config_rec = {"model": _MODEL.value, "tp": _TP.value, "batch": _BATCH.value,
                "prompt_len": _PROMPT.value, "gen_len": _GEN.value, "max_len": max_len,
                "backend": _BACKEND.value, "command_buffers": _CB.value,
                "xla_collectives": _COLL.value, "runs": _RUNS.value, "dtype": "bfloat16",
                "weights": "random", "xla_flags_set": flags_str}
  path = records.write("decode", config_rec, rows, extra=extra)
  print(f"record: {path}")


if __name__ == "__main__":
  app.run(main)
