"""Decode-time matrix-vector product y = x @ w.T in Pallas Mosaic GPU (wgmma, swap-AB).

At batch 1 a projection reads every weight once and does almost no arithmetic, so its time
is the weight bytes over the bandwidth the kernel reaches. XLA's batch-1 dots reach 55-65%
of HBM bandwidth on H200 (docs/decode_baseline.md). This kernel streams the weight, stored
(out, in) as the model keeps it, through a multi-stage TMA pipeline into shared memory and
multiplies each (tile_n, tile_k) tile by the activation padded to 16 rows, with the weight
as wgmma's A operand (M = weight rows) and the activation as the transposed B operand
(N = 16): the skinny product runs on the tensor cores, bound only by the weight stream.
A K split spreads small matrices over more SMs; its f32 partial sums are added in XLA.

    y = gemv(x, w)          # x (b, k) bf16 with b <= 16, w (n, k) bf16 -> y (b, n) bf16
    z = gemv(x, w, out_dtype=jnp.float32)   # f32 result (logits)

`reference` is the XLA product with the same f32 accumulation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 16  # the activation's rows as wgmma's N: batch padded to 16


@dataclasses.dataclass(frozen=True)
class Config:
  """tile_n weight rows x tile_k columns per pipeline step; `stages` steps in flight; the K
  range split over `splits` blocks per row tile."""

  tile_n: int = 64
  tile_k: int = 128
  stages: int = 4
  splits: int = 1


def config_for(n: int, k: int, num_sms: int = 132) -> Config:
  """A tiling for an (n, k) weight: the fewest K splits (each at least 4 steps long) that
  give about one block per SM, with the widest steps (128, 64 or 32 columns) that work."""
  tiles = n // Config.tile_n
  best = None
  for tile_k in (128, 64, 32):
    if k % tile_k:
      continue
    steps = k // tile_k
    fits = [s for s in range(1, 9) if steps % s == 0 and (s == 1 or steps // s >= 4)]
    splits = next((s for s in fits if tiles * s >= 0.9 * num_sms), fits[-1])
    config = Config(tile_k=tile_k, splits=splits)
    if tiles * splits >= 0.9 * num_sms:
      return config
    if best is None or splits > best.splits:
      best = config
  if best is None:
    raise ValueError(f"k={k} is not a multiple of 32")
  return best


def reference(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """XLA's product with the same f32 accumulation, in the 3-D form the model uses (XLA:CPU
  has no bf16 x bf16 -> f32 dot for the 2-D form inside larger programs)."""
  return jnp.einsum("btk,nk->btn", x[None], w,
                    preferred_element_type=jnp.float32).astype(out_dtype or x.dtype)[0]


def check(x: jax.Array, w: jax.Array, config: Config) -> None:
  """Raises before anything is traced into a kernel when the shapes cannot be tiled."""
  if x.dtype != jnp.bfloat16 or w.dtype != jnp.bfloat16:
    raise ValueError(f"gemv takes bfloat16 operands, found {x.dtype} and {w.dtype}")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
    raise ValueError(f"gemv takes x (b, k) and w (n, k), found {x.shape} and {w.shape}")
  b, k = x.shape
  n = w.shape[0]
  if not 1 <= b <= ROWS:
    raise ValueError(f"gemv takes 1..{ROWS} rows of activations, found {b}")
  if n % config.tile_n:
    raise ValueError(f"{n} weight rows are not a multiple of tile_n={config.tile_n}")
  if k % (config.tile_k * config.splits):
    raise ValueError(f"k={k} is not a multiple of tile_k x splits = "
                     f"{config.tile_k} x {config.splits}")


def _transforms(cols: int, dtype) -> tuple:
  swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
  elems = swizzle // jnp.dtype(dtype).itemsize
  return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


def gemv(x: jax.Array, w: jax.Array, config: Config = Config(), interpret=None,
         out_dtype=None) -> jax.Array:
  """x @ w.T for x (b, k), w (n, k), both bf16, b <= 16; f32 accumulation, rounded once to
  `out_dtype` (default x's). `interpret` (plgpu.InterpretGPUParams()) runs the kernel on the
  CPU, for tests."""
  check(x, w, config)
  b, k = x.shape
  n = w.shape[0]
  tile_n, tile_k, splits = config.tile_n, config.tile_k, config.splits
  steps = k // tile_k // splits
  in_transforms = _transforms(tile_k, jnp.bfloat16)
  out_transforms = _transforms(ROWS, jnp.float32)

  def body(x_gmem, w_gmem, o_gmem):
    ni, si = lax.axis_index("n"), lax.axis_index("split")

    def acc_scope(acc_ref):
      def step(_, w_smem, x_smem):
        plgpu.wgmma(acc_ref, w_smem, x_smem.transpose((1, 0)))
        if config.stages == 1:
          plgpu.wgmma_wait(0)

      plgpu.emit_pipeline(
          step, grid=(steps,),
          in_specs=[
              plgpu.BlockSpec((tile_n, tile_k), lambda ki: (ni, si * steps + ki),
                              transforms=in_transforms,
                              delay_release=1 if config.stages > 1 else 0),
              plgpu.BlockSpec((ROWS, tile_k), lambda ki: (0, si * steps + ki),
                              transforms=in_transforms,
                              delay_release=1 if config.stages > 1 else 0),
          ],
          max_concurrent_steps=config.stages)(w_gmem, x_gmem)
      return acc_ref[...]

    acc = pl.run_scoped(acc_scope, plgpu.ACC((tile_n, ROWS)))

    @functools.partial(pl.run_scoped,
                       o_smem=plgpu.SMEM((tile_n, ROWS), jnp.float32, transforms=out_transforms))
    def _store(o_smem):
      o_smem[...] = acc
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, pl.ds(ni * tile_n, tile_n)])
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((splits, n, ROWS), jnp.float32),
      grid=(n // tile_n, splits), grid_names=("n", "split"),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      kernel_name="gemv", interpret=interpret)
  partial = kernel(jnp.pad(x, ((0, ROWS - b), (0, 0))), w)
  return partial.sum(0)[:, :b].T.astype(out_dtype or x.dtype)


def applies(m: int, n: int, k: int, dtype) -> bool:
  """Whether `dense` runs the kernel for an (m, k) x (n, k) product of `dtype`."""
  return (1 <= m <= ROWS and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
          and n % Config.tile_n == 0 and k % 32 == 0)


def dense(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x (m, k) @ w.T, w (n, k): the kernel on CUDA where it applies (decode-sized m, shapes that
  tile), XLA's dot otherwise and off the GPU (same f32 accumulation, one rounding)."""
  m, k = x.shape
  n = w.shape[0]
  xla = functools.partial(reference, out_dtype=out_dtype)
  if not applies(m, n, k, x.dtype) or w.dtype != x.dtype:
    return xla(x, w)
  config = config_for(n, k)
  kernel = functools.partial(gemv, config=config, out_dtype=out_dtype)
  return lax.platform_dependent(x, w, cuda=kernel, default=xla)
