"""`auto`'s message-size thresholds (pallas_kernels/all_reduce.THRESHOLDS) from measured
all-reduce rows (experiments/bench_allreduce.py records)."""

from __future__ import annotations


def derive(rows: list[dict], tp: int) -> tuple[int, int]:
  """`auto`'s (one-shot, two-shot) limits from measured rows: one-shot up to the largest size
  at which it is the fastest of one_shot, two_shot and psum (XLA default kernels, what auto
  falls back to); two-shot from there up to the largest size at which it beats psum."""
  impls = ("one_shot", "two_shot", "psum_default")
  loop = {}
  for r in rows:
    if r["op"] == "all_reduce" and r["tp"] == tp and r["loop_us"] and r["impl"] in impls:
      loop.setdefault(r["bytes"], {})[r["impl"]] = r["loop_us"]
  sizes = sorted(b for b, v in loop.items() if len(v) == 3)
  if not sizes:
    raise ValueError(f"no size with one_shot, two_shot and psum_default rows at tp={tp}")
  one = max([b for b in sizes if loop[b]["one_shot"] <= min(loop[b].values())], default=0)
  two = max([b for b in sizes if b > one and loop[b]["two_shot"] <= loop[b]["psum_default"]],
            default=one)
  return one, two
