"""One entry point from a model name (or a HF directory) to sharded weights."""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
from jax.sharding import Mesh

from models import hf_loader
from models.config import preset
from models.decode import init_random


def _smollm2_dir() -> pathlib.Path:
  from models import smollm2  # needs gguf, only for the one-time conversion

  return smollm2.ensure_checkpoint()


REAL_WEIGHTS = {"smollm2-135m": _smollm2_dir}


def build(model: str, mesh: Mesh, checkpoint_dir: str | None = None, dtype=jnp.bfloat16,
          seed: int = 0):
  """Returns (config, graphdef, state, checkpoint_dir or None).

  A checkpoint directory wins; otherwise presets with real weights are converted and
  loaded, and shape-only presets get random weights created in their shards.
  """
  if checkpoint_dir is None and model in REAL_WEIGHTS:
    checkpoint_dir = str(REAL_WEIGHTS[model]())
  if checkpoint_dir is not None:
    config, graphdef, state = hf_loader.load(pathlib.Path(checkpoint_dir), mesh, dtype)
    return config, graphdef, state, checkpoint_dir
  config = preset(model, dtype=dtype)
  graphdef, state = init_random(config, mesh, seed)
  return config, graphdef, state, None
