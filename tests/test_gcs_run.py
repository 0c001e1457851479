"""A whole run in an (emulated) bucket: data in gs://, workdir in gs://, TensorBoard events,
SIGKILL, exact resume with the lease taken over, and `python -m cmix_jax.evaluate` reading the
workdir back."""

from cmix_jax import storage
from cmix_jax.data import fake_data
from configs import tiny
from experiments import common
from tests import gcs as gcs_lib
from tests import helpers

ROOT = f'gs://{gcs_lib.BUCKET}/e2e'


def _train_records(workdir):
  return {
    r['step']: r for r in storage.read_jsonl(f'{workdir}/metrics.jsonl') if r['kind'] == 'train'
  }


def test_bucket_run_is_killed_resumes_exactly_and_evaluates(gcs):
  fake = tiny.config().data.fake  # the tiny run's data, as an npz source in the bucket
  arrays = fake_data.make_fake(
    fake.num_train, fake.num_test, fake.image_shape, fake.num_classes, seed=fake.seed
  )
  storage.save_npz(
    f'{ROOT}/tiny.npz',
    x_train=arrays['train'][0],
    y_train=arrays['train'][1],
    x_test=arrays['test'][0],
    y_test=arrays['test'][1],
  )
  data = [
    f'--set=data.name=npz:{ROOT}/tiny.npz',
    f'--set=data.data_dir={ROOT}/tfds',
    '--devices=2',  # TensorBoard on, as by default
  ]
  straight, killed = f'{ROOT}/straight', f'{ROOT}/killed'
  helpers.driver(f'--workdir={straight}', *data)
  proc = helpers.driver(
    f'--workdir={killed}',
    '--kill_after_checkpoint=2',
    *data,
    check=False,
  )
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert common.read_checkpoint(killed)[0] == 2
  assert storage.read_json(f'{killed}/lease.json')['pid'] > 0  # the killed run's lease is left
  resumed = helpers.driver(f'--workdir={killed}', *data)
  assert 'Taking over the workdir lease' in resumed.stderr
  assert not storage.as_path(f'{killed}/lease.json').exists()  # released at the clean end
  (step_a, state_a, meta_a), (step_b, state_b, meta_b) = (
    common.read_checkpoint(straight),
    common.read_checkpoint(killed),
  )
  assert step_a == step_b == 4 and meta_a == meta_b
  helpers.assert_same_state(state_a, state_b)
  assert _train_records(straight).keys() == _train_records(killed).keys() == {2, 4}
  for step in (2, 4):
    assert _train_records(straight)[step]['loss'] == _train_records(killed)[step]['loss']
  for workdir, runs in ((straight, 1), (killed, 2)):  # the killed run's file, the resumed one's
    events = [
      p for p in storage.as_path(workdir).iterdir() if p.name.startswith('events.out.tfevents.')
    ]
    assert len(events) == runs, events
    assert all(b'train/loss' in p.read_bytes() for p in events)  # uploaded with the scalars
  report = storage.read_json(f'{killed}/eval.json')
  proc = helpers.python_module('cmix_jax.evaluate', f'--workdir={killed}', timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = storage.read_json(f'{killed}/eval_latest_4.json')
  assert evaluated['metrics']['accuracy'] == report['final']['accuracy']
  png = storage.as_path(f'{killed}/eval_latest_4_reliability.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  assert storage.read_json(f'{killed}/split.json')['num_labeled'] == 32
