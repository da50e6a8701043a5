"""The bucketed prefill runtime against exact-length prefill: logits, cache and generation,
under concurrent requests, on the fallback path, and from the persistent cache."""

import concurrent.futures
import json
import subprocess
import sys

import numpy as np
import pytest

from hf_fixtures import random_weights, tiny_config, write_checkpoint
from model_helpers import decoder_from_weights
from models.executable_store import ExecutableStore
from models.prefill_runtime import NO_GRAPHS, PrefillRuntime, default_buckets

MAX_LEN = 64
BUCKETS = (8, 16, 32, 48, 64)


def _decoder(tmp_path_factory, tp):
  config = tiny_config()
  return decoder_from_weights(tmp_path_factory.mktemp("ckpt"), config,
                              random_weights(config, seed=4), tp=tp, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
  return _decoder(tmp_path_factory, 1)


def _prompt(n, seed=0):
  return np.random.default_rng(seed + n).integers(3, 64, n).tolist()


def _exact(decoder, prompt):
  """Reference: prefill at exactly the prompt's length."""
  cache, comm = decoder.new_cache(1), decoder.new_comm_state(1)
  return decoder.prefill(cache, comm, [prompt])


def _assert_same_prefill(got, ref, n):
  next_ref, logits_ref, cache_ref, _ = ref
  assert int(got.next_b[0]) == int(next_ref[0])
  np.testing.assert_allclose(np.asarray(got.logits_bv), np.asarray(logits_ref), rtol=1e-5,
                             atol=1e-5)
  assert np.asarray(got.cache.lengths).tolist() == [n]
  for a, b in zip(got.cache.k + got.cache.v, cache_ref.k + cache_ref.v):
    # Other shapes, other codegen: equal up to float32 rounding, not bit for bit.
    np.testing.assert_allclose(np.asarray(a)[:, :, :n], np.asarray(b)[:, :, :n], rtol=1e-6,
                               atol=1e-6)


def test_default_buckets():
  assert default_buckets(512) == (16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
  assert default_buckets(100) == (16, 32, 64, 100)
  assert default_buckets(10) == (10,)


@pytest.mark.parametrize("tp, lengths", [(1, (1, 2, 7, 8, 9, 16, 17, 31, 33, 50, 63)),
                                         (2, (1, 9, 40))])
def test_bucketed_prefill_equals_exact_length(tmp_path_factory, tp, lengths):
  decoder = _decoder(tmp_path_factory, tp)
  runtime = PrefillRuntime(decoder, BUCKETS, background=False)
  for n in lengths:
    got = runtime.prefill(_prompt(n), max_new_tokens=1)
    assert got.bucket == runtime.bucket_for(n) >= n
    _assert_same_prefill(got, _exact(decoder, _prompt(n)), n)


def test_generation_after_bucketed_prefill(decoder):
  runtime = PrefillRuntime(decoder, BUCKETS, background=False)
  loop = decoder.loop_fn(12, False)  # one decode executable for every prompt length
  for n in (3, 20, 40):
    got = runtime.prefill(_prompt(n), max_new_tokens=13)
    ref_next, _, ref_cache, ref_comm = _exact(decoder, _prompt(n))
    tokens, _, _, _ = loop(decoder.state, got.cache, got.comm_state, got.next_b)
    ref_tokens, _, _, _ = loop(decoder.state, ref_cache, ref_comm, ref_next)
    assert np.asarray(tokens).tolist() == np.asarray(ref_tokens).tolist(), n


def test_concurrent_requests_during_background_compilation(decoder):
  lengths = np.random.default_rng(1).choice([3, 11, 20, 37, 52, 60], 24).tolist()
  refs = {n: _exact(decoder, _prompt(n)) for n in set(lengths)}
  with PrefillRuntime(decoder, (4, 8, 12, 16, 24, 32, 48, 64)) as runtime:
    assert runtime.ready() != runtime.buckets  # requests arrive while compilation runs
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      results = list(pool.map(lambda n: runtime.prefill(_prompt(n)), lengths))
    for n, got in zip(lengths, results):
      assert got.bucket >= n
      _assert_same_prefill(got, refs[n], n)
    runtime.wait()  # compiled and warmed up: every bucket was run twice off the request path
    assert runtime.ready() == runtime.buckets
    assert all(row["compile_s"] > 0 and row["run_s"] > 0 for row in runtime.stats())


def test_fallback_to_a_larger_ready_bucket(decoder):
  with PrefillRuntime(decoder, BUCKETS, prior_lengths=[64]) as runtime:
    runtime.wait(64)
    with runtime.paused():
      assert 8 not in runtime.ready()
      got = runtime.prefill(_prompt(5))
    assert got.bucket > 8
    _assert_same_prefill(got, _exact(decoder, _prompt(5)), 5)
    runtime.wait(8)
    assert runtime.prefill(_prompt(5)).bucket == 8


def test_clear_errors(decoder):
  runtime = PrefillRuntime(decoder, (8, 16, 32), background=False)
  with pytest.raises(ValueError, match="prompt of 33 tokens exceeds the largest bucket, 32"):
    runtime.prefill(_prompt(33))
  with pytest.raises(ValueError,
                     match=r"prompt of 30 tokens \+ 40 new tokens exceeds the cache length 64"):
    runtime.prefill(_prompt(30), max_new_tokens=40)
  with pytest.raises(ValueError, match="the prompt is empty"):
    runtime.prefill([])
  with pytest.raises(ValueError,
                     match=r"buckets \[16, 128\] must .* \[1, 64\] \(the cache length\)"):
    PrefillRuntime(decoder, (128, 16), background=False)
  assert runtime.ready() == ()  # nothing was compiled for any of them


_SECOND_START = """
import json, sys, time
import jax, jax.numpy as jnp
from models import hf_loader
from models.decode import Decoder
from models.prefill_runtime import PrefillRuntime, enable_persistent_cache
from models.sharding import make_mesh
enable_persistent_cache(sys.argv[2])
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
mesh = make_mesh(1)
config, graphdef, state = hf_loader.load(sys.argv[1], mesh, jnp.float32)
runtime = PrefillRuntime(Decoder(config, graphdef, state, mesh, max_len=32), (8, 16),
                         background=False)
runtime.wait()
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"),
                  "compile_s": sum(r["compile_s"] for r in runtime.stats())}))
"""


def test_persistent_cache_serves_a_second_start(tmp_path):
  config = tiny_config()
  ckpt = write_checkpoint(tmp_path / "ckpt", config, random_weights(config))
  cache_dir = tmp_path / "jax_cache"

  def start():
    out = subprocess.run([sys.executable, "-c", _SECOND_START, str(ckpt), str(cache_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

  first = start()
  assert first["hits"] == 0 and first["misses"] >= 2
  assert len(list(cache_dir.glob("jit__prefill-*"))) == 2  # one entry per bucket
  second = start()
  assert second["misses"] == 0 and second["hits"] == first["misses"]
  assert second["compile_s"] < first["compile_s"]


@pytest.mark.parametrize("tp", [1, 2])
def test_executable_store_serves_a_new_runtime(tmp_path_factory, tmp_path, tp):
  decoder = _decoder(tmp_path_factory, tp)
  store = ExecutableStore(tmp_path / "executables")
  first = PrefillRuntime(decoder, (8, 16), background=False, store=store)
  first.wait()
  assert [r["source"] for r in first.stats()] == ["compiled", "compiled"]
  assert store.entries() == 2
  second = PrefillRuntime(decoder, (8, 16), background=False, store=store)
  second.wait()
  stats = second.stats()
  assert [r["source"] for r in stats] == ["store", "store"]
  assert all(r["lower_s"] == 0.0 and r["temp_bytes"] is not None for r in stats)
  for n in (3, 8, 11):
    _assert_same_prefill(second.prefill(_prompt(n)), _exact(decoder, _prompt(n)), n)


def test_executable_store_keys_and_damaged_entries(decoder, tmp_path):
  store = ExecutableStore(tmp_path / "executables")
  runtime = PrefillRuntime(decoder, (8, 16), background=False, store=store)
  assert len({runtime._store_key(8), runtime._store_key(16)}) == 2
  assert store.key(a=1) == store.key(a=1) != store.key(a=2)
  runtime.wait(8)
  path = next(store.directory.glob("*.executable"))
  path.write_bytes(b"not an executable")
  again = PrefillRuntime(decoder, (8,), background=False, store=store)
  again.wait()
  assert again.stats()[0]["source"] == "compiled"  # the damaged entry was compiled anew
  _assert_same_prefill(again.prefill(_prompt(5)), _exact(decoder, _prompt(5)), 5)
  assert store.load(runtime._store_key(8), decoder.mesh.devices.flat) is not None  # replaced


def test_graphs_and_compiler_options_apply_to_the_buckets_and_key_the_store(decoder, tmp_path):
  """Buckets with command buffers (not the default): the same prefill, a separate store entry."""
  store = ExecutableStore(tmp_path / "executables")
  plain = PrefillRuntime(decoder, (8,), background=False, store=store)
  graphs = PrefillRuntime(decoder, (8,), background=False, store=store, graphs=True)
  assert plain.compiler_options == NO_GRAPHS and graphs.compiler_options == {}
  assert plain._store_key(8) != graphs._store_key(8)
  _assert_same_prefill(graphs.prefill(_prompt(5)), _exact(decoder, _prompt(5)), 5)
  with pytest.raises(Exception, match="compiling the 8-token bucket failed") as info:
    PrefillRuntime(decoder, (8,), background=False,
                   compiler_options={"xla_no_such_option": ""}).wait()
  assert "No such compile option" in str(info.value.__cause__)
