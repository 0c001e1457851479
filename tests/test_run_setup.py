"""run_setup.py: every check before any write, and the check of a resumed workdir's config."""

import os
import subprocess
import sys
import textwrap

import pytest

from cmix_jax import config_validation
from cmix_jax import run_setup
from configs import tiny


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
