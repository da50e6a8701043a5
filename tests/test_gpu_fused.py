"""GPU: fused all-reduce + add + RMSNorm against the unfused XLA sequence and its reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from models.collectives import rms_norm
from model_helpers import gpu_ranks
from models.sharding import make_mesh
from pallas_kernels import common, fused_add_norm, lowering_checks, workspace

pytestmark = pytest.mark.gpu(count=2)


def _capacity(tokens, hidden, protocol):
  return fused_add_norm.PROTOCOLS[protocol] * tokens * fused_add_norm.padded_hidden(hidden)


def _build(n, tokens, hidden, protocol, config=fused_add_norm.CONFIG):
  mesh = make_mesh(n)
  spec = workspace.spec("tp")
  ws = workspace.init(mesh, "tp", _capacity(tokens, hidden, protocol), jnp.bfloat16)

  def once(p, r, w, ws):
    out, new_res, ws = fused_add_norm.all_reduce_add_norm(p, r, w, ws, "tp", 1e-5,
                                                          config=config, protocol=protocol)
    ref_out, ref_res = fused_add_norm.reference(p, r, w, "tp", 1e-5)
    new = (r.astype(jnp.float32) + lax.psum(p, "tp").astype(jnp.float32)).astype(r.dtype)
    return out, new_res, ref_out, ref_res, rms_norm(new, w, 1e-5), new, ws

  f = workspace.sharded_jit(once, mesh, (P("tp"), P(), P(), spec), (P("tp"),) * 6 + (spec,),
                            donate_argnums=3)
  return f, ws


CASES = ([("flags", t, h) for t in (1, 4, 16, 64, 128) for h in (2048, 4096, 5120, 8192)]
         + [("ll", t, h) for t, h in ((1, 4096), (4, 5120), (16, 8192), (64, 4096), (128, 2048))])
# Smaller grid caps (bench_allreduce --fused_blocks): one block per row group or fewer.
CAPPED = [(proto, t, h, b, "parallel") for proto in ("flags", "ll")
          for t, h in ((1, 4096), (16, 5120)) for b in (1, 4)]
# The serial flag poll (common.Config.poll), where blocks wait for the most flags.
SERIAL = [("flags", t, h, fused_add_norm.CONFIG.max_blocks, "serial")
          for t, h in ((1, 8192), (16, 4096))]


@pytest.mark.parametrize("protocol,tokens,hidden,blocks,poll",
                         [(*c, fused_add_norm.CONFIG.max_blocks, "parallel") for c in CASES]
                         + CAPPED + SERIAL)
def test_matches_unfused_sequence(protocol, tokens, hidden, blocks, poll):
  for n in gpu_ranks():
    f, ws = _build(n, tokens, hidden, protocol, common.Config(max_blocks=blocks, poll=poll))
    key = jax.random.key(tokens * hidden)
    for i in range(3):
      k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
      p = jax.random.normal(k1, (n * tokens, hidden), jnp.bfloat16)
      r = jax.random.normal(k2, (tokens, hidden), jnp.bfloat16)
      w = (1 + 0.1 * jax.random.normal(k3, (hidden,), jnp.float32)).astype(jnp.bfloat16)
      out, res, ref_out, ref_res, xla_out, xla_res, ws = f(p, r, w, ws)
      out, res = np.asarray(out, np.float32), np.asarray(res, np.float32)
      np.testing.assert_array_equal(res, np.asarray(ref_res, np.float32))
      np.testing.assert_allclose(out, np.asarray(ref_out, np.float32), rtol=1e-2, atol=1e-2)
      per_rank = out.reshape(n, tokens, hidden)
      for rank in range(1, n):  # bitwise identical on every rank
        np.testing.assert_array_equal(per_rank[rank], per_rank[0])
      np.testing.assert_allclose(res, np.asarray(xla_res, np.float32), rtol=2e-2, atol=5e-2)
      np.testing.assert_allclose(out, np.asarray(xla_out, np.float32), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("protocol", sorted(fused_add_norm.PROTOCOLS))
def test_ten_thousand_back_to_back_calls(protocol):
  for n in gpu_ranks():
    mesh = make_mesh(n)
    spec = workspace.spec("tp")
    tokens, hidden = 2, 4096
    ws = workspace.init(mesh, "tp", _capacity(tokens, hidden, protocol), jnp.bfloat16)
    w = jnp.ones((hidden,), jnp.bfloat16)

    def chain(p, r, ws):
      def body(i, c):  # each call checked against the reference on the same inputs
        x, res, ws, bad = c
        part = (p + x * 0.25 + i.astype(jnp.bfloat16) * 1e-3).astype(p.dtype)
        x, new_res, ws = fused_add_norm.all_reduce_add_norm(part, res * 0.5, w, ws, "tp", 1e-5,
                                                            protocol=protocol)
        x_ref, res_ref = fused_add_norm.reference(part, res * 0.5, w, "tp", 1e-5)
        err = jnp.abs(x.astype(jnp.float32) - x_ref.astype(jnp.float32))
        bad += jnp.sum(new_res != res_ref) + jnp.sum(err > 0.0625)
        return x, new_res, ws, bad
      out = lax.fori_loop(0, 10_000, body, (r, r, ws, jnp.int32(0)))
      return out[2], lax.psum(out[3], "tp")

    f = workspace.sharded_jit(chain, mesh, (P("tp"), P(), spec), (spec, P()), donate_argnums=2)
    p = jax.random.normal(jax.random.key(0), (n * tokens, hidden), jnp.bfloat16)
    r = jax.random.normal(jax.random.key(1), (tokens, hidden), jnp.bfloat16)
    assert lowering_checks.workspace_copies(f.lower(p, r, ws).compile().as_text(), ws) == []
    ws, bad = f(p, r, ws)
    assert int(bad) == 0
    assert int(np.asarray(ws.epoch)[0]) == 10_000
