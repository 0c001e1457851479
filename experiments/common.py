"""What the experiment scripts share: the variants, the training command, run bookkeeping,
one timer and one checkpoint reader.

Run the scripts from the repository root as modules (`python -m experiments.study`), so that
`experiments`, `configs` and `cmix_jax` import as packages. Only the standard library is
imported here at load time (experiments/bench_torch.py runs without cmix_jax importable).
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, 'experiments')

# ----------------------------------------------------------------------------
# Variants: name -> config overrides on top of a base algorithm (study, sweep, compare, bench).

VARIANTS = {
  'base': {},
  'control': {'calibratemix.enabled': True, 'calibratemix.second_pass_only': True},
  'cmix': {'calibratemix.enabled': True},
  'cmix_fused': {'calibratemix.enabled': True, 'calibratemix.passes': 1},
  'split_random': {'calibratemix.enabled': True, 'calibratemix.pair_k_frac': 1.0},
  'randmix': {'calibratemix.enabled': True, 'calibratemix.random_pairing': True},
  'ls': {'ssl.label_smoothing': 0.1},
}


def dotted(config: dict, key: str):
  """config['a']['b'] for key 'a.b' (a run's config.json); KeyError(key) where it has none."""
  node = config
  for part in key.split('.'):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def _holds(config: dict, overrides: dict) -> bool:
  try:
    return all(dotted(config, k) == v for k, v in overrides.items())
  except KeyError:
    return False


def variant_of(config: dict, among=tuple(VARIANTS)) -> str:
  """The variant of `among` with the most overrides that a run's config.json all holds."""
  holds = [v for v in among if _holds(config, VARIANTS[v])]
  if not holds:
    raise ValueError(f'no variant of {among} fits the config; include base.')
  return max(holds, key=lambda v: len(VARIANTS[v]))


# ----------------------------------------------------------------------------
# The training command, config files and the scripts' command lines.


def main_command(
  config: str,
  workdir: str,
  overrides: dict | None = None,
  flags=(),
  python: str = sys.executable,
  data_dir: str | None = None,
) -> list[str]:
  """argv of one `python -m cmix_jax.main` run.

  `--config=CONFIG` (`--config.data.data_dir=DATA_DIR` after it when given), `--workdir`,
  then `--config.KEY=VALUE` per override and the ready-made `flags` last.
  """
  argv = [python, '-m', 'cmix_jax.main', f'--config={config}']
  argv += [] if data_dir is None else [f'--config.data.data_dir={data_dir}']
  argv += [f'--workdir={workdir}']
  argv += [f'--config.{k}={v}' for k, v in (overrides or {}).items()]
  return argv + list(flags)


def load_config(config_flag: str):
  """The ConfigDict of `file[:argument]` (a path from the repository root), as cmix_jax.main
  builds it; FileNotFoundError when there is no such file."""
  path, _, argument = config_flag.partition(':')
  file = path if os.path.isabs(path) else os.path.join(REPO, path)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'no config file {path}')
  name = os.path.splitext(os.path.basename(file))[0]
  spec = importlib.util.spec_from_file_location(f'config_file_{name}', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def arg_parser(doc: str, parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
  """A script's parser whose --help shows its docstring as written."""
  return parser_class(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_xla_flags(parser: argparse.ArgumentParser) -> None:
  """A benchmark's --xla_flags, by default the default config's."""
  from configs import default

  parser.add_argument(
    '--xla_flags',
    default=default.get_config().xla_flags,
    help="backend flags as config.xla_flags ('' = XLA's defaults)",
  )


# ----------------------------------------------------------------------------
# Run bookkeeping.


def run_name(algorithm: str, variant: str, seed: int, labels=None) -> str:
  """'fixmatch-cmix-n40-s0' (no -n part when labels is None): a study run's name."""
  return f'{algorithm}-{variant}' + ('' if labels is None else f'-n{labels}') + f'-s{seed}'


FINISHED_FILE = 'eval.json'  # written by cmix_jax.main at a run's end


def is_finished(workdir: str) -> bool:
  """Whether the run in `workdir` (local or gs://) ran to its end."""
  from cmix_jax import storage

  return (storage.as_path(workdir) / FINISHED_FILE).exists()


def log_path(workdir: str, remote_logs: str) -> str:
  """Local file for a run's output: `workdir.log` beside a local workdir, or
  `remote_logs/<its name>.log` for a gs:// one."""
  from cmix_jax import storage

  if storage.is_remote(workdir):
    return os.path.join(remote_logs, os.path.basename(workdir.rstrip('/')) + '.log')
  return os.path.abspath(os.path.expanduser(workdir)) + '.log'


def write_json(path: str, record) -> None:
  """A result file, written whole, local or gs:// (a killed script never leaves half of one)."""
  from cmix_jax import storage

  storage.write_json(path, record, indent=1, sort_keys=True, allow_nan=True)


def read_checkpoint(workdir: str) -> tuple:
  """(step, state as numpy arrays, meta) of the newest checkpoint of a run, local or gs://,
  whatever topology saved it."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp

  from cmix_jax import checkpointing
  from cmix_jax import storage

  directory = checkpointing.checkpoint_dir(workdir)
  step = ocp.CheckpointManager(directory, item_names=('state', 'meta')).latest_step()
  path = directory / str(step) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  state = checkpointer.restore(
    path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  )
  return step, state, storage.read_json(directory / str(step) / 'meta' / 'metadata')


# ----------------------------------------------------------------------------
# Timing.


def median_seconds(fn, runs: int, warmup: int = 1) -> float:
  """Median wall seconds of `runs` calls of fn() after `warmup` untimed ones (compiling);
  every call waits for its result (jax.block_until_ready; a None result is ready)."""
  import jax

  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(statistics.median(times))
