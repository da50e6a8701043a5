"""`auto`'s message-size ranges (pallas_kernels/all_reduce.THRESHOLDS) from measured
all-reduce rows (experiments/bench_allreduce.py records: a sweep, and a tiling sweep)."""

from __future__ import annotations

import collections

from pallas_kernels.common import Config

KERNELS = ("one_shot_ll", "one_shot", "two_shot")
FALLBACK = "psum_default"  # what auto runs beyond its ranges: psum with XLA's default kernels


def derive(rows: list[dict], tp: int, keep_within: float = 0.05
           ) -> tuple[tuple[str, Config | None, int], ...]:
  """At every size where psum was tried and at least one kernel measured, the fastest
  (method, tiling) that ran wins (a candidate measured more than once: its mean), except
  that where a kernel wins, the previous size's winner stays if within `keep_within` of it
  (no range for noise); consecutive sizes with one winner form a range ending at the
  largest of them, and ranges after the last kernel win are dropped (psum is the
  fallback)."""
  samples = collections.defaultdict(lambda: collections.defaultdict(list))
  psum_tried = set()  # sizes where psum ran or failed (no psum in a WHILE graph from 8 MB)
  for r in rows:
    method = r["impl"].split("[")[0]
    if r["op"] != "all_reduce" or r["tp"] != tp or method not in (*KERNELS, FALLBACK):
      continue
    if method == FALLBACK:
      psum_tried.add(r["bytes"])
    if r["loop_us"]:
      # Rows from before the `poll` field ran the serial flag poll: auto uses what was measured.
      cfg = (Config(r.get("vectors", 2), r.get("max_blocks", 16), r.get("poll") or "serial",
                    r.get("transport") or "registers") if method in KERNELS else None)
      samples[r["bytes"]][("xla" if method == FALLBACK else method, cfg)].append(r["loop_us"])
  sizes = sorted(b for b, v in samples.items()
                 if b in psum_tried and any(m != "xla" for m, _ in v))
  if not sizes:
    raise ValueError(f"no size with {FALLBACK} tried and a kernel measured at tp={tp}")
  ranges: list[tuple[str, Config | None, int]] = []
  for size in sizes:
    mean = {k: sum(v) / len(v) for k, v in samples[size].items()}
    method, cfg = min(mean, key=mean.get)
    if method != "xla" and ranges and ranges[-1][:2] in mean and (
        mean[ranges[-1][:2]] <= (1 + keep_within) * mean[method, cfg]):
      method, cfg = ranges[-1][:2]
    if ranges and ranges[-1][:2] == (method, cfg):
      ranges[-1] = (method, cfg, size)
    else:
      ranges.append((method, cfg, size))
  while ranges and ranges[-1][0] == "xla":
    ranges.pop()
  return tuple(ranges)
