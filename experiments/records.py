"""Benchmark records: one JSON file per run under experiments/results/<experiment>/.

A record carries where and how it was measured (git sha, date, jax/jaxlib versions,
device kind and count, XLA_FLAGS, the config) and `results`: a list of flat rows, one
per measured configuration, with plain keys and numbers, so that all records of an
experiment load as one table (`load_rows`).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
from typing import Any, Iterable

import numpy as np

# TPDECODE_RESULTS redirects records (tests run the benchmarks into a temporary directory).
RESULTS_DIR = pathlib.Path(os.environ.get("TPDECODE_RESULTS",
                                          pathlib.Path(__file__).resolve().parent / "results"))
_SCALARS = (str, int, float, bool, type(None))


def summarize(samples: Iterable[float], prefix: str = "") -> dict[str, float]:
  """median, P10, P90, P99, mean, min and count of timing samples, keys prefixed."""
  x = np.asarray(list(samples), dtype=np.float64)
  if x.size == 0:
    raise ValueError("no samples to summarize")
  stats = {"median": np.median(x), "p10": np.percentile(x, 10), "p90": np.percentile(x, 90),
           "p99": np.percentile(x, 99), "mean": x.mean(), "min": x.min()}
  out = {prefix + k: float(v) for k, v in stats.items()}
  out[prefix + "n"] = int(x.size)
  return out


def _git_sha() -> str:
  """TPDECODE_GIT_SHA when set (the GPU machine's copy of the tree carries a stale .git: the
  commit that was sent is named by the command), else the checkout's HEAD (+ -dirty)."""
  if sha := os.environ.get("TPDECODE_GIT_SHA"):
    return sha
  try:
    root = pathlib.Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, check=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def environment() -> dict[str, Any]:
  """Where this process runs: versions, devices, flags."""
  import jax
  import jaxlib

  devices = jax.devices()
  return {
      "git_sha": _git_sha(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "jaxlib_version": jaxlib.__version__,
      "platform": devices[0].platform,
      "device_kind": devices[0].device_kind,
      "num_devices": len(devices),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
      # What else ran on the host at the same time (gpu_pairs.sh: the other GPU pair).
      "concurrent_with": os.environ.get("TPDECODE_CONCURRENT", ""),
      "python": platform.python_version(),
  }


def write(experiment: str, config: dict[str, Any], results: list[dict[str, Any]],
          extra: dict[str, Any] | None = None, root: pathlib.Path | None = None,
          path: pathlib.Path | None = None) -> pathlib.Path:
  """Writes a record and returns its path. Rows must be flat (scalar values only).

  With `path` (a previous return value), rewrites that record: benchmarks write after every
  configuration, so a run cut short keeps what it measured under one name."""
  for i, row in enumerate(results):
    bad = {k: type(v).__name__ for k, v in row.items() if not isinstance(v, _SCALARS)}
    if bad:
      raise TypeError(f"results[{i}] is not flat: non-scalar values {bad}")
  record = {"experiment": experiment, **environment(), "config": config, "results": results}
  if extra:
    record.update(extra)
  if path is None:
    directory = (root or RESULTS_DIR) / experiment
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    path = directory / f"{stamp}.json"
  path = pathlib.Path(path)
  path.write_text(json.dumps(record, indent=1, default=str) + "\n")
  return path


def load(experiment: str | None = None, root: pathlib.Path | None = None) -> list[dict[str, Any]]:
  """All records (of one experiment, or all), oldest first, each with its `path`."""
  root = root or RESULTS_DIR
  pattern = f"{experiment}/*.json" if experiment else "*/*.json"
  records = []
  for path in sorted(root.glob(pattern)):
    record = json.loads(path.read_text())
    record["path"] = str(path.relative_to(root))
    records.append(record)
  return records


def load_rows(experiment: str, root: pathlib.Path | None = None) -> list[dict[str, Any]]:
  """Every result row of an experiment, each joined with its record's provenance and config."""
  rows = []
  for rec in load(experiment, root):
    meta = {k: rec[k] for k in ("path", "git_sha", "date", "device_kind", "num_devices", "config")}
    meta["concurrent_with"] = rec.get("concurrent_with", "")  # older records predate the field
    rows.extend({**meta, **row} for row in rec["results"])
  return rows
