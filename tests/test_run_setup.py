"""run_setup.py: every check before any write, and the check of a resumed workdir's config."""

import json
import os
import subprocess
import sys
import textwrap

import ml_collections
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


def _older_config_json(workdir, *fields) -> dict:
  """Rewrites workdir/config.json as a version of cmix_jax without `fields` wrote it."""
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  for field in fields:
    *parents, leaf = field.split('.')
    node = saved
    for part in parents:
      node = node[part]
    del node[leaf]
  with open(path, 'w') as f:
    json.dump(saved, f)
  return saved


def test_an_older_workdir_gets_the_defaults_of_the_fields_it_predates(tmp_path):
  config = tiny.config()
  run_setup.build_run(config, str(tmp_path))
  predated = ('calibratemix.pair_scope', 'data.unlabeled_size', 'model.conv_grad')
  older = _older_config_json(str(tmp_path), *predated)
  # Evaluation reads it back (evaluate.load_config): the missing fields take their defaults.
  run = run_setup.build_run(ml_collections.ConfigDict(older), str(tmp_path), write=False)
  assert json.loads(run.config.to_json()) == json.loads(config.to_json())
  # Resuming compares it as the run computed it: at the defaults, but for a changed one.
  changed = tiny.config()
  changed.calibratemix.pair_scope = 'device'
  with pytest.raises(config_validation.ConfigError, match=r'\(fields: calibratemix.pair_scope\)'):
    run_setup.build_run(changed, str(tmp_path))
  run_setup.build_run(config, str(tmp_path))
  # A field this version does not know is named as a difference (and refused by the merge).
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  saved['data']['retired_field'] = 1
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  with pytest.raises(config_validation.ConfigError, match=r'\(fields: data.retired_field\)'):
    run_setup.build_run(config, str(tmp_path))
  with pytest.raises(
    config_validation.ConfigError, match='unknown config field data.retired_field'
  ):
    run_setup.build_run(ml_collections.ConfigDict(saved), str(tmp_path), write=False)
