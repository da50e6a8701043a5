"""Sharded prefill, decode step and generation loops for a `Llama` on a `tp` mesh.

Everything runs inside one `shard_map` per executable, so each rank executes the
per-rank program of models/llama.py with explicit collectives. Two generation loops:

- `jit`: the whole generation (prefill excluded) in one executable, a `lax.while_loop`
  that stops at EOS or the token budget. XLA can lower it into one command buffer with a
  device-side WHILE node (`--xla_gpu_enable_command_buffer=+WHILE`), so per-executable host
  costs are paid once per generation instead of once per token.
- `python`: a Python loop over one jitted, cache-donating decode step. Each step's tokens
  feed the next on the device and reach the host one step behind (the EOS check lags one
  step), so the host's work for step i+1 overlaps the GPU's for step i, as in a server.

Both produce the same greedy tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models import sharding
from models.collectives import BACKENDS, Comm
from models.config import LlamaConfig
from models.llama import MATMULS, Block, KVCache, Llama
from pallas_kernels.workspace import sharded_jit


def _leaf_name(path) -> str:
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1])


def state_specs(state: nnx.State) -> nnx.State:
  """PartitionSpec for every parameter, from models/sharding.PARAM_SPECS."""
  return jax.tree_util.tree_map_with_path(lambda p, _: sharding.PARAM_SPECS[_leaf_name(p)], state)


def abstract_model(config: LlamaConfig, tp: int) -> tuple[nnx.GraphDef, nnx.State]:
  """Graph and parameter shapes of the model laid out for `tp` ranks; allocates nothing."""
  sharding.check_tp(config, tp)
  heads = sharding.HeadLayout.build(config.num_heads, config.num_kv_heads, tp)
  return nnx.split(nnx.eval_shape(lambda: Llama(config, heads, nnx.Rngs(0))))


def init_random(config: LlamaConfig, mesh: Mesh, seed: int = 0):
  """Random weights created directly in their shards (no device holds the whole model).

  One jitted initializer per block, reused for every layer, keeps compile time flat in
  the number of layers.
  """
  tp = mesh.shape[sharding.TP]
  graphdef, abstract = abstract_model(config, tp)
  heads = sharding.HeadLayout.build(config.num_heads, config.num_kv_heads, tp)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(abstract))
  flat_shardings = dict(nnx.to_flat_state(shardings))

  def sharded_init(make, prefix):
    abstract_part = nnx.split(nnx.eval_shape(lambda: make(jax.random.key(0))))[1]
    out = nnx.from_flat_state(
        [(p, flat_shardings[prefix + p]) for p, _ in nnx.to_flat_state(abstract_part)])
    return jax.jit(lambda key: nnx.split(make(key))[1], out_shardings=out)

  key = jax.random.key(seed)
  top = sharded_init(lambda k: Llama(config.replace(num_layers=0), heads, nnx.Rngs(k)), ())
  block = sharded_init(lambda k: Block(config, heads, nnx.Rngs(k)), ("layers", 0))
  flat = list(nnx.to_flat_state(top(jax.random.fold_in(key, config.num_layers))))
  for i in range(config.num_layers):
    flat += [(("layers", i) + p, v) for p, v in nnx.to_flat_state(block(jax.random.fold_in(key, i)))]
  return graphdef, nnx.from_flat_state(flat)


class Decoder:
  """Compiled prefill, decode step and generation loops for one model, mesh, all-reduce
  backend, matmul implementation (models/llama.MATMULS) and cache length (any batch size;
  each shape compiles once)."""

  def __init__(self, config: LlamaConfig, graphdef: nnx.GraphDef, state: nnx.State, mesh: Mesh,
               *, backend: str = "xla", max_len: int = 512, matmul: str = "xla"):
    if matmul not in MATMULS:
      raise ValueError(f"unknown matmul {matmul!r}; choose from {MATMULS}")
    self.config, self.graphdef, self.state, self.mesh = config, graphdef, state, mesh
    self.matmul = matmul
    self.tp = mesh.shape[sharding.TP]
    self.max_len = max_len
    self.comm = Comm(backend=backend, axis=sharding.TP, eps=self.config.rms_norm_eps)
    self._specs = state_specs(state)
    self._backend = BACKENDS[backend]
    self._cache_specs = KVCache(
        k=(sharding.CACHE_SPEC,) * self.config.num_layers,
        v=(sharding.CACHE_SPEC,) * self.config.num_layers, lengths=P())
    self._comm_specs = self._backend.state_spec(sharding.TP)

  # ---- state -------------------------------------------------------------------------

  def cache_spec(self, batch: int) -> KVCache:
    """Shapes, dtypes and shardings of a cache of `max_len` slots per row."""
    heads = sharding.HeadLayout.build(self.config.num_heads, self.config.num_kv_heads, self.tp)
    kv = jax.ShapeDtypeStruct((batch, len(heads.kv_src), self.max_len, self.config.head_dim),
                              self.config.dtype, sharding=NamedSharding(self.mesh, sharding.CACHE_SPEC))
    layers = (kv,) * self.config.num_layers
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=NamedSharding(self.mesh, P()))
    return KVCache(layers, layers, lengths)

  def new_cache(self, batch: int) -> KVCache:
    """An empty cache, sharded on KV heads, allocated by one cached executable."""
    return self._zeros(batch)()

  @functools.lru_cache(maxsize=None)
  def _zeros(self, batch: int):
    spec = self.cache_spec(batch)
    return jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec),
                   out_shardings=jax.tree.map(lambda s: s.sharding, spec))

  def new_comm_state(self, batch: int) -> Any:
    """The all-reduce backend's per-rank state (None for `xla`)."""
    example = jax.ShapeDtypeStruct((batch, 1, self.config.hidden_size), self.config.dtype)
    return self._backend.init_state(self.mesh, sharding.TP, example)

  # ---- per-rank programs -------------------------------------------------------------

  def _model(self, state) -> Llama:
    return nnx.merge(self.graphdef, state)

  def _greedy(self, logits_bv: jax.Array, comm_state):
    """Global argmax over vocab-parallel logits: each rank's best (value, index), exchanged
    exactly as int32 words through the comm backend. Returns (tokens (b,), comm state)."""
    v_local = logits_bv.shape[-1]
    best = jnp.max(logits_bv, axis=-1).astype(jnp.float32)
    idx = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32) + self.comm.rank() * v_local
    words = jnp.stack([lax.bitcast_convert_type(best, jnp.int32), idx], axis=-1)  # (b, 2)
    all_bnk, comm_state = self.comm.gather_words(words, comm_state)
    all_best = lax.bitcast_convert_type(all_bnk[..., 0], jnp.float32)  # (b, tp)
    winner = jnp.argmax(all_best, axis=1)  # first (lowest-vocab) rank on ties
    return jnp.take_along_axis(all_bnk[..., 1], winner[:, None], axis=1)[:, 0], comm_state

  def _prefill(self, state, cache, comm_state, tokens_bt, lengths_b):
    t = tokens_bt.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens_bt.shape)
    logits, cache, comm_state = self._model(state)(
        tokens_bt, pos, cache, self.comm, comm_state, prefill=True, logits_at=lengths_b - 1,
        matmul=self.matmul)
    cache = cache._replace(lengths=lengths_b)
    nxt, comm_state = self._greedy(logits[:, 0], comm_state)
    return nxt, logits[:, 0], cache, comm_state

  def _step(self, state, cache, comm_state, tokens_b):
    pos = cache.lengths[:, None]
    logits, cache, comm_state = self._model(state)(
        tokens_b[:, None], pos, cache, self.comm, comm_state, prefill=False, matmul=self.matmul)
    cache = cache._replace(lengths=cache.lengths + 1)
    nxt, comm_state = self._greedy(logits[:, 0], comm_state)
    return nxt, logits[:, 0], cache, comm_state

  def _loop(self, state, cache, comm_state, first_b, *, steps: int, stop_at_eos: bool):
    b = first_b.shape[0]
    eos = self.config.eos_token_id

    def cond(carry):
      i, _, _, done, _, _ = carry
      return (i < steps) & ~(stop_at_eos & jnp.all(done))

    def body(carry):
      i, out, tok, done, cache, comm_state = carry
      nxt, _, cache, comm_state = self._step(state, cache, comm_state, tok)
      nxt = jnp.where(done, eos, nxt)
      # A select, not dynamic_update_slice: XLA turns that into a loop-dependent dynamic
      # slice fusion, which keeps the while loop out of the command buffer (one graph).
      out = jnp.where(lax.broadcasted_iota(jnp.int32, out.shape, 1) == i, nxt[:, None], out)
      return i + 1, out, nxt, done | (nxt == eos), cache, comm_state

    out = jnp.full((b, steps), eos, jnp.int32)
    carry = (jnp.int32(0), out, first_b, first_b == eos, cache, comm_state)
    n, out, _, _, cache, comm_state = lax.while_loop(cond, body, carry)
    return out, n, cache, comm_state

  # ---- compiled entry points ---------------------------------------------------------

  def _sharded(self, fn, in_specs, out_specs, donate):
    return sharded_jit(fn, self.mesh, in_specs, out_specs, donate_argnums=donate)

  @functools.cached_property
  def prefill_fn(self):
    """(state, cache, comm, tokens (b, t), lengths (b,)) -> (next (b,), logits (b, v), cache, comm)."""
    specs = (self._specs, self._cache_specs, self._comm_specs, P(), P())
    return self._sharded(self._prefill, specs,
                         (P(), P(None, sharding.TP), self._cache_specs, self._comm_specs), (1, 2))

  @functools.cached_property
  def step_fn(self):
    """(state, cache, comm, tokens (b,)) -> (next (b,), logits (b, v), cache, comm); donates."""
    specs = (self._specs, self._cache_specs, self._comm_specs, P())
    out = (P(), P(None, sharding.TP), self._cache_specs, self._comm_specs)
    return self._sharded(self._step, specs, out, (1, 2))

  @functools.lru_cache(maxsize=None)
  def loop_fn(self, steps: int, stop_at_eos: bool = True):
    """(state, cache, comm, first (b,)) -> (tokens (b, steps), n, cache, comm), one executable."""
    fn = functools.partial(self._loop, steps=steps, stop_at_eos=stop_at_eos)
    specs = (self._specs, self._cache_specs, self._comm_specs, P())
    return self._sharded(fn, specs, (P(), P(), self._cache_specs, self._comm_specs), (1, 2))

  # ---- convenience -------------------------------------------------------------------

  def prefill(self, cache, comm_state, prompts: list[list[int]], bucket: int | None = None):
    """Prefill right-padded prompts of different lengths; returns (next, logits, cache, comm)."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    t = bucket or int(lengths.max())
    if lengths.min() < 1 or lengths.max() > t or t > self.max_len:
      raise ValueError(f"prompt lengths {lengths.tolist()} must lie in [1, {t}] and the padded"
                       f" length {t} within the cache length {self.max_len}")
    tokens = np.zeros((len(prompts), t), np.int32)
    for row, p in enumerate(prompts):
      tokens[row, :len(p)] = p
    return self.prefill_fn(self.state, cache, comm_state, jnp.asarray(tokens), jnp.asarray(lengths))

  def generate(self, prompts: list[list[int]], max_new_tokens: int, loop: str = "jit",
               stop_at_eos: bool = True) -> "Generation":
    """Greedy generation of up to `max_new_tokens` per prompt, with host-side timings."""
    if loop not in ("jit", "python"):
      raise ValueError(f"loop must be 'jit' or 'python', found {loop!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > self.max_len:
      raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the"
                       f" cache length {self.max_len}")
    cache, comm = self.new_cache(len(prompts)), self.new_comm_state(len(prompts))
    start = time.perf_counter()
    first, _, cache, comm = self.prefill(cache, comm, prompts)
    tokens = [np.asarray(first)]
    prefill_s = time.perf_counter() - start
    steps_s: list[float] = []
    if loop == "jit" and max_new_tokens > 1:
      t0 = time.perf_counter()
      out, n, _, _ = self.loop_fn(max_new_tokens - 1, stop_at_eos)(self.state, cache, comm, first)
      tokens.extend(np.asarray(out).T)
      n = int(n)
      steps_s = [(time.perf_counter() - t0) / max(n, 1)] * n
    elif loop == "python":
      eos = self.config.eos_token_id
      done, tok, pending = tokens[0] == eos, first, None

      def receive(t):  # a step's tokens on the host, EOS after each row's end
        nonlocal done
        nxt = np.where(done, eos, np.asarray(t))
        done = done | (nxt == eos)
        tokens.append(nxt)

      for _ in range(max_new_tokens - 1):
        if stop_at_eos and done.all():
          break
        t0 = time.perf_counter()
        tok, _, cache, comm = self.step_fn(self.state, cache, comm, tok)
        tok.copy_to_host_async()
        if pending is not None:
          receive(pending)
        pending = tok
        steps_s.append(time.perf_counter() - t0)
      if pending is not None:
        receive(pending)
    out = np.full((len(prompts), max_new_tokens), self.config.eos_token_id, np.int32)
    out[:, :len(tokens)] = np.stack(tokens, axis=1)[:, :max_new_tokens]
    return Generation(out, prefill_s, steps_s)


@dataclasses.dataclass
class Generation:
  """Tokens (b, max_new_tokens), EOS-filled after each row's end, and host-side timings."""

  tokens: np.ndarray
  prefill_s: float  # prompt in, first token on the host
  steps_s: list[float]  # one entry per decode step (jit loop: the loop's mean)
