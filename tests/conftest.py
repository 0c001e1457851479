"""Test setup: eight fake CPU devices, so pmap/shard_map equivalence runs here."""

import gc
import os

import pytest

# A persistent compile cache shared by every process of a run (pytest-xdist workers and the
# subprocess drivers): tests build fresh jitted closures of the same programs, which miss
# jax's in-memory cache but hit this one. It must be set before jax is first imported, since
# jax reads these variables then; every program is cached, however quick its compile.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR",
  os.path.join(os.environ.get("TMPDIR", "/tmp"), "cmix_jax_test_jit_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Set before any backend starts: 8 fake devices, the default config's backend flags so
# in-process tests compile the programs `main` does, and LLVM's cheap settings: the tests'
# programs run a few steps each, so compiling them dominates, and these cut that by about a
# third. Processes a test starts without XLA_FLAGS (the command-line tests) compile as a
# user's run does. Flags already in XLA_FLAGS win.
from cmix_jax import parallel as _parallel
from configs import default as _default

_parallel.set_xla_flags(
  '--xla_force_host_platform_device_count=8 '
  '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
  + _default.get_config().xla_flags
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The `gcs` fixture (a local GCS emulator with gs://test-bucket) for every test module.
from tests import gcs as _gcs
from tests.gcs import gcs  # noqa: F401

import jax


MAX_MEMORY_MAPS = 20_000  # well under Linux's default vm.max_map_count of 65,530


def _memory_maps() -> int:
  try:
    with open('/proc/self/maps') as f:
      return sum(1 for _ in f)
  except OSError:  # not Linux: no such limit to keep under
    return 0


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops the compiled programs after a test module once the process holds many.

  Every loaded XLA:CPU executable keeps memory maps for its code; kept for the whole suite,
  one process passes Linux's 65,530-map limit (vm.max_map_count) and segfaults in the next
  compile or cache read (two test files alone leave 28,665 maps). Clearing only past
  MAX_MEMORY_MAPS keeps jax's small shared programs compiled most of the time.
  """
  yield
  if _memory_maps() > MAX_MEMORY_MAPS:
    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
  """Stops this process's GCS emulator when its session ends, in the main process and in every
  xdist worker: a worker still busy when the run shuts down leaves through os._exit (execnet),
  skipping atexit. An emulator whose process dies any other way dies with it (tests/gcs.py)."""
  del session, exitstatus
  _gcs.stop_emulator()
