"""Test setup: eight fake CPU devices, so pmap/shard_map equivalence runs here."""

import os

# Set before any backend starts: 8 fake devices, plus the default config's backend flags so
# in-process tests compile like `main` does (flags already in XLA_FLAGS win).
from cmix_jax import parallel as _parallel  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default as _default  # pylint: disable=g-import-not-at-top,wrong-import-position

_parallel.set_xla_flags(
  '--xla_force_host_platform_device_count=8 ' + _default.get_config().xla_flags
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Compiled steps are reused across the test processes of one run (the subprocess
# drivers compile the same tiny programs): a persistent cache cuts minutes of compile.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.environ.get("TMPDIR", "/tmp"), "cmix_jax_test_jit_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")

# The `gcs` fixture (a local GCS emulator with gs://test-bucket) for every test module.
from tests.gcs import gcs  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
