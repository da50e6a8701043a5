"""The Flax model against the independent numpy reference, and cached decode against
full recomputation."""

import numpy as np
import pytest

import numpy_llama
from hf_fixtures import random_weights, tiny_config
from model_helpers import decoder_from_weights, last_logits

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    "gqa": tiny_config(),
    "mha_tied": tiny_config(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_llama3": tiny_config(num_key_value_heads=1, rope_scaling=LLAMA3_SCALING,
                              rope_theta=500000.0),
    "gqa_tied_llama3": tiny_config(num_attention_heads=6, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_scaling=LLAMA3_SCALING),
}


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_matches_numpy_reference(tmp_path, name):
  config = CONFIGS[name]
  weights = random_weights(config, seed=1)
  tokens = np.random.default_rng(0).integers(0, config["vocab_size"], size=20)
  ref = numpy_llama.forward(weights, config, tokens)
  decoder = decoder_from_weights(tmp_path, config, weights)
  # Prompts of different lengths in one right-padded batch: row i ends at lengths[i] - 1.
  lengths = [1, 7, 13, 20]
  got = np.asarray(last_logits(decoder, [list(tokens[:n]) for n in lengths]))
  for row, n in enumerate(lengths):
    assert _rel_err(got[row], ref[n - 1]) < 1e-5, (name, n)


@pytest.mark.parametrize("loop", ["jit", "python"])
def test_cached_decode_equals_full_recomputation(tmp_path, loop):
  config = CONFIGS["gqa_tied_llama3"]
  weights = random_weights(config, seed=2)
  decoder = decoder_from_weights(tmp_path, config, weights)
  prompts = [[5, 9, 11], [7, 3, 8, 20, 33, 41, 2 + 10], [60]]
  new = 12
  got = decoder.generate(prompts, new, loop=loop, stop_at_eos=False).tokens
  for row, prompt in enumerate(prompts):
    seq = list(prompt)
    for _ in range(new):  # greedy by full recomputation with the reference
      seq.append(int(np.argmax(numpy_llama.forward(weights, config, np.array(seq))[-1])))
    assert got[row].tolist() == seq[len(prompt):], row


def test_decode_logits_match_reference_step_by_step(tmp_path):
  """The decode path's logits (not only its argmax) agree with recomputation."""
  config = CONFIGS["gqa"]
  weights = random_weights(config, seed=3)
  decoder = decoder_from_weights(tmp_path, config, weights)
  prompt = [3, 14, 15, 9, 26]
  cache, comm = decoder.new_cache(1), decoder.new_comm_state(1)
  tok, _, cache, comm = decoder.prefill(cache, comm, [prompt])
  seq = prompt + [int(tok[0])]
  for _ in range(5):
    tok, step_logits, cache, comm = decoder.step_fn(decoder.state, cache, comm, tok)
    ref = numpy_llama.forward(weights, config, np.array(seq))[-1]
    assert _rel_err(np.asarray(step_logits[0]), ref) < 1e-5
    seq.append(int(tok[0]))


def test_no_recompilation_per_step_or_length_within_a_bucket(tmp_path):
  config = CONFIGS["gqa"]
  decoder = decoder_from_weights(tmp_path, config, random_weights(config, seed=7))
  for prompts in ([[1, 2, 3]], [[4, 5, 6, 7, 8, 9]], [[10, 11]]):  # all within bucket 16
    cache, comm = decoder.new_cache(1), decoder.new_comm_state(1)
    tok, _, cache, comm = decoder.prefill(cache, comm, prompts, bucket=16)
    for _ in range(3):
      tok, _, cache, comm = decoder.step_fn(decoder.state, cache, comm, tok)
  assert decoder.prefill_fn._cache_size() == 1
  assert decoder.step_fn._cache_size() == 1


def test_both_loops_stop_each_row_at_eos(tmp_path):
  """Rows are EOS-filled after their first EOS; the loop ends once every row has; the jit
  loop and the python loop (which reads tokens one step behind) agree."""
  config = CONFIGS["gqa"]
  weights = random_weights(config, seed=5)
  prompts = [[5, 9, 11], [7, 3, 8, 20], [60]]
  for eos, rows, stops_early in ((2, [1, 2], True), (55, [0, 1, 2], False)):
    decoder = decoder_from_weights(tmp_path / str(eos), {**config, "eos_token_id": eos}, weights)
    batch = [prompts[r] for r in rows]
    ref = decoder.generate(batch, 12, stop_at_eos=False).tokens
    assert (ref == eos).any(axis=1).all() == stops_early
    for loop in ("jit", "python"):
      gen = decoder.generate(batch, 12, loop=loop)
      np.testing.assert_array_equal(gen.tokens, ref, err_msg=f"eos={eos} loop={loop}")
      assert (len(gen.steps_s) < 11) == stops_early, (eos, loop, len(gen.steps_s))
