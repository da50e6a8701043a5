"""A small all-reduce run for compute-sanitizer: each kernel a few times on 2 GPUs, checked."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from models.sharding import make_mesh
from pallas_kernels import all_reduce, common, workspace

mesh = make_mesh(2)
spec = workspace.spec("tp")
for method in ("one_shot", "two_shot"):
  shape = (2, 4096)
  ws = workspace.init(mesh, "tp", all_reduce.workspace_capacity(*shape, jnp.bfloat16, 2),
                      jnp.bfloat16)
  f = jax.jit(jax.shard_map(
      lambda x, ws: (*all_reduce.all_reduce(x, ws, "tp", method), common.reference(x, "tp")),
      mesh=mesh, in_specs=(P("tp"), spec), out_specs=(P("tp"), spec, P("tp")), check_vma=False),
      donate_argnums=1)
  for i in range(4):
    x = jax.random.normal(jax.random.key(i), (4, 4096), jnp.bfloat16)
    y, ws, ref = f(x, ws)
    assert np.array_equal(np.asarray(y), np.asarray(ref)), method
  print(method, "ok", flush=True)
