"""`auto`'s message-size ranges (pallas_kernels/all_reduce.THRESHOLDS) from measured
all-reduce rows (experiments/bench_allreduce.py records)."""

from __future__ import annotations

KERNELS = ("one_shot_ll", "one_shot", "two_shot")
FALLBACK = "psum_default"  # what auto runs beyond its ranges: psum with XLA's default kernels


def derive(rows: list[dict], tp: int) -> tuple[tuple[str, int], ...]:
  """At every size where psum and at least one kernel were measured, the fastest of them
  wins; consecutive sizes with one winner form a range ending at the largest of them, and
  ranges after the last kernel win are dropped (psum is the fallback)."""
  loop = {}
  for r in rows:
    if (r["op"] == "all_reduce" and r["tp"] == tp and r["loop_us"]
        and r["impl"] in (*KERNELS, FALLBACK)):
      loop.setdefault(r["bytes"], {})[r["impl"]] = r["loop_us"]
  sizes = sorted(b for b, v in loop.items() if FALLBACK in v and len(v) > 1)
  if not sizes:
    raise ValueError(f"no size with {FALLBACK} and a kernel measured at tp={tp}")
  ranges: list[tuple[str, int]] = []
  for size in sizes:
    best = min(loop[size], key=loop[size].get)
    method = "xla" if best == FALLBACK else best
    if ranges and ranges[-1][0] == method:
      ranges[-1] = (method, size)
    else:
      ranges.append((method, size))
  while ranges and ranges[-1][0] == "xla":
    ranges.pop()
  return tuple(ranges)
