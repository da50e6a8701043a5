"""Tensor parallelism on 8 fake CPU devices: TP=1/2/4/8 give TP=1's logits and tokens."""

import re

import jax
import numpy as np
import pytest

from hf_fixtures import random_weights, tiny_config
from model_helpers import decoder_from_weights, last_logits
from models import sharding
from models.config import preset
from models.decode import abstract_model

SMOLLM2_HEADS = tiny_config(num_attention_heads=9, num_key_value_heads=3, head_dim=8,
                            hidden_size=36, tie_word_embeddings=True)
CONFIGS = {"tiny": tiny_config(num_attention_heads=8, num_key_value_heads=2),
           "smollm2_heads": SMOLLM2_HEADS}
PROMPTS = [[5, 9, 11, 3], [7, 3, 8, 20, 33, 41, 12], [60]]


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
  """TP=1 logits and tokens per config, computed once."""
  out = {}
  for name, config in CONFIGS.items():
    weights = random_weights(config, seed=4)
    dec = decoder_from_weights(tmp_path_factory.mktemp(name), config, weights)
    out[name] = (weights, np.asarray(last_logits(dec, PROMPTS)),
                 dec.generate(PROMPTS, 10, stop_at_eos=False).tokens)
  return out


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tp_matches_tp1(tmp_path, tp1, name, tp):
  if len(jax.devices()) < tp:
    pytest.skip(f"needs {tp} devices")
  weights, logits1, tokens1 = tp1[name]
  dec = decoder_from_weights(tmp_path, CONFIGS[name], weights, tp=tp)
  np.testing.assert_allclose(np.asarray(last_logits(dec, PROMPTS)), logits1, rtol=2e-5, atol=2e-5)
  for loop in ("jit", "python"):
    np.testing.assert_array_equal(dec.generate(PROMPTS, 10, loop=loop, stop_at_eos=False).tokens,
                                  tokens1)


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 2), (9, 3, 4), (9, 3, 8), (32, 8, 8), (64, 8, 4),
                                         (32, 32, 4), (4, 1, 8)])
def test_head_layout_places_every_head_once_per_replica(heads, kv, tp):
  layout = sharding.HeadLayout.build(heads, kv, tp)
  group = heads // kv
  assert len(layout.q_src) % tp == 0 and len(layout.kv_src) % tp == 0
  assert sorted(h for h in layout.q_src if h >= 0) == list(range(heads))
  assert set(h for h in layout.kv_src if h >= 0) == set(range(kv))
  qpk = layout.q_per_rank // layout.kv_per_rank
  for slot, head in enumerate(layout.q_src):  # every real q head sits next to its KV head
    if head >= 0:
      assert layout.kv_src[slot // qpk] == head // group


def test_llama_shapes_need_no_padding():
  for name, tp in [("llama2-7b", 8), ("llama3-8b", 8), ("llama3-70b", 8)]:
    cfg = preset(name)
    assert -1 not in sharding.HeadLayout.build(cfg.num_heads, cfg.num_kv_heads, tp).q_src


def test_impossible_layout_names_the_numbers():
  cfg = preset("tiny").replace(intermediate_size=100, vocab_size=250)
  with pytest.raises(ValueError, match=r"intermediate_size 100 is not divisible by tp=8; "
                                       r"vocab_size 250 is not divisible by tp=8"):
    abstract_model(cfg, 8)


def test_70b_shapes_build_without_allocating():
  _, state = abstract_model(preset("llama3-70b"), 8)
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(x.size for x in leaves) > 69e9


@pytest.mark.parametrize("backend", ["one_shot", "one_shot_ll", "two_shot", "auto", "fused_ll"])
@pytest.mark.parametrize("tp", [2, 8])
def test_kernel_backends_give_xla_tokens(tmp_path, tp1, backend, tp):
  """On the CPU the kernels run their reference; the workspace threads through both loops."""
  weights, _, tokens1 = tp1["tiny"]
  dec = decoder_from_weights(tmp_path, CONFIGS["tiny"], weights, tp=tp, backend=backend)
  for loop in ("jit", "python"):
    np.testing.assert_array_equal(dec.generate(PROMPTS, 10, loop=loop, stop_at_eos=False).tokens,
                                  tokens1)


@pytest.mark.parametrize("backend", ["one_shot", "one_shot_ll", "two_shot", "fused", "fused_ll"])
def test_decode_loop_lowers_for_cuda_with_kernels(tmp_path, tp1, backend):
  """The whole jitted decode loop lowers for CUDA: one kernel per all-reduce and one for the
  argmax exchange, no XLA collective (they keep the loop out of a WHILE graph), no
  multicast."""
  from pallas_kernels import lowering_checks
  weights = tp1["tiny"][0]
  dec = decoder_from_weights(tmp_path, CONFIGS["tiny"], weights, tp=2, backend=backend)
  cache, comm = dec.new_cache(2), dec.new_comm_state(2)
  first = jax.numpy.zeros((2,), jax.numpy.int32)
  text = lowering_checks.lower_for_cuda(dec.loop_fn(4, False), dec.state, cache, comm, first)
  layers = CONFIGS["tiny"]["num_hidden_layers"]
  assert len(lowering_checks.mosaic_calls(text)) == 2 * layers + 2  # per step, inside the loop
  assert not re.search(r"stablehlo\.(all_gather|all_reduce|reduce_scatter|all_to_all)", text)
  assert lowering_checks.multicast_uses(text) == []


@pytest.mark.parametrize("backend", ["one_shot", "fused"])
def test_donated_state_aliases_itself(tmp_path, tp1, backend):
  """The KV cache and the workspace buffers that peers write (slots, flags) come back in their
  own output positions in the step and loop executables (workspace.sharded_jit), so XLA
  copies neither. jax matches donations to outputs in output order by per-rank shape, so
  the (1,) int32 leaves (cache lengths, workspace epoch) may trade places with the (1,)
  tokens output: harmless, no peer writes them. Checked on the CPU compile."""
  from pallas_kernels import lowering_checks
  dec = decoder_from_weights(tmp_path, CONFIGS["tiny"], tp1["tiny"][0], tp=4, backend=backend)
  cache, comm = dec.new_cache(1), dec.new_comm_state(1)
  first = jax.numpy.zeros((1,), jax.numpy.int32)
  params = len(jax.tree.leaves(dec.state))
  leaves = jax.tree_util.tree_flatten_with_path((cache, comm))[0]
  # Parameters: state, cache, comm, tokens; outputs: two arrays, then cache and comm.
  want = {params + i: 2 + i for i, (path, _) in enumerate(leaves)
          if re.search(r"\.(k|v|slots|flags)\b", jax.tree_util.keystr(path))}
  assert len(want) == 2 * CONFIGS["tiny"]["num_hidden_layers"] + 2  # k, v per layer; slots, flags
  for fn in (dec.step_fn, dec.loop_fn(4, False)):
    got = lowering_checks.aliases(fn.lower(dec.state, cache, comm, first).compile().as_text())
    assert {p: got.get(p) for p in want} == want


@pytest.mark.parametrize("tp", [2, 8])
def test_fused_backend_gives_xla_tokens(tmp_path, tp1, tp):
  weights, _, tokens1 = tp1["tiny"]
  dec = decoder_from_weights(tmp_path, CONFIGS["tiny"], weights, tp=tp, backend="fused")
  for loop in ("jit", "python"):
    np.testing.assert_array_equal(dec.generate(PROMPTS, 10, loop=loop, stop_at_eos=False).tokens,
                                  tokens1)


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("backend", ["xla", "one_shot", "fused_ll"])
def test_gather_words_is_exact(n, backend):
  """Comm.gather_words returns every rank's int32 words bit for bit, whatever the words
  (negative, NaN patterns as f32), on the CPU path of every kind of backend."""
  from jax.sharding import PartitionSpec as P
  from models.collectives import BACKENDS, Comm
  mesh = sharding.make_mesh(n)
  comm = Comm(backend)
  example = jax.ShapeDtypeStruct((3, 1, 64), jax.numpy.bfloat16)
  state = BACKENDS[backend].init_state(mesh, "tp", example)
  spec = BACKENDS[backend].state_spec("tp")
  words = np.random.default_rng(n).integers(-2**31, 2**31, (n * 3, 2), dtype=np.int64)
  words[0, 0] = np.array(np.nan, np.float32).view(np.int32)
  words = words.astype(np.int32)
  f = jax.jit(jax.shard_map(lambda w, s: comm.gather_words(w, s), mesh=mesh,
                            in_specs=(P("tp"), spec), out_specs=(P("tp"), spec), check_vma=False))
  got, _ = f(words, state)
  expected = np.broadcast_to(words.reshape(n, 3, 2).transpose(1, 0, 2), (n, 3, n, 2))
  np.testing.assert_array_equal(np.asarray(got).reshape(n, 3, n, 2), expected)
