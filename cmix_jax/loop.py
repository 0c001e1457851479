"""The host-side training loop: setup, resume, steps, periodic logging/eval/checkpoints."""

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from clu import metric_writers
from jax.experimental import multihost_utils

from cmix_jax import algorithms
from cmix_jax import checkpointing
from cmix_jax import config_validation
from cmix_jax import dynamics
from cmix_jax import evaluation
from cmix_jax import parallel
from cmix_jax import train
from cmix_jax.data import datasets
from cmix_jax.data import pipeline
from cmix_jax.data import splits

# Fields that may change when a run is resumed (they do not change what is computed).
RESUMABLE_FIELDS = frozenset({
    'log_every', 'eval_every', 'checkpoint_every', 'max_to_keep', 'progress_bar',
    'data.data_dir', 'data.prefetch', 'eval.plots', 'num_devices', 'parallel_backend',
    'distributed.coordinator_address', 'distributed.num_processes',
    'distributed.process_id', 'distributed.cpu_collectives', 'max_nonfinite_steps',
    'xla_flags'})


class Preempted(Exception):
  """Raised inside the loop after a SIGTERM-triggered checkpoint; the run exits 0."""


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/Inf more often than allowed."""


@dataclasses.dataclass
class StopFlag:
  """Set by the SIGTERM handler; read at step boundaries."""
  requested: bool = False


@dataclasses.dataclass
class Run:
  """What the loop works with (built once by `setup`)."""
  config: ml_collections.ConfigDict
  workdir: str
  topo: parallel.Topology
  data: Any
  info: train.DataInfo
  model: Any
  tx: Any
  algorithm: Any
  manager: Any
  best_manager: Any
  writer: Any
  is_lead: bool


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
  return sorted(k for k in set(a) | set(b)
                if k not in RESUMABLE_FIELDS and a.get(k, '<absent>') != b.get(k, '<absent>'))


def check_workdir_config(config, workdir: str, allow_change: bool) -> None:
  """Refuses to resume a workdir whose saved config differs (unless allowed)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  diff = config_differences(saved, json.loads(config.to_json()))
  if diff and not allow_change:
    raise config_validation.ConfigError(
        f'{workdir} holds a run with a different config (fields: {", ".join(diff)}). '
        'Use a new --workdir, or pass --allow_config_change to resume anyway.')


def _init_backend(config) -> None:
  """Backend flags and multi-host join: both must happen before the first computation."""
  parallel.set_xla_flags(config.get('xla_flags', ''))
  dist = config.get('distributed', None)
  if dist is None:
    return
  address = dist.coordinator_address or os.environ.get('CMIX_COORDINATOR_ADDRESS', '')
  if address:
    parallel.initialize_distributed(
        address, int(dist.num_processes or os.environ.get('CMIX_NUM_PROCESSES', 1)),
        int(dist.process_id if dist.process_id >= 0 else os.environ.get('CMIX_PROCESS_ID', 0)),
        dist.cpu_collectives or None)


def open_data(config):
  """The raw data set (spec, splits), before any labeled/unlabeled split is drawn."""
  fake = config.data.get('fake', None)
  return datasets.open_dataset(config.data.name, os.path.expanduser(config.data.data_dir),
                               fake.to_dict() if fake is not None else None)


def split_data(config, raw):
  """Labeled / validation / unlabeled sets of a raw data set, drawn from the config's seed."""
  return datasets.make_ssl_data(raw, config.data.num_labels, config.seed,
                                val_size=config.data.val_size,
                                include_lb_to_ulb=config.data.include_lb_to_ulb)


def _static_data_facts(config) -> tuple[int | None, int | None]:
  """(num_classes, num_train) known before reading any data, so checks come first."""
  if config.data.name == 'fake' and config.data.get('fake') is not None:
    return int(config.data.fake.num_classes), int(config.data.fake.num_train)
  spec = datasets.SPECS.get(config.data.name)
  return (spec.num_classes if spec else None), None


def data_info(data) -> train.DataInfo:
  spec = data.spec
  return train.DataInfo(num_labeled=data.num_labeled, num_unlabeled=data.num_unlabeled,
                        num_classes=data.num_classes, image_shape=tuple(spec.image_shape),
                        mean=tuple(spec.mean), std=tuple(spec.std))


def setup(config, workdir: str, allow_config_change: bool = False, write: bool = True) -> Run:
  """Validates, loads data and builds everything; writes nothing before all checks pass.

  `write=False` (evaluation of an existing workdir) skips writing config and split.
  """
  _init_backend(config)
  topo = parallel.make_topology(config.num_devices)
  config_validation.validate(config, topo.num_devices, *_static_data_facts(config))
  raw = open_data(config)
  config_validation.validate(config, topo.num_devices, raw.spec.num_classes,
                             len(raw.train_labels))
  data = split_data(config, raw)
  if write:
    check_workdir_config(config, workdir, allow_config_change)
  is_lead = jax.process_index() == 0
  info = data_info(data)
  if is_lead and write:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    splits.save_split(workdir, data.labeled_idx, data.val_idx, data.train_labels,
                      config.seed, config.data.name)
  model = train.create_model(config, info.num_classes)
  return Run(
      config=config, workdir=workdir, topo=topo, data=data, info=info, model=model,
      tx=train.create_optimizer(config.optim, config.num_train_steps),
      algorithm=algorithms.get_algorithm(config),
      manager=checkpointing.create_manager(workdir, config.max_to_keep),
      best_manager=checkpointing.create_manager(os.path.join(workdir, 'best'), 1),
      writer=metric_writers.create_default_writer(workdir, just_logging=not (is_lead and write)),
      is_lead=is_lead)


def to_replicated(tree, topo: parallel.Topology):
  """Host pytree -> arrays replicated over the mesh."""
  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_process_local_data(topo.replicated, x, x.shape)
  return jax.tree.map(put, tree)


def dynamics_sharded(config) -> bool:
  return bool(config.get('dynamics_sharded', False))


def stack_state(state, topo: parallel.Topology, sharded: bool):
  """Checkpoint layout -> per-device stacked [D, ...] layout used by the steps.

  Checkpoint layout: everything replicated, except sharded dynamics tables, which stay
  stacked [D, N/D, ...] (each device's own slice) in both layouts.
  """
  if not sharded:
    return parallel.replicate(state, topo)
  return parallel.replicate(state.replace(dynamics=None), topo).replace(dynamics=state.dynamics)


def unstack_state(state, topo: parallel.Topology, sharded: bool):
  """Per-device stacked layout -> checkpoint layout (see `stack_state`)."""
  if not sharded:
    return parallel.unreplicate(state, topo)
  return parallel.unreplicate(state.replace(dynamics=None), topo).replace(
      dynamics=state.dynamics)


def fresh_state(run: Run):
  """A new state in the checkpoint layout (zero dynamics shards when sharded)."""
  sharded = dynamics_sharded(run.config)
  state = train.create_train_state(run.config, run.model, run.tx, run.algorithm, run.info,
                                   jax.random.key(run.config.seed),
                                   dynamics_shards=run.topo.num_devices if sharded else 1)
  if not sharded:
    return to_replicated(state, run.topo)
  return to_replicated(state.replace(dynamics=None), run.topo).replace(
      dynamics=parallel.replicate(state.dynamics, run.topo))  # identical zero shards


def host_dynamics(run: Run, state) -> dynamics.DynamicsState:
  """Full dynamics tables on the host from the stacked state (gathers shards)."""
  if not dynamics_sharded(run.config):
    return parallel.first_replica_to_host(state.dynamics)
  stacked = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                         state.dynamics)
  return dynamics.unshard_state(stacked, run.info.num_labeled, run.info.num_unlabeled)


def initial_state(run: Run):
  """(state in checkpoint layout, meta) from the newest readable checkpoint, or fresh."""
  fresh = fresh_state(run)
  restored = checkpointing.restore_latest(run.manager, checkpointing.abstract_like(fresh))
  if restored is None:
    return fresh, {'step': 0, 'history': [], 'best': {}}
  step, state, meta = restored
  logging.info('Resuming from step %d in %s', step, run.workdir)
  return state, meta


def make_step_fns(run: Run) -> dict:
  """The parallel train steps: 'base' (and 'mix' when CalibrateMix is enabled)."""
  backend = run.config.get('parallel_backend', 'pmap')
  step = functools.partial(train.train_step, model=run.model, tx=run.tx,
                           algorithm=run.algorithm, config=run.config, info=run.info)
  fns = {'base': parallel.parallelize(functools.partial(step, mix=False), run.topo,
                                      backend=backend)}
  if run.config.calibratemix.enabled:
    fns['mix'] = parallel.parallelize(functools.partial(step, mix=True), run.topo,
                                      backend=backend)
  return fns


def step_kind(config, step: int) -> str:
  cm = config.calibratemix
  return 'mix' if cm.enabled and step > cm.warmup_steps else 'base'  # steps 0..warmup: base


def train_iterator(run: Run, start_step: int):
  """Prefetched, device-placed batches from `start_step` on (deterministic in the step)."""
  data = run.config.data
  it = pipeline.TrainIterator(
      run.data, global_batch=data.batch_size,
      uratio=data.uratio if run.algorithm.uses_unlabeled else 0, seed=run.config.seed,
      start_step=start_step, local_devices=run.topo.num_local_devices,
      process_index=jax.process_index(), process_count=jax.process_count())
  return pipeline.prefetch(it, data.prefetch, functools.partial(parallel.shard_batch,
                                                                topo=run.topo))


def run_steps(step_fns, state, batches, config, start: int, end: int,
              flag: StopFlag | None = None):
  """Steps [start, end) with no host sync (metrics stay on device); stops early on SIGTERM."""
  step_metrics = []
  for step in range(start, end):
    if flag is not None and flag.requested:
      break
    state, metrics = step_fns[step_kind(config, step)](state, next(batches))
    step_metrics.append(metrics)
  return state, step_metrics


def summarize_metrics(step_metrics: list) -> dict:
  """Mean over steps of replica 0's metrics (the one host sync per log interval)."""
  host = [parallel.first_replica_to_host(m) for m in step_metrics]
  keys = set().union(*host)
  return {k: float(np.mean([h[k] for h in host if k in h])) for k in sorted(keys)}


def check_finite(state, config) -> None:
  """Stops the run once more non-finite steps happened than allowed."""
  allowed = config.get('max_nonfinite_steps', 0)
  count = int(parallel.first_replica_to_host(state.nonfinite_steps))
  if count > allowed:
    first = int(parallel.first_replica_to_host(state.first_nonfinite_step))
    raise NonFiniteError(
        f'non-finite loss or gradient first at step {first} '
        f'({count} such steps skipped, {allowed} allowed); '
        'the last good checkpoint is kept. Lower the learning rate or raise '
        '--config.max_nonfinite_steps to skip such steps.')


def split_arrays(run: Run, split: str):
  """(images, labels) of the test split or of the labeled validation slice."""
  if split == 'test':
    return run.data.test_images, run.data.test_labels
  val_images = datasets.ArrayImageSource(run.data.train_images.get(run.data.val_idx))
  return val_images, run.data.train_labels[run.data.val_idx]


def evaluate(run: Run, state, split: str = 'test') -> dict:
  """EMA-model metrics on the test split or the labeled validation slice (streamed sums)."""
  images, labels = split_arrays(run, split)
  sums, _, _ = evaluation.accumulate(_eval_fn(run), state, images, labels,
                                     run.config.data.eval_batch_size, run.topo,
                                     run.info.num_classes)
  return evaluation.result_from_sums(sums, run.config.eval.num_bins)


@functools.lru_cache(maxsize=None)
def _eval_fn_cached(model, info, topo, backend):
  return evaluation.make_eval_fn(model, info, topo, backend)


def _eval_fn(run: Run):
  return _eval_fn_cached(run.model, run.info, run.topo, run.config.get('parallel_backend', 'pmap'))


def selection_metric(config) -> str | None:
  return {'best_test': 'test', 'best_val': 'val'}.get(config.eval.selection)


def periodic_eval(run: Run, state, step: int, meta: dict) -> dict:
  """Evaluates, writes metrics, and saves the `best` checkpoint when selection improves."""
  result = evaluate(run, state, 'test')
  record = {'step': step, **{f'test/{k}': v for k, v in result['metrics'].items()}}
  if run.config.eval.selection == 'best_val' and len(run.data.val_idx):
    val = evaluate(run, state, 'val')
    record.update({f'val/{k}': v for k, v in val['metrics'].items()})
  run.writer.write_scalars(step, record)
  meta['history'].append(record)
  sel = selection_metric(run.config)
  if sel and record[f'{sel}/accuracy'] > meta['best'].get(f'{sel}/accuracy', -1.0):
    meta['best'] = dict(record)
    meta['best_reliability'] = result['reliability']
    checkpointing.save(run.best_manager, step,
                       unstack_state(state, run.topo, dynamics_sharded(run.config)),
                       {'record': record}, wait=True)
  if run.is_lead:
    _append_jsonl(run.workdir, {'kind': 'eval', **record})
  return result


def _append_jsonl(workdir: str, record: dict) -> None:
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')


def save_checkpoint(run: Run, state, step: int, meta: dict, wait: bool = False) -> None:
  meta = dict(meta, step=step)
  checkpointing.save(run.manager, step,
                     unstack_state(state, run.topo, dynamics_sharded(run.config)), meta, wait=wait)


def final_report(run: Run, state, result: dict, meta: dict, step: int) -> dict:
  """Writes eval.json (the selected checkpoint's metrics), pictures and the dynamics tables."""
  selection = run.config.eval.selection
  selected, selected_step, reliability = dict(result['metrics']), step, result['reliability']
  if selection != 'final' and meta['best']:
    selected = {k[len('test/'):]: v for k, v in meta['best'].items() if k.startswith('test/')}
    selected_step, reliability = meta['best']['step'], meta['best_reliability']
  report = {**selected, 'selection': selection, 'step': selected_step,
            'final': dict(result['metrics'], step=step), 'best': meta['best'],
            'num_train_steps': run.config.num_train_steps}
  if run.is_lead:
    with open(os.path.join(run.workdir, 'eval.json'), 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)
    if run.config.eval.plots:
      evaluation.write_report(result, run.workdir, prefix='final',
                              title=f'{run.config.algorithm} final (EMA, step {step})')
      write_dynamics(run, state)
    with open(os.path.join(run.workdir, 'reliability.json'), 'w') as f:
      json.dump(reliability, f)  # of the selected checkpoint, like eval.json's top level
    _training_curves(run, meta)
  return report


def write_dynamics(run: Run, state) -> None:
  """Exports the dynamics tables (.npz) and draws the labeled/unlabeled data maps."""
  from cmix_jax import plots  # pylint: disable=g-import-not-at-top
  dyn = host_dynamics(run, state)
  dynamics.save_npz(dyn, os.path.join(run.workdir, 'dynamics.npz'))
  lb_hidden_ok = None
  plots.data_map(np.asarray(dynamics.labeled_variability(dyn)),
                 np.asarray(dynamics.labeled_confidence(dyn)),
                 os.path.join(run.workdir, 'data_map_labeled.png'),
                 color=lb_hidden_ok, title='labeled: gold-label probability')
  if run.algorithm.uses_unlabeled:
    hidden = run.data.unlabeled_labels
    pseudo = np.asarray(dyn.apm).argmax(-1)
    correct = np.where(hidden >= 0, pseudo == hidden, False).astype(np.float32)
    plots.data_map(np.asarray(dynamics.unlabeled_variability(dyn)),
                   np.asarray(dynamics.unlabeled_confidence(dyn)),
                   os.path.join(run.workdir, 'data_map_unlabeled.png'), color=correct,
                   color_label='APM pseudo-label correct',
                   title='unlabeled: pseudo-label probability')


def _training_curves(run: Run, meta: dict) -> None:
  from cmix_jax import plots  # pylint: disable=g-import-not-at-top
  if meta['history']:
    history = [{'step': r['step'], 'accuracy': r['test/accuracy'], 'ece': r['test/ece']}
               for r in meta['history']]
    plots.training_curves(history, os.path.join(run.workdir, 'curves.png'))


def _install_sigterm(flag: StopFlag):
  def handler(signum, frame):  # pylint: disable=unused-argument
    flag.requested = True
  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    return None


def _boundaries(config, start: int) -> list[int]:
  """Steps at which the loop syncs with the host (log, eval, checkpoint, end)."""
  total = config.num_train_steps
  marks = {total}
  for every in (config.log_every, config.eval_every, config.checkpoint_every):
    marks.update(range(every, total, every))
  return sorted(m for m in marks if m > start)


def run(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False,
        stop_flag: StopFlag | None = None) -> dict:
  """Trains (resuming if possible), evaluates and writes the final report."""
  r = setup(config, workdir, allow_config_change)
  flag = stop_flag or StopFlag()
  previous = _install_sigterm(flag)
  try:
    return _train(r, flag)
  finally:
    r.manager.wait_until_finished()
    r.writer.flush()
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def _preempt(r: Run, state, step: int, meta: dict) -> dict:
  """Saves at the current step boundary so a rerun of the same command resumes here."""
  if step in r.manager.all_steps():  # this boundary's periodic checkpoint is already there
    r.manager.wait_until_finished()
  else:
    save_checkpoint(r, state, step, meta, wait=True)
  logging.warning('SIGTERM: saved a checkpoint at step %d in %s.', step, r.workdir)
  print(f'Preempted: checkpoint saved at step {step} in {r.workdir}; rerun the same '
        'command to resume.', flush=True)
  return {'preempted': True, 'step': step}


def _train(r: Run, flag: StopFlag) -> dict:
  config = r.config
  state, meta = initial_state(r)
  start = int(meta['step'])
  state = stack_state(state, r.topo, dynamics_sharded(config))
  step_fns = make_step_fns(r)
  batches = train_iterator(r, start)
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start, disable=not (
      r.is_lead and config.progress_bar), dynamic_ncols=True, desc=config.algorithm)
  result, step, t0 = None, start, time.time()
  try:
    for end in _boundaries(config, start):
      state, step_metrics = run_steps(step_fns, state, batches, config, step, end, flag)
      if not step_metrics:
        break
      summary = summarize_metrics(step_metrics)
      summary['steps_per_sec'] = len(step_metrics) / max(time.time() - t0, 1e-9)
      step, t0 = step + len(step_metrics), time.time()
      bar.update(len(step_metrics))
      check_finite(state, config)
      if step % config.log_every == 0 or step == config.num_train_steps:
        r.writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        if r.is_lead:
          _append_jsonl(r.workdir, {'kind': 'train', 'step': step, **summary})
      if step % config.eval_every == 0 or step == config.num_train_steps:
        result = periodic_eval(r, state, step, meta)
        bar.set_postfix(loss=f'{summary["loss"]:.3f}',
                        acc=f'{result["metrics"]["accuracy"]:.4f}',
                        ece=f'{result["metrics"]["ece"]:.4f}')
      if step % config.checkpoint_every == 0 or step == config.num_train_steps:
        save_checkpoint(r, state, step, meta)
      if flag.requested and step < config.num_train_steps:
        return _preempt(r, state, step, meta)
    if flag.requested and step < config.num_train_steps:
      return _preempt(r, state, step, meta)
  finally:
    bar.close()
    batches.close()
  if result is None:
    result = periodic_eval(r, state, step, meta)
  return final_report(r, state, result, meta, step)
