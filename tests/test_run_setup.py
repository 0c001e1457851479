"""run_setup.py: every check before any write, resume checks, the newest readable checkpoint."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from cmix_jax import checkpointing
from cmix_jax import config_validation
from cmix_jax import dynamics
from cmix_jax import evaluate
from cmix_jax import run_setup
from cmix_jax import train
from tests import test_train
from tests import tiny


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('ssl.p_cutoff', 1.5, 'p_cutoff'),
    ('ssl.label_smoothing', 1.0, 'label_smoothing'),
    ('ssl.ulb_loss_ratio', -1.0, 'ulb_loss_ratio'),
  ],
)
def test_bad_ssl_value_fails_before_anything_is_written(field, value, message, tmp_path):
  workdir = tmp_path / 'run'
  config = tiny.config()
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    run_setup.build_run(config, str(workdir))
  assert not workdir.exists()  # no config.json left behind to block the corrected rerun
  run = run_setup.build_run(tiny.config(), str(workdir))  # the corrected rerun starts
  assert (workdir / 'config.json').exists() and run.info.num_classes == 4


def test_bad_input_is_refused_before_tensorflow_is_imported(tmp_path):
  # TF (data reading, TensorBoard) takes seconds to import; a typo should not wait for it.
  code = textwrap.dedent(f"""
    import sys
    from cmix_jax import config_validation, train
    from configs import default
    config = default.get_config()
    config.optim.lr = -1.0
    try:
      train.train_and_evaluate(config, {str(tmp_path / 'run')!r})
    except config_validation.ConfigError:
      print('refused; tensorflow imported:', 'tensorflow' in sys.modules)
  """)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=120
  )
  assert 'refused; tensorflow imported: False' in proc.stdout, proc.stderr[-2000:]
  assert not (tmp_path / 'run').exists()


def test_resume_refuses_a_different_config_and_names_the_field(tmp_path):
  config = tiny.config()
  run_setup.build_run(config, str(tmp_path))
  changed = tiny.config()
  changed.optim.lr = 0.1
  with pytest.raises(config_validation.ConfigError, match='optim.lr'):
    run_setup.build_run(changed, str(tmp_path))
  run_setup.build_run(
    changed, str(tmp_path), allow_config_change=True
  )  # the explicit flag allows it
  changed.log_every = 1  # logging cadence may change freely
  run_setup.build_run(changed, str(tmp_path))


def test_unreadable_newest_checkpoint_falls_back_to_previous(tmp_path):
  workdir = str(tmp_path / 'run')
  test_train._driver(f'--workdir={workdir}')
  ckpt = os.path.join(workdir, 'checkpoints', '4', 'state')
  for root, _, files in os.walk(ckpt):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  run = run_setup.build_run(tiny.config(), workdir)
  _, meta = run_setup.initial_state(run)
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
  saved, _ = run_setup.initial_state(eight)
  cut, _ = run_setup.initial_state(two)
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
