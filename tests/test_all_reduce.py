"""Peer-write all-reduce: reference semantics, CUDA lowering on 2/4/8 fake devices, the
multicast guard, input validation, and the model backends on the CPU reference path."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels import all_reduce, common, lowering_checks, workspace

METHODS = ["one_shot", "one_shot_ll", "two_shot", "auto", "xla"]


def _mesh(n, devices=None):
  return Mesh(np.array(devices or jax.devices()[:n]), ("tp",))


def _fn(mesh, method):
  def f(x, ws):
    return all_reduce.all_reduce(x, ws, "tp", method)
  spec = workspace.spec("tp")
  return workspace.sharded_jit(f, mesh, (P("tp"), spec), (P("tp"), spec), donate_argnums=1)


def _ws_avals(n, tokens, hidden, dtype, config=None):
  cap = all_reduce.workspace_capacity(tokens, hidden, dtype, n, config)
  return workspace.Workspace(jax.ShapeDtypeStruct((n * 2, n, cap), dtype),
                             jax.ShapeDtypeStruct((n * workspace.MAX_BLOCKS, 2, n), jnp.int32),
                             jax.ShapeDtypeStruct((n,), jnp.int32))


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,dtype", [((1, 4096), jnp.float32), ((5, 576), jnp.bfloat16),
                                         ((16, 2048), jnp.bfloat16)])
def test_reference_path_matches_rank_order_sum(n, method, shape, dtype):
  mesh = _mesh(n)
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n * shape[0], shape[1])).astype(np.float32)
  xj = jnp.asarray(x, dtype)
  ws = workspace.init(mesh, "tp", all_reduce.workspace_capacity(*shape, dtype, n), dtype)
  f = _fn(mesh, method)
  y, ws = f(xj, ws)
  y2, ws = f(xj, ws)  # the workspace threads through: a second call works and advances
  parts = np.asarray(xj, np.float32).reshape(n, *shape)
  exact = parts[0].copy()
  for p in parts[1:]:
    exact += p
  expected = np.tile(np.asarray(jnp.asarray(exact, dtype), np.float32), (n, 1))
  if method == "xla":  # psum's own summation order
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)
  else:
    np.testing.assert_array_equal(np.asarray(y, np.float32), expected)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))
  kernel_calls = 0 if method == "xla" else 2
  assert np.asarray(ws.epoch).tolist() == [kernel_calls] * n


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("method", ["one_shot", "one_shot_ll", "two_shot"])
@pytest.mark.parametrize("shape,dtype", [((1, 4096), jnp.bfloat16), ((3, 576), jnp.bfloat16),
                                         ((256, 16384), jnp.bfloat16), ((8, 8192), jnp.float32)])
def test_kernels_lower_for_cuda_without_multicast(n, method, shape, dtype):
  mesh = _mesh(n)
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), dtype)
  text = lowering_checks.lower_for_cuda(_fn(mesh, method), x, _ws_avals(n, *shape, dtype))
  calls = lowering_checks.mosaic_calls(text)
  assert len(calls) == 1, "exactly one kernel, and not the CPU reference"
  assert "output_operand_aliases" in calls[0], "the workspace must be aliased in place"
  assert "skip_device_barrier = true" in calls[0] or "skip_device_barrier=true" in calls[0].replace(" ", "")
  assert lowering_checks.multicast_uses(text) == []


@pytest.mark.parametrize("poll", common.POLLS)
@pytest.mark.parametrize("method", ["one_shot", "two_shot"])
def test_both_flag_polls_lower(method, poll):
  """The flag-protocol kernels with either flag poll (peer_sync.epoch_flag_exchange)."""
  n, shape = 4, (16, 4096)
  mesh = _mesh(n)
  spec = workspace.spec("tp")
  f = jax.jit(jax.shard_map(
      lambda x, ws: all_reduce.all_reduce(x, ws, "tp", method, common.Config(poll=poll)),
      mesh=mesh, in_specs=(P("tp"), spec), out_specs=(P("tp"), spec), check_vma=False))
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), jnp.bfloat16)
  text = lowering_checks.lower_for_cuda(f, x, _ws_avals(n, *shape, jnp.bfloat16))
  assert len(lowering_checks.mosaic_calls(text)) == 1
  with pytest.raises(ValueError, match="poll must be one of"):
    common.Config(poll="fast")


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 4096), (3, 576), (256, 16384)])
@pytest.mark.parametrize("method", ["one_shot", "two_shot"])
def test_bulk_copies_lower(method, n, shape):
  """transport="tma": non-tensor bulk copies (cp.async.bulk) to the peers."""
  config = common.Config(vectors=8, max_blocks=32, transport="tma")
  f = jax.jit(jax.shard_map(
      lambda x, ws: all_reduce.all_reduce(x, ws, "tp", method, config),
      mesh=_mesh(n), in_specs=(P("tp"), workspace.spec("tp")),
      out_specs=(P("tp"), workspace.spec("tp")), check_vma=False))
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), jnp.bfloat16)
  text = lowering_checks.lower_for_cuda(f, x, _ws_avals(n, *shape, jnp.bfloat16, config))
  assert len(lowering_checks.mosaic_calls(text)) == 1
  assert "cp.async.bulk.global.shared::cta.bulk_group" in text
  assert lowering_checks.multicast_uses(text) == []


def test_bulk_copies_are_a_one_shot_and_two_shot_option():
  with pytest.raises(ValueError, match="transport must be one of"):
    common.Config(transport="nvshmem")
  mesh = _mesh(2)
  f = jax.shard_map(lambda x, ws: all_reduce.all_reduce(x, ws, "tp", "one_shot_ll",
                                                        common.Config(transport="tma")),
                    mesh=mesh, in_specs=(P("tp"), workspace.spec("tp")),
                    out_specs=(P("tp"), workspace.spec("tp")), check_vma=False)
  with pytest.raises(ValueError, match="transport 'tma' is a one_shot and two_shot option"):
    jax.eval_shape(f, jax.ShapeDtypeStruct((2, 4096), jnp.bfloat16),
                   _ws_avals(2, 1, 4096, jnp.bfloat16))
  big = common.Config(vectors=64, transport="tma")  # two 128 KiB buffers
  g = jax.jit(jax.shard_map(lambda x, ws: all_reduce.all_reduce(x, ws, "tp", "one_shot", big),
                            mesh=mesh, in_specs=(P("tp"), workspace.spec("tp")),
                            out_specs=(P("tp"), workspace.spec("tp")), check_vma=False))
  with pytest.raises(ValueError, match="need 262144 bytes of shared memory"):
    lowering_checks.lower_for_cuda(g, jax.ShapeDtypeStruct((2 * 64, 4096), jnp.bfloat16),
                                   _ws_avals(2, 64, 4096, jnp.bfloat16, big))


@pytest.mark.parametrize("method", ["one_shot", "two_shot"])
def test_a_grid_of_one_block_per_sm_lowers(method):
  """Large messages want a block per SM (workspace.MAX_BLOCKS flag rows); 8 MB over 4 ranks."""
  n, shape, config = 4, (256, 16384), common.Config(vectors=8, max_blocks=workspace.MAX_BLOCKS)
  assert config.grid(shape[0] * shape[1] // n // config.chunk(jnp.bfloat16))[0] == 128
  f = jax.jit(jax.shard_map(
      lambda x, ws: all_reduce.all_reduce(x, ws, "tp", method, config),
      mesh=_mesh(n), in_specs=(P("tp"), workspace.spec("tp")),
      out_specs=(P("tp"), workspace.spec("tp")), check_vma=False))
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), jnp.bfloat16)
  text = lowering_checks.lower_for_cuda(f, x, _ws_avals(n, *shape, jnp.bfloat16))
  assert len(lowering_checks.mosaic_calls(text)) == 1


@pytest.mark.parametrize("n, rng", [(n, i) for n in (2, 4)
                                    for i in range(len(all_reduce.THRESHOLDS[n]))])
def test_auto_lowers_each_range_with_its_tiling(n, rng):
  """Each of auto's measured ranges, at its largest message, lowers to the kernel and tiling
  it names (one Mosaic call, no multimem), or to psum where it names xla."""
  method, config, largest = all_reduce.THRESHOLDS[n][rng]
  hidden = 4096 if largest <= 2 << 20 else 16384
  shape = (largest // 2 // hidden, hidden) if largest >= 2 * hidden else (1, largest // 2)
  x = jax.ShapeDtypeStruct((n * shape[0], shape[1]), jnp.bfloat16)
  text = lowering_checks.lower_for_cuda(_fn(_mesh(n), "auto"), x, _ws_avals(n, *shape, jnp.bfloat16))
  calls = lowering_checks.mosaic_calls(text)
  assert len(calls) == (0 if method == "xla" else 1)
  assert lowering_checks.multicast_uses(text) == []


def test_multicast_guard_detects_multimem():
  """Negative control: a kernel that uses multimem (lowered only, never run) is caught."""
  mesh = _mesh(2)

  def body(x_ref, y_ref):
    plgpu.multimem_store(x_ref[...], y_ref, ("tp",))

  def f(x):
    k = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((128,), jnp.float32))
    return k(x)

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))
  text = lowering_checks.lower_for_cuda(g, jax.ShapeDtypeStruct((256,), jnp.float32))
  assert lowering_checks.multicast_uses(text)


FORBIDDEN = ("multimem_store", "multimem_load_reduce", "multicast_ref", "semaphore_signal_multicast",
             "all_gather_mgpu", "reduce_scatter_mgpu")


def test_no_multicast_api_in_package_sources():
  root = pathlib.Path(__file__).resolve().parent.parent
  for path in list((root / "pallas_kernels").rglob("*.py")) + list((root / "models").rglob("*.py")) + \
      list((root / "experiments").rglob("*.py")):
    text = path.read_text()
    assert not [f for f in FORBIDDEN if f in text], path


def test_nvls_stays_off_in_benchmarks():
  import os
  from experiments import xla_env
  xla_env.apply()
  assert os.environ["NCCL_NVLS_ENABLE"] == "0"


@pytest.mark.parametrize("x,method,message", [
    (jnp.zeros((2, 64), jnp.float16), "one_shot", "supports bfloat16 and float32, found float16"),
    (jnp.zeros((2, 64), jnp.int32), "auto", "supports bfloat16 and float32, found int32"),
    (jnp.zeros((2, 2, 64), jnp.bfloat16), "one_shot", r"takes a \(tokens, hidden\) message"),
    (jnp.zeros((600, 64), jnp.bfloat16), "two_shot", r"takes 1..256 tokens .* found \(300, 64\)"),
    (jnp.zeros((2, 20000), jnp.bfloat16), "one_shot", "hidden sizes up to 16384"),
    (jnp.zeros((2, 64), jnp.bfloat16), "ring", "method must be one of"),
])
def test_bad_input_is_rejected_before_launch(x, method, message):
  mesh = _mesh(2)
  dtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float32) else jnp.bfloat16
  ws = workspace.init(mesh, "tp", 1 << 16, dtype)
  with pytest.raises(ValueError, match=message):
    _fn(mesh, method)(x, ws)


def test_axis_not_in_mesh():
  mesh = _mesh(2)
  ws = workspace.init(mesh, "tp", 1 << 14, jnp.bfloat16)

  def f(x, ws):
    return all_reduce.all_reduce(x, ws, "model", "one_shot")
  spec = workspace.spec("tp")
  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("tp"), spec), out_specs=(P("tp"), spec)))
  with pytest.raises(ValueError, match="axis 'model' is not a mesh axis"):
    g(jnp.zeros((2, 64), jnp.bfloat16), ws)


def test_three_ranks_rejected_for_kernels():
  mesh = _mesh(3)
  ws = workspace.init(mesh, "tp", 1 << 14, jnp.bfloat16)
  with pytest.raises(ValueError, match="runs on 2, 4 or 8 ranks, found 3"):
    _fn(mesh, "one_shot")(jnp.zeros((3, 64), jnp.bfloat16), ws)


def test_mesh_must_be_local_devices_in_order():
  devs = jax.devices()
  with pytest.raises(ValueError, match="first local devices in jax.devices\\(\\) order"):
    workspace.init(_mesh(2, [devs[1], devs[0]]), "tp", 1024, jnp.bfloat16)
  with pytest.raises(ValueError, match="axis 'x' is not an axis of the mesh"):
    workspace.init(_mesh(2), "x", 1024, jnp.bfloat16)


def test_message_larger_than_workspace():
  mesh = _mesh(2)
  ws = workspace.init(mesh, "tp", 4096, jnp.bfloat16)
  with pytest.raises(ValueError, match="cannot carry a message of 16384 bfloat16 elements"):
    lowering_checks.lower_for_cuda(_fn(mesh, "one_shot"),
                                   jax.ShapeDtypeStruct((8, 4096), jnp.bfloat16), ws)


@pytest.mark.parametrize("n", sorted(all_reduce.THRESHOLDS))
def test_auto_thresholds_pick_by_size(n):
  ranges = all_reduce.THRESHOLDS[n]
  assert all_reduce.select(1, n) == ranges[0][:2]
  for (method, cfg, largest), (after, after_cfg, _) in zip(ranges,
                                                           ranges[1:] + (("xla", None, 0),)):
    assert all_reduce.select(largest, n) == (method, cfg)
    assert all_reduce.select(largest + 1, n) == (after, after_cfg)
  assert all_reduce.select(64 << 20, n) == ("xla", None)


def test_thresholds_derived_from_measured_rows():
  from experiments.thresholds import derive
  impls = ("one_shot_ll", "one_shot", "two_shot", "psum_default")
  us = {  # bytes -> loop µs per impl (None: not measured)
      8192: (6, 8, 11, 15), 65536: (10, 9, 11, 15), 262144: (20, 14, 12, 15),
      1 << 20: (None, 30, 19, 20), 2 << 20: (None, 40, 21, 20), 4 << 20: (None, 90, 45, 37)}
  rows = [{"op": "all_reduce", "tp": 2, "impl": impl, "bytes": b, "loop_us": v}
          for b, vals in us.items() for impl, v in zip(impls, vals)]
  rows.append({"op": "all_reduce", "tp": 2, "impl": "psum_default", "bytes": 8 << 20,
               "loop_us": None})  # failed, and no kernel measured there: no range
  c = common.Config(poll="serial")  # rows without a poll field ran the serial flag poll
  assert derive(rows, 2) == (("one_shot_ll", c, 8192), ("one_shot", c, 65536),
                             ("two_shot", c, 1 << 20))
  older = [r for r in rows if r["impl"] != "one_shot_ll"]  # records from before the LL kernel
  assert derive(older, 2) == (("one_shot", c, 65536), ("two_shot", c, 1 << 20))
  wide = {"vectors": 8, "max_blocks": 32}  # a tiling sweep's rows: it wins where it is
  tiled = [{"op": "all_reduce", "tp": 2, "impl": "two_shot[v8,b32]", "bytes": b, "loop_us": v,
            **wide} for b, v in ((1 << 20, 18.0), (2 << 20, 19.0), (4 << 20, 30.0))]
  assert derive(rows + tiled, 2) == (("one_shot_ll", c, 8192), ("one_shot", c, 65536),
                                     ("two_shot", c, 262144),
                                     ("two_shot", common.Config(8, 32, "serial"), 4 << 20))
  assert derive(rows + tiled[:1], 2)[-1] == ("two_shot", common.Config(8, 32, "serial"), 1 << 20)
  # within 5% of the fastest, the previous size's winner keeps its range (no noise ranges)
  close = [{**tiled[0], "loop_us": 18.5}]
  assert derive(rows + close, 2)[-1] == ("two_shot", c, 1 << 20)
  # where psum failed (not in a WHILE graph at >= 8 MB), the fastest kernel takes the size
  big = {"op": "all_reduce", "tp": 2, "impl": "one_shot[v8,b32]", "bytes": 8 << 20,
         "loop_us": 50.0, **wide}
  assert derive(rows + tiled + [big], 2)[-1] == ("one_shot", common.Config(8, 32, "serial"), 8 << 20)
  parallel = [{**r, "poll": "parallel"} if r["impl"] != "psum_default" else r for r in rows]
  assert derive(parallel, 2)[0] == ("one_shot_ll", common.Config(), 8192)
  with pytest.raises(ValueError, match="no size with psum_default tried and a kernel measured"):
    derive(rows, 4)


def test_workspace_copies_found_in_optimized_hlo():
  ws = workspace.Workspace(jax.ShapeDtypeStruct((4, 2, 4096), jnp.bfloat16),
                           jax.ShapeDtypeStruct((64, 2, 2), jnp.int32),
                           jax.ShapeDtypeStruct((2,), jnp.int32))
  hlo = """
  %copy.3 = bf16[2,2,4096]{2,1,0} copy(bf16[2,2,4096]{2,1,0} %p)
  %copy.4 = f32[4]{0} copy(f32[4]{0} %y)
  %copy-start.1 = (s32[32,2,2]{2,1,0}, s32[32,2,2]{2,1,0}, u32[]) copy-start(s32[32,2,2]{2,1,0} %f)
  %wrapped_copy.2 = s32[32,2,2]{2,1,0} fusion(s32[32,2,2]{2,1,0} %f), kind=kLoop, calls=%w
  ROOT %add = bf16[2,2,4096]{2,1,0} add(bf16[2,2,4096]{2,1,0} %p, bf16[2,2,4096]{2,1,0} %p)"""
  found = lowering_checks.workspace_copies(hlo, ws)
  assert [line.split()[0] for line in found] == ["%copy.3", "%copy-start.1", "%wrapped_copy.2"]


@pytest.mark.parametrize("n, names", [
    (2, ("20261122T060607632282Z", "20261122T063028449773Z", "20261122T161502504865Z",
         "20261122T163818857738Z")), (4, ("20261122T094025976278Z", "20261122T104801796663Z", "20261122T112208392518Z"))])
def test_auto_ranges_are_derived_from_the_records_they_cite(n, names):
  """THRESHOLDS[n] is what experiments/thresholds.derive gives on the records its comment names."""
  import json
  from experiments.thresholds import derive
  root = pathlib.Path(__file__).parent.parent / "experiments" / "results" / "allreduce"
  rows = [row for name in names
          for row in json.loads((root / f"{name}.json").read_text())["results"]]
  assert derive(rows, n) == all_reduce.THRESHOLDS[n]


def test_sharded_jit_aliases_the_workspace_to_itself():
  """At TP=4 the flags (128 x 2 x 4 int32) are 4 KB per rank, like a (1, 2048) bf16 output:
  a plain jit lets XLA alias the donated flags to that output (and copy the flags in front
  of the kernel, which hung on 4xH200); sharded_jit keeps every workspace buffer its own."""
  n = 4
  mesh, spec = _mesh(n), workspace.spec("tp")
  ws = workspace.init(mesh, "tp", 2048, jnp.bfloat16)
  x = jnp.zeros((n, 2048), jnp.bfloat16)
  f = lambda x, ws: (x * 2, ws)
  assert ws.flags.nbytes == x.nbytes  # per rank too: the collision this test is about
  plain = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("tp"), spec), out_specs=(P("tp"), spec),
                                check_vma=False), donate_argnums=1)
  # Parameters: x, slots, flags, epoch; outputs: y, slots, flags, epoch.
  assert lowering_checks.aliases(plain.lower(x, ws).compile().as_text())[2] == 0
  good = workspace.sharded_jit(f, mesh, (P("tp"), spec), (P("tp"), spec), donate_argnums=1)
  assert lowering_checks.aliases(good.lower(x, ws).compile().as_text()) == {1: 1, 2: 2, 3: 3}
