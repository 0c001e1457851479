"""experiments/bench.py: the --smoke run on the 8 test devices, presets, the peak table."""

import types

import jax
import pytest

from experiments import bench


def _rows(out: str) -> dict:
  """variant -> the table row's cells (the '(+x% over base)' note stripped)."""
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('| ') and cells[0].isdigit():
      rows[cells[1].split(' ')[0]] = cells
  return rows


def test_smoke_runs_on_all_devices(capsys):
  # The smoke preset times fixmatch, +cmix1 and +cmix2; two of them keep the test's compile
  # time down (the fused pass compiles in tests/test_steps.py).
  bench.main(['--smoke', '--variants=fixmatch,fixmatch+cmix2'])
  out = capsys.readouterr().out
  assert 'measured float32 matmul' in out and 'peak memory' in out
  rows = _rows(out)
  assert list(rows) == ['fixmatch', 'fixmatch+cmix2']
  flops = {}
  for variant, (b, _, devices, imgs, secs, ips, ips_dev, gflop, frac, eval_ips) in rows.items():
    assert (int(b), int(devices), int(imgs)) == (16, jax.local_device_count(), 16 + 2 * 2 * 16)
    assert float(secs) > 0 and float(eval_ips) > 0 and float(frac) > 0
    assert float(ips) == pytest.approx(int(imgs) / float(secs), rel=1e-2)
    assert float(ips_dev) == pytest.approx(float(ips) / int(devices), rel=1e-2)
    flops[variant] = float(gflop)
  # The reference's second pass runs the network again over the mixed sets and both views.
  assert flops['fixmatch+cmix2'] > 1.6 * flops['fixmatch']


def test_paper_preset_and_explicit_flags_win():
  args = bench.parse_args(['--paper'])
  assert (args.batch_sizes, args.uratio, args.model, args.dtype) == (
    '64',
    7,
    'wrn_28_2',
    'bfloat16',
  )
  assert args.variants == 'softmatch,softmatch+cmix1,softmatch+cmix2'
  assert args.num_devices == -1  # every local device
  assert bench.parse_args(['--paper', '--batch_sizes=32']).batch_sizes == '32'
  assert bench.parse_args(['--paper', '--steps=5']).steps == 5  # even when it is the default
  assert bench.parse_args([]).batch_sizes == '16,64' and bench.parse_args([]).steps == 5
  with pytest.raises(SystemExit):
    bench.parse_args(['--paper', '--smoke'])
  with pytest.raises(SystemExit):
    bench.parse_args(['--variants=fixmatch,nope'])
  with pytest.raises(SystemExit):
    bench.parse_args(['--image_shape=32x32'])


@pytest.mark.parametrize(
  'kind,peak',
  [
    ('NVIDIA H200', 989e12),
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA A100-SXM4-80GB', 312e12),
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6 lite', 918e12),
  ],
)
def test_peak_table_matches_device_kinds(kind, peak):
  device = types.SimpleNamespace(platform='gpu' if 'NVIDIA' in kind else 'tpu', device_kind=kind)
  assert bench.device_peak(device, 'bfloat16')[0] == peak


def test_unknown_accelerator_and_cpu_use_a_measured_matmul(monkeypatch):
  monkeypatch.setattr(bench, 'matmul_peak', lambda n=2048, repeats=5, dtype='float32': 7.0)
  unknown = types.SimpleNamespace(platform='gpu', device_kind='NVIDIA L4')
  assert bench.device_peak(unknown, 'bfloat16') == (
    7.0,
    'measured bfloat16 matmul (unknown accelerator)',
  )
  cpu = types.SimpleNamespace(platform='cpu', device_kind='cpu')
  assert bench.device_peak(cpu, 'bfloat16') == (7.0, 'measured bfloat16 matmul')


def test_time_ours_times_one_device_without_eval(monkeypatch):
  # bench_torch.py --compare reads our step time through time_ours (the tuple it unpacks from
  # time_train_step once gained a field and broke --compare).
  calls = []
  real = bench.time_train_step

  def spy(config, warmup, steps, with_eval=True):
    result = real(config, warmup, steps, with_eval=with_eval)
    calls.append((config, with_eval, result))
    return result

  monkeypatch.setattr(bench, 'time_train_step', spy)
  seconds = bench.time_ours('fixmatch', 16, 2, 0, 1, model='cnn_small', image_shape=(12, 12, 1))
  [(config, with_eval, result)] = calls
  assert (config.num_devices, config.model.name, config.data.batch_size) == (1, 'cnn_small', 16)
  assert not with_eval and result[2] is None and result[3] == 1
  assert seconds == result[0] and seconds > 0


def _printed_bounds(text: str) -> tuple[float, float]:
  """The interval a number printed with its digits may have been rounded from."""
  half = 0.5 * 10.0 ** -(len(text.split('.')[1]) if '.' in text else 0)
  return float(text) - half, float(text) + half


def test_torch_compare_prints_ours_over_torch(monkeypatch, capsys):
  pytest.importorskip('torch')
  from experiments import bench_torch

  ours = types.SimpleNamespace(  # our side on the small model: the table's plumbing is tested
    time_ours=lambda *args, **kw: bench.time_ours(
      *args, model='cnn_small', image_shape=(12, 12, 1), **kw
    ),
    augment_seconds=lambda b, uratio, warmup, steps: 0.25,
  )
  monkeypatch.setattr(bench_torch, 'import_our_bench', lambda: ours)
  bench_torch.main(
    [
      '--compare',
      '--batch_sizes=2',
      '--uratio=1',
      '--variants=fixmatch',
      '--conv_grad=xla,subpixel',
    ]
  )
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith('| fixmatch | 2 |')]
  cells = [[c.strip() for c in row.strip('|').split('|')] for row in rows]
  assert [c[6] for c in cells] == ['fixmatch', 'fixmatch conv_grad=subpixel']
  for c in cells:
    assert c[2] == '6'  # B + 2 * uratio * B images
    (t_lo, t_hi), (o_lo, o_hi), (r_lo, r_hi) = (_printed_bounds(c[i]) for i in (5, 8, 9))
    assert o_lo / t_hi <= r_hi and r_lo <= o_hi / t_lo  # the ratio of the printed throughputs
  assert 'augmentation alone at B=2' in out and '0.250 s/step' in out


def test_profile_step_groups_one_traced_step_by_thunk_kind(capsys):
  # profile_step compiles its step through bench.compiled_step, as the timings do.
  from experiments import profile_step

  profile_step.main(
    ['--model=cnn_small', '--image_shape=12,12,1', '--batch_size=4', '--uratio=1', '--steps=1']
  )
  out = capsys.readouterr().out
  assert 'fixmatch cnn_small B=4 uratio=1' in out and '| thunk kind |' in out
  assert '| untraced: Eigen conv kernels + idle |' in out
