"""Test set-up: 8 fake CPU devices (so tensor parallelism is tested on every commit) and
the `gpu` marker, which skips cleanly where no CUDA GPU is present."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import faulthandler  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# f32 references compare at 1e-5: no TF32 matmuls when the suite runs on a GPU.
jax.config.update("jax_default_matmul_precision", "highest")


def _num_gpus() -> int:
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:
    return 0


def pytest_collection_modifyitems(config, items):
  gpus = _num_gpus()
  for item in items:
    marker = item.get_closest_marker("gpu")
    if marker is None:
      continue
    need = marker.kwargs.get("count", 1)
    if gpus < need:
      item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {gpus}"))


@pytest.fixture(autouse=True)
def gpu_watchdog(request):
  """A lost flag hangs a peer-write kernel: GPU tests dump stacks and exit instead."""
  if request.node.get_closest_marker("gpu") is None:
    yield
    return
  faulthandler.dump_traceback_later(240, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()
