"""gs:// paths against a real local GCS endpoint (fake-gcs-server): every layer that writes or
reads a workdir or a data dir, and the preflight errors."""

import io
import os

import jax
import numpy as np
import pytest
from google.cloud import storage as gcs_client
from PIL import Image

from cmix_jax import checkpointing
from cmix_jax import dynamics
from cmix_jax import metrics
from cmix_jax import plots
from cmix_jax import storage
from cmix_jax.data import fake_data
from cmix_jax.data import own_data
from cmix_jax.data import splits
from cmix_jax.data import tfds_store
from experiments import common
from experiments import compare
from tests import gcs as gcs_lib
from tests import helpers

ROOT = f'gs://{gcs_lib.BUCKET}'


def _objects(prefix):
  """Object names under `prefix`, listed by google-cloud-storage (not by the code under test)."""
  return sorted(b.name for b in gcs_client.Client().list_blobs(gcs_lib.BUCKET, prefix=prefix))


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_json_jsonl_and_npz_round_trip(gcs, tmp_path, where):
  run = f'{ROOT}/files' if where == 'gs' else str(tmp_path / 'files')
  storage.write_json(f'{run}/config.json', {'a': [1, 2]})
  assert storage.read_json(f'{run}/config.json') == {'a': [1, 2]}
  for step in (1, 2, 3):
    storage.append_jsonl(f'{run}/metrics.jsonl', {'step': step})
  assert storage.read_jsonl(f'{run}/metrics.jsonl') == [{'step': 1}, {'step': 2}, {'step': 3}]
  storage.save_npz(f'{run}/x.npz', x=np.arange(5))
  with np.load(io.BytesIO(storage.as_path(f'{run}/x.npz').read_bytes())) as data:
    np.testing.assert_array_equal(data['x'], np.arange(5))
  names = ['config.json', 'metrics.jsonl', 'x.npz']  # and no temp file left behind
  if where == 'gs':
    assert _objects('files/') == [f'files/{n}' for n in names]
  else:
    assert sorted(os.listdir(run)) == names


def test_local_paths_expand_the_home_folder_and_buckets_stay_as_given():
  assert storage.is_remote('gs://b/x') and not storage.is_remote('~/x')
  assert os.fspath(storage.as_path('~/x')) == os.path.expanduser('~/x')
  assert os.fspath(storage.as_path('runs/x')) == os.path.abspath('runs/x')
  assert os.fspath(storage.as_path('gs://b/x/')) == 'gs://b/x'
  assert (storage.bucket_of('gs://b/x/y'), storage.object_name('gs://b/x/y')) == ('b', 'x/y')


def test_split_pictures_and_dynamics_written_to_the_bucket(gcs):
  run = f'{ROOT}/outputs'
  labels = np.arange(12) % 3
  splits.save_split(run, np.array([0, 4, 8]), np.array([3]), labels, 7, 'fake')
  loaded = splits.load_split(run)
  np.testing.assert_array_equal(loaded['labeled_idx'], [0, 4, 8])
  assert loaded['labeled_per_class'] == [1, 1, 1] and loaded['seed'] == 7
  probs = np.full((4, 2), 0.5)
  table = metrics.reliability_table(probs, np.array([0, 1, 0, 1]), 10)
  png, data = plots.reliability_diagram(table, f'{run}/reliability.png')
  assert storage.as_path(png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert storage.read_json(data)['ece'] == pytest.approx(0.0)
  _, csv_path = plots.data_map(np.array([0.1, 0.2]), np.array([0.5, 0.9]), f'{run}/data_map.png')
  assert storage.as_path(csv_path).read_text().splitlines()[1].startswith('0,0.1,0.5')
  state = dynamics.DynamicsState.init(3, 2, 3)
  dynamics.save_npz(state, f'{run}/dynamics.npz')
  with np.load(io.BytesIO(storage.as_path(f'{run}/dynamics.npz').read_bytes())) as npz:
    assert npz['apm'].shape == (2, 3)
  assert _objects('outputs/') == [
    f'outputs/{n}'
    for n in (
      'data_map.data.csv',
      'data_map.png',
      'dynamics.npz',
      'reliability.data.json',
      'reliability.png',
      'split.json',
    )
  ]


def test_orbax_checkpoints_in_the_bucket_save_and_restore(gcs):
  state = {'w': jax.numpy.arange(6.0).reshape(2, 3), 'tables': {'n': np.arange(3, dtype=np.int32)}}
  manager = checkpointing.create_manager(f'{ROOT}/ckpt', max_to_keep=2)
  assert os.fspath(manager.directory) == f'{ROOT}/ckpt/checkpoints'
  for step in (1, 2, 3):
    checkpointing.save(manager, step, jax.tree.map(lambda x, s=step: x * s, state), {'step': step})
  manager.wait_until_finished()
  reader = checkpointing.create_manager(f'{ROOT}/ckpt', 2)
  # The shapes as saved, from the metadata alone (how sharded tables restore on any count).
  assert checkpointing.saved_shapes(reader, 3, 'tables') == {'n': (3,)}
  step, restored, meta = checkpointing.restore_latest(reader, checkpointing.abstract_like(state))
  assert (step, meta) == (3, {'step': 3})
  np.testing.assert_array_equal(restored['w'], np.arange(6.0).reshape(2, 3) * 3)
  np.testing.assert_array_equal(restored['tables']['n'], [0, 3, 6])
  steps = {name.split('/')[2] for name in _objects('ckpt/checkpoints/')}
  assert steps == {'2', '3'}  # max_to_keep dropped step 1 from the bucket


def _write_digits(root_dir, arrays):
  """A 2-class image folder (train/test per class) under root_dir, local or gs://."""
  for split, (x, y) in arrays.items():
    for i, (image, label) in enumerate(zip(x, y)):
      buffer = io.BytesIO()
      Image.fromarray(image[..., 0]).save(buffer, format='PNG')
      storage.write_bytes(f'{root_dir}/{split}/c{label}/{i:03d}.png', buffer.getvalue())


def test_own_data_from_the_bucket_stored_in_the_bucket_reads_like_local(gcs, tmp_path):
  fake = fake_data.make_fake(num_train=24, num_test=8, image_shape=(8, 8, 1), num_classes=2)
  arrays = {
    'x_train': fake['train'][0],
    'y_train': fake['train'][1],
    'x_test': fake['test'][0],
    'y_test': fake['test'][1],
  }
  storage.save_npz(f'{ROOT}/src/digits.npz', **arrays)
  storage.save_npz(tmp_path / 'digits.npz', **arrays)
  remote = helpers.load_ssl_data(f'npz:{ROOT}/src/digits.npz', f'{ROOT}/tfds', 4, seed=0)
  local = helpers.load_ssl_data(f'npz:{tmp_path / "digits.npz"}', str(tmp_path / 'tfds'), 4, seed=0)
  assert remote.spec.tfds_name == local.spec.tfds_name  # same bytes, same fingerprint
  assert tfds_store.is_stored(f'{ROOT}/tfds', remote.spec.tfds_name, ['stats.json'])
  stored = _objects(f'tfds/{remote.spec.tfds_name}/')
  assert any(name.endswith('array_record-00000-of-00001') for name in stored)
  for part in ('train', 'test'):  # ArrayRecord read back from the bucket, byte for byte
    x_remote = getattr(remote, f'{part}_images').get(np.arange(len(fake[part][0])))
    np.testing.assert_array_equal(x_remote, fake[part][0])
    np.testing.assert_array_equal(getattr(remote, f'{part}_labels'), fake[part][1])
  np.testing.assert_array_equal(remote.labeled_idx, local.labeled_idx)
  _write_digits(f'{ROOT}/folder', {'train': fake['train'], 'test': fake['test']})
  _write_digits(tmp_path / 'folder', {'train': fake['train'], 'test': fake['test']})
  (remote_parts, names), (local_parts, _) = (
    own_data.read_folder(f'{ROOT}/folder'),
    own_data.read_folder(str(tmp_path / 'folder')),
  )
  assert names == ('c0', 'c1')
  for split in ('train', 'test'):
    for a, b in zip(remote_parts[split], local_parts[split]):
      np.testing.assert_array_equal(a, b)


def test_preflight_accepts_the_bucket_and_leaves_no_probe(gcs):
  storage.check_writable(f'{ROOT}/preflight')
  storage.check_readable(f'{ROOT}/preflight')
  assert _objects('preflight') == []


@pytest.mark.parametrize('check', [storage.check_writable, storage.check_readable])
def test_preflight_names_a_missing_bucket_and_creates_nothing(gcs, check):
  with pytest.raises(storage.StorageError) as err:
    check('gs://no-such-bucket/run')
  assert 'gs://no-such-bucket does not exist' in str(err.value)
  assert '`gcloud storage buckets create gs://no-such-bucket`' in str(err.value)
  assert 'no-such-bucket' not in [b.name for b in gcs_client.Client().list_buckets()]


def test_preflight_names_missing_credentials(gcs, monkeypatch, tmp_path):
  monkeypatch.delenv('STORAGE_EMULATOR_HOST')  # the real service, which wants credentials
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(tmp_path / 'missing-key.json'))
  with pytest.raises(
    storage.StorageError, match='no Google Cloud credentials.*gcloud auth application-default login'
  ):
    storage.check_writable('gs://some-bucket/run')


def test_preflight_names_an_unreachable_endpoint(gcs, monkeypatch):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', f'http://127.0.0.1:{gcs_lib.free_port()}')
  with pytest.raises(storage.StorageError, match='gs://test-bucket could not be reached'):
    storage.check_readable(f'{ROOT}/x', timeout_s=1)


def test_preflight_of_a_local_workdir_writes_nothing(tmp_path):
  storage.check_writable(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path) == []
  (tmp_path / 'file').write_text('')
  with pytest.raises(storage.StorageError, match='file is not a folder; pick a writable'):
    storage.check_writable(str(tmp_path / 'file' / 'run'))


def test_compare_and_sweep_read_and_write_the_bucket(gcs):
  # sweep.py's skip check (common.is_finished) and compare.py, both on a bucket
  runs = f'{ROOT}/sweeps/grid'
  for seed, error in ((0, 0.1), (1, 0.2)):
    run = f'{runs}/fix_{seed}'
    storage.write_json(
      f'{run}/config.json',
      {'algorithm': 'fixmatch', 'seed': seed, 'data': {'name': 'cifar10', 'num_labels': 40}},
    )
    storage.write_json(
      f'{run}/eval.json', {'accuracy': 1 - error, 'ece': 0.05, 'selection': 'final', 'step': 9}
    )
    storage.write_json(f'{run}/reliability.json', helpers.RELIABILITY_TABLE)
  storage.write_json(f'{runs}/unfinished/config.json', {'seed': 5})
  assert common.is_finished(f'{runs}/fix_0') and not common.is_finished(f'{runs}/unfinished')
  finished, unfinished = compare.discover([runs])
  assert finished == [f'{runs}/fix_0', f'{runs}/fix_1'] and unfinished == [f'{runs}/unfinished']
  assert compare.main([runs, f'--out={ROOT}/compare', '--reference=']) == 0
  assert _objects('compare/') == [
    'compare/reliability.data.json',
    'compare/reliability.png',
    'compare/table.csv',
    'compare/table.md',
  ]
  rows = storage.as_path(f'{ROOT}/compare/table.csv').read_text().splitlines()
  assert len(rows) == 2  # header + the one fixmatch/cifar10/40 group of two seeds


def test_run_assembly_refuses_a_missing_bucket_before_writing(gcs, tmp_path):
  from cmix_jax import run_setup
  from configs import tiny

  with pytest.raises(storage.StorageError, match='gs://no-such-bucket does not exist'):
    run_setup.build_run(tiny.config(), 'gs://no-such-bucket/run')
  config = tiny.config()
  config.data.data_dir = 'gs://no-such-data/tfds'
  with pytest.raises(storage.StorageError, match='cannot read gs://no-such-data/tfds'):
    run_setup.build_run(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_bad_checkpoints_in_a_bucket_are_moved_aside_never_deleted(gcs):
  """An unreadable newest step and an interrupted save in gs:// are renamed like on a disk."""
  workdir = f'{ROOT}/aside'
  state = {'w': np.arange(6.0)}
  manager = checkpointing.create_manager(workdir, 3)
  for step in (1, 2):
    checkpointing.save(manager, step, {'w': state['w'] + step}, {'step': step})
  checkpointing.wait_until_saved(manager)
  before = _objects('aside/checkpoints/2/')
  for name in (n for n in before if '/state/' in n):  # garble step 2's state files
    storage.write_bytes(f'gs://{gcs_lib.BUCKET}/{name}', b'garbage')
  storage.write_text(f'{workdir}/checkpoints/3.orbax-checkpoint-tmp-17/state/part', 'cut off')
  manager = checkpointing.create_manager(workdir, 3)
  step, restored, meta = checkpointing.restore_latest(
    manager, checkpointing.abstract_like(jax.tree.map(np.asarray, state))
  )
  assert (step, meta) == (1, {'step': 1})
  np.testing.assert_array_equal(restored['w'], state['w'] + 1)
  assert manager.all_steps() == [1]
  # Every object of step 2 and of the cut-off save is still there, under its new name.
  assert _objects('aside/checkpoints/2.unreadable/') == [
    n.replace('/2/', '/2.unreadable/') for n in before
  ]
  assert _objects('aside/checkpoints/3.partial/') == ['aside/checkpoints/3.partial/state/part']
  assert not _objects('aside/checkpoints/2/') and not _objects('aside/checkpoints/3.orbax')
