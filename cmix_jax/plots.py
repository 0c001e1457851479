"""Pictures of calibration and training dynamics (matplotlib Agg, no pyplot global state).

Every function writes a PNG at `path` (local or gs://) and the numbers behind it next to it
(`<stem>.data.json`, or `<stem>.data.csv` for per-point data maps) and returns
(png_path, data_path).
"""

import csv
import io
import math
import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cmix_jax import storage

TABLE_KEYS = ('bin_lo', 'bin_hi', 'count', 'mean_conf', 'accuracy')
MAX_MAP_POINTS = 20_000
_DPI = 120


def data_path(path: str, ext: str = 'json') -> str:
  """`dir/name.png` -> `dir/name.data.<ext>` (the numbers file beside a picture)."""
  stem, _ = os.path.splitext(path)
  return f'{stem}.data.{ext}'


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=_DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> str:
  """PNG rendered in memory, then written whole (local or gs://)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', bbox_inches='tight')
  storage.write_bytes(path, buffer.getvalue())
  return path


def _write_json(path: str, payload) -> str:
  storage.write_json(path, payload, indent=1, allow_nan=False)
  return path


def _as_table(table: Mapping, name: str = 'table') -> dict:
  """Reliability table as float64 arrays, checked for keys and equal lengths."""
  if not isinstance(table, Mapping):
    raise ValueError(
      f'{name} must be a dict with keys {TABLE_KEYS} (metrics.reliability_table output).'
    )
  missing = [k for k in TABLE_KEYS if k not in table]
  if missing:
    raise ValueError(
      f'{name} lacks keys {missing}; pass metrics.reliability_table output (keys {TABLE_KEYS}).'
    )
  out = {k: np.asarray(table[k], np.float64).reshape(-1) for k in TABLE_KEYS}
  if len({len(v) for v in out.values()}) != 1 or not len(out['count']):
    raise ValueError(
      f'{name}: every column must have the same, non-zero number of bins, got '
      f'{ {k: len(v) for k, v in out.items()} }.'
    )
  return out


def table_ece(table: Mapping) -> float:
  """ECE of a reliability table: sum_b count_b/N |accuracy_b - mean_conf_b|."""
  t = _as_table(table)
  n = t['count'].sum()
  return float((t['count'] * np.abs(t['accuracy'] - t['mean_conf'])).sum() / max(n, 1.0))


def pool_tables(tables: Sequence[Mapping]) -> dict:
  """One reliability table from several with the same bins (counts add, means weighted)."""
  ts = [_as_table(t) for t in tables]
  if not ts:
    raise ValueError('pool_tables needs at least one table.')
  for t in ts[1:]:
    if len(t['bin_lo']) != len(ts[0]['bin_lo']) or not np.allclose(t['bin_lo'], ts[0]['bin_lo']):
      raise ValueError(
        'pool_tables: the tables have different bins; pool only tables built '
        'with the same num_bins.'
      )
  count = sum(t['count'] for t in ts)
  safe = np.maximum(count, 1.0)
  conf = sum(t['count'] * t['mean_conf'] for t in ts) / safe
  acc = sum(t['count'] * t['accuracy'] for t in ts) / safe
  return {
    'bin_lo': ts[0]['bin_lo'],
    'bin_hi': ts[0]['bin_hi'],
    'count': count,
    'mean_conf': np.where(count > 0, conf, 0.0),
    'accuracy': np.where(count > 0, acc, 0.0),
  }


def _draw_reliability(
  ax, t: dict, title: str | None, ece: float | None, show_counts: bool = True
) -> None:
  """Accuracy bars per bin, the diagonal, the gap to mean confidence hatched."""
  width = t['bin_hi'] - t['bin_lo']
  full = t['count'] > 0
  ax.bar(
    t['bin_lo'][full],
    t['accuracy'][full],
    width=width[full],
    align='edge',
    color='tab:blue',
    edgecolor='black',
    linewidth=0.6,
    label='accuracy',
  )
  lo = np.minimum(t['accuracy'], t['mean_conf'])[full]
  gap = np.abs(t['mean_conf'] - t['accuracy'])[full]
  ax.bar(
    t['bin_lo'][full],
    gap,
    bottom=lo,
    width=width[full],
    align='edge',
    fill=False,
    edgecolor='tab:red',
    hatch='///',
    linewidth=0.8,
    label='gap to mean confidence',
  )
  ax.plot([0, 1], [0, 1], '--', color='gray', linewidth=1, label='perfect calibration')
  if show_counts:
    for x, w, c in zip(t['bin_lo'][full], width[full], t['count'][full]):
      ax.text(
        x + w / 2,
        0.98,
        f'{int(round(c))}',
        ha='center',
        va='top',
        fontsize=5,
        rotation=90,
        color='dimgray',
        bbox={'facecolor': 'white', 'alpha': 0.6, 'linewidth': 0, 'pad': 0.5},
      )
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel('confidence')
  ax.set_ylabel('accuracy')
  ece = table_ece(t) if ece is None else ece
  head = f'{title}\n' if title else ''
  ax.set_title(f'{head}ECE = {100 * ece:.2f} %  (N = {int(round(t["count"].sum()))})', fontsize=9)


def reliability_diagram(
  table: Mapping, path: str, title: str | None = None, ece: float | None = None
) -> tuple:
  """Reliability diagram of `metrics.reliability_table` output, counts per bin beneath."""
  t = _as_table(table)
  ece = table_ece(t) if ece is None else float(ece)
  fig = _new_figure(4.5, 5.5)
  top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
  _draw_reliability(top, t, title, ece, show_counts=False)
  top.legend(loc='upper left', fontsize=7)
  top.set_xlabel('')
  width = t['bin_hi'] - t['bin_lo']
  bottom.bar(
    t['bin_lo'],
    t['count'],
    width=width,
    align='edge',
    color='gray',
    edgecolor='black',
    linewidth=0.6,
  )
  for x, w, c in zip(t['bin_lo'], width, t['count']):
    if c > 0:
      bottom.text(x + w / 2, c, f'{int(round(c))}', ha='center', va='bottom', fontsize=6)
  bottom.set_ylim(0, 1.25 * max(t['count'].max(), 1.0))
  bottom.set_ylabel('count')
  bottom.set_xlabel('confidence')
  png = _save(fig, path)
  payload = {'title': title, 'ece': ece, **{k: v.tolist() for k, v in t.items()}}
  return png, _write_json(data_path(path), payload)


def confidence_histogram(
  confidences, correct, path: str, num_bins: int = 20, title: str | None = None
) -> tuple:
  """Stacked histogram of confidences, correct vs wrong, with accuracy and mean confidence."""
  conf = np.asarray(confidences, np.float64).reshape(-1)
  ok = np.asarray(correct).reshape(-1).astype(bool)
  if len(conf) != len(ok) or not len(conf):
    raise ValueError(
      f'confidences and correct must be non-empty and of equal length, got '
      f'{len(conf)} and {len(ok)}.'
    )
  if not np.all(np.isfinite(conf)):
    raise ValueError('confidences contain NaN or Inf.')
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  n_ok, _ = np.histogram(np.clip(conf[ok], 0, 1), edges)
  n_bad, _ = np.histogram(np.clip(conf[~ok], 0, 1), edges)
  acc, mean_conf = float(ok.mean()), float(conf.mean())
  fig = _new_figure(5, 3.5)
  ax = fig.subplots()
  ax.bar(
    edges[:-1],
    n_ok,
    width=np.diff(edges),
    align='edge',
    color='tab:green',
    edgecolor='black',
    linewidth=0.5,
    label='correct',
  )
  ax.bar(
    edges[:-1],
    n_bad,
    bottom=n_ok,
    width=np.diff(edges),
    align='edge',
    color='tab:red',
    edgecolor='black',
    linewidth=0.5,
    label='wrong',
  )
  ax.axvline(acc, color='black', linestyle='--', label=f'accuracy {100 * acc:.1f} %')
  ax.axvline(
    mean_conf, color='tab:purple', linestyle=':', label=f'mean confidence {100 * mean_conf:.1f} %'
  )
  ax.set_xlim(0, 1)
  ax.set_xlabel('confidence')
  ax.set_ylabel('examples')
  ax.legend(fontsize=7, loc='upper left')
  ax.set_title(title or f'confidence histogram (N = {len(conf)})', fontsize=9)
  png = _save(fig, path)
  payload = {
    'bin_edges': edges.tolist(),
    'count_correct': n_ok.tolist(),
    'count_wrong': n_bad.tolist(),
    'accuracy': acc,
    'mean_confidence': mean_conf,
  }
  return png, _write_json(data_path(path), payload)


def subsample_indices(n: int, max_points: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of at most max_points of n items, the same for the same (n, seed)."""
  if n <= max_points:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def data_map(
  variability,
  confidence,
  path: str,
  color=None,
  color_label: str | None = None,
  title: str | None = None,
  max_points: int = MAX_MAP_POINTS,
  seed: int = 0,
) -> tuple:
  """Swayamdipta et al. 2020 data map: x variability, y confidence, one point per sample.

  `color` [N]: two values (e.g. easy/hard, pseudo-label correct) give two
  colours, more give a colour bar. Non-finite points (never-seen samples) are
  dropped, then at most `max_points` are drawn (deterministic subsample by seed).
  """
  var = np.asarray(variability, np.float64).reshape(-1)
  conf = np.asarray(confidence, np.float64).reshape(-1)
  col = None if color is None else np.asarray(color, np.float64).reshape(-1)
  if len(var) != len(conf) or (col is not None and len(col) != len(var)):
    raise ValueError(
      f'variability, confidence (and color) must have equal lengths, got '
      f'{len(var)}, {len(conf)}' + ('' if col is None else f', {len(col)}') + '.'
    )
  finite = np.isfinite(var) & np.isfinite(conf)
  if col is not None:
    finite &= np.isfinite(col)
  kept = np.flatnonzero(finite)
  shown = kept[subsample_indices(len(kept), max_points, seed)]
  fig = _new_figure(5.5, 4.5)
  ax = fig.subplots()
  discrete = col is not None and len(np.unique(col[kept])) <= 2
  if col is None:
    ax.scatter(var[shown], conf[shown], s=4, alpha=0.5, color='tab:blue', linewidths=0)
  elif discrete:
    values = np.unique(col[kept])
    for value, c in zip(values, ('tab:red', 'tab:blue')):
      pick = shown[col[shown] == value]
      label = f'{color_label or "color"} = {value:g} ({int((col[kept] == value).sum())})'
      ax.scatter(var[pick], conf[pick], s=4, alpha=0.5, color=c, linewidths=0, label=label)
    ax.legend(fontsize=7, loc='lower right', markerscale=3)
  else:
    sc = ax.scatter(
      var[shown], conf[shown], s=4, alpha=0.6, c=col[shown], cmap='viridis', linewidths=0
    )
    fig.colorbar(sc, ax=ax, label=color_label or '')
  for x, y, text in (
    (0.02, 0.95, 'easy-to-learn'),
    (0.02, 0.03, 'hard-to-learn'),
    (0.6, 0.5, 'ambiguous'),
  ):
    ax.text(
      x,
      y,
      text,
      transform=ax.transAxes,
      fontsize=7,
      color='black',
      bbox={'facecolor': 'white', 'alpha': 0.7, 'linewidth': 0},
    )
  ax.set_ylim(-0.02, 1.02)
  ax.set_xlim(left=0)
  ax.set_xlabel('variability (std of p over training)')
  ax.set_ylabel('confidence (mean p over training)')
  shown_note = f'{len(shown)} of {len(kept)} shown' + (
    f', {len(var) - len(kept)} non-finite dropped' if len(kept) < len(var) else ''
  )
  ax.set_title(f'{title}\n{shown_note}' if title else shown_note, fontsize=9)
  png = _save(fig, path)
  csv_path = data_path(path, 'csv')
  table = io.StringIO(newline='')
  writer = csv.writer(table)
  writer.writerow(['index', 'variability', 'confidence', 'color'])
  for i in shown:
    writer.writerow(
      [
        int(i),
        repr(float(var[i])),
        repr(float(conf[i])),
        '' if col is None else repr(float(col[i])),
      ]
    )
  storage.write_text(csv_path, table.getvalue())
  return png, csv_path


def training_curves(
  history: Sequence[Mapping], path: str, keys: Sequence[str] | None = None
) -> tuple:
  """One panel per metric over training steps (default: accuracy, ece, then other numbers)."""
  if not history or any(not isinstance(r, Mapping) or 'step' not in r for r in history):
    raise ValueError(
      'history must be a non-empty list of dicts, each with a "step" key '
      '(e.g. {"step": 500, "accuracy": 0.9, "ece": 0.05}).'
    )
  if keys is None:
    found = []
    for record in history:
      for k, v in record.items():
        if (
          k != 'step'
          and k not in found
          and isinstance(v, (int, float, np.number))
          and not isinstance(v, bool)
        ):
          found.append(k)
    keys = [k for k in ('accuracy', 'ece') if k in found] + [
      k for k in found if k not in ('accuracy', 'ece')
    ]
  if not keys:
    raise ValueError('history holds no numeric metric besides "step".')
  series = {}
  for k in keys:
    pts = sorted(
      (float(r['step']), float(r[k]))
      for r in history
      if k in r and r[k] is not None and math.isfinite(float(r[k]))
    )
    series[k] = {'step': [p[0] for p in pts], 'value': [p[1] for p in pts]}
  ncols = min(len(keys), 3)
  nrows = math.ceil(len(keys) / ncols)
  fig = _new_figure(4 * ncols, 3 * nrows)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
  for ax, k in zip(axes, keys):
    ax.plot(series[k]['step'], series[k]['value'], marker='o', markersize=3)
    ax.set_title(k, fontsize=9)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  for ax in axes[len(keys) :]:
    ax.set_visible(False)
  png = _save(fig, path)
  return png, _write_json(data_path(path), series)


def multi_reliability(
  tables: Mapping[str, Mapping],
  path: str,
  title: str | None = None,
  overlay: bool = False,
  ncols: int = 4,
) -> tuple:
  """Several reliability tables on one figure: a panel each, or overlaid curves (`overlay`)."""
  if not isinstance(tables, Mapping) or not tables:
    raise ValueError('tables must be a non-empty dict name -> reliability table.')
  ts = {name: _as_table(t, f'tables[{name!r}]') for name, t in tables.items()}
  eces = {name: table_ece(t) for name, t in ts.items()}
  if overlay:
    fig = _new_figure(5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], '--', color='gray', linewidth=1)
    for name, t in ts.items():
      full = t['count'] > 0
      ax.plot(
        t['mean_conf'][full],
        t['accuracy'][full],
        marker='o',
        markersize=3,
        label=f'{name} (ECE {100 * eces[name]:.2f} %)',
      )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel('mean confidence in bin')
    ax.set_ylabel('accuracy in bin')
    ax.legend(fontsize=6, loc='upper left')
    if title:
      ax.set_title(title, fontsize=9)
  else:
    ncols = max(1, min(ncols, len(ts)))
    nrows = math.ceil(len(ts) / ncols)
    fig = _new_figure(3.4 * ncols, 3.8 * nrows)
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax, (name, t) in zip(axes, ts.items()):  # long names wrap so panel titles never collide
      _draw_reliability(ax, t, textwrap.fill(name, 32), eces[name], show_counts=len(ts) <= 8)
    for ax in axes[len(ts) :]:
      ax.set_visible(False)
    if title:
      fig.suptitle(title)
    fig.tight_layout()
  png = _save(fig, path)
  payload = {
    name: {'ece': eces[name], **{k: v.tolist() for k, v in t.items()}} for name, t in ts.items()
  }
  return png, _write_json(data_path(path), {'title': title, 'tables': payload})


def forest_plot(
  rows: Sequence[Mapping], path: str, xlabel: str = 'paired difference', title: str | None = None
) -> tuple:
  """Mean and interval of each comparison, one line each, with 0 marked.

  rows: dicts with 'label', 'mean', 'low', 'high' and optionally 'shown' (filled marker)
  and 'group' (rows of one group share a colour). Non-finite rows are drawn without a bar.
  """
  if not rows:
    raise ValueError('forest_plot needs at least one row.')
  groups = list(dict.fromkeys(r.get('group', '') for r in rows))
  colors = {g: f'C{i % 10}' for i, g in enumerate(groups)}
  fig = _new_figure(7.5, 0.32 * len(rows) + 1.2)
  ax = fig.subplots()
  for y, row in enumerate(reversed(rows)):
    color = colors[row.get('group', '')]
    if math.isfinite(row['low']) and math.isfinite(row['high']):
      ax.plot([row['low'], row['high']], [y, y], color=color, linewidth=1.5)
    if math.isfinite(row['mean']):
      face = color if row.get('shown') else 'white'
      ax.plot([row['mean']], [y], 'o', color=color, markerfacecolor=face, markersize=5)
  ax.axvline(0.0, color='gray', linestyle='--', linewidth=1)
  ax.set_yticks(range(len(rows)))
  ax.set_yticklabels([r['label'] for r in reversed(rows)], fontsize=7)
  ax.set_xlabel(xlabel)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  png = _save(fig, path)
  finite = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
  keys = ('label', 'group', 'mean', 'low', 'high', 'shown')
  payload = [{k: finite(r.get(k)) for k in keys} for r in rows]
  return png, _write_json(data_path(path), {'title': title, 'rows': payload})
