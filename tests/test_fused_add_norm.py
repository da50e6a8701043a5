"""Fused all-reduce + residual add + RMSNorm: reference semantics, CUDA lowering, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from models.collectives import rms_norm
from pallas_kernels import common, fused_add_norm, lowering_checks, workspace

SHAPES = [(1, 4096), (3, 576), (16, 8192), (128, 5120), (256, 16384)]


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("tp",))


def _fn(mesh, eps=1e-5, protocol="flags", config=fused_add_norm.CONFIG):
  spec = workspace.spec("tp")

  def f(partial, residual, weight, ws):
    return fused_add_norm.all_reduce_add_norm(partial, residual, weight, ws, "tp", eps,
                                              config=config, protocol=protocol)
  return workspace.sharded_jit(f, mesh, (P("tp"), P("tp"), P(), spec), (P("tp"), P("tp"), spec),
                               donate_argnums=3)


def _ws(mesh, n, tokens, hidden, dtype, abstract=False, protocol="flags"):
  cap = fused_add_norm.PROTOCOLS[protocol] * tokens * fused_add_norm.padded_hidden(hidden)
  if abstract:
    return workspace.Workspace(jax.ShapeDtypeStruct((n * 2, n, cap), dtype),
                               jax.ShapeDtypeStruct((n * workspace.MAX_BLOCKS, 2, n), jnp.int32),
                               jax.ShapeDtypeStruct((n,), jnp.int32))
  return workspace.init(mesh, "tp", cap, dtype)


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("shape", [(1, 64), (5, 576), (8, 4096)])
def test_reference_equals_psum_add_norm(n, shape):
  mesh = _mesh(n)
  rng = np.random.default_rng(0)
  partial = jnp.asarray(rng.normal(size=(n * shape[0], shape[1])), jnp.float32)
  residual = jnp.asarray(rng.normal(size=(n * shape[0], shape[1])), jnp.float32)
  weight = jnp.asarray(1 + 0.1 * rng.normal(size=shape[1]), jnp.float32)
  normed, new_res, ws = _fn(mesh)(partial, residual, weight, _ws(mesh, n, *shape, jnp.float32))

  def unfused(p, r, w):
    new = r + lax.psum(p, "tp")
    return rms_norm(new, w, 1e-5), new
  ref = jax.jit(jax.shard_map(unfused, mesh=mesh, in_specs=(P("tp"), P("tp"), P()),
                              out_specs=(P("tp"), P("tp"))))(partial, residual, weight)
  np.testing.assert_allclose(np.asarray(new_res), np.asarray(ref[1]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(normed), np.asarray(ref[0]), rtol=1e-5, atol=1e-5)
  assert np.asarray(ws.epoch).tolist() == [1] * n


@pytest.mark.parametrize("protocol", sorted(fused_add_norm.PROTOCOLS))
@pytest.mark.parametrize("dt", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_lowers_for_cuda_without_multicast(n, shape, dt, protocol):
  mesh = _mesh(n)
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), dt)
  w = jax.ShapeDtypeStruct((shape[1],), dt)
  ws = _ws(mesh, n, *shape, dt, abstract=True, protocol=protocol)
  text = lowering_checks.lower_for_cuda(_fn(mesh, protocol=protocol), x, x, w, ws)
  calls = lowering_checks.mosaic_calls(text)
  assert len(calls) == 1 and "output_operand_aliases" in calls[0]
  assert lowering_checks.multicast_uses(text) == []


@pytest.mark.parametrize("protocol,poll", [("flags", "parallel"), ("flags", "serial"),
                                           ("ll", "parallel")])
@pytest.mark.parametrize("blocks", [1, 4, 32])
@pytest.mark.parametrize("shape", [(1, 4096), (16, 8192)])
def test_smaller_grid_caps_lower(shape, blocks, protocol, poll):
  """The grid caps bench_allreduce --fused_blocks sweeps (one block: no redundant row reads),
  with either flag poll."""
  mesh = _mesh(2)
  x = jax.ShapeDtypeStruct((2 * shape[0], shape[1]), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((shape[1],), jnp.bfloat16)
  ws = _ws(mesh, 2, *shape, jnp.bfloat16, abstract=True, protocol=protocol)
  config = common.Config(max_blocks=blocks, poll=poll)
  text = lowering_checks.lower_for_cuda(_fn(mesh, protocol=protocol, config=config), x, x, w, ws)
  assert len(lowering_checks.mosaic_calls(text)) == 1
  groups, _, col_blocks, _ = fused_add_norm.grid(shape[0], shape[1], config)
  assert groups * col_blocks <= blocks


@pytest.mark.parametrize("residual_shape,weight_shape,message", [
    ((4, 64), (64,), r"residual \(2, 64\) float32 must match the partial output \(1, 64\)"),
    ((2, 64), (32,), r"norm weight \(32,\) must be \(64,\)"),
])
def test_bad_input(residual_shape, weight_shape, message):
  mesh = _mesh(2)
  ws = _ws(mesh, 2, 2, 64, jnp.float32)
  with pytest.raises(ValueError, match=message):
    _fn(mesh)(jnp.zeros((2, 64), jnp.float32), jnp.zeros(residual_shape, jnp.float32),
              jnp.zeros(weight_shape, jnp.float32), ws)


@pytest.mark.parametrize("tokens,hidden,expected", [
    (1, 4096, (1, 1, 4, 1)), (1, 8192, (1, 1, 8, 1)), (4, 5120, (4, 1, 5, 1)),
    (128, 4096, (32, 4, 1, 4)), (5, 576, (5, 1, 1, 1)), (1, 16384, (1, 1, 16, 1)),
    (16, 5120, (16, 1, 1, 5)), (16, 4096, (16, 1, 2, 2)), (256, 16384, (32, 8, 1, 16))])
def test_grid_spreads_a_row_over_column_blocks(tokens, hidden, expected):
  width = fused_add_norm.padded_hidden(hidden)
  got = fused_add_norm.grid(tokens, width, fused_add_norm.CONFIG)
  assert got == expected
  row_groups, rows, col_blocks, own = got
  assert row_groups * rows == tokens and col_blocks * own * fused_add_norm.VECTOR == width
  assert row_groups * col_blocks <= workspace.MAX_BLOCKS


def test_ll_needs_twice_the_workspace():
  mesh = _mesh(2)
  x = jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((4096,), jnp.bfloat16)
  with pytest.raises(ValueError,
                     match="cannot carry a \\(1, 4096\\) bfloat16 message with protocol 'll'"):
    lowering_checks.lower_for_cuda(_fn(mesh, protocol="ll"), x, x, w,
                                   _ws(mesh, 2, 1, 4096, jnp.bfloat16, abstract=True))
  with pytest.raises(ValueError, match="protocol must be one of"):
    _fn(mesh, protocol="nccl")(jnp.zeros((2, 64)), jnp.zeros((2, 64)), jnp.zeros(64),
                               _ws(mesh, 2, 1, 64, jnp.float32))
