"""All-reduce latency: XLA's psum (three ways) against the peer-write kernels.

  python -m experiments.bench_allreduce --tp 2                 # all-reduce by message size
  python -m experiments.bench_allreduce --tp 2 --op add_norm   # all-reduce + add + RMSNorm

`--op add_norm` measures the model's `reduce_add_norm` backends (models/collectives.py) at
(tokens, hidden) decode shapes: `xla` (psum, then add and norm in XLA) in each psum
flavour, `one_shot` (kernel, then add and norm in XLA) and `fused` (one kernel).

XLA flags are per process, so this binary runs one child process per psum flavour
(default collective kernels, NCCL, XLA's one-shot flag) and one for the Pallas kernels
(one_shot, two_shot, auto), and merges their rows into one record.

Measures, per implementation and bf16 message size (bytes per rank):
- `loop_us`: the decode-shaped measure. A `fori_loop` whose body chains 16 all-reduces
  (each result rescaled by 1/n so that values stay finite; the same for every
  implementation), compiled with `+WHILE` command buffers (whether XLA makes it one graph:
  docs/allreduce.md); host time of the whole executable / (iterations x 16), idle gaps
  included. NCCL cannot run inside a graph's WHILE node (instantiation fails, seen on
  2xH200), so `psum_nccl` runs the same loop with XLA's default command buffers: a
  host-driven loop, as NCCL runs in decode.
- `loop_device_us`: the same loop timed on the GPU: `%globaltimer` stamps in the data flow
  before the first op and after the last (experiments/device_clock.py), slowest GPU, median
  over the runs; no host launch or synchronization inside.
- `single_us`: one all-reduce per jitted call, end to end on the host.
- `kernel_us`: GPU time of the all-reduce kernels per op (CUPTI over one loop execution,
  so the ranks run in lockstep; a kernel that waits for its peer counts the wait).

A size or implementation that fails (an XLA error, e.g. a graph that cannot be
instantiated) is recorded with its `error` and the sweep goes on.
"""

from __future__ import annotations

import functools
import json
import os
import time

from absl import app, flags

from experiments import records, thresholds, xla_env

_TP = flags.DEFINE_integer("tp", 2, "Ranks (first tp local GPUs).")
_MIN = flags.DEFINE_integer("min_bytes", 4 << 10, "Smallest message per rank.")
_MAX = flags.DEFINE_integer("max_bytes", 64 << 20, "Largest message per rank.")
_ITERS = flags.DEFINE_integer("iters", 50, "Loop iterations (x16 all-reduces each).")
_RUNS = flags.DEFINE_integer("runs", 10, "Timed executions per measure (median).")
_CHILD = flags.DEFINE_string("child", None, "Internal: run one flavour and write rows to a file.")
_OUT = flags.DEFINE_string("child_out", None, "Internal: where a child writes its rows.")
_OP = flags.DEFINE_enum("op", "all_reduce", ["all_reduce", "add_norm"], "What to measure.")
_TOKENS = flags.DEFINE_list("tokens", ["1", "4", "16", "64", "128"], "add_norm: token counts.")
_HIDDEN = flags.DEFINE_list("hidden", ["4096", "5120", "8192"], "add_norm: hidden sizes.")
_STEP = flags.DEFINE_integer("size_step", 2, "Factor between consecutive message sizes.")
_FROM = flags.DEFINE_list("thresholds_from", None, "all_reduce records of this TP degree (a"
                          " sweep, a tiling sweep): auto uses the thresholds derived from"
                          " their rows (experiments/thresholds.py).")
_CUPTI = flags.DEFINE_bool("cupti", True, "Measure kernel times with CUPTI.")
_FLAVOURS = flags.DEFINE_list("flavours", None, "Subset of the child flavours (default: all).")
_IMPLS = flags.DEFINE_list("impls", None, "pallas flavour: subset of its implementations.")
_DUMP = flags.DEFINE_string("dump_dir", None, "XLA dump per child under this directory; the"
                            " record gets each child's loop thunk sequence excerpts.")
_FUSED_BLOCKS = flags.DEFINE_list("fused_blocks", ["32"], "add_norm: grid caps `blocks[:poll]`"
                                  " for the fused kernels to sweep (poll: common.POLLS); the"
                                  " first is the kernel's default.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", None, "Stop this many seconds after the start"
                                 " and record what was measured (set it inside an outer timeout).")
_CONFIGS = flags.DEFINE_list("configs", ["2:16"], "pallas flavour, all_reduce: kernel tilings"
                             " `vectors:max_blocks[:poll]` (common.Config) to sweep; the first"
                             " is also used by auto.")

CHAIN = 16
MEASURES = ("loop_us", "loop_device_us", "clock_error", "single_us", "error",
            "workspace_copies", "kernel_us", "other_kernel_us", "max_rel_err", "ranks_equal")
FUSED = {"fused": "flags", "fused_ll": "ll"}  # add_norm impl -> fused_add_norm protocol
BARE = {"bare_one_shot": "one_shot"}  # add_norm impl -> the all-reduce alone, no add or norm
KERNELS = ("one_shot", "one_shot_ll", "two_shot")  # the pallas methods that take a tiling
FLAVOURS = {  # child -> (XLA collectives mode, command buffers, implementations per op)
    "psum_default": ("default", "while", {"all_reduce": ["xla"], "add_norm": ["xla"]}),
    "psum_nccl": ("nccl", "default", {"all_reduce": ["xla"], "add_norm": ["xla"]}),
    "psum_xla_one_shot": ("one_shot", "while", {"all_reduce": ["xla"], "add_norm": ["xla"]}),
    "pallas": ("default", "while", {"all_reduce": ["one_shot", "one_shot_ll", "two_shot", "auto"],
                                    "add_norm": ["one_shot", "one_shot_ll", "fused",
                                                 "fused_ll", *BARE]}),
}


def _sizes():
  size, out = _MIN.value, []
  while size <= _MAX.value:
    out.append(size)
    size *= _STEP.value
  return out


def _apply_thresholds():
  """Sets all_reduce.THRESHOLDS[tp] from --thresholds_from; returns what auto uses."""
  from pallas_kernels import all_reduce
  if _FROM.value:
    rows = [row for path in _FROM.value for row in json.load(open(path))["results"]]
    all_reduce.THRESHOLDS[_TP.value] = thresholds.derive(rows, _TP.value)
  return {"thresholds_from": _FROM.value,
          "thresholds": {str(k): [_range_json(*r) for r in v]
                         for k, v in all_reduce.THRESHOLDS.items()}}


def _range_json(method, config, largest):
  return {"method": method, "largest_bytes": largest,
          **({"vectors": config.vectors, "max_blocks": config.max_blocks, "poll": config.poll,
              "transport": config.transport} if config else {})}


def _auto_label(method, config) -> str:
  """auto's choice as a row label: `one_shot[v8,b32]`, or `xla`."""
  return method + (_tiling(config) if config else "")


def _tiling(config) -> str:
  """A tiling as a row label suffix: `[v8,b32]`, `[v8,b32,serial,tma]` for the serial flag
  poll and bulk copies (thresholds.derive reads the name before it)."""
  return f"[v{config.vectors},b{config.max_blocks}{_options(config)}]"


def _options(config) -> str:
  """Label suffix of the non-default flag poll and transport."""
  return (("" if config.poll == "parallel" else f",{config.poll}")
          + ("" if config.transport == "registers" else f",{config.transport}"))


def _config(text: str, fused: bool = False):
  """common.Config from `vectors:max_blocks[:poll][:transport]` (`max_blocks[:poll]` if
  fused); poll and transport are named by value, e.g. `8:32:tma` or `2:16:serial`."""
  from pallas_kernels import common
  fields = text.split(":")
  sizes = [int(f) for f in fields[:1 if fused else 2]]
  named = {("poll" if f in common.POLLS else "transport"): f for f in fields[len(sizes):]}
  return common.Config(*([2] if fused else []), *sizes, **named)


def _shape(nbytes: int) -> tuple[int, int]:
  """A (tokens, hidden) bf16 message of `nbytes`: the smallest hidden of 4096, 8192, 16384
  that keeps it within the kernels' token limit, else one row (small) or hidden 16384."""
  from pallas_kernels.all_reduce import MAX_TOKENS
  elems = nbytes // 2
  for hidden in (4096, 8192, 16384):
    if elems >= hidden and elems % hidden == 0 and elems // hidden <= MAX_TOKENS:
      return elems // hidden, hidden
  return (1, elems) if elems < 4096 else (elems // 16384, 16384)


def _stamp_first(carry):
  """A device timestamp (experiments/device_clock.py) in the data flow of carry's first leaf."""
  import jax
  from experiments import device_clock
  leaves, tree = jax.tree.flatten(carry)
  leaves[0], t = device_clock.stamp(leaves[0])
  return jax.tree.unflatten(tree, leaves), t


def _cases(n):
  """(tokens, hidden, bytes) of every message this op measures."""
  if _OP.value == "add_norm":
    return [(int(t), int(h), int(t) * int(h) * 2) for h in _HIDDEN.value for t in _TOKENS.value]
  return [(*_shape(b), b) for b in _sizes()]


def _check(y, x, n: int) -> dict:
  """An all-reduce op's output (rescaled by 1/n) against the f32 sum of its input: the
  largest error relative to the sum's magnitude, and whether every rank holds the same."""
  import numpy as np

  got = np.asarray(y, np.float32).reshape(n, -1) * n
  want = np.asarray(x, np.float32).reshape(n, -1).sum(0)
  return {"max_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
          "ranks_equal": bool((got == got[:1]).all())}


def _rescaled_all_reduce(y, ws, method: str, cfg, n: int):
  """The all-reduce op: rescaled by 1/n so that a chain of sums stays finite."""
  from pallas_kernels import all_reduce
  y, ws = all_reduce.all_reduce(y, ws, "tp", method, cfg if method in KERNELS else None)
  return (y * (1.0 / n)).astype(y.dtype), ws


def _add_norm_op(impl: str, cfg, weight, n: int):
  """One step on the carry (partial, residual): a fused kernel, an all-reduce then XLA's add
  and norm, or (BARE) the all-reduce alone, the fused kernel's yardstick."""
  from models.collectives import BACKENDS, fused_backend

  if impl in BARE:
    def bare(carry, ws):
      x, r = carry
      y, ws = _rescaled_all_reduce(x[:, 0], ws, BARE[impl], cfg, n)
      return (y[:, None], r), ws
    return bare
  backend = fused_backend(FUSED[impl], cfg) if impl in FUSED else BACKENDS[impl]

  def op(carry, ws):
    x, r, ws = backend.reduce_add_norm(*carry, weight, 1e-5, "tp", ws)
    return (x, r), ws
  return op


def run_child(flavour: str, out_path: str):
  collectives, command_buffers, impls_by_op = FLAVOURS[flavour]
  xla_env.apply(command_buffers, collectives,
                dump_dir=os.path.join(_DUMP.value, flavour) if _DUMP.value else None)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from jax.sharding import PartitionSpec as P

  from experiments import cupti, device_clock
  from models.collectives import workspace_capacity
  from models.sharding import make_mesh
  from pallas_kernels import all_reduce, lowering_checks, workspace

  n = _TP.value
  _apply_thresholds()
  mesh = make_mesh(n)
  spec = workspace.spec("tp")
  configs = [_config(c) for c in _CONFIGS.value]
  impls = [i for i in impls_by_op[_OP.value]
           if flavour != "pallas" or not _IMPLS.value or i in _IMPLS.value]
  fused_configs = [_config(b, fused=True) for b in _FUSED_BLOCKS.value]
  variants = [(impl, cfg) for impl in impls
              for cfg in (configs if impl in KERNELS and _OP.value == "all_reduce" else
                          fused_configs if impl in FUSED else configs[:1])
              if impl in all_reduce.TRANSPORT_METHODS or cfg.transport == "registers"]
  log = xla_env.ChildLog(out_path)
  for tokens, hidden, nbytes in _cases(n):
    for impl, cfg in variants:
      kernel_ok = tokens <= all_reduce.MAX_TOKENS and hidden <= all_reduce.MAX_HIDDEN
      if (impl in KERNELS or impl in BARE) and not kernel_ok:
        continue
      tag = (("" if cfg == fused_configs[0] else f"[b{cfg.max_blocks}{_options(cfg)}]")
             if impl in FUSED else "" if cfg == configs[0] else _tiling(cfg))
      case = {"op": _OP.value, "flavour": flavour,
              "impl": (impl if impl != "xla" else flavour) + tag, "tp": n, "bytes": nbytes,
              "vectors": cfg.vectors, "max_blocks": cfg.max_blocks,
              "poll": cfg.poll if impl in (*KERNELS, *FUSED) else None,
              "transport": cfg.transport if impl in KERNELS else None,
              "tokens": tokens, "hidden": hidden,
              "method": (impl if impl != "auto" else
                         _auto_label(*all_reduce.select(nbytes, n)) if kernel_ok else "xla"),
              "command_buffers": command_buffers, "kernel_measure": "loop"}
      if log.done(case):
        continue
      log.start({**case, **dict.fromkeys(MEASURES)})
      example = jax.ShapeDtypeStruct((tokens if kernel_ok else 1, 1, hidden), jnp.bfloat16)
      capacity = max(workspace_capacity(example, n), all_reduce.workspace_capacity(
          tokens, hidden, jnp.bfloat16, n, cfg) if kernel_ok else 0)  # cfg may tile coarser
      fresh_ws = lambda: workspace.init(mesh, "tp", capacity, jnp.bfloat16)

      w = jnp.ones((hidden,), jnp.bfloat16)

      if _OP.value == "add_norm":  # carry (partial, residual): the normed output feeds on
        op = _add_norm_op(impl, cfg, w, n)
        carry = (jax.random.normal(jax.random.key(nbytes), (n * tokens, 1, hidden), jnp.bfloat16),
                 jax.random.normal(jax.random.key(1), (n * tokens, 1, hidden), jnp.bfloat16))
      else:
        op = functools.partial(_rescaled_all_reduce, method=impl, cfg=cfg, n=n)
        carry = jax.random.normal(jax.random.key(nbytes), (n * tokens, hidden), jnp.bfloat16)

      def chain(carry, ws, stamped=True):
        """The decode-shaped loop; stamped: device timestamps around it (device_clock)."""
        def body(_, c):
          for _ in range(CHAIN):
            c = op(*c)
          return c
        if stamped:
          carry, t0 = _stamp_first(carry)
        carry, ws = lax.fori_loop(0, _ITERS.value, body, (carry, ws))
        if not stamped:
          return carry, ws
        carry, t1 = _stamp_first(carry)
        return carry, ws, jnp.stack([t0, t1])

      def build(fn, stamped=False):
        cspec = jax.tree.map(lambda _: P("tp"), carry)
        return workspace.sharded_jit(fn, mesh, (cspec, spec),
                                     (cspec, spec, *([P("tp")] if stamped else [])),
                                     donate_argnums=1)

      loop, single = build(chain, stamped=True), build(op)
      state = {"ws": fresh_ws()}

      def call(fn):
        out = fn(carry, state["ws"])
        state["ws"] = out[1]
        jax.block_until_ready(out[0])
        return out

      def measure(fn, runs, device=None):
        """(median host s, None) or (None, error): a failure costs one row. `device`
        collects the slowest GPU's stamped seconds per run."""
        try:
          call(fn)  # compile and warm up
          samples = []
          for _ in range(runs):
            t = time.perf_counter()
            out = call(fn)
            samples.append(time.perf_counter() - t)
            if device is not None:
              stamps = np.asarray(out[2]).reshape(n, 2, 2)  # rank, (start, end), words
              device.append(float(device_clock.elapsed_s(stamps[:, 0], stamps[:, 1]).max()))
          return float(np.median(samples)), None
        except jax.errors.JaxRuntimeError as e:
          state["ws"] = fresh_ws()  # the failed call may have consumed the donated one
          return None, str(e).splitlines()[0][:300]

      copies = None
      if impl != "xla" and jax.default_backend() == "gpu":
        # Workspace copies break the peer-write protocol (lowering_checks.workspace_copies).
        hlo = loop.lower(carry, state["ws"]).compile().as_text()
        copies = len(lowering_checks.workspace_copies(hlo, state["ws"]))
      device = [] if jax.default_backend() == "gpu" else None
      loop_s, loop_err = measure(loop, _RUNS.value, device)
      clock_err = None
      if loop_err:  # without the clock, in case the stamps are what failed
        clock_err, device = loop_err, None
        loop = build(lambda c, w: chain(c, w, stamped=False))
        loop_s, loop_err = measure(loop, _RUNS.value)
      one_s, one_err = measure(single, _RUNS.value * 3)
      check = _check(call(single)[0], carry, n) if _OP.value == "all_reduce" and not one_err else {}
      kernel_ms = (cupti.kernel_ms(lambda: call(loop)) if loop_s and _CUPTI.value
                   else None)  # summed over the GPUs and the loop's ops
      per_op = lambda seconds: seconds / (_ITERS.value * CHAIN) * 1e6
      log.add({**case, "loop_us": loop_s and per_op(loop_s),
               "loop_device_us": per_op(float(np.median(device))) if device else None,
               "clock_error": clock_err,
               "single_us": one_s and one_s * 1e6, "error": loop_err or one_err,
               "workspace_copies": copies, **check,
               **{name: (per_op(kernel_ms.get(k, 0.0) * 1e-3 / n) if kernel_ms else None)
                  for name, k in (("kernel_us", "all_reduce"), ("other_kernel_us", "other"))}})
      print(json.dumps(log.rows[-1]), flush=True)


def main(argv):
  del argv
  if _CHILD.value:
    return run_child(_CHILD.value, _OUT.value)
  flavours = _FLAVOURS.value or list(FLAVOURS)
  if unknown := sorted(set(flavours) - set(FLAVOURS)):
    raise app.UsageError(f"unknown --flavours {unknown}; choose from {list(FLAVOURS)}")
  config = {"op": _OP.value, "tp": _TP.value, "dtype": "bfloat16", "chain": CHAIN,
            "iters": _ITERS.value,
            "runs": _RUNS.value, "cupti": _CUPTI.value,
            "loop_us": "elapsed of one executable / (iters x 16); each op rescaled by 1/n",
            "flavours": {k: FLAVOURS[k][:2] for k in flavours}, "configs": _CONFIGS.value,
            "impls": _IMPLS.value, "size_step": _STEP.value, **_apply_thresholds()}
  name = "allreduce" if _OP.value == "all_reduce" else "add_norm"
  rows, path = [], None
  deadline = time.monotonic() + _TIME_LIMIT.value if _TIME_LIMIT.value else None
  for done, flavour in enumerate(flavours, 1):  # the record after every child: a run cut
    rows += xla_env.run_children("experiments.bench_allreduce", [flavour],  # short keeps it
                                 deadline=deadline)
    cut = deadline is not None and time.monotonic() >= deadline
    extra = {"children_done": f"{done - cut} of {len(flavours)}"
                              + (f" ({flavour} cut at the time limit)" if cut else "")}
    if _DUMP.value:  # did the chained loop become one graph with a WHILE node?
      extra["thunk_evidence"] = {f: xla_env.thunk_evidence(os.path.join(_DUMP.value, f),
                                                           "jit_chain")
                                 for f in flavours[:done]}
    path = records.write(name, config, rows, extra=extra, path=path)
    if cut:
      break
  print(f"record: {path}")

if __name__ == "__main__":
  app.run(main)
