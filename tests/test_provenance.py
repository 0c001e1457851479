"""cmix_jax.provenance: what a result records about the machine and code it ran on."""

import subprocess

import jax

from cmix_jax import provenance


def _git(repo, *args):
  subprocess.run(['git', '-C', str(repo), *args], check=True, capture_output=True)


def test_commit_and_dirty_flag_of_a_repository(tmp_path):
  assert provenance.git_commit(str(tmp_path)) == {'commit': None, 'dirty': None}  # no repo
  _git(tmp_path, 'init', '-q')
  (tmp_path / 'a.txt').write_text('one\n')
  _git(tmp_path, 'add', 'a.txt')
  _git(tmp_path, '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'one')
  head = subprocess.run(
    ['git', '-C', str(tmp_path), 'rev-parse', 'HEAD'], capture_output=True, text=True
  ).stdout.strip()
  assert provenance.git_commit(str(tmp_path)) == {'commit': head, 'dirty': False}
  (tmp_path / 'untracked.txt').write_text('ignored\n')  # untracked files do not count
  assert provenance.git_commit(str(tmp_path))['dirty'] is False
  (tmp_path / 'a.txt').write_text('two\n')
  assert provenance.git_commit(str(tmp_path)) == {'commit': head, 'dirty': True}


def test_describe_names_machine_devices_and_versions():
  record = provenance.describe(devices_used=1)
  assert record['machine_id'] == provenance.machine_id() and len(record['machine_id']) == 12
  assert record['platform'] == jax.devices()[0].platform
  assert record['device_count'] == jax.device_count() and record['devices_used'] == 1
  assert record['versions']['jax'] == jax.__version__
  assert set(provenance.PACKAGES) <= set(record['versions'])
  assert record['cpu']['cores'] >= 1 and set(record['cpu']['isa']) <= set(provenance.ISA_FLAGS)
  assert record['commit'] is None or len(record['commit']) == 40
