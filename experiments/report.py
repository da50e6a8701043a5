"""Regenerates docs/results.md and docs/plots/ from the records in experiments/results/.

  python -m experiments.report

Every table row and plot point comes from a record file; each section names its records.
"""

from __future__ import annotations

import datetime
import pathlib
from typing import Any, Callable

from absl import app

from experiments import profiling, records

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
# Decode records before this measured the copy bandwidth low: their HBM floor is optimistic.
_FLOOR_FIXED = "2026-11-22T03:30"


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
  cols = ["tp", "matrix", "gemm", "form", "d_in", "d_out", "us_median", "gbps", "kernel", "path"]
  rows = [{**r, "gemm": r.get("gemm", "default")} for r in rows]  # older records: XLA's default

  def draw(ax):
    series = sorted({(r["path"], r["gemm"], r["form"]) for r in rows})
    labels = sorted({(r["tp"], r["matrix"]) for r in rows})
    width = 0.8 / len(series)
    for i, (path, gemm, form) in enumerate(series):
      vals = [next((r.get("gbps") or 0 for r in rows if (r["tp"], r["matrix"]) == l
                    and (r["path"], r["gemm"], r["form"]) == (path, gemm, form)), 0)
              for l in labels]
      ax.bar([j + width * i for j in range(len(labels))], vals, width=width,
             label=f"{gemm} {form} ({pathlib.Path(path).stem[:15]})")
    ax.set_xticks([j + 0.4 for j in range(len(labels))])
    ax.set_xticklabels([f"TP{t}\n{m}" for t, m in labels], fontsize=6)
    ax.set_ylabel("GB/s (weight bytes / time)")
    ax.set_title("Batch-1 matrix-vector products at per-rank LLaMA-2-7B shapes")
    ax.legend(fontsize=6)

  return ("## Batch-1 matmuls as XLA lowers them (experiments/bench_matvec.py)\n\n"
          "`dn`: weights stored (in, out); `nd`: stored (out, in), the package's layout;"
          " `nd_rows2`: the activation presented as two rows; `gemm`: XLA's default (autotuned"
          " Triton GEMM fusions) or cuBLAS (`--xla_gpu_enable_triton_gemm=false`). `kernel`"
          " lists what XLA emitted for one product compiled alone.\n\n" + _plot("matvec", draw)
          + "\n\n" + table(rows, cols))


def _decode_section(rows):
  cols = ["model", "tp", "batch", "backend", "matmul", "loop", "command_buffers", "xla_collectives",
          "gemm", "tpot_ms_median",
          "tpot_ms_p90", "tpot_ms_p99", "tokens_per_s", "weight_gbps_per_device",
          "hbm_copy_gbps", "floor_fraction", "gpu_all_reduce_us", "all_reduce_share_of_tpot",
          "outside_compute_share",
          "cupti_total_us", "gpu_busy_fraction", "loop_in_one_graph",
          "concurrent_with", "git_sha", "path"]
  rows = sorted(rows, key=lambda r: (r["model"], r["tp"], r["loop"], r["command_buffers"],
                                     r["xla_collectives"], r["backend"]))

  def draw(ax):
    # The newest measurement of each configuration (the table keeps every record).
    setting = lambda r: (r["model"], r["batch"], r["tp"], r["backend"], r["matmul"],
                         r["command_buffers"], r["xla_collectives"], r["gemm"])
    newest = {}
    for r in sorted((r for r in rows if r["loop"] == "jit" and r["model"] == "llama2-7b"
                     and r["batch"] == 1), key=lambda r: r["date"]):
      newest[setting(r)] = r
    jit = sorted(newest.values(), key=lambda r: (r["tp"], -r["tpot_ms_median"]))
    labels = [f"TP{r['tp']} {r['backend']}{'+gemv' if r['matmul'] == 'pallas' else ''}\n"
              f"cb={r['command_buffers']} psum={r['xla_collectives']}" for r in jit]
    ax.bar(range(len(jit)), [r["tpot_ms_median"] for r in jit], label="TPOT median (jit loop)")
    ax.plot(range(len(jit)), [r["hbm_floor_ms"] for r in jit], "k_", markersize=20,
            label="HBM floor (measured copy bandwidth)")
    ax.set_xticks(range(len(jit)))
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("ms per output token")
    ax.set_title("LLaMA-2-7B shape, bf16, batch 1, jit loop: newest record per setting")
    ax.legend()

  return ("## Decode latency (experiments/bench_decode.py)\n\n"
          "TPOT for the jit loop is the per-run mean over 255 steps (median over runs); for the"
          f" python loop, per step. Records dated before {_FLOOR_FIXED} measured the copy"
          " bandwidth low (2.3-2.7 TB/s: one synchronous op per call, then an in-graph loop"
          " that XLA gave extra traffic), so `floor_fraction` in those rows is optimistic by up"
          " to ~1.8x; later records time back-to-back asynchronous copies."
          " `loop_in_one_graph`: the jit loop's own thunk sequence in an XLA dump (runs with"
          " `--dump_dir`) holds the while loop inside a command buffer.\n\n"
          + _plot("decode_tpot", draw) + "\n\n" + table(rows, cols))


_STUDY = "decode study: Gemma2, 8xH100, TP=8; TTFT: arXiv 2604.23467"
def _stamp(r) -> float:
  return datetime.datetime.fromisoformat(r["date"]).timestamp()


def _setting(r) -> tuple:
  """What a decode comparison holds fixed: workload, TP degree and the matmuls."""
  return (r["model"], r["batch"], r["tp"], r["gemm"], r["matmul"])


def _is(backend, cb, coll="default"):
  """A decode-row predicate: all-reduce backend, command buffers and lax.psum's collectives."""
  return lambda r: (r["backend"] == backend and r["command_buffers"] == cb
                    and r["xla_collectives"] == coll)


def _pairs(jit, base, new):
  """{(model, batch, TP): (base row, new row, where)} for TP > 1, the best-matched pair of
  each: one record (one process) first, then one commit (one GPU session's code), then the
  most recent; `where` says when the two rows come from two processes."""
  best: dict[tuple, tuple] = {}
  for a in jit:
    if not base(a) or a["tp"] == 1:
      continue
    for b in jit:
      if new(b) and _setting(b) == _setting(a):
        rank = (a["path"] != b["path"], a["git_sha"] != b["git_sha"],
                -min(_stamp(a), _stamp(b)))
        k = _setting(a)[:3]
        if k not in best or rank < best[k][0]:
          best[k] = (rank, a, b)
  out = {}
  for k, (rank, a, b) in sorted(best.items()):
    where = ("" if not rank[0] else ", two processes" if not rank[1]
             else ", two processes of different commits")
    out[k] = (a, b, where)
  return out


def _newest(rows, key):
  """The newest row per key(row)."""
  out = {}
  for r in sorted(rows, key=lambda r: r["date"]):
    out[key(r)] = r
  return list(out.values())


def _claims_section(rows):
  """The study's claims next to ours: decode comparisons from the best-matched pair of jit
  rows per model, batch and TP; shares, TTFT and kernel ratios from the newest record."""
  jit = [r for r in rows if r["loop"] == "jit"]
  lines = [f"| claim ({_STUDY}) | study | ours | records |", "|---|---|---|---|"]

  def compare(claim, study, base, new, what):
    for (model, batch, tp), (a, b, where) in _pairs(jit, base, new).items():
      lines.append(f"| {claim} | {study} | {b['tpot_ms_median'] / a['tpot_ms_median'] - 1:+.1%}"
                   f" ({what}, {model}, batch {batch}, TP={tp}{where})"
                   f" | {a['path']}, {b['path']} |")

  shares = [r for r in jit if r["backend"] == "xla" and r["tp"] > 1
            and (r.get("outside_compute_share") is not None or r.get("all_reduce_share_of_tpot"))]
  for r in _newest(shares, lambda r: (r["model"], r["batch"], r["tp"], r["xla_collectives"],
                                      r["command_buffers"])):
    where = (f"{r['model']}, batch {r['batch']}, TP={r['tp']}, psum={r['xla_collectives']},"
             f" cb={r['command_buffers']}; {'CUPTI' if r.get('cupti_matmul_us') else 'trace'}")
    ours = (f"{r['outside_compute_share']:.1%} of the step outside compute kernels"
            if r.get("outside_compute_share") is not None else
            f"{r['all_reduce_share_of_tpot']:.1%} collective kernel time, waits included")
    lines.append(f"| all-reduce share of decode latency | ~23% | {ours} ({where}) | {r['path']} |")
  for cb in ("while", "default", "off"):
    compare("decode latency, fused vs standalone all-reduce", "-27%", _is("xla", cb),
            _is("fused", cb), f"vs psum default, cb={cb}")
  for cb in ("default", "off"):
    compare("decode latency, fused vs standalone all-reduce", "-27%", _is("xla", cb, "nccl"),
            _is("fused", cb), f"vs psum over NCCL, cb={cb}")
  for backend in ("xla", "fused"):
    compare("CUDA graphs (XLA's default command buffers) vs none", "-5%", _is(backend, "off"),
            _is(backend, "default"), backend)
    compare("whole loop as one CUDA graph vs default command buffers", "-5%",
            _is(backend, "default"), _is(backend, "while"), backend)
  ttft = [r for r in records.load_rows("ttft") if r["row"] == "policy"]
  hybrid = _newest([r for r in ttft if r["policy"] == "hybrid"],
                   lambda r: (r["model"], r["tp"], r["device_kind"], r["start"]))
  for r in hybrid:  # the prefill paper's claim: hybrid vs naive TTFT P99, one record
    naive = [n for n in ttft if n["path"] == r["path"] and n["policy"] == "naive"]
    if naive:
      lines.append(f"| TTFT P99, hybrid ({r['start']} start) vs naive jit per length |"
                   f" -66% (arXiv 2604.23467: against TensorRT-LLM, a different baseline) |"
                   f" {r['ttft_ms_p99'] / naive[0]['ttft_ms_p99'] - 1:+.1%} ({r['model']},"
                   f" TP={r['tp']}, {r['device_kind']}) | {r['path']} |")
  for r in _add_norm_goal_rows(records.load_rows("add_norm")):
    if r["base"] != "bare_one_shot":
      lines.append(f"| fused all-reduce + add + norm vs {r['base']} then add + norm, 1-16"
                   f" tokens, hidden {r['hiddens']}, TP={r['tp']} | ~3x (vs standalone"
                   f" all-reduce kernels) | {r['low']:.2f}-{r['high']:.2f}x faster | {r['path']} |")
  return ("## The study's claims and ours\n\n" + "\n".join(lines) + "\n\n"
          + _decode_goals(jit))


# Issue 5's kernel goals: baseline -> (text, ratio of the fused kernel's time, met?).
_ADD_NORM_GOALS = {
    "psum_nccl": ("fused >= 3x faster than psum_nccl + add + norm", "psum_nccl / fused",
                  lambda x: x >= 3.0),
    "psum_default": ("fused >= 1.5x faster than psum_default + add + norm",
                     "psum_default / fused", lambda x: x >= 1.5),
    "bare_one_shot": ("fused at most 1.2x our bare one_shot all-reduce", "fused / bare one_shot",
                      lambda x: x <= 1.2),
}


def _add_norm_goal_rows(rows):
  """Per TP and baseline of _ADD_NORM_GOALS, the newest add_norm record holding both: the
  `fused` kernel (the model's) against the baseline at 1-16 tokens, shape by shape."""
  out = []
  for tp in sorted({r["tp"] for r in rows}):
    at = {(r["path"], r["impl"], r["tokens"], r["hidden"]): r["loop_us"] for r in rows
          if r["tp"] == tp and r["tokens"] <= 16 and r["loop_us"] is not None}
    for base, (text, what, met) in _ADD_NORM_GOALS.items():
      per_path: dict[str, dict[int, list[float]]] = {}
      for (path, impl, tokens, hidden), us in at.items():
        if impl == "fused" and (path, base, tokens, hidden) in at:
          x = at[(path, base, tokens, hidden)] / us
          per_path.setdefault(path, {}).setdefault(hidden, []).append(
              1 / x if base == "bare_one_shot" else x)
      if per_path:
        path = max(per_path)  # record names are UTC timestamps: the newest
        ratios = [x for xs in per_path[path].values() for x in xs]
        out.append({"tp": tp, "base": base, "goal": text, "what": what, "path": path,
                    "low": min(ratios), "high": max(ratios),
                    "met": sum(map(met, ratios)), "shapes": len(ratios),
                    "hiddens": ", ".join(map(str, sorted(per_path[path])))})
  return out


def _decode_goals(jit):
  """Issue 5's goals for the LLaMA-2-7B shape at batch 1, from the best-matched pairs."""
  lines = ["### Issue 5's goals (H200)\n", "| goal | ours | met | records |", "|---|---|---|---|"]
  for r in _add_norm_goal_rows(records.load_rows("add_norm")):
    lines.append(f"| {r['goal']}, 1-16 tokens, TP={r['tp']} | {r['low']:.2f}-{r['high']:.2f}x"
                 f" ({r['what']}, hidden {r['hiddens']}) | {r['met']} of {r['shapes']}"
                 f" shapes | {r['path']} |")
  h200 = [r for r in jit if r["model"] == "llama2-7b" and r["batch"] == 1
          and r["device_kind"] == "NVIDIA H200" and r["gemm"] == "default" and r["matmul"] == "xla"]

  def goal(want, limit, base, new, what):
    for (_, _, tp), (a, b, where) in _pairs(h200, base, new).items():
      change = b["tpot_ms_median"] / a["tpot_ms_median"] - 1
      lines.append(f"| {want}, TP={tp} | {change:+.1%} ({what}{where}) |"
                   f" {'yes' if change <= limit else 'no'} | {a['path']}, {b['path']} |")

  for cb in ("off", "default"):
    goal("fused >= 27% below xla over NCCL", -0.27, _is("xla", cb, "nccl"), _is("fused", cb),
         f"cb={cb}")
  for cb in ("off", "default", "while"):
    goal("fused >= 15% below xla, default collectives", -0.15, _is("xla", cb), _is("fused", cb),
         f"cb={cb}")
  goal("whole loop as one graph >= 5% below default graphs", -0.05, _is("fused", "default"),
       _is("fused", "while"), "fused")
  for r in _newest([r for r in h200 if r["backend"] == "fused" and r["tp"] > 1
                    and r["date"] >= _FLOOR_FIXED],
                   lambda r: (r["tp"], r["command_buffers"])):
    x = r["tpot_ms_median"] / r["hbm_floor_ms"]
    lines.append(f"| TPOT within 1.3x of the HBM floor, TP={r['tp']} | {x:.2f}x"
                 f" (fused, cb={r['command_buffers']}) | {'yes' if x <= 1.3 else 'no'}"
                 f" | {r['path']} |")
  return "\n".join(lines)


def _by_record(rows):
  """{record path: its rows}, oldest record first."""
  out: dict[str, list[dict[str, Any]]] = {}
  for r in sorted(rows, key=lambda r: r["path"]):
    out.setdefault(r["path"], []).append(r)
  return out


def _record_tp_groups(rows):
  """(record path, TP degree, its rows, a heading naming machine and commit), record by
  record and TP by TP."""
  for path, recs in _by_record(rows).items():
    for tp in sorted({r["tp"] for r in recs}):
      mine = [r for r in recs if r["tp"] == tp]
      head = mine[0]
      beside = (f"; ran beside another process ({head['concurrent_with']})"
                if head["concurrent_with"] else "")
      yield path, tp, mine, (f"### TP={tp}, {head['device_kind']} x{head['num_devices']}"
                             f" ({path}, {head['git_sha']}{beside})")


def _pivot(rows, key_cols, value="loop_us"):
  """One row per `key_cols` value, one column per implementation holding `value`."""
  impls = list(dict.fromkeys(r["impl"] for r in rows))
  out: dict[tuple, dict[str, Any]] = {}
  for r in rows:
    row = out.setdefault(tuple(r[c] for c in key_cols), {c: r[c] for c in key_cols})
    row[r["impl"]] = r[value] if r[value] is not None else "fails"
  return [out[k] for k in sorted(out)], impls


def _ratio(a, b):
  return a / b if isinstance(a, float) and isinstance(b, float) else None


def _allreduce_section(rows):
  parts = ["## All-reduce latency (experiments/bench_allreduce.py)\n\n"
           "µs per all-reduce in the decode-shaped loop (`loop_us`: 16 chained all-reduces per"
           " iteration, compiled with `+WHILE` command buffers; whether XLA made each loop one"
           " graph: docs/allreduce.md; NCCL: default command buffers, see the benchmark's"
           " docstring). `fails`: XLA could not run that configuration (the record holds the"
           " error). Per record, with issue 4's goals where the record ran `auto` beside psum:"]
  for path, tp, mine, heading in _record_tp_groups(rows):
    pivot, impls = _pivot(mine, ["bytes"])
    auto = {r["bytes"]: r["method"] for r in mine if r["impl"] == "auto"}
    for row in pivot:
      row["auto picks"] = auto.get(row["bytes"])
      best_xla = [row.get(k) for k in ("psum_default", "psum_nccl", "psum_xla_one_shot")]
      best_xla = min([v for v in best_xla if isinstance(v, float)], default=None)
      ours = row.get("auto", row.get("one_shot"))
      row["ours / fastest psum"] = _ratio(ours, best_xla)
      row["ours / psum_default"] = _ratio(ours, row.get("psum_default"))
      row["ours / psum_nccl"] = _ratio(ours, row.get("psum_nccl"))
    stem = pathlib.Path(path).stem

    def draw(ax, mine=mine, impls=impls, tp=tp):
      for impl in impls:
        pts = sorted((r["bytes"], r["loop_us"]) for r in mine
                     if r["impl"] == impl and r["loop_us"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"TP{tp} {impl}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("message bytes per rank (bf16)")
      ax.set_ylabel("µs per all-reduce (decode-shaped loop)")
      ax.legend(fontsize=7)

    parts.append(heading + "\n\n" + _goals(pivot) + _plot(f"allreduce_{stem}_tp{tp}", draw)
                 + "\n\n" + table(pivot, ["bytes", *impls, "auto picks", "ours / fastest psum",
                                          "ours / psum_default", "ours / psum_nccl"]))
  return "\n\n".join(parts)


def _goals(pivot) -> str:
  """Issue 4's goals for one record's `auto` against psum in the same run ("" without both)."""
  rows = {r["bytes"]: r for r in pivot if isinstance(r.get("auto"), float)}
  small = [rows[b] for b in sorted(rows) if 8 << 10 <= b <= 256 << 10]
  if 8 << 10 not in rows or not all(isinstance(r.get("psum_default"), float)
                                    and isinstance(r.get("psum_nccl"), float) for r in small):
    return ""
  worst = max((r for r in rows.values() if r["ours / fastest psum"] is not None),
              key=lambda r: r["ours / fastest psum"])
  failed = sorted(r["bytes"] for r in pivot if r.get("auto") == "fails")
  lines = [
      f"- 8 KB per op: {rows[8 << 10]['auto']:.2f} µs (goal <= 6 µs)",
      f"- 8-256 KB, auto / psum_default: {min(r['ours / psum_default'] for r in small):.2f}-"
      f"{max(r['ours / psum_default'] for r in small):.2f}x (goal <= 0.8x)",
      f"- 8-256 KB, auto / psum_nccl: {min(r['ours / psum_nccl'] for r in small):.2f}-"
      f"{max(r['ours / psum_nccl'] for r in small):.2f}x (goal <= 0.4x)",
      f"- auto / faster psum, worst size where both ran: {worst['ours / fastest psum']:.3f}x"
      f" at {worst['bytes']} bytes (goal <= 1.05x)"]
  if failed:
    lines.append(f"- auto could not run (XLA error) at {', '.join(map(str, failed))} bytes")
  return "\n".join(lines) + "\n\n"


def _ttft_section(rows):
  intro = ("## Prefill time to first token (experiments/bench_ttft.py)\n\n"
           "Batch-1 requests one after another, prompt lengths half uniform in 10..500 and half"
           " the grid 10, 50, ..., 500; each policy in a fresh process that serves from the moment"
           " the weights are loaded, so compilation shows up in TTFT. `naive` compiles each exact"
           " length when first seen, `pad_max` one executable at the cache length, `buckets` each"
           " bucket on first use, `hybrid` every bucket in the background with JAX's persistent"
           " cache (cold: empty cache directory; warm: a second process from it)."
           " `first_ttft_ms` is the first request's TTFT; `ready_all_s` the time until every"
           " bucket was compiled; `fallbacks` requests served in a larger ready bucket;"
           " `blocked_on_compile` requests that waited for (or did) a compilation;"
           " `padding_frac` the mean padding per request, relative to its prompt length;"
           " `exec_temp_mib` XLA's temp memory summed over executables (their code size reads 0"
           " on XLA:CPU); `steady_*` a second pass over the same requests once every executable"
           " they need is ready (records before 2026-11-22T09:00: the requests that arrived"
           " after every executable was ready).")
  paths = sorted({r["path"] for r in rows})
  return "\n\n".join([intro] + [_ttft_record([r for r in rows if r["path"] == p]) for p in paths])


def _ttft_record(rows: list[dict[str, Any]]) -> str:
  """Tables and plots of one bench_ttft record (its rows)."""
  of = lambda kind: [r for r in rows if r["row"] == kind]
  run = lambda r: f"hybrid ({r['start']})" if r["policy"] == "hybrid" else r["policy"]
  policies = [{**r, "run": run(r), "exec_temp_mib": r["exec_temp_bytes"] / 2**20}
              for r in of("policy")]
  runs = [p["run"] for p in policies]
  ttft = {name: [(r["length"], r["ttft_ms"]) for r in of("request") if run(r) == name]
          for name in runs}
  head = policies[0]
  path, stem = head["path"], pathlib.Path(head["path"]).stem
  title = f"{head['model']}, {head['device_kind']}"

  def scatter(ax):
    for name, pts in ttft.items():
      ax.scatter([n for n, _ in pts], [t for _, t in pts], s=8, alpha=0.6, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"{title}: TTFT per request")
    ax.legend(fontsize=7)

  def cdf(ax):
    for name, pts in ttft.items():
      times = sorted(t for _, t in pts)
      ax.plot(times, [(i + 1) / len(times) for i in range(len(times))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{title}: TTFT CDF")
    ax.legend(fontsize=7)

  bins: dict[int, dict[str, Any]] = {}
  ratio_cols = []
  for b in of("bin"):
    row = bins.setdefault(b["len_hi"], {"prompt tokens": b["bin"]})
    row[run(b)] = f"{b['ttft_ms_median']:.0f} / {b['ttft_ms_p99']:.0f}"
    for field, label in (("steady_vs_exact", "steady / exact"),
                         ("steady_p99_over_p50", "steady P99 / P50")):
      if b["policy"] == "hybrid" and b.get(field) is not None:
        col = f"{run(b)} {label}"
        row[col] = b[field]
        ratio_cols += [col] if col not in ratio_cols else []
  execs = []
  for name in runs:
    mine = [r for r in of("executable") if run(r) == name]
    means = {k: [r[k] for r in mine if r[k] is not None]
             for k in ("lower_s", "compile_s", "first_run_s")}
    execs.append({"policy": name, "executables": len(mine),
                  "from_store": sum(r.get("source") == "store" for r in mine),
                  **{k: sum(v) / len(v) if v else None for k, v in means.items()}})
  # Buckets ran with XLA's command buffers unless the config says otherwise (the default
  # before session 6); XLA:CPU has none.
  graphs = "" if head["device_kind"] == "cpu" else (
      ", buckets with CUDA graphs" if head["config"].get("bucket_graphs", True)
      else ", buckets without CUDA graphs")
  out = (f"### {title} x{head['num_devices']}, TP{head['tp']}{graphs} ({path},"
         f" {head['git_sha']})\n\n"
         + table(policies, ["run", "requests", "ttft_ms_median", "ttft_ms_p90", "ttft_ms_p99",
                            "first_ttft_ms", "ready_all_s", "executables", "exec_temp_mib",
                            "compile_s_total", "fallbacks", "blocked_on_compile",
                            "padding_frac", "serve_s", "steady_requests",
                            "steady_ttft_ms_median", "steady_ttft_ms_p99",
                            "steady_p99_over_p50"])
         + "\n\nTTFT median / P99 (ms) per prompt-length bin (arrival pass); `steady / exact`:"
           " hybrid's steady median TTFT over exact-length prefill at the same lengths (naive's"
           " steady pass, interpolated; without naive, the bucket profile); `steady P99 / P50`:"
           " its tail within the bin:\n\n"
         + table([bins[k] for k in sorted(bins)], ["prompt tokens"] + runs + ratio_cols)
         + "\n\n"
         + _plot(f"ttft_{stem}_length", scatter) + "\n\n" + _plot(f"ttft_{stem}_cdf", cdf)
         + "\n\nMean seconds per executable: lowering, XLA compilation (or persistent-cache"
           " load, or loading the whole executable from the store: `from_store`), and the"
           " background warm-up's first run:\n\n"
         + table(execs, ["policy", "executables", "from_store", "lower_s", "compile_s",
                         "first_run_s"]))
  if of("bucket_profile"):
    out += ("\n\nBucket choice: every candidate length compiled and timed alone (`run_ms`: median"
            " of three runs after the first; `after_switch_ms` / `after_largest_ms`: the same"
            " right after a run of the next smaller / the largest bucket), then bucket sets scored on this workload as if all"
            " their buckets were compiled (`vs_exact`: expected prefill time over exact-length"
            " prefill; `_short`: prompts of at most 100 tokens; `build_s_total`: lowering,"
            " compilation and first run of all its buckets).\n\n"
            + table(of("bucket_profile"), ["length", "lower_s", "compile_s", "first_run_s",
                                            "run_ms", "after_switch_ms", "after_largest_ms",
                                            "temp_bytes"]) + "\n\n"
            + table(of("bucket_set"), ["set", "count", "expected_prefill_ms", "vs_exact",
                                        "expected_prefill_ms_short", "vs_exact_short",
                                        "build_s_total", "buckets"]))
  return out


def _add_norm_section(rows):
  bare = {(r["tp"], r["bytes"]): r for r in records.load_rows("allreduce")
          if r["impl"] == "one_shot" and r["loop_us"] is not None}
  parts = ["## All-reduce + residual add + RMSNorm (experiments/bench_allreduce.py --op add_norm)"
           "\n\nµs per all-reduce + add + RMSNorm in the decode-shaped loop: `psum_*` and"
           " `one_shot` all-reduce, then add and norm in XLA; `fused*` one kernel (flags or LL"
           " protocol, `[bN]`: grid capped at N blocks); ratios use the fastest of them. Goals"
           " (issue):"
           " fused >= 3x faster than psum_nccl and >= 1.5x than psum_default at 1-16 tokens,"
           " and at most 1.2x our bare one-shot all-reduce of the same bytes (`bare_one_shot`, in"
           " the same run; in records without it, the newest all-reduce record's, another"
           " process)."]
  for path, tp, mine, heading in _record_tp_groups(rows):
    pivot, impls = _pivot(mine, ["hidden", "tokens"])
    for row in pivot:  # the fastest single-kernel variant (protocol, grid cap) of this shape
      kernels = {k: v for k, v in row.items()
                 if k.startswith("fused") and isinstance(v, float)}
      row["best fused"] = min(kernels, key=kernels.get) if kernels else None
      fused = kernels.get(row["best fused"])
      row["psum_nccl / fused"] = _ratio(row.get("psum_nccl"), fused)
      row["psum_default / fused"] = _ratio(row.get("psum_default"), fused)
      one = bare.get((tp, row["hidden"] * row["tokens"] * 2))  # another process
      row["fused / bare one_shot"] = _ratio(fused, row.get("bare_one_shot")
                                            or (one and one["loop_us"]))

    def draw(ax, mine=mine, tp=tp):
      for impl, hidden in sorted({(r["impl"], r["hidden"]) for r in mine}):
        pts = sorted((r["tokens"], r["loop_us"]) for r in mine
                     if (r["impl"], r["hidden"]) == (impl, hidden) and r["loop_us"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label=f"TP{tp} {impl} h={hidden}")
      ax.set_xscale("log", base=2)
      ax.set_xlabel("tokens")
      ax.set_ylabel("µs per all-reduce + add + RMSNorm")
      ax.legend(fontsize=6, ncol=2)

    parts.append(heading + "\n\n"
                 + _plot(f"add_norm_{pathlib.Path(path).stem}_tp{tp}", draw) + "\n\n"
                 + table(pivot, ["hidden", "tokens", *impls, "best fused", "psum_nccl / fused",
                                 "psum_default / fused", "fused / bare one_shot"]))
  return "\n\n".join(parts)


def _decode_sections(rows):
  rows = [{"gemm": "default", "matmul": "xla", **r} for r in rows]  # older records' settings
  for r in rows:  # derived from the stored kernel times, so older records get it too
    r["outside_compute_share"] = profiling.outside_compute_share(r)
  return _claims_section(rows) + "\n\n" + _decode_section(rows)


# experiment name -> section writers(rows) -> markdown. Benchmarks add theirs here.
SECTIONS: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "generate": _generate_section,
    "decode": _decode_sections,
    "allreduce": _allreduce_section,
    "add_norm": _add_norm_section,
    "matvec": _matvec_section,
    "ttft": _ttft_section,
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
