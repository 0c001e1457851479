"""resume.py: the newest readable checkpoint, and sharded tables restored on another device
count (by the loop and by `cmix_jax.evaluate`)."""

import os

import jax
import numpy as np

from cmix_jax import checkpointing
from cmix_jax import dynamics
from cmix_jax import evaluate
from cmix_jax import resume
from cmix_jax import run_setup
from cmix_jax import train
from configs import tiny
from tests import helpers


def test_unreadable_newest_checkpoint_falls_back_to_previous(tmp_path):
  workdir = str(tmp_path / 'run')
  helpers.driver(f'--workdir={workdir}')
  ckpt = os.path.join(workdir, 'checkpoints', '4', 'state')
  for root, _, files in os.walk(ckpt):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  run = run_setup.build_run(tiny.config(), workdir)
  _, meta = resume.initial_state(run)
  assert int(meta['step']) == 2


def _sharded(num_devices: int, steps: int):
  config = tiny.config(calibratemix=True, steps=steps)
  config.num_devices, config.dynamics_sharded = num_devices, True
  return config


def _full_tables(run, state):
  """The whole dynamics tables of a restored state (host numpy, padding rows dropped)."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.dynamics)
  return dynamics.unshard_state(host, run.info.num_labeled, run.info.num_unlabeled)


def test_sharded_dynamics_resume_and_evaluate_on_another_device_count(tmp_path):
  # A pod run's workdir resumes on another slice, or is evaluated on a laptop: the tables
  # saved in 8 shards are read whole and cut into this run's shards, unchanged.
  workdir = str(tmp_path)
  train.train_and_evaluate(_sharded(8, 4), workdir)
  eight = run_setup.build_run(_sharded(8, 4), workdir, write=False)
  two = run_setup.build_run(_sharded(2, 4), workdir, write=False)
  saved, _ = resume.initial_state(eight)
  cut, _ = resume.initial_state(two)
  assert saved.dynamics.apm.shape[0] == 8 and cut.dynamics.apm.shape[0] == 2
  reference = _full_tables(eight, saved)
  assert reference.apm_count.sum() > 0 and reference.aum_count.sum() > 0
  jax.tree.map(np.testing.assert_array_equal, _full_tables(two, cut), reference)
  for name in ('params', 'ema_params', 'opt_state', 'algo_state', 'rng'):
    jax.tree.map(np.testing.assert_array_equal, getattr(cut, name), getattr(saved, name))

  train.train_and_evaluate(_sharded(4, 6), workdir, allow_config_change=True)
  shapes = checkpointing.saved_shapes(eight.manager, 6, 'dynamics')
  assert shapes['apm'][0] == 4  # saved in this run's shards from then on
  step, stacked = evaluate.restore(two, 'last', 4)  # an 8-shard checkpoint on 2 devices
  assert step == 4 and stacked.dynamics.apm.shape[0] == 2
  jax.tree.map(np.testing.assert_array_equal, _full_tables(two, stacked), reference)


def test_restore_skeleton_is_the_fresh_state_without_running_init():
  # The resume path traces the state's shapes instead of compiling and running model.init;
  # the skeleton must match what a fresh state lays out, sharded dynamics included.
  for config in (tiny.config(calibratemix=True), _sharded(4, 4)):
    p = helpers.parts(config)
    expected = checkpointing.abstract_like(resume.fresh_state(p))
    got = resume.abstract_state(p)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert (g.shape, g.dtype, g.sharding) == (e.shape, e.dtype, e.sharding)
