"""Not collected by the suite: the inner session of tests/test_emulator_lifetime.py, which
starts the emulator in each xdist worker and records its pid in $EMULATOR_PIDS."""

import os


def _record(gcs):
  with open(os.environ['EMULATOR_PIDS'], 'a') as f:
    f.write(f'{gcs.process.pid}\n')


def test_first_worker(gcs):
  _record(gcs)


def test_second_worker(gcs):
  _record(gcs)
