"""How XLA lowers batch-1 matrix-vector products at per-rank LLaMA shapes, and how fast.

XLA's GPU algebraic simplifier drops size-1 dimensions from a dot, so a batch-1 activation
becomes a vector, and it strength-reduces vector-matrix dots whose operands hold fewer than
10M elements in total into multiply + reduce (gpu_algebraic_simplifier.cc). At TP=1 the
LLaMA-2-7B projections are just over that line (4096 x 4096); at TP=2 they fall under it.
This benchmark times each dot form at each per-rank shape, separate and fused (q/k/v and
gate/up as one matrix, as models/llama.py stores them), and names the kernel XLA chose,
once per way the dots may be emitted (`--gemms`: XLA's autotuned Triton GEMM fusions,
cuBLAS (xla_env.GEMMS), or `pallas`: the package's GEMV kernel, pallas_kernels/gemv.py, for
the `nd` form), each in its own process, merged into one record.

  python -m experiments.bench_matvec --gemms default,cublas
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import records, xla_env
from pallas_kernels import gemv

_TPS = flags.DEFINE_list("tps", ["1", "2", "4", "8"], "Tensor-parallel degrees to emulate.")
_RUNS = flags.DEFINE_integer("runs", 30, "Timed runs (median reported).")
_COPIES = flags.DEFINE_integer("copies", 48, "Distinct weights per run, each used once.")
_FORMS = flags.DEFINE_list("forms", ["dn", "nd", "nd_rows2"], "Dot forms to time (see dense).")
GEMMS = (*xla_env.GEMMS, "pallas")
_GEMMS = flags.DEFINE_list("gemms", ["default", "cublas", "pallas"], f"Of {GEMMS}.")
_CHILD = flags.DEFINE_string("child", None, "Internal: the GEMM setting this process measures.")
_OUT = flags.DEFINE_string("child_out", None, "Internal: where a child writes its rows.")
_GEMV_CONFIGS = flags.DEFINE_list(
    "gemv_configs", ["auto"], "GEMV tilings to time with --gemms pallas: 'auto' "
    "(gemv.config_for) or TILE_K:STAGES:SPLITS; tilings a shape cannot take are skipped.")
_REPS = flags.DEFINE_integer("reps", 1, "Passes over the weights per run (>1 lets XLA merge "
                             "dots that share a weight, which this benchmark must not measure).")



def gemv_config(spec: str, n: int, k: int) -> gemv.Config:
  """'auto' -> gemv.config_for(n, k); 'TILE_K:STAGES:SPLITS' -> that tiling."""
  if spec == "auto":
    return gemv.config_for(n, k)
  tile_k, stages, splits = map(int, spec.split(":"))
  return gemv.Config(tile_k=tile_k, stages=stages, splits=splits)


def dense(form: str, x, w, gemm: str = "default", config: gemv.Config | None = None):
  """x (1, d) against w stored (d, n) for 'dn' or (n, d) for 'nd*' (`config`: the GEMV's
  tiling for gemm 'pallas').

  'nd_rows2' presents the batch-1 activation as two rows, so that the dot keeps a
  non-degenerate dimension and is not strength-reduced; the rows are averaged back.
  """
  if form == "dn":
    return jnp.einsum("bd,dn->bn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  if form == "nd" and gemm == "pallas":
    return gemv.gemv(x, w, config or gemv.config_for(*w.shape))
  if form == "nd":
    return jnp.einsum("bd,nd->bn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  if form == "nd_rows2":
    y = jnp.einsum("bd,nd->bn", jnp.concatenate([x, x]), w, preferred_element_type=jnp.float32)
    return ((y[:1] + y[1:]) * 0.5).astype(x.dtype)
  raise ValueError(form)


def entry_kernels(hlo_text: str) -> str:
  """The fusions and custom calls of the optimized module's ENTRY, e.g. 'input_reduce_fusion'."""
  entry = hlo_text[hlo_text.rfind("ENTRY"):]
  found = re.findall(r"%?([A-Za-z_][\w-]*?)(?:\.\d+)* = [^\n]*? (fusion|custom-call)\(", entry)
  targets = re.findall(r'custom_call_target="([^"]+)"', entry)
  kinds = re.findall(r'"kind":"(__[a-z_]+)"', entry)
  return ";".join([n for n, _ in found] + targets + kinds) or "none"


def measure(form: str, d_in: int, d_out: int, gemm: str, config: gemv.Config | None = None):
  keys = jax.random.split(jax.random.key(0), _COPIES.value + 1)
  shape = (d_in, d_out) if form == "dn" else (d_out, d_in)
  ws = [jax.random.normal(k, shape, jnp.bfloat16) for k in keys[1:]]
  # A distinct activation for every product, so that no two dots can be merged by CSE.
  xs = jax.random.normal(keys[0], (_REPS.value * _COPIES.value, 1, d_in), jnp.bfloat16)

  def run(xs, ws):
    acc = jnp.zeros((1, d_out), jnp.float32)
    for r in range(_REPS.value):
      for c, w in enumerate(ws):
        acc = acc + dense(form, xs[r * len(ws) + c], w, gemm, config).astype(jnp.float32)
    return acc

  compiled = jax.jit(run).lower(xs, ws).compile()
  # One dot compiled alone shows which kernel XLA picks for it.
  single = jax.jit(lambda x, w: dense(form, x, w, gemm, config))
  kind = entry_kernels(single.lower(xs[0], ws[0]).compile().as_text())
  x = xs[0]
  ref = np.asarray(x, np.float32) @ (np.asarray(ws[0], np.float32) if form == "dn"
                                    else np.asarray(ws[0], np.float32).T)
  got = np.asarray(single(x, ws[0]), np.float32)
  rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  compiled(xs, ws).block_until_ready()
  samples = []
  for _ in range(_RUNS.value):
    t0 = time.perf_counter()
    compiled(xs, ws).block_until_ready()
    samples.append((time.perf_counter() - t0) / (_REPS.value * _COPIES.value) * 1e6)
  med = float(np.median(samples))
  return {"form": form, "d_in": d_in, "d_out": d_out, "kernel": kind, "rel_err": rel,
          "gbps": d_in * d_out * 2 / (med * 1e-6) / 1e9, **records.summarize(samples, "us_")}


def run_child(gemm: str, out_path: str):
  xla_env.apply(gemm=gemm if gemm in xla_env.GEMMS else "default")
  d, f = 4096, 11008  # LLaMA-2-7B
  log = xla_env.ChildLog(out_path)
  for tp in map(int, _TPS.value):
    shapes = {"qkv_each": (d, d // tp), "qkv_fused": (d, 3 * d // tp), "o_proj": (d // tp, d),
              "gate_up_each": (d, f // tp), "gate_up_fused": (d, 2 * f // tp),
              "down_proj": (f // tp, d)}
    for name, (d_in, d_out) in shapes.items():
      for form in _FORMS.value:
        if gemm == "pallas" and (form != "nd" or jax.default_backend() != "gpu"):
          continue  # the kernel takes the package's (out, in) layout, on a GPU
        for config in gemv_configs(gemm, d_out, d_in, _GEMV_CONFIGS.value):
          case = {"tp": tp, "matrix": name, "gemm": gemm, "form": form,
                  "gemv_config": _config_name(config)}
          if log.done(case):
            continue
          log.start({**case, "us_median": None})
          row = {**case, **measure(form, d_in, d_out, gemm, config)}
          log.add(row)
          print(f"{gemm} tp={tp} {name:13s} {form:9s} {row['gemv_config']:11s}"
                f" {row['us_median']:8.2f} us {row['gbps']:6.0f} GB/s rel_err"
                f" {row['rel_err']:.1e}  {row['kernel']}", flush=True)


def gemv_configs(gemm: str, n: int, k: int, specs: list[str]) -> list[gemv.Config | None]:
  """The GEMV tilings of `specs` that an (n, k) weight takes, deduplicated (one None: XLA)."""
  if gemm != "pallas":
    return [None]
  out = []
  for spec in specs:
    config = gemv_config(spec, n, k)
    try:
      gemv.check(jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
                 jax.ShapeDtypeStruct((n, k), jnp.bfloat16), config)
    except ValueError:
      continue
    if config not in out:
      out.append(config)
  return out


def _config_name(config: gemv.Config | None) -> str:
  return "" if config is None else f"{config.tile_k}:{config.stages}:{config.splits}"


def main(argv):
  del argv
  if _CHILD.value:
    return run_child(_CHILD.value, _OUT.value)
  if unknown := sorted(set(_GEMMS.value) - set(GEMMS)):
    raise app.UsageError(f"unknown --gemms {unknown}; choose from {list(GEMMS)}")
  rows = xla_env.run_children("experiments.bench_matvec", _GEMMS.value)
  config = {"gemms": {g: xla_env.GEMMS.get(g, "pallas_kernels/gemv.py") for g in _GEMMS.value},
            "model_shapes": "llama2-7b",
            "dtype": "bfloat16", "batch": 1, "runs": _RUNS.value,
            "copies": _COPIES.value, "reps": _REPS.value,
            "timing": "wall clock of one executable of copies*reps chained dots / count"}
  print(f"record: {records.write('matvec', config, rows)}")


if __name__ == "__main__":
  app.run(main)
