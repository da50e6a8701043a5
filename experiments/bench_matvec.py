"""How XLA lowers batch-1 matrix-vector products at per-rank LLaMA shapes, and how fast.

XLA's GPU algebraic simplifier drops size-1 dimensions from a dot, so a batch-1 activation
becomes a vector, and it strength-reduces vector-matrix dots whose operands hold fewer than
10M elements in total into multiply + reduce (gpu_algebraic_simplifier.cc). At TP=1 the
LLaMA-2-7B projections are just over that line (4096 x 4096); at TP=2 they fall under it.
This benchmark times each dot form at each per-rank shape and names the kernel XLA chose.

  python -m experiments.bench_matvec
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import records

_TPS = flags.DEFINE_list("tps", ["1", "2", "4", "8"], "Tensor-parallel degrees to emulate.")
_RUNS = flags.DEFINE_integer("runs", 30, "Timed runs (median reported).")
_COPIES = flags.DEFINE_integer("copies", 12, "Distinct weights per run (rotated past L2).")
_REPS = flags.DEFINE_integer("reps", 4, "Passes over the weights per run.")


def dense(form: str, x, w):
  """x (b, d) against w: 'dn' stores (d, n), 'nd' stores (n, d); 'dn_rows2' pads b=1 to 2 rows."""
  if form == "dn":
    return jnp.einsum("bd,dn->bn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  if form == "nd":
    return jnp.einsum("bd,nd->bn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
  if form == "dn_rows2":
    x2 = jnp.concatenate([x, x], axis=0)
    y = jnp.einsum("bd,dn->bn", x2, w, preferred_element_type=jnp.float32)
    return ((y[:1] + y[1:]) * 0.5).astype(x.dtype)
  raise ValueError(form)


def kernel_kind(hlo_text: str) -> str:
  if "__cublas" in hlo_text:
    return "cublas"
  if "__triton_gemm" in hlo_text or "triton_gemm" in hlo_text:
    return "triton_gemm"
  if "reduce(" in hlo_text:
    return "multiply_reduce"
  return "other"


def measure(form: str, d_in: int, d_out: int):
  keys = jax.random.split(jax.random.key(0), _COPIES.value + 1)
  shape = (d_out, d_in) if form == "nd" else (d_in, d_out)
  ws = [jax.random.normal(k, shape, jnp.bfloat16) for k in keys[1:]]
  x = jax.random.normal(keys[0], (1, d_in), jnp.bfloat16)

  def run(x, ws):
    acc = jnp.zeros((1, d_out), jnp.float32)
    for _ in range(_REPS.value):
      for w in ws:
        acc = acc + dense(form, x, w).astype(jnp.float32)
    return acc

  fn = jax.jit(run)
  compiled = fn.lower(x, ws).compile()
  # One representative dot, compiled alone, tells which kernel XLA picks.
  kind = kernel_kind(jax.jit(lambda x, w: dense(form, x, w)).lower(x, ws[0]).compile().as_text())
  ref = np.asarray(x, np.float32) @ (np.asarray(ws[0], np.float32).T if form == "nd"
                                    else np.asarray(ws[0], np.float32))
  got = np.asarray(jax.jit(lambda x, w: dense(form, x, w))(x, ws[0]), np.float32)
  rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  compiled(x, ws).block_until_ready()
  samples = []
  for _ in range(_RUNS.value):
    t0 = time.perf_counter()
    compiled(x, ws).block_until_ready()
    samples.append((time.perf_counter() - t0) / (_REPS.value * _COPIES.value) * 1e6)
  med = float(np.median(samples))
  return {"form": form, "d_in": d_in, "d_out": d_out, "kernel": kind, "rel_err": rel,
          "gbps": d_in * d_out * 2 / (med * 1e-6) / 1e9, **records.summarize(samples, "us_")}


def main(argv):
  del argv
  d, f = 4096, 11008  # LLaMA-2-7B
  rows = []
  for tp in map(int, _TPS.value):
    for name, (d_in, d_out) in {"qkv_each": (d, d // tp), "o_proj": (d // tp, d),
                                "gate_up_each": (d, f // tp), "down_proj": (f // tp, d)}.items():
      for form in ("dn", "nd", "dn_rows2"):
        row = {"tp": tp, "matrix": name, **measure(form, d_in, d_out)}
        rows.append(row)
        print(f"tp={tp} {name:13s} {form:9s} {row['kernel']:16s} {row['us_median']:8.2f} us "
              f"{row['gbps']:7.0f} GB/s  rel_err {row['rel_err']:.1e}", flush=True)
  config = {"model_shapes": "llama2-7b", "dtype": "bfloat16", "batch": 1, "runs": _RUNS.value,
            "copies": _COPIES.value, "reps": _REPS.value,
            "timing": "wall clock of one executable of copies*reps chained dots / count"}
  print(f"record: {records.write('matvec', config, rows)}")


if __name__ == "__main__":
  app.run(main)
