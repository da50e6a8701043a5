"""Regenerates docs/results.md and docs/plots/ from the records in experiments/results/.

  python -m experiments.report

Every table row and plot point comes from a record file; each section names its records.
"""

from __future__ import annotations

import pathlib
from typing import Any, Callable

from absl import app

from experiments import records

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return "" if v is None else str(v)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
  """A markdown table of `columns` (missing values blank)."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def _generate_section(rows):
  cols = ["device_kind", "num_devices", "model", "tp", "loop", "prompt_tokens", "output_tokens",
          "ttft_ms", "tpot_ms_median", "tokens_per_s", "weight_gbps_per_device", "git_sha", "path"]
  return ("## Greedy generation (experiments/generate.py)\n\n"
          "Time to first token, median time per output token and achieved weight-read bandwidth.\n\n"
          + table(rows, cols))


def _plot(name: str, draw: Callable[[Any], None]) -> str:
  """Draws into docs/plots/<name>.png with matplotlib (Agg); returns the markdown image link."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(8, 4.5))
  draw(ax)
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  (DOCS / "plots").mkdir(parents=True, exist_ok=True)
  fig.savefig(DOCS / "plots" / f"{name}.png", dpi=110)
  plt.close(fig)
  return f"![{name}](plots/{name}.png)"


def _matvec_section(rows):
  cols = ["tp", "matrix", "form", "d_in", "d_out", "us_median", "gbps", "kernel", "path"]

  def draw(ax):
    forms = sorted({r["form"] for r in rows})
    labels = sorted({(r["tp"], r["matrix"]) for r in rows})
    for i, form in enumerate(forms):
      vals = [next((r["gbps"] for r in rows if (r["tp"], r["matrix"], r["form"]) == (*l, form)), 0)
              for l in labels]
      ax.bar([j + 0.27 * i for j in range(len(labels))], vals, width=0.27, label=form)
    ax.set_xticks([j + 0.27 for j in range(len(labels))])
    ax.set_xticklabels([f"TP{t}\n{m}" for t, m in labels], fontsize=6)
    ax.set_ylabel("GB/s (weight bytes / time)")
    ax.set_title("Batch-1 matrix-vector products at per-rank LLaMA-2-7B shapes")
    ax.legend()

  return ("## Batch-1 matmuls as XLA lowers them (experiments/bench_matvec.py)\n\n"
          "`dn`: weights stored (in, out); `nd`: stored (out, in), the package's layout;"
          " `nd_rows2`: the activation presented as two rows. `kernel` lists what XLA emitted"
          " for one product compiled alone.\n\n" + _plot("matvec", draw) + "\n\n" + table(rows, cols))


def _decode_section(rows):
  cols = ["tp", "backend", "loop", "command_buffers", "xla_collectives", "tpot_ms_median",
          "tpot_ms_p90", "tpot_ms_p99", "tokens_per_s", "weight_gbps_per_device",
          "hbm_copy_gbps", "floor_fraction", "gpu_all_reduce_us", "all_reduce_share_of_tpot",
          "git_sha", "path"]
  rows = sorted(rows, key=lambda r: (r["model"], r["tp"], r["loop"], r["command_buffers"],
                                     r["xla_collectives"], r["backend"]))

  def draw(ax):
    jit = [r for r in rows if r["loop"] == "jit"]
    labels = [f"TP{r['tp']} {r['backend']}\ncb={r['command_buffers']} {r['xla_collectives']}"
              for r in jit]
    ax.bar(range(len(jit)), [r["tpot_ms_median"] for r in jit], label="TPOT median (jit loop)")
    ax.plot(range(len(jit)), [r["hbm_floor_ms"] for r in jit], "k_", markersize=20,
            label="HBM floor (measured copy bandwidth)")
    ax.set_xticks(range(len(jit)))
    ax.set_xticklabels(labels, fontsize=6, rotation=45, ha="right")
    ax.set_ylabel("ms per output token")
    ax.set_title("LLaMA-2-7B shape, bf16, batch 1: decode time per token")
    ax.legend()

  return ("## Decode latency (experiments/bench_decode.py)\n\n"
          "TPOT for the jit loop is the per-run mean over 255 steps (median over runs); for the"
          " python loop, per step. Records before 2026-11-22T00:22 measured the copy bandwidth"
          " with a single large elementwise op (launch and allocation included), which read"
          " low; `floor_fraction` of those rows is optimistic.\n\n"
          + _plot("decode_tpot", draw) + "\n\n" + table(rows, cols))


def _allreduce_section(rows):
  cols = ["tp", "impl", "method", "bytes", "loop_us", "single_us", "kernel_us", "git_sha", "path"]

  def draw(ax):
    for (tp, impl) in sorted({(r["tp"], r["impl"]) for r in rows}):
      pts = sorted((r["bytes"], r["loop_us"]) for r in rows if (r["tp"], r["impl"]) == (tp, impl))
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"TP{tp} {impl}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message bytes per rank (bf16)")
    ax.set_ylabel("µs per all-reduce (decode-shaped loop)")
    ax.legend(fontsize=7)

  return ("## All-reduce latency (experiments/bench_allreduce.py)\n\n"
          + _plot("allreduce", draw) + "\n\n" + table(rows, cols))


# experiment name -> section writer(rows) -> markdown. Benchmarks add theirs here.
SECTIONS: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "generate": _generate_section,
    "decode": _decode_section,
    "allreduce": _allreduce_section,
    "matvec": _matvec_section,
}


def render(root: pathlib.Path | None = None) -> str:
  parts = ["# Results\n\nGenerated by `python -m experiments.report` from experiments/results/;"
           " do not edit by hand. Paths are relative to experiments/results/."]
  for experiment, section in SECTIONS.items():
    rows = records.load_rows(experiment, root)
    if rows:
      parts.append(section(rows))
  return "\n\n".join(parts) + "\n"


def main(argv):
  del argv
  (DOCS / "plots").mkdir(parents=True, exist_ok=True)
  out = DOCS / "results.md"
  out.write_text(render())
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
