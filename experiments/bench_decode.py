"""Batch decode latency of the tensor-parallel LLaMA: time per output token and where it goes.

  python -m experiments.bench_decode --model llama2-7b --tp 1,2 --backend xla,fused \
      --command_buffers while

Every (TP degree, all-reduce backend, loop) in the lists is measured in this one process,
so their ratios come from the same run; XLA flags (command buffers, psum implementation)
are per process. Reports TPOT (median, P90, P99), tokens/s, achieved weight-read GB/s per
device and the fraction of the HBM floor (weight bytes per GPU / measured copy bandwidth).
With --profile, a jax.profiler trace of the jit loop splits GPU kernel time into
all-reduce, matmul, attention and other, and records which trace lines held events; with
--cupti, CUPTI sums every kernel of the loop (graphs included) by name. The all-reduce share
of the step comes from CUPTI where it ran (on 2xH200 the trace held only XLA's collective
kernels). Writes a record under experiments/results/decode/ after every configuration.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from experiments import records, xla_env

_MODEL = flags.DEFINE_string("model", "llama2-7b", "Preset (models/config.py); random weights.")
_TPS = flags.DEFINE_list("tp", ["1"], "Tensor-parallel degrees.")
_BATCHES = flags.DEFINE_list("batch", ["1"], "Batch sizes (sequences decoded together).")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence.")
_GEN = flags.DEFINE_integer("gen_len", 256, "Generated tokens per sequence.")
_BACKENDS = flags.DEFINE_list("backend", ["xla"], "All-reduce backends (models/collectives.py).")
_MATMULS = flags.DEFINE_list("matmul", ["xla"], "Projection implementations"
                             " (models/llama.MATMULS): XLA's dots or the Pallas GEMV kernel.")
_LOOPS = flags.DEFINE_list("loops", ["jit", "python"], "Decode loops to time (jit, python).")
_CB = flags.DEFINE_enum("command_buffers", "default", list(xla_env.COMMAND_BUFFERS),
                        "XLA command buffers: default set, off, or the whole loop (+WHILE).")
_COLL = flags.DEFINE_enum("xla_collectives", "default", list(xla_env.COLLECTIVES),
                          "How lax.psum runs: XLA's kernels, NCCL, or XLA's one-shot kernel.")
_GEMM = flags.DEFINE_enum("gemm", "default", list(xla_env.GEMMS),
                          "How XLA emits the matmuls: autotuned Triton fusions or cuBLAS.")
_RUNS = flags.DEFINE_integer("runs", 8, "Timed generations per loop (after one warm-up).")
_PROFILE = flags.DEFINE_bool("profile", False, "Trace the jit loop and break GPU time down.")
_CUPTI = flags.DEFINE_bool("cupti", False, "Sum the jit loop's kernel time with CUPTI, command"
                           " buffers on (kernels inside graphs count): GPU busy time per step.")
_COPY_GIB = flags.DEFINE_float("copy_gib", 2.0, "GiB copied to measure HBM bandwidth.")
_DUMP = flags.DEFINE_string("dump_dir", None, "XLA dump directory (checks the WHILE graph).")


def main(argv):
  del argv
  flags_str = xla_env.apply(_CB.value, _COLL.value, _DUMP.value, _GEMM.value)
  import jax
  import numpy as np

  from experiments import profiling
  from models import factory
  from models.decode import Decoder
  from models.sharding import make_mesh

  t_start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)
  copy_gbps = xla_env.hbm_copy_gbps(_COPY_GIB.value)
  log(f"copy bandwidth {copy_gbps:.0f} GB/s (device 0)")
  max_len = -(-(_PROMPT.value + _GEN.value) // 128) * 128
  steps = _GEN.value - 1
  rows, extra, tokens = [], {"profiles": {}, "command_buffers_in_dump": {}}, {}
  config_rec = {"model": _MODEL.value, "tp": _TPS.value, "batch": _BATCHES.value,
                "prompt_len": _PROMPT.value, "gen_len": _GEN.value, "max_len": max_len,
                "backends": _BACKENDS.value, "matmuls": _MATMULS.value,
                "command_buffers": _CB.value,
                "xla_collectives": _COLL.value, "gemm": _GEMM.value, "runs": _RUNS.value,
                "dtype": "bfloat16",
                "weights": "random", "xla_flags_set": flags_str}
  path = None

  def save():  # after every configuration: a run cut short keeps what it measured
    nonlocal path
    path = records.write("decode", config_rec, rows, extra=extra, path=path)
    return path

  for tp in map(int, _TPS.value):
    mesh = make_mesh(tp)
    config, graphdef, state, _ = factory.build(_MODEL.value, mesh)
    jax.block_until_ready(state)
    weight_bytes = config.weight_bytes / tp
    floor_ms = weight_bytes / (copy_gbps * 1e9) * 1e3
    log(f"tp={tp}: weights ready; HBM floor {floor_ms:.3f} ms per token")
    for backend, matmul in [(b, m) for b in _BACKENDS.value for m in _MATMULS.value]:
      if tp == 1 and backend != "xla":
        log(f"tp=1: skipping {backend} (no communication at TP=1: it runs as xla)")
        continue
      decoder = Decoder(config, graphdef, state, mesh, backend=backend, max_len=max_len,
                        matmul=matmul)
      for batch in map(int, _BATCHES.value):
        prompts = np.random.default_rng(0).integers(3, config.vocab_size,
                                                    (batch, _PROMPT.value)).tolist()
        key = {"model": _MODEL.value, "tp": tp, "batch": batch, "backend": backend,
               "matmul": matmul}
        for loop in _LOOPS.value:
          stats, ttft_ms, gen_tokens = _time(decoder, prompts, loop)
          med = stats["tpot_ms_median"]
          # Tokens against the first configuration at this TP and batch. In bf16 a different
          # summation order (rank-order f32 vs XLA's psum) can flip a near-tie argmax, after
          # which the sequences diverge; exact equality is tested in f32 (tests/test_gpu_*).
          agree = gen_tokens == tokens.setdefault((tp, batch), gen_tokens)
          same = bool(agree.all())
          prefix = int(np.min(np.where(agree.all(1), agree.shape[1], np.argmin(agree, 1))))
          rows.append({
              **key, "loop": loop, "command_buffers": _CB.value, "xla_collectives": _COLL.value,
              "gemm": _GEMM.value, **stats, "tokens_per_s": batch * 1e3 / med,
              "weight_gbps_per_device": weight_bytes / (med * 1e-3) / 1e9,
              "hbm_copy_gbps": copy_gbps, "hbm_floor_ms": floor_ms,
              "floor_fraction": floor_ms / med, "ttft_ms_median": ttft_ms,
              "samples": "per step" if loop == "python" else f"per run of {steps} steps",
              "tokens_match_first": same, "tokens_same_prefix": prefix})
          log(f"tp={tp} b={batch} {backend:8s} {matmul:6s} {loop:6s} TPOT median {med:.3f} ms"
              f"  P90 {stats['tpot_ms_p90']:.3f}  P99 {stats['tpot_ms_p99']:.3f}"
              f"  ({floor_ms / med:.0%} of floor)"
              f"{'' if same else f'  tokens differ from the first config after {prefix}'}")
        if _CUPTI.value and "jit" in _LOOPS.value:
          busy = _kernel_time(decoder, prompts, steps, tp)
          for row in rows:
            if all(row[k] == v for k, v in key.items()) and row["loop"] == "jit":
              tpot_us = row["tpot_ms_median"] * 1e3
              row.update(busy, gpu_busy_fraction=busy["cupti_total_us"] / tpot_us)
              log(f"CUPTI per step (µs): { {k: round(v, 1) for k, v in busy.items()} }"
                  f"  busy {row['gpu_busy_fraction']:.0%}")
        if _PROFILE.value and "jit" in _LOOPS.value:
          split, seen = _profile(decoder, prompts, steps, profiling)
          mine = [r for r in rows if all(r[k] == v for k, v in key.items())]
          tpot_us = next(r for r in mine if r["loop"] == "jit")["tpot_ms_median"] * 1e3
          for row in mine:
            row.update(split)
            # How much of the step the trace's kernels add up to (collectives waiting for
            # peers and overlapping compute can take it past 1).
            row["trace_coverage_of_tpot"] = split.get("gpu_total_us", 0.0) / tpot_us
          extra["profiles"][f"tp{tp}_b{batch}_{backend}_{matmul}"] = seen
          log(f"profile per step (µs): { {k: round(v, 1) for k, v in split.items()} }")
        if _DUMP.value and "jit" in _LOOPS.value:  # this configuration's loop module
          seen = frozenset(e["file"] for e in extra["command_buffers_in_dump"].values())
          evidence = xla_env.thunk_evidence(_DUMP.value, "jit__loop", skip=seen)
          extra["command_buffers_in_dump"][f"tp{tp}_b{batch}_{backend}_{matmul}"] = evidence
          log(f"loop in one graph: {evidence.get('loop_in_one_graph')}; host loop body"
              f" outside graphs: {evidence.get('host_loop_body_outside_graphs')}")
        for row in rows:  # all-reduce share of the step: CUPTI (every kernel) over the trace
          if all(row[k] == v for k, v in key.items()) and row["loop"] == "jit":
            if _DUMP.value:
              row["loop_in_one_graph"] = evidence.get("loop_in_one_graph")
            us = row.get("cupti_all_reduce_us", row.get("gpu_all_reduce_us"))
            if us and tp > 1:
              row["all_reduce_share_of_tpot"] = us / (row["tpot_ms_median"] * 1e3)
            outside = profiling.outside_compute_share(row)
            if outside is not None:
              row["outside_compute_share"] = outside
              log(f"tp={tp} {backend}: {outside:.1%} of the step outside compute kernels")
        save()
    del state, graphdef
  path = save()
  print(f"record: {path}")


def _time(decoder, prompts, loop: str):
  """One warm-up generation (compiles), then --runs timed ones: (TPOT stats in ms, median
  TTFT in ms, the tokens). Python-loop samples are per step; jit-loop samples per run."""
  import numpy as np

  decoder.generate(prompts, _GEN.value, loop=loop, stop_at_eos=False)
  samples, ttft = [], []
  for _ in range(_RUNS.value):
    gen = decoder.generate(prompts, _GEN.value, loop=loop, stop_at_eos=False)
    ttft.append(gen.prefill_s * 1e3)
    steps_ms = np.array(gen.steps_s) * 1e3
    samples.extend(steps_ms if loop == "python" else steps_ms[:1])
  return records.summarize(samples, "tpot_ms_"), float(np.median(ttft)), gen.tokens


def _prefilled(decoder, prompts):
  """(cache, comm state, first tokens) after prefilling `prompts`: a jit loop's inputs."""
  import jax

  cache, comm = decoder.new_cache(len(prompts)), decoder.new_comm_state(len(prompts))
  first, _, cache, comm = decoder.prefill(cache, comm, prompts)
  jax.block_until_ready(first)
  return cache, comm, first


def _kernel_time(decoder, prompts, steps, tp):
  """Kernel µs per decode step and device by category, from CUPTI around one jit-loop run
  (command buffers stay on; kernels are classified by name and, through the compiled
  loop's HLO, by the JAX named scope they came from)."""
  import jax

  from experiments import cupti, profiling

  cache, comm, first = _prefilled(decoder, prompts)
  fn = decoder.loop_fn(steps, False)  # compiled by the timing above
  hlo = fn.lower(decoder.state, cache, comm, first).compile().as_text()
  ms = cupti.kernel_ms(lambda: jax.block_until_ready(fn(decoder.state, cache, comm, first)),
                       profiling.kernel_scopes(hlo))
  out = {f"cupti_{cat}_us": ms.get(cat, 0.0) * 1e3 / tp / steps
         for cat in ("all_reduce", "matmul", "attention", "other")}
  out["cupti_total_us"] = sum(out.values())
  return out


def _profile(decoder, prompts, steps, profiling):
  """GPU kernel time per decode step by category, from a trace of one jit-loop run."""
  import jax

  trace_dir = tempfile.mkdtemp(prefix="decode_trace_")
  cache, comm, first = _prefilled(decoder, prompts)
  fn = decoder.loop_fn(steps, False)  # compiled by the timing above
  jax.profiler.start_trace(trace_dir)
  jax.block_until_ready(fn(decoder.state, cache, comm, first))
  jax.profiler.stop_trace()
  lines = {}
  kernels = profiling.device_kernels(trace_dir, lines)
  top = [[c, name[:100], round(us / steps, 2), round(count / steps, 2)]
         for c, name, us, count in profiling.top_kernels(kernels)]
  return profiling.breakdown(kernels, steps), {"top_kernels": top, "trace_lines": lines}


if __name__ == "__main__":
  app.run(main)
