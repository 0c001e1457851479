"""What several test modules share: data sets with their split, Fashion-MNIST-like IDX files,
the parts of a run without a workdir, the step harness, the subprocess driver (one process or
two over loopback), and checkpoint comparisons."""

import dataclasses
import gzip
import os
import struct
import subprocess
import sys
from typing import Any

import jax
import numpy as np

from cmix_jax import algorithms
from cmix_jax import base_step
from cmix_jax import parallel
from cmix_jax import resume
from cmix_jax import run_setup
from cmix_jax import steps
from cmix_jax import train
from cmix_jax.data import catalog
from cmix_jax.data import pipeline
from cmix_jax.data import ssl_data
from tests import gcs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run's reliability.json: two bins, 40 test images.
RELIABILITY_TABLE = {
  'bin_lo': [0.0, 0.5],
  'bin_hi': [0.5, 1.0],
  'count': [10, 30],
  'mean_conf': [0.4, 0.8],
  'accuracy': [0.3, 0.9],
}


# ----------------------------------------------------------------------------
# Data sets with their split, the parts of a run, and its train steps, without a workdir.


def load_ssl_data(
  name: str,
  data_dir: str,
  num_labels: int,
  seed: int,
  val_size: int = 0,
  include_lb_to_ulb: bool = True,
  fake_kwargs: dict | None = None,
  unlabeled_size: int = 0,
) -> ssl_data.SSLData:
  """catalog.open_dataset + ssl_data.make_ssl_data, as a run draws them (by arguments)."""
  return ssl_data.make_ssl_data(
    catalog.open_dataset(name, data_dir, fake_kwargs),
    num_labels,
    seed,
    val_size,
    include_lb_to_ulb,
    unlabeled_size,
  )


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
  """`array` as an IDX file: magic 0,0,code,ndim; big-endian uint32 dims; big-endian data."""
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


def write_fashion_like(directory, counts, seed=0):
  """Small Fashion-MNIST-style IDX files (Debian names); returns the arrays written."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    n = counts[split]
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with open(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
      f.write(gzip.compress(_idx_bytes(images, 0x08)))
    with open(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
      f.write(gzip.compress(_idx_bytes(labels, 0x08)))
    arrays[split] = (images, labels)
  return arrays


@dataclasses.dataclass
class Parts:
  """What the train steps need: a run's parts, built from a config alone."""

  config: Any
  topo: parallel.Topology
  data: Any  # ssl_data.SSLData
  info: steps.DataInfo
  model: Any
  tx: Any
  algorithm: algorithms.Algorithm
  sharded_field: str | None


def parts(config) -> Parts:
  """The parts `run_setup.build_run` would build for `config`, without checks or a workdir."""
  topo = parallel.make_topology(config.num_devices)
  data = run_setup.split_data(config, run_setup.open_data(config))
  info = run_setup.data_info(data)
  return Parts(
    config=config,
    topo=topo,
    data=data,
    info=info,
    model=steps.create_model(config, info.num_classes, topo.num_devices),
    tx=steps.create_optimizer(config.optim, config.num_train_steps),
    algorithm=algorithms.get_algorithm(config),
    sharded_field='dynamics' if base_step.tables_sharded(config) else None,
  )


def evaluator(p: Parts):
  """The run's Evaluator of these parts (run_setup.make_evaluator)."""
  return run_setup.make_evaluator(p.config, p.info, p.topo)


def fresh_state(p: Parts):
  """resume.fresh_state of the parts (same seed and layout), stacked [D, ...] for the steps."""
  return parallel.stack_state(resume.fresh_state(p), p.topo, p.sharded_field)


def step_fns(p: Parts) -> dict:
  """steps.make_step_fns of these parts (what the loop calls)."""
  return steps.make_step_fns(p.model, p.tx, p.algorithm, p.config, p.info, p.topo)


def batches(p: Parts, start_step: int = 0):
  """pipeline.train_batches of these parts (close() it when done)."""
  return pipeline.train_batches(p.config, p.data, p.algorithm, p.topo, start_step)


def run_steps(p: Parts, num_steps: int, state=None, fns=None):
  """(stacked state, per-step metrics) after `num_steps` loop steps from `state` (or fresh)."""
  it = batches(p)
  try:
    return train.run_steps(
      fns or step_fns(p), fresh_state(p) if state is None else state, it, p.config, 0, num_steps
    )
  finally:
    it.close()


def run_on(config, num_devices: int, num_steps: int, backend: str = 'pmap'):
  """(stacked state, per-step metrics) of `num_steps` loop steps on `num_devices` devices."""
  config = config.copy_and_resolve_references()
  config.num_devices, config.parallel_backend = num_devices, backend
  return run_steps(parts(config), num_steps)


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(
      np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
    )


# ----------------------------------------------------------------------------
# Whole runs in subprocesses (tests/run_driver.py, `python -m ...`), and what they leave.


def _driver_env() -> dict:
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)  # a plain process (the driver sets its own device count)
  return env


def python_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python -m module args` from the repo root as a user starts it, its output captured."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO,
    env=_driver_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def driver(*args, check=True, timeout=240) -> subprocess.CompletedProcess:
  """Runs tests/run_driver.py with `args`; AssertionError with its output if it fails."""
  proc = python_module('tests.run_driver', *args, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(
      f'driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}'
    )
  return proc


def two_processes(workdir, *args, timeout=300, devices=4) -> list:
  """Runs the driver as two processes (`devices` fake devices each) over loopback; (process,
  out, err) each."""
  port = gcs.free_port()
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'tests.run_driver',
        f'--workdir={workdir}',
        f'--devices={devices}',
        f'--coordinator=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        *args,
      ],
      cwd=REPO,
      env=_driver_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    return [(p, *p.communicate(timeout=timeout)) for p in procs]
  finally:  # a hung pair (the failure some tests look for) is not left running
    for p in procs:
      p.kill()


def assert_same_state(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  for path, x in flat_a:
    np.testing.assert_array_equal(x, flat_b[path], err_msg=jax.tree_util.keystr(path))
