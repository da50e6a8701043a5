"""A small all-reduce run on SMOKE_TP GPUs (default 2): each kernel checked against its
reference, then a quick decode-shaped timing (fori_loop of 16 chained ops, whole loop as one
graph). Also the program compute-sanitizer runs (--no-timing)."""

import os
import sys
import time

from experiments import xla_env

xla_env.apply("while")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from models.collectives import BACKENDS, Comm  # noqa: E402
from models.sharding import make_mesh  # noqa: E402
from pallas_kernels import all_reduce, common, fused_add_norm, workspace  # noqa: E402

n = int(os.environ.get("SMOKE_TP", "2"))
mesh = make_mesh(n)
spec = workspace.spec("tp")
shape = (2, 4096)
dt = jnp.bfloat16
cap = max(all_reduce.workspace_capacity(*shape, dt, n), shape[0] * shape[1])


def sm(f, ins, outs, donate):
  return workspace.sharded_jit(f, mesh, ins, outs, donate_argnums=donate)


TMA = common.Config(8, 32, transport="tma")
for method, config in (("one_shot", None), ("one_shot_ll", None), ("two_shot", None),
                       ("one_shot", TMA), ("two_shot", TMA)):
  label = method + ("" if config is None else " (bulk copies)")
  ws = workspace.init(mesh, "tp", max(cap, all_reduce.workspace_capacity(*shape, dt, n, TMA)), dt)
  f = sm(lambda x, ws: (*all_reduce.all_reduce(x, ws, "tp", method, config),
                        common.reference(x, "tp")),
         (P("tp"), spec), (P("tp"), spec, P("tp")), 1)
  for i in range(4):
    x = jax.random.normal(jax.random.key(i), (2 * n, 4096), dt)
    y, ws, ref = f(x, ws)
    assert np.array_equal(np.asarray(y), np.asarray(ref)), label
  print(label, "correct", flush=True)

w = jax.random.normal(jax.random.key(9), (4096,), dt)
for protocol in fused_add_norm.PROTOCOLS:
  ws = workspace.init(mesh, "tp", cap, dt)
  f = sm(lambda p, r, w, ws: (*fused_add_norm.all_reduce_add_norm(p, r, w, ws, "tp", 1e-5,
                                                                  protocol=protocol),
                              *fused_add_norm.reference(p, r, w, "tp", 1e-5)),
         (P("tp"), P(), P(), spec), (P("tp"), P("tp"), spec, P("tp"), P("tp")), 3)
  for i in range(4):
    p = jax.random.normal(jax.random.key(10 + i), (2 * n, 4096), dt)  # per-rank partials
    r = jax.random.normal(jax.random.key(20 + i), (2, 4096), dt)  # replicated residual
    out, res, ws, out_ref, res_ref = f(p, r, w, ws)
    assert np.array_equal(np.asarray(res), np.asarray(res_ref)), f"fused {protocol} residual"
    err = np.abs(np.asarray(out, np.float32) - np.asarray(out_ref, np.float32)).max()
    assert err <= 0.0625, f"fused {protocol} normed max err {err}"
    o = np.asarray(out).reshape(n, 2, 4096)
    assert all(np.array_equal(o[0], ok) for ok in o), f"fused {protocol} ranks differ"
  print(f"fused {protocol} correct", flush=True)
for backend in ("one_shot", "fused_ll"):  # the decode step's exact argmax exchange
  comm = Comm(backend)
  state = BACKENDS[backend].init_state(mesh, "tp", jax.ShapeDtypeStruct((2, 1, 4096), dt))
  f = sm(comm.gather_words, (P("tp"), spec), (P("tp"), spec), 1)
  for i in range(4):
    words = np.random.default_rng(i).integers(-2**31, 2**31, (2 * n, 2)).astype(np.int32)
    got, state = f(words, state)
    want = np.broadcast_to(words.reshape(n, 2, 2).transpose(1, 0, 2), (n, 2, n, 2))
    assert np.array_equal(np.asarray(got).reshape(n, 2, n, 2), want), f"gather {backend}"
  print(f"gather_words {backend} correct", flush=True)
if "--no-timing" in sys.argv:
  sys.exit(0)

# Decode-shaped timing: 16 chained reduce+add+norm per iteration, per backend.
iters, chain = 200, 16
for backend in ("xla", "one_shot", "one_shot_ll", "fused", "fused_ll"):
  impl = BACKENDS[backend]
  state = impl.init_state(mesh, "tp", jax.ShapeDtypeStruct((1, 1, 4096), dt)) if backend != "xla" else None

  def loop(x, r, ws):
    def body(_, c):
      x, r, ws = c
      for _ in range(chain):
        x, r, ws = impl.reduce_add_norm(x, r, w, 1e-5, "tp", ws)
      return x, r, ws
    return lax.fori_loop(0, iters, body, (x, r, ws))

  sp = spec if state is not None else None
  g = sm(loop, (P("tp"), P(), sp), (P("tp"), P(), sp), 2)
  x = jax.random.normal(jax.random.key(1), (n, 1, 4096), dt)
  r = jax.random.normal(jax.random.key(2), (1, 1, 4096), dt)
  box = {"ws": state}

  def run():
    out = g(x, r, box["ws"])
    box["ws"] = out[2]
    jax.block_until_ready(out)
  run()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter(); run(); ts.append(time.perf_counter() - t0)
  print(f"{backend:9s} {np.median(ts) / (iters * chain) * 1e6:7.2f} us per reduce+add+norm "
        f"(8 KB, TP={n}, fori_loop, +WHILE)", flush=True)
