"""Compiled executables on disk, loaded on a later start without tracing, lowering or compiling.

JAX's persistent compilation cache skips XLA's compilation on a second start, but each
function is still traced and lowered first, which for a model written layer by layer takes
longer than loading its compiled code. `ExecutableStore` keeps whole compiled executables
(`jax.experimental.serialize_executable`) under keys that name everything an executable
depends on: a caller's description of the computation (e.g. model config, mesh, bucket),
the jax and jaxlib versions, the devices, XLA_FLAGS and the source of this package. Any
change gives a new key; nothing stale is ever loaded.

Stored executables are pickles: load only directories this process's user wrote.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import pickle
import tempfile
from typing import Any

import jax
import jaxlib
from jax.experimental import serialize_executable

_PACKAGES = ("models", "pallas_kernels")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
  """Digest of every Python file of the packages that define the computations."""
  root = pathlib.Path(__file__).resolve().parent.parent
  h = hashlib.sha256()
  for pkg in _PACKAGES:
    for path in sorted((root / pkg).rglob("*.py")):
      h.update(str(path.relative_to(root)).encode())
      h.update(path.read_bytes())
  return h.hexdigest()


class ExecutableStore:
  """A directory of compiled executables (see the module docstring)."""

  def __init__(self, directory: str | pathlib.Path):
    self.directory = pathlib.Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)

  def key(self, **description: Any) -> str:
    """The key of the executable `description` (JSON-able values, e.g. repr of a config)
    names, in this environment."""
    parts = {**description, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
             "devices": [f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices()],
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "source": source_digest()}
    blob = json.dumps(parts, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()[:32]

  def _path(self, key: str) -> pathlib.Path:
    return self.directory / f"{key}.executable"

  def load(self, key: str, devices) -> jax.stages.Compiled | None:
    """The stored executable, loaded onto `devices` (the computation's devices, in the
    order it was compiled for), or None when there is none or it cannot be loaded."""
    path = self._path(key)
    if not path.exists():
      return None
    try:
      payload, in_tree, out_tree = pickle.loads(path.read_bytes())
      return serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                       execution_devices=list(devices))
    except Exception:  # a damaged or foreign entry is no entry; the caller compiles instead
      return None

  def save(self, key: str, compiled: jax.stages.Compiled) -> None:
    """Stores `compiled` under `key` (atomically: readers never see a partial file)."""
    blob = pickle.dumps(serialize_executable.serialize(compiled))
    fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
      f.write(blob)
    os.replace(tmp, self._path(key))

  def entries(self) -> int:
    return len(list(self.directory.glob("*.executable")))
