"""The benchmark binaries run end to end on the CPU (2 fake devices, tiny sizes) and write
records that the report reads: a broken flag, row or record fails here, not on a GPU."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import records

ROOT = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(tmp_path, module, *args) -> list[dict]:
  env = {**os.environ, "TPDECODE_RESULTS": str(tmp_path), "TPDECODE_GIT_SHA": "test",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  paths = sorted(tmp_path.glob("*/*.json"))
  assert len(paths) == 1, paths
  record = json.loads(paths[0].read_text())
  assert record["git_sha"] == "test" and record["platform"] == "cpu"
  return record["results"]


def test_bench_allreduce(tmp_path):
  rows = _run(tmp_path, "bench_allreduce", "--tp=2", "--min_bytes=8192", "--max_bytes=16384",
              "--iters=2", "--runs=2", "--flavours=pallas,psum_default")
  got = sorted((r["impl"], r["bytes"]) for r in rows)
  impls = ("one_shot", "one_shot_ll", "two_shot", "auto", "psum_default")
  assert got == sorted((i, b) for i in impls for b in (8192, 16384))
  assert all(r["loop_us"] > 0 and r["error"] is None for r in rows)
  assert all(r["max_rel_err"] < 1e-2 and r["ranks_equal"] for r in rows), "checked, not zeros"


def test_bench_allreduce_add_norm(tmp_path):
  rows = _run(tmp_path, "bench_allreduce", "--tp=2", "--op=add_norm", "--tokens=1,4",
              "--hidden=4096", "--iters=2", "--runs=2", "--flavours=pallas")
  impls = ("bare_one_shot", "fused", "fused_ll", "one_shot", "one_shot_ll")
  assert sorted((r["impl"], r["tokens"]) for r in rows) == [(i, t) for i in impls for t in (1, 4)]


def test_bench_decode(tmp_path):
  rows = _run(tmp_path, "bench_decode", "--model=tiny", "--tp=2", "--backend=xla,fused",
              "--matmul=xla,pallas", "--batch=1,2", "--prompt_len=4", "--gen_len=6", "--runs=1",
              "--copy_gib=0.01", "--cupti")
  assert len(rows) == 2 * 2 * 2 * 2  # backends x matmuls x batches x loops
  assert all(r["tpot_ms_median"] > 0 and r["tokens_match_first"] for r in rows)
  assert {r["matmul"] for r in rows} == {"xla", "pallas"}


def test_bench_matvec(tmp_path):
  rows = _run(tmp_path, "bench_matvec", "--tps=8", "--runs=2", "--copies=2", "--forms=nd",
              "--gemms=default")
  assert {r["matrix"] for r in rows} == {"qkv_each", "qkv_fused", "o_proj", "gate_up_each",
                                         "gate_up_fused", "down_proj"}
  assert all(r["rel_err"] < 1e-2 for r in rows)


def test_report_renders_a_fresh_record(tmp_path, monkeypatch):
  results = tmp_path / "results"
  _run(results, "bench_allreduce", "--tp=2", "--min_bytes=8192", "--max_bytes=8192",
       "--iters=2", "--runs=2", "--flavours=pallas")
  from experiments import report
  monkeypatch.setattr(report, "DOCS", tmp_path / "docs")  # plots go there, not into docs/
  text = report.render(results)
  assert "## All-reduce latency" in text and "| 8192 |" in text
  assert list((tmp_path / "docs" / "plots").glob("allreduce_*.png"))
  assert records.load("allreduce", results)[0]["config"]["flavours"] == {
      "pallas": ["default", "while"]}


def test_bench_ttft(tmp_path):
  rows = _run(tmp_path, "bench_ttft", "--model=tiny", "--requests=200", "--noprofile_buckets",
              "--naive_requests=10", "--buckets=64,128,256,512")
  policies = {(r["policy"], r["start"]): r for r in rows if r["row"] == "policy"}
  assert sorted(policies) == [("buckets", "cold"), ("hybrid", "cold"), ("hybrid", "warm"),
                              ("naive", "cold"), ("pad_max", "cold")]
  assert policies[("naive", "cold")]["requests"] == 10
  assert policies[("pad_max", "cold")]["requests"] == 200
  sources = {(r["start"], r["source"]) for r in rows
             if r["row"] == "executable" and r["policy"] == "hybrid"}
  assert sources == {("cold", "compiled"), ("warm", "store")}  # the warm start loads them all
  # A steady pass over the same requests; bins against naive's steady exact-length prefill.
  phases = [r["phase"] for r in rows if r["row"] == "request" and r["policy"] == "pad_max"]
  assert phases == ["arrival"] * 200 + ["steady"] * 200
  assert all(p["steady_requests"] == p["requests"] for p in policies.values())
  bins = [r for r in rows if r["row"] == "bin" and r["policy"] == "hybrid"]
  assert bins and all(b["exact_source"] == "naive steady" and b["steady_vs_exact"] > 0
                      for b in bins)


def test_gemv_tilings_swept_are_the_ones_a_shape_takes():
  from experiments import bench_matvec
  from pallas_kernels import gemv

  specs = ["auto", "128:4:1", "128:4:2", "128:2:8"]
  assert bench_matvec.gemv_configs("default", 6144, 4096, specs) == [None]
  got = bench_matvec.gemv_configs("pallas", 6144, 4096, specs)
  assert got[0] == gemv.config_for(6144, 4096) and len(got) == len(set(got)) == 3
  # k = 5504 = 43 x 128: no 128-wide split divides it; the sweep skips those tilings.
  assert bench_matvec.gemv_configs("pallas", 4096, 5504, ["128:4:1", "128:4:2"]) == [
      gemv.Config(tile_k=128, stages=4, splits=1)]


def test_kernel_scopes_classify_by_named_scope():
  """CUPTI names kernels after HLO instructions; the compiled module maps them to scopes."""
  from experiments import profiling

  hlo = "\n".join([
      '%loop_add_fusion.3 = f32[4]{0} fusion(%a), kind=kLoop, calls=%c,'
      ' metadata={op_name="jit(_loop)/while/body/attention/add"}',
      'ROOT %gemm_fusion_dot.12 = bf16[1,8]{1,0} fusion(%x, %w), kind=kCustom,'
      ' metadata={op_name="jit(_loop)/while/body/matmul/dot_general"}',
      '%copy.1 = f32[4]{0} copy(%a), metadata={op_name="jit(_loop)/attention/copy"}'])
  scopes = profiling.kernel_scopes(hlo)
  assert set(scopes) == {"loop_add_fusion_3", "gemm_fusion_dot_12"}
  kernel = lambda name: profiling.Kernel("", name, 0, 0, profiling.scope_of(name, scopes))
  assert profiling.classify(kernel("loop_add_fusion_3")) == "attention"
  assert profiling.classify(kernel("loop_add_fusion_3_impl")) == "attention"  # suffixed
  assert profiling.classify(kernel("loop_add_fusion_31")) == "other"  # another instruction
  assert profiling.classify(kernel("one_shot_all_reduce")) == "all_reduce"


def test_compiled_decode_loop_kernels_map_to_model_scopes():
  """The scopes CUPTI's breakdown relies on exist in a compiled decode loop (CPU compile)."""
  import jax.numpy as jnp

  from experiments import profiling
  from models import factory
  from models.decode import Decoder
  from models.sharding import make_mesh

  mesh = make_mesh(2)
  config, graphdef, state, _ = factory.build("tiny", mesh)
  dec = Decoder(config, graphdef, state, mesh, backend="xla", max_len=64)
  cache, comm = dec.new_cache(1), dec.new_comm_state(1)
  hlo = dec.loop_fn(4, False).lower(dec.state, cache, comm, jnp.zeros((1,), jnp.int32))
  scopes = profiling.kernel_scopes(hlo.compile().as_text())
  found = {profiling.classify(profiling.Kernel("", k, 0, 0, v)) for k, v in scopes.items()}
  assert found == set(profiling.CATEGORIES), found


def _child_module(tmp_path, monkeypatch, name, source):
  """A benchmark child module `name` for xla_env.run_children, importable by its processes."""
  (tmp_path / f"{name}.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
  monkeypatch.setattr(sys, "argv", ["prog"])


def test_a_child_that_dies_during_a_case_is_restarted_after_it(tmp_path, monkeypatch):
  """xla_env.run_children + ChildLog: the case that killed the child becomes an error row and
  the restarted child measures the rest."""
  from experiments import xla_env
  _child_module(tmp_path, monkeypatch, "child_mod",
      "import os, sys\n"
      "from experiments.xla_env import ChildLog\n"
      "log = ChildLog(sys.argv[-1].split('=', 1)[1])\n"
      "for case in range(4):\n"
      "  if log.done({'case': case}):\n"
      "    continue\n"
      "  log.start({'case': case, 'value': None})\n"
      "  if case == 1:\n"
      "    os.abort()\n"
      "  log.add({'case': case, 'value': case * 10, 'error': None})\n")
  rows = xla_env.run_children("child_mod", ["only"])
  assert [r["case"] for r in rows] == [0, 1, 2, 3]
  assert rows[1]["value"] is None and "died" in rows[1]["error"]
  assert [r["value"] for r in rows if r["case"] != 1] == [0, 20, 30]


def test_a_child_past_the_deadline_keeps_its_rows_and_no_other_starts(tmp_path, monkeypatch):
  """xla_env.run_children(deadline=...): the child measuring when time runs out is killed; the
  rows it wrote are returned and the next child never runs."""
  import time
  from experiments import xla_env
  _child_module(tmp_path, monkeypatch, "slow_mod",
      "import sys, time\n"
      "from experiments.xla_env import ChildLog\n"
      "log = ChildLog(sys.argv[-1].split('=', 1)[1])\n"
      "name = sys.argv[-2].split('=', 1)[1]\n"
      "for case in range(100):\n"
      "  log.add({'name': name, 'case': case})\n"
      "  time.sleep(0.5 if case else 0)\n")
  rows = xla_env.run_children("slow_mod", ["first", "second"], deadline=time.monotonic() + 8)
  assert rows and {r["name"] for r in rows} == {"first"}
  assert [r["case"] for r in rows] == list(range(len(rows))) and len(rows) < 100


def test_thunk_evidence_reads_the_named_module(tmp_path):
  """xla_env.thunk_evidence: the loop's own thunk sequence, its kinds and the while context."""
  from experiments import xla_env
  (tmp_path / "module_0001.jit__loop.thunk_sequence_after_thunk_passes.txt").write_text(
      "000: kCommandBuffer [source | next=006 (1)]\n    001: kCopy [source | sink]\n"
      "006: kWhile [prev=000 (1) | next=000 (1)]\ncondition:\n    007: kCustomKernel\n  body:\n"
      "    000: kCommandBuffer [source | next=010 (1)]\n    010: kCollectiveKernel [prev=000 (1)]\n")
  (tmp_path / "module_0003.jit_chain.thunk_sequence_after_thunk_passes.txt").write_text(
      "000: kCommandBuffer [source | sink]\n    004: kWhile [prev=003 (1) | next=039 (1)]\n")
  (tmp_path / "module_0002.jit__prefill.thunk_sequence_after_thunk_passes.txt").write_text(
      "000: kKernel\n" * 50)
  got = xla_env.thunk_evidence(str(tmp_path), "jit__loop")
  assert got["file"].startswith("module_0001.jit__loop")
  assert got["thunk_kinds"] == {"kCommandBuffer": 2, "kCopy": 1, "kWhile": 1,
                                "kCustomKernel": 1, "kCollectiveKernel": 1}
  assert got["while_lines"] == ["006: kWhile [prev=000 (1) | next=000 (1)]"]
  assert len(got["around_first_while"]) == 8
  assert not got["loop_in_one_graph"]
  assert got["host_loop_body_outside_graphs"] == {"kCollectiveKernel": 1}
  chain = xla_env.thunk_evidence(str(tmp_path), "jit_chain")
  assert chain["loop_in_one_graph"] and chain["host_loop_body_outside_graphs"] == {}
  assert xla_env.thunk_evidence(str(tmp_path), "jit_step")["file"] is None


def test_device_clock_stamps_lower_for_cuda_and_are_zero_off_gpu():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P
  from experiments import device_clock
  from pallas_kernels import lowering_checks
  mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

  def f(x):
    x, t0 = device_clock.stamp(x)
    y, t1 = device_clock.stamp(jnp.sin(x))
    return y, t0, t1

  g = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("tp"), out_specs=(P("tp"),) * 3,
                            check_vma=False))
  x = jnp.ones((4, 256), jnp.float32)
  y, t0, t1 = g(x)
  np.testing.assert_allclose(y, np.sin(1.0) * np.ones((4, 256)), rtol=1e-6)
  assert not np.asarray(t0).any() and not np.asarray(t1).any()
  text = lowering_checks.lower_for_cuda(g, jax.ShapeDtypeStruct(x.shape, x.dtype))
  assert len(lowering_checks.mosaic_calls(text)) == 2 and "globaltimer" in text
  t = np.array([[[5, 1], [7, 1]]], np.int32)  # (low, high) words: 2^32 + 5 -> 2^32 + 7 ns
  np.testing.assert_allclose(device_clock.elapsed_s(t[:, 0], t[:, 1]), [2e-9])


def test_trace_lines_kept_are_the_compute_streams():
  """The main stream's line also lists copies ("Memset,MemcpyD2D,Compute"); it must be kept."""
  from experiments import profiling

  assert profiling._COMPUTE_LINE.match("Stream #50(Memset,MemcpyD2D,Compute)")
  assert profiling._COMPUTE_LINE.match("Stream #187(Compute)")
  assert not profiling._COMPUTE_LINE.match("Stream #12(MemcpyH2D)")
  assert not profiling._COMPUTE_LINE.match("XLA Ops")


def test_bench_allreduce_tiling_strings():
  """`--configs` / `--fused_blocks` strings and the row labels they give (own process: the
  benchmarks' absl flags share names)."""
  check = """
from experiments import bench_allreduce as b
from pallas_kernels import common
assert b._config("8:32") == common.Config(8, 32)
assert b._config("8:128:tma") == common.Config(8, 128, transport="tma")
assert b._config("2:16:serial:tma") == common.Config(2, 16, "serial", "tma")
assert b._config("32:serial", fused=True) == common.Config(2, 32, "serial")
assert b._tiling(b._config("8:32:serial:tma")) == "[v8,b32,serial,tma]"
try:
  b._config("8:32:fast")
except ValueError as e:
  assert "transport must be one of" in str(e)
else:
  raise AssertionError("no error for an unknown transport")
"""
  subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT)


def test_outside_compute_share():
  """1 - compute kernels / TPOT, from CUPTI before the trace; None when no count saw a matmul."""
  from experiments import profiling

  row = {"tpot_ms_median": 4.0, "gpu_matmul_us": 2000.0, "gpu_attention_us": 0.0,
         "gpu_other_us": 1000.0, "gpu_all_reduce_us": 5000.0}
  assert profiling.outside_compute_share(row) == pytest.approx(0.25)
  row.update(cupti_matmul_us=2500.0, cupti_attention_us=300.0, cupti_other_us=200.0)
  assert profiling.outside_compute_share(row) == pytest.approx(1 - 3000.0 / 4000.0)
  assert profiling.outside_compute_share({**row, "cupti_matmul_us": 0.0, "gpu_matmul_us": 0.0}) is None
  assert profiling.outside_compute_share({**row, "tpot_ms_median": 2.0}) == 0.0  # kernels fill it


def _decode_row(path, date, backend, cb, tpot, coll="default", tp=2):
  return {"path": path, "date": date, "git_sha": "s", "model": "llama2-7b", "batch": 1, "tp": tp,
          "gemm": "default", "matmul": "xla", "loop": "jit", "backend": backend,
          "command_buffers": cb, "xla_collectives": coll, "tpot_ms_median": tpot,
          "hbm_floor_ms": 1.0, "device_kind": "NVIDIA H200"}


def test_report_goals_pair_rows_of_one_process_first(monkeypatch):
  """Issue 5's goal rows: a same-record pair beats a newer cross-record one; verdicts follow
  the thresholds; the kernel rows take the newest add_norm record, shape by shape."""
  from experiments import report

  add_norm = [{"path": p, "tp": 2, "tokens": t, "hidden": 4096, "impl": impl, "loop_us": us}
              for p, rows in [("add_norm/1.json", {"fused": 10.0, "psum_nccl": 20.0}),
                              ("add_norm/2.json", {"fused": 8.0, "psum_nccl": 28.0,
                                                   "psum_default": 12.0, "bare_one_shot": 9.0})]
              for impl, us in rows.items() for t in (1, 16)]
  monkeypatch.setattr(report.records, "load_rows", lambda name, root=None: add_norm
                      if name == "add_norm" else [])
  jit = [_decode_row("a", "2026-11-22T10:00", "xla", "default", 4.0, "nccl"),
         _decode_row("a", "2026-11-22T10:00", "fused", "default", 2.8),
         _decode_row("b", "2026-11-22T12:00", "fused", "default", 3.5),
         _decode_row("c", "2026-11-22T12:00", "xla", "default", 4.0),
         _decode_row("c", "2026-11-22T12:00", "fused", "default", 3.5),
         _decode_row("d", "2026-11-22T13:00", "fused", "while", 3.4)]
  text = report._decode_goals(jit)
  assert "| fused >= 3x faster than psum_nccl + add + norm, 1-16 tokens, TP=2 | 3.50-3.50x" in text
  assert "| 2 of 2 shapes | add_norm/2.json |" in text
  assert "fused at most 1.2x our bare one_shot all-reduce, 1-16 tokens, TP=2 | 0.89-0.89x" in text
  assert "| fused >= 27% below xla over NCCL, TP=2 | -30.0% (cb=default) | yes | a, a |" in text
  assert "| fused >= 15% below xla, default collectives, TP=2 | -12.5% (cb=default) | no | c, c |" in text
  assert "-2.9% (fused, two processes) | no | b, d |" in text  # newest pair across records
  assert "| TPOT within 1.3x of the HBM floor, TP=2 | 3.40x (fused, cb=while) | no | d |" in text
