"""Assembles a run: validates the config, checks the workdir, loads data, builds the parts.

Nothing is written before every check has passed: `build_run` fills the config from
configs/default.py (`config_validation.with_defaults`; the one place a config enters, from
`train_and_evaluate` or a workdir's config.json), validates it (with the data set's facts),
checks that the data dir can be read and the workdir written (local or gs://), builds the
algorithm, model and optimizer, takes the workdir lease (one writing run per workdir), and
only then writes `config.json` and `split.json`. A resumed workdir must hold the same config
(`check_workdir_config`, but for RESUMABLE_FIELDS; fields its config.json predates count as
their defaults). Where the run starts (fresh or from a checkpoint) is `resume`'s; the loop is
`train`'s.
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections

from cmix_jax import algorithms
from cmix_jax import base_step
from cmix_jax import checkpointing
from cmix_jax import config_validation
from cmix_jax import evaluation
from cmix_jax import lease
from cmix_jax import parallel
from cmix_jax import reports
from cmix_jax import steps
from cmix_jax import storage
from cmix_jax.data import catalog
from cmix_jax.data import specs
from cmix_jax.data import splits
from cmix_jax.data import ssl_data

# Fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_FIELDS = frozenset(
  {
    'log_every',
    'eval_every',
    'checkpoint_every',
    'max_to_keep',
    'progress_bar',
    'data.data_dir',
    'data.prefetch',
    'eval.plots',
    'num_devices',
    'parallel_backend',
    'distributed.mode',
    'distributed.coordinator_address',
    'distributed.num_processes',
    'distributed.process_id',
    'distributed.cpu_collectives',
    'max_nonfinite_steps',
    'xla_flags',
    'lease_timeout_s',
    'tensorboard',
  }
)


@dataclasses.dataclass
class Run:
  """Everything the loop works with, built once by `build_run`."""

  config: ml_collections.ConfigDict
  workdir: str
  topo: parallel.Topology
  data: ssl_data.SSLData
  info: steps.DataInfo
  model: Any
  tx: Any
  algorithm: algorithms.Algorithm
  evaluator: evaluation.Evaluator
  manager: Any  # orbax CheckpointManager of workdir/checkpoints
  best_manager: Any  # the selection checkpoint, workdir/best/checkpoints
  writer: Any  # clu metric writer (TensorBoard on the lead process)
  is_lead: bool  # process 0 writes the files
  sharded_field: str | None  # state field kept sharded per device ('dynamics') or None
  # The workdir lease (process 0 of a writing run; a no-op elsewhere): refresh() at each log
  # interval, release() when the run ends.
  lease: Any = dataclasses.field(default_factory=lease.NoLease)


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_differences(saved: dict, current: dict) -> list[str]:
  """Names of fields that differ between two configs, other than RESUMABLE_FIELDS."""
  a, b = _flatten(saved), _flatten(current)
  return sorted(
    k
    for k in set(a) | set(b)
    if k not in RESUMABLE_FIELDS and a.get(k, '<absent>') != b.get(k, '<absent>')
  )


def check_workdir_config(config, workdir: str, allow_change: bool) -> None:
  """Refuses to resume a workdir whose saved config differs (unless allowed).

  Fields the saved config.json predates count as their defaults (what that run computed with).
  """
  path = storage.as_path(workdir) / 'config.json'
  if not path.exists():
    return
  saved = storage.read_json(path)
  try:
    saved = json.loads(config_validation.with_defaults(saved).to_json())
  except config_validation.ConfigError:
    pass  # a field this version does not know: the comparison below names it
  diff = config_differences(saved, json.loads(config.to_json()))
  if diff and not allow_change:
    raise config_validation.ConfigError(
      f'{workdir} holds a run with a different config (fields: {", ".join(diff)}). '
      'Use a new --workdir, or pass --allow_config_change to resume anyway.'
    )


def start_backend(config) -> None:
  """Backend flags and multi-host join: both must happen before the first computation."""
  parallel.set_xla_flags(config.xla_flags)
  try:
    logging.info('distributed: %s', parallel.start_distributed(config.distributed))
  except ValueError as e:
    raise config_validation.ConfigError(f'invalid config:\n  {e}') from None


def keep_tensorflow_off_accelerators() -> None:
  """TF only reads data and writes TensorBoard events: hide the GPUs from it before it starts.

  Imported here, after the checks, so bad input is refused without TF's seconds of import.
  """
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')


def open_data(config):
  """The raw data set (spec, splits), before any labeled/unlabeled split is drawn."""
  fake = config.data.fake
  return catalog.open_dataset(
    config.data.name,
    os.path.expanduser(config.data.data_dir),
    fake.to_dict() if fake is not None else None,
  )


def split_data(config, raw) -> ssl_data.SSLData:
  """Labeled / validation / unlabeled sets of a raw data set, drawn from the config's seed."""
  return ssl_data.make_ssl_data(
    raw,
    config.data.num_labels,
    config.seed,
    val_size=config.data.val_size,
    include_lb_to_ulb=config.data.include_lb_to_ulb,
    unlabeled_size=config.data.unlabeled_size,
  )


def _static_data_facts(config) -> tuple[int | None, int | None]:
  """(num_classes, num_train) known before reading any data, so checks come first."""
  if config.data.name == 'fake' and config.data.fake is not None:
    return int(config.data.fake.num_classes), int(config.data.fake.num_train)
  spec = specs.SPECS.get(config.data.name)
  return (spec.num_classes if spec else None), None


def data_info(data: ssl_data.SSLData) -> steps.DataInfo:
  spec = data.spec
  return steps.DataInfo(
    num_labeled=data.num_labeled,
    num_unlabeled=data.num_unlabeled,
    num_classes=data.num_classes,
    image_shape=tuple(spec.image_shape),
    mean=tuple(spec.mean),
    std=tuple(spec.std),
  )


def _algorithm(config) -> algorithms.Algorithm:
  """The configured algorithm; its own hyperparameter checks are config errors."""
  try:
    return algorithms.get_algorithm(config)
  except ValueError as e:
    raise config_validation.ConfigError(f'invalid config:\n  {e}') from None


def _write_run_files(config, workdir: str, data: ssl_data.SSLData) -> None:
  """config.json (the resolved config) and split.json (the drawn indices, for audits)."""
  storage.write_text(
    storage.as_path(workdir) / 'config.json', config.to_json_best_effort(indent=2, sort_keys=True)
  )
  splits.save_split(
    workdir,
    data.labeled_idx,
    data.val_idx,
    data.train_labels,
    config.seed,
    config.data.name,
    unlabeled=data.unlabeled_record(),
  )


def build_run(config, workdir: str, allow_config_change: bool = False, write: bool = True) -> Run:
  """Validates, loads data and builds everything; writes nothing before all checks pass.

  `config` may lack fields (a workdir's older config.json, a partial config): they take their
  defaults, and the Run holds the filled copy. `write=False` (evaluation of an existing workdir)
  skips the config check and the writes.
  """
  config = config_validation.with_defaults(config)
  topo = _checked_topology(config)
  algorithm = _algorithm(config)
  storage.check_readable(config.data.data_dir)
  timeout_s = config.lease_timeout_s if write else None
  if write:
    storage.check_writable(workdir)
    lease.check(workdir, timeout_s)  # early refusal
  keep_tensorflow_off_accelerators()
  raw = open_data(config)
  config_validation.validate(config, topo.num_devices, raw.spec.num_classes, len(raw.train_labels))
  data = split_data(config, raw)
  if write:
    check_workdir_config(config, workdir, allow_config_change)
  info = data_info(data)
  model = steps.create_model(config, info.num_classes, topo.num_devices)
  tx = steps.create_optimizer(config.optim, config.num_train_steps)
  is_lead = jax.process_index() == 0
  held = lease.take(workdir, timeout_s) if write else lease.NoLease()
  try:
    if is_lead and write:
      _write_run_files(config, workdir, data)
    return Run(
      config=config,
      workdir=workdir,
      topo=topo,
      data=data,
      info=info,
      model=model,
      tx=tx,
      algorithm=algorithm,
      evaluator=make_evaluator(config, info, topo),
      manager=checkpointing.create_manager(workdir, config.max_to_keep),
      best_manager=checkpointing.create_manager(os.path.join(workdir, 'best'), 1),
      writer=reports.metric_writer(workdir, write and is_lead and config.tensorboard),
      is_lead=is_lead,
      sharded_field='dynamics' if base_step.tables_sharded(config) else None,
      lease=held,
    )
  except BaseException:
    held.release()
    raise


def _checked_topology(config) -> parallel.Topology:
  """Starts the backend and checks the config against the devices (before any data is read)."""
  start_backend(config)
  try:
    topo = parallel.make_topology(config.num_devices)
  except ValueError as e:  # more devices asked for than exist
    raise config_validation.ConfigError(f'invalid config:\n  {e}') from None
  config_validation.validate(config, topo.num_devices, *_static_data_facts(config))
  return topo


def make_evaluator(config, info: steps.DataInfo, topo: parallel.Topology) -> evaluation.Evaluator:
  """The one evaluation path (float32 model) of the loop, `evaluate` and temperature scaling."""
  return evaluation.Evaluator(
    steps.create_eval_model(config, info.num_classes, topo.num_devices),
    info,
    topo,
    config.parallel_backend,
    config.data.eval_batch_size,
    config.eval.num_bins,
  )
