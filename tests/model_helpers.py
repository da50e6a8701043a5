"""Builds decoders from HF-format test weights so tests compare against numpy_llama."""

import jax
import jax.numpy as jnp

from hf_fixtures import write_checkpoint
from models import hf_loader
from models.decode import Decoder
from models.sharding import make_mesh


def decoder_from_weights(tmp_path, hf_config, weights, tp=1, dtype=jnp.float32, max_len=64,
                         backend="xla", matmul="xla"):
  directory = write_checkpoint(tmp_path / f"ckpt_tp{tp}", hf_config, weights)
  mesh = make_mesh(tp)
  config, graphdef, state = hf_loader.load(directory, mesh, dtype)
  return Decoder(config, graphdef, state, mesh, backend=backend, max_len=max_len, matmul=matmul)


def last_logits(decoder, prompts):
  """Logits (b, v) at each prompt's last token, from one batched prefill."""
  cache, comm = decoder.new_cache(len(prompts)), decoder.new_comm_state(len(prompts))
  _, logits, _, _ = decoder.prefill(cache, comm, prompts)
  return logits


def gpu_ranks():
  """The tensor-parallel degrees the local GPUs allow, of 2, 4 and 8."""
  return [r for r in (2, 4, 8) if r <= len(jax.devices())]
