"""PyTorch reference train steps (USB's WRN-28-2, FixMatch, SoftMatch+CalibrateMix) on this machine.

  pip install torch==2.13.0                       # the optional extra (setup.cfg: torch)
  python -m experiments.bench_torch               # B=16, 3 timed steps, torch side only
  python -m experiments.bench_torch --batch_sizes=16,64 --variants=fixmatch,softmatch+cmix2
  python -m experiments.bench_torch --compare     # also time OUR steps (experiments/bench.py)
  python -m experiments.bench_torch --compare --batch_sizes=16,64 --conv_grad=xla,subpixel

The torch steps follow the reference code (USB `semilearn` + the CalibrateMix reference's
`softmatch_calibratemix.py`) op for op: one concatenated forward (use_cat), USB losses and
hooks, SGD (Nesterov, coupled weight decay skipped for bn/bias), cosine LambdaLR, USB's EMA
hook, `.item()` logging; the CalibrateMix step keeps the reference's per-sample Python
pairing loop and second forward pass. Inputs are pre-made random float tensors, so the torch
side EXCLUDES data loading and augmentation; our step (--compare) includes on-device weak +
RandAugment augmentation, so the ratio understates our model-step speed.

Throughput counts input images per step, B + 2*uratio*B, for every variant (as
experiments/bench.py does): the CalibrateMix second pass costs time, not images.
On CPU, torch's cost per image rises beyond ~250 images per forward (B > 16 at uratio 7):
activations above glibc's 32 MB mmap threshold are freshly mapped and page-faulted every
step (about 1M minor faults per step at 480 images), so B=64 figures carry that effect.
"""

import math
import os
import resource
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from experiments import common
from experiments import usb_models

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)  # CHW, as the reference feeds its network
TORCH_VARIANTS = ('fixmatch', 'softmatch', 'softmatch+cmix2')
# Our variant(s) timed against each torch variant with --compare.
OURS_FOR = {
  'fixmatch': ('fixmatch',),
  'softmatch': ('softmatch',),
  'softmatch+cmix2': ('softmatch+cmix2', 'softmatch+cmix1'),
}


# ----------------------------------------------------------------------------------------
# WRN-28-2 as USB's current semilearn/nets/wrn/wrn.py defines it (the version cmix_jax follows):
# bias-free block convs, block BN at PyTorch's default eps, activate_before_residual in group 1.


class WideBasicBlock(nn.Module):
  """USB's pre-activation block, quirks kept for an equal cost.

  On a width change without activate_before_residual (first block of groups 2 and 3) the raw
  input feeds conv1 and the 1x1 shortcut, and bn1 + activation still run with unused output.
  """

  def __init__(
    self, in_channels: int, out_channels: int, stride: int, activate_before_residual: bool
  ):
    super().__init__()
    self.equal_in_out = in_channels == out_channels
    self.activate_before_residual = activate_before_residual
    self.bn1 = nn.BatchNorm2d(in_channels, momentum=1e-3)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels, momentum=1e-3)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
    self.shortcut = (
      None
      if self.equal_in_out
      else nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    )

  def forward(self, x):  # [N, Cin, H, W] -> [N, Cout, H/stride, W/stride]
    pre = F.leaky_relu(self.bn1(x), 0.1, inplace=True)
    if self.equal_in_out:
      branch_in, residual = pre, x
    else:
      branch_in = pre if self.activate_before_residual else x  # else `pre` is unused (USB)
      residual = self.shortcut(branch_in)
    out = F.leaky_relu(self.bn2(self.conv1(branch_in)), 0.1, inplace=True)
    return residual + self.conv2(out)


class WideResNet(nn.Module):
  """WRN-depth-width for 32x32 inputs; returns (logits [N, C], pooled features [N, F])."""

  def __init__(self, num_classes: int = NUM_CLASSES, depth: int = 28, width: int = 2):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got {depth}; use 28 for WRN-28-2.')
    blocks_per_group = (depth - 4) // 6
    channels = [16, 16 * width, 32 * width, 64 * width]
    self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=True)
    groups = []
    for group, stride in enumerate((1, 2, 2)):
      groups.append(
        nn.Sequential(
          *[
            WideBasicBlock(
              channels[group] if i == 0 else channels[group + 1],
              channels[group + 1],
              stride if i == 0 else 1,
              activate_before_residual=group == 0,
            )
            for i in range(blocks_per_group)
          ]
        )
      )
    self.groups = nn.Sequential(*groups)
    self.bn_final = nn.BatchNorm2d(channels[3], eps=1e-3, momentum=1e-3)
    self.classifier = nn.Linear(channels[3], num_classes)
    usb_models.init_weights(self)

  def forward(self, x):  # [N, 3, 32, 32]
    out = self.groups(self.conv1(x))  # [N, 128, 8, 8]
    out = F.leaky_relu(self.bn_final(out), 0.1)
    feat = F.adaptive_avg_pool2d(out, 1).flatten(1)  # [N, 128]
    return self.classifier(feat), feat


# ----------------------------------------------------------------------------------------
# Training state: model, optimizer, EMA, SoftMatch and CalibrateMix bookkeeping.


class Trainer:
  """Everything the reference's algorithm object carries between steps."""

  def __init__(
    self,
    num_labeled: int,
    num_unlabeled: int,
    device: str,
    seed: int = 0,
    lr: float = 0.03,
    weight_decay: float = 5e-4,
    num_train_steps: int = 2**20,
  ):
    torch.manual_seed(seed)
    self.rng = np.random.default_rng(seed)
    self.device = device
    self.model = WideResNet().to(device).train()
    self.ema_model = WideResNet().to(device).eval()
    self.ema_model.load_state_dict(self.model.state_dict())
    self.ema_shadow = {name: p.detach().clone() for name, p in self.model.named_parameters()}
    self.ema_decay = 0.999
    # USB get_optimizer(bn_wd_skip=True): no weight decay on names with 'bn' or 'bias'.
    decay, no_decay = [], []
    for name, param in self.model.named_parameters():
      (no_decay if 'bn' in name or 'bias' in name else decay).append(param)
    self.optimizer = torch.optim.SGD(
      [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}],
      lr=lr,
      momentum=0.9,
      weight_decay=weight_decay,
      nesterov=True,
    )
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
      self.optimizer, lambda k: max(0.0, math.cos(7 * math.pi * k / (16 * num_train_steps)))
    )
    # SoftMatch: DistAlignEMAHook (uniform target) and SoftMatchWeightingHook.
    self.p_model = None  # [C], the first batch's mean, then EMA
    self.p_target = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, device=device)
    self.prob_max_mu = torch.tensor(1.0 / NUM_CLASSES, device=device)
    self.prob_max_var = torch.tensor(1.0, device=device)
    self.ema_p, self.n_sigma = 0.999, 2
    # CalibrateMix reference: AUM sums/counts [N_lb], APM values/counts [N_ulb, C].
    self.aum_sum = torch.zeros(num_labeled, device=device)
    self.aum_count = torch.zeros(num_labeled, device=device)
    self.apm_value = torch.zeros(num_unlabeled, NUM_CLASSES, device=device)
    self.apm_count = torch.zeros(num_unlabeled, NUM_CLASSES, device=device)
    self.apm_delta = 0.997

  @torch.no_grad()
  def update_ema(self):
    """USB's EMAHook.after_train_step: shadow EMA, then ema_model <- live state + shadow."""
    for name, param in self.model.named_parameters():
      self.ema_shadow[name] = (
        self.ema_decay * self.ema_shadow[name] + (1.0 - self.ema_decay) * param.detach()
      ).clone()
    self.ema_model.load_state_dict(self.model.state_dict())
    self.ema_model.load_state_dict(self.ema_shadow, strict=False)

  def apply_update(self, loss, lap):
    """USB's ParamUpdateHook (backward, step, scheduler, zero_grad) and EMA hook."""
    loss.backward()
    lap('backward')
    self.optimizer.step()
    self.scheduler.step()
    self.model.zero_grad()
    lap('optimizer (SGD + lr schedule + zero_grad)')
    self.update_ema()
    lap('EMA update (shadow + ema_model load_state_dict)')

  def finish_step(self, loss, lap, logged) -> dict:
    """apply_update, then the step's log: every tensor of logged() read with `.item()`."""
    self.apply_update(loss, lap)
    log = {name: value.item() for name, value in logged().items()}
    lap('logging (.item())')
    return log

  @torch.no_grad()
  def dist_align(self, probs_ulb):  # [U, C] -> [U, C]
    """Uniform distribution alignment (USB DistAlignEMAHook): update p_model, then rescale."""
    batch_mean = probs_ulb.mean(0)  # [C]
    self.p_model = (
      batch_mean
      if self.p_model is None
      else self.p_model * self.ema_p + batch_mean * (1 - self.ema_p)
    )
    aligned = probs_ulb * (self.p_target + 1e-6) / (self.p_model + 1e-6)
    return aligned / aligned.sum(-1, keepdim=True)

  @torch.no_grad()
  def softmatch_weight(self, probs_ulb):  # [U, C] -> [U]
    """Truncated-Gaussian weights (USB SoftMatchWeightingHook); EMAs updated first."""
    max_probs = probs_ulb.max(-1).values  # [U]
    self.prob_max_mu = self.ema_p * self.prob_max_mu + (1 - self.ema_p) * max_probs.mean().item()
    self.prob_max_var = (
      self.ema_p * self.prob_max_var + (1 - self.ema_p) * torch.var(max_probs, unbiased=True).item()
    )
    gap = torch.clamp(max_probs - self.prob_max_mu, max=0.0)
    return torch.exp(-(gap**2) / (2 * self.prob_max_var / self.n_sigma**2))

  @torch.no_grad()
  def update_aum(self, logits_lb, y_lb, idx_lb):
    """Margin of the gold label, summed by tensor index assignment (repeats count once)."""
    top2_vals, top2_idx = torch.topk(logits_lb, 2, dim=1)  # [B, 2]
    gold = logits_lb.gather(1, y_lb[:, None])[:, 0]  # [B]
    margin = torch.where(
      top2_idx[:, 0] == y_lb, top2_vals[:, 0] - top2_vals[:, 1], gold - top2_vals[:, 0]
    )
    self.aum_sum[idx_lb] += margin
    self.aum_count[idx_lb] += 1

  @torch.no_grad()
  def update_apm(self, logits_ulb_w, idx_ulb):
    """Per-class pseudo-margins blended with alpha = delta / (1 + n), by index assignment."""
    top2_vals, top2_idx = torch.topk(logits_ulb_w, 2, dim=1)  # [U, 2]
    margins = logits_ulb_w - top2_vals[:, :1]  # [U, C]
    rows = torch.arange(logits_ulb_w.shape[0], device=logits_ulb_w.device)
    margins[rows, top2_idx[:, 0]] = top2_vals[:, 0] - top2_vals[:, 1]
    alpha = self.apm_delta / (1.0 + self.apm_count[idx_ulb])  # [U, C]
    self.apm_value[idx_ulb] = alpha * margins + (1.0 - alpha) * self.apm_value[idx_ulb]
    self.apm_count[idx_ulb] += 1


# ----------------------------------------------------------------------------------------
# Train steps. `lap(name)` charges the time since the previous lap to `name`.


def masked_ce(logits, targets, mask):
  """USB consistency_loss('ce', mask): mean over samples of mask * CE."""
  return (F.cross_entropy(logits, targets, reduction='none') * mask).mean()


def fixmatch_step(trainer: Trainer, batch: dict, lap) -> dict:
  """USB FixMatch.train_step + ParamUpdateHook + EMAHook, hard labels, threshold 0.95."""
  num_lb = batch['y_lb'].shape[0]
  inputs = torch.cat((batch['x_lb'], batch['x_ulb_w'], batch['x_ulb_s']))  # [B + 2U, 3, H, W]
  logits, _ = trainer.model(inputs)
  logits_lb = logits[:num_lb]  # [B, C]
  logits_ulb_w, logits_ulb_s = logits[num_lb:].chunk(2)  # [U, C] each
  sup_loss = F.cross_entropy(logits_lb, batch['y_lb'])
  max_probs, pseudo_label = torch.softmax(logits_ulb_w.detach(), -1).max(-1)  # [U], [U]
  mask = (max_probs >= 0.95).float()
  unsup_loss = masked_ce(logits_ulb_s, pseudo_label, mask)
  loss = sup_loss + unsup_loss
  lap('forward + losses')
  return trainer.finish_step(
    loss,
    lap,
    lambda: dict(sup_loss=sup_loss, unsup_loss=unsup_loss, total_loss=loss, util_ratio=mask.mean()),
  )


def softmatch_loss(trainer: Trainer, logits_lb, logits_ulb_w, logits_ulb_s, y_lb):
  """(sup + unsup loss, mask, pseudo-label) of SoftMatch with uniform alignment, as USB does."""
  sup_loss = F.cross_entropy(logits_lb, y_lb)
  probs_ulb_w = trainer.dist_align(torch.softmax(logits_ulb_w.detach(), -1))  # [U, C]
  mask = trainer.softmatch_weight(probs_ulb_w)  # [U]
  pseudo_label = logits_ulb_w.detach().argmax(-1)  # [U], from raw (not aligned) logits
  unsup_loss = masked_ce(logits_ulb_s, pseudo_label, mask)
  return sup_loss + unsup_loss, mask, pseudo_label


def targeted_mixup(x_a, y_a, x_pool, y_pool, rng, alpha: float = 0.4, k: int = 15):
  """The reference's mixup_data: per anchor, pick one of its k most dissimilar pool images."""
  lam = float(rng.beta(alpha, alpha))
  mixed = torch.empty_like(x_a)  # [A, 3, H, W]
  y_b = torch.empty_like(y_a)  # [A]
  k = min(k, x_pool.shape[0])  # the reference's fixed 15 needs a pool of >= 15 (B >= 5)
  for i in range(x_a.shape[0]):  # one Python iteration per anchor, as the reference
    cosine = F.cosine_similarity(x_a[i].view(1, -1), x_pool.view(x_pool.shape[0], -1), dim=1)
    _, dissimilar = torch.topk(cosine, k, largest=False)  # [k]
    partner = dissimilar[torch.randint(0, k, (1,)).item()]
    mixed[i] = lam * x_a[i] + (1 - lam) * x_pool[partner]
    y_b[i] = y_pool[partner]
  return mixed, y_a, y_b, lam


def mixup_bce(logits, y_a, y_b, lam: float):
  """lam * BCE(logits, onehot_a) + (1 - lam) * BCE(logits, onehot_b), mean over batch x classes."""
  onehot_a = F.one_hot(y_a, NUM_CLASSES).float()
  onehot_b = F.one_hot(y_b, NUM_CLASSES).float()
  return lam * F.binary_cross_entropy_with_logits(logits, onehot_a) + (
    1 - lam
  ) * F.binary_cross_entropy_with_logits(logits, onehot_b)


def softmatch_cmix_step(trainer: Trainer, batch: dict, lap, mix: bool = True) -> dict:
  """Reference SoftMatch+CalibrateMix step after warm-up (mix=False: the plain SoftMatch step)."""
  x_lb, y_lb, x_ulb_w = batch['x_lb'], batch['y_lb'], batch['x_ulb_w']
  num_lb = y_lb.shape[0]
  logits, _ = trainer.model(torch.cat((x_lb, x_ulb_w, batch['x_ulb_s'])))
  logits_lb = logits[:num_lb]  # [B, C]
  logits_ulb_w, logits_ulb_s = logits[num_lb:].chunk(2)  # [U, C] each
  loss_1, mask, pseudo_label = softmatch_loss(trainer, logits_lb, logits_ulb_w, logits_ulb_s, y_lb)
  lap('forward 1 + losses')
  trainer.update_aum(logits_lb.detach(), y_lb, batch['idx_lb'])
  if not mix:
    lap('AUM bookkeeping')
    return trainer.finish_step(loss_1, lap, lambda: dict(total_loss=loss_1, util_ratio=mask.mean()))

  # Median splits: AUM for labeled, APM at the pseudo-label for unlabeled (stable sort).
  aum = trainer.aum_sum[batch['idx_lb']] / (trainer.aum_count[batch['idx_lb']] + 1e-8)  # [B]
  order_lb = torch.sort(aum).indices
  hard_lb, easy_lb = order_lb[: num_lb // 2], order_lb[num_lb // 2 :]
  trainer.update_apm(logits_ulb_w.detach(), batch['idx_ulb'])
  apm = trainer.apm_value[batch['idx_ulb']]  # [U, C]
  apm = apm[torch.arange(apm.shape[0], device=apm.device), pseudo_label]  # [U]
  order_ulb = torch.sort(apm).indices
  num_ulb = order_ulb.shape[0]
  hard_ulb, easy_ulb = order_ulb[: num_ulb // 2], order_ulb[num_ulb // 2 :]
  lap('AUM/APM bookkeeping + median split')

  x_1, y_1a, y_1b, lam_1 = targeted_mixup(
    x_lb[easy_lb], y_lb[easy_lb], x_ulb_w[hard_ulb], pseudo_label[hard_ulb], trainer.rng
  )
  x_2, y_2a, y_2b, lam_2 = targeted_mixup(
    x_lb[hard_lb], y_lb[hard_lb], x_ulb_w[easy_ulb], pseudo_label[easy_ulb], trainer.rng
  )
  lap('pairing loop + mixup (per-sample Python)')

  logits, _ = trainer.model(torch.cat((x_lb, x_1, x_2, x_ulb_w, batch['x_ulb_s'])))
  logits_lb = logits[:num_lb]
  logits_1 = logits[num_lb : num_lb + x_1.shape[0]]  # [B - B//2, C]
  logits_2 = logits[num_lb + x_1.shape[0] : num_lb + x_1.shape[0] + x_2.shape[0]]  # [B//2, C]
  logits_ulb_w, logits_ulb_s = logits[num_lb + x_1.shape[0] + x_2.shape[0] :].chunk(2)
  base_2, mask_2, _ = softmatch_loss(trainer, logits_lb, logits_ulb_w, logits_ulb_s, y_lb)
  mix_1 = mixup_bce(logits_1, y_1a, y_1b, lam_1)
  mix_2 = mixup_bce(logits_2, y_2a, y_2b, lam_2)
  loss_2 = mix_1 + mix_2 + base_2
  total_loss = loss_1 + loss_2
  lap('forward 2 + losses')
  return trainer.finish_step(
    total_loss,
    lap,
    lambda: dict(
      loss_1=loss_1,
      mix_1=mix_1,
      mix_2=mix_2,
      loss_2=loss_2,
      total_loss=total_loss,
      util_ratio=mask_2.mean(),
    ),
  )


STEP_FNS = {
  'fixmatch': fixmatch_step,
  'softmatch': lambda trainer, batch, lap: softmatch_cmix_step(trainer, batch, lap, mix=False),
  'softmatch+cmix2': softmatch_cmix_step,
}


# ----------------------------------------------------------------------------------------
# Timing.


class Laps:
  """Accumulates wall time of consecutive named parts (CPU torch ops run synchronously)."""

  def __init__(self, device: str):
    self.device = device
    self.parts = {}
    self._last = self._now()

  def _now(self):
    if self.device.startswith('cuda'):
      torch.cuda.synchronize()
    return time.perf_counter()

  def __call__(self, name: str):
    now = self._now()
    self.parts[name] = self.parts.get(name, 0.0) + now - self._last
    self._last = now


def random_batch(
  batch_size: int,
  uratio: int,
  num_labeled: int,
  num_unlabeled: int,
  generator: torch.Generator,
  device: str,
) -> dict:
  """Pre-made, already 'augmented' inputs: random normal images, labels and dataset indices."""
  num_ulb = uratio * batch_size
  images = lambda n: torch.randn((n,) + IMAGE_SHAPE, generator=generator).to(device)
  return dict(
    x_lb=images(batch_size),  # [B, 3, 32, 32]
    y_lb=torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator).to(device),
    idx_lb=torch.randint(0, num_labeled, (batch_size,), generator=generator).to(device),
    x_ulb_w=images(num_ulb),  # [U, 3, 32, 32]
    x_ulb_s=images(num_ulb),
    idx_ulb=torch.randperm(num_unlabeled, generator=generator)[:num_ulb].to(device),
  )


def time_torch_step(
  variant: str,
  batch_size: int,
  uratio: int,
  warmup: int,
  steps: int,
  device: str,
  num_labeled: int = 4000,
  num_unlabeled: int = 50000,
):
  """(seconds of each timed step, {part: median seconds}) of one torch variant."""
  if variant not in STEP_FNS:
    raise ValueError(f'unknown torch variant {variant!r}; choose from {sorted(STEP_FNS)}.')
  trainer = Trainer(num_labeled, num_unlabeled, device)
  generator = torch.Generator().manual_seed(1)
  step_fn = STEP_FNS[variant]
  totals, parts = [], []
  for i in range(warmup + steps):
    batch = random_batch(batch_size, uratio, num_labeled, num_unlabeled, generator, device)
    lap = Laps(device)
    step_fn(trainer, batch, lap)
    if i >= warmup:
      totals.append(sum(lap.parts.values()))
      parts.append(lap.parts)
  part_medians = {name: statistics.median(p[name] for p in parts) for name in parts[0]}
  return totals, part_medians


def op_table(variant: str, batch_size: int, uratio: int, device: str, rows: int = 12) -> str:
  """torch.profiler's self-CPU-time table of one step (after one warm-up step)."""
  trainer = Trainer(4000, 50000, device)
  generator = torch.Generator().manual_seed(1)
  make = lambda: random_batch(batch_size, uratio, 4000, 50000, generator, device)
  STEP_FNS[variant](trainer, make(), Laps(device))
  batch = make()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    STEP_FNS[variant](trainer, batch, Laps(device))
  return prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=rows)


def import_our_bench():
  """experiments/bench.py (our step), or a clear error while the package is not importable."""
  try:
    from experiments import bench
  except Exception as e:
    raise SystemExit(
      f'--compare needs experiments/bench.py and the cmix_jax package importable, but the '
      f'import failed with {type(e).__name__}: {e}. Run without --compare to time the torch '
      f'side alone, or fix the import first.'
    ) from e
  for name in ('time_ours', 'augment_seconds'):
    if not hasattr(bench, name):
      raise SystemExit(
        f'--compare: experiments/bench.py has no {name}(); it is expected to provide '
        'time_ours and augment_seconds.'
      )
  return bench


def main(argv=None):
  parser = common.arg_parser(__doc__)
  parser.add_argument('--batch_sizes', default='16', help='comma-separated labeled batch sizes')
  parser.add_argument('--uratio', type=int, default=7)
  parser.add_argument(
    '--variants',
    default='fixmatch,softmatch+cmix2',
    help=f'comma-separated, from {",".join(TORCH_VARIANTS)}',
  )
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (median reported)')
  parser.add_argument('--device', default='cpu', help="torch device: 'cpu' or 'cuda'")
  parser.add_argument(
    '--compare',
    action='store_true',
    help='also time our steps via experiments/bench.py and print ours/torch',
  )
  parser.add_argument(
    '--conv_grad',
    default='xla',
    help="with --compare: our model.conv_grad, comma-separated to time each (e.g. 'xla,subpixel')",
  )
  parser.add_argument(
    '--op_table',
    action='store_true',
    help='print torch.profiler top ops of one step per variant (first B)',
  )
  args = parser.parse_args(argv)

  batch_sizes = [int(b) for b in args.batch_sizes.split(',')]
  variants = args.variants.split(',')
  conv_grads = args.conv_grad.split(',')
  problems = []
  if any(g not in ('xla', 'subpixel') for g in conv_grads):
    problems.append(f'--conv_grad={args.conv_grad}: choose from xla,subpixel')
  if any(v not in TORCH_VARIANTS for v in variants):
    problems.append(f'--variants={args.variants}: choose from {",".join(TORCH_VARIANTS)}')
  if min(batch_sizes) < 2:
    problems.append(f'--batch_sizes={args.batch_sizes}: each must be >= 2 (median splits)')
  if args.uratio < 1 or args.steps < 1 or args.warmup < 0:
    problems.append(
      f'--uratio={args.uratio}, --steps={args.steps}, --warmup={args.warmup}: '
      f'need uratio >= 1, steps >= 1, warmup >= 0'
    )
  if problems:
    raise ValueError('bad arguments: ' + '; '.join(problems) + '.')
  if args.device.startswith('cuda') and not torch.cuda.is_available():
    raise ValueError('--device=cuda but torch sees no GPU; use --device=cpu.')
  bench = import_our_bench() if args.compare else None  # fail before the long torch runs

  torch.set_num_threads(os.cpu_count())
  print(
    f'torch {torch.__version__} on {args.device}, {torch.get_num_threads()} threads '
    f'(os.cpu_count() = {os.cpu_count()}); WRN-28-2, 32x32x3, 10 classes, float32, NCHW; '
    f'uratio {args.uratio}; median of {args.steps} steps after {args.warmup} warm-up'
  )
  print(
    'torch inputs are pre-made random tensors: NO data loading or augmentation in the '
    'torch step time.'
  )
  small = [b for b in batch_sizes if args.uratio * b // 2 < 15]
  if small and 'softmatch+cmix2' in variants:
    print(
      f'note: at B={small} the unlabeled half-pool is < 15, so the pairing draws from the '
      f'whole pool (the reference would fail in topk).'
    )

  # Torch and our step of one (B, variant) run back to back, so load drift on a shared
  # machine shifts both alike.
  results, spreads, parts, ours, aug = {}, {}, {}, {}, {}
  for b in batch_sizes:
    for variant in variants:
      totals, parts[(variant, b)] = time_torch_step(
        variant, b, args.uratio, args.warmup, args.steps, args.device
      )
      results[(variant, b)] = statistics.median(totals)
      spreads[(variant, b)] = f'{min(totals):.2f}-{max(totals):.2f}'
      for our_variant in OURS_FOR[variant] if bench is not None else ():
        for conv_grad in conv_grads:
          ours[(our_variant, conv_grad, b)] = bench.time_ours(
            our_variant, b, args.uratio, args.warmup, args.steps, conv_grad=conv_grad
          )
    if bench is not None:
      aug[b] = bench.augment_seconds(b, args.uratio, args.warmup, args.steps)

  header = '| variant | B | imgs/step | torch step s | torch min-max s | torch img/s |'
  if bench is not None:
    header += ' ours | ours step s | ours img/s | ours/torch (img/s) |'
  print('\n' + header)
  print('|' + '---|' * (header.count('|') - 1))
  for b in batch_sizes:
    images = b + 2 * args.uratio * b
    for variant in variants:
      torch_s = results[(variant, b)]
      row = (
        f'| {variant} | {b} | {images} | {torch_s:.3f} | {spreads[(variant, b)]} |'
        f' {images / torch_s:.1f} |'
      )
      if bench is None:
        print(row)
        continue
      for our_variant in OURS_FOR[variant]:
        for conv_grad in conv_grads:
          ours_s = ours[(our_variant, conv_grad, b)]
          label = our_variant + (f' conv_grad={conv_grad}' if conv_grad != 'xla' else '')
          print(f'{row} {label} | {ours_s:.3f} | {images / ours_s:.1f} | {torch_s / ours_s:.2f} |')
  if bench is not None:
    print(
      'ours/torch > 1 means our step is faster. Our step time INCLUDES on-device weak + '
      'RandAugment augmentation; the torch one excludes all augmentation.'
    )
    for b in batch_sizes:
      if aug[b] is None:
        print(f'our augmentation cost at B={b}: not measured (cmix_jax.data.augment missing)')
      else:
        print(
          f'our augmentation alone at B={b} (augment.augment_batch, 3 views jitted apart): '
          f'{aug[b]:.3f} s/step, included in "ours step s" above'
        )

  print('\nwhere the torch step goes (median s per part, share of the median step):')
  for (variant, b), part in parts.items():
    for name, seconds in part.items():
      print(
        f'  {variant:16s} B={b:<3d} {name:48s} {seconds:8.3f} s '
        f'{100 * seconds / results[(variant, b)]:5.1f}%'
      )
  print(f'peak host RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB')

  if args.op_table:
    for variant in variants:
      print(f'\ntorch.profiler, {variant}, B={batch_sizes[0]}, one step, top ops by self CPU time:')
      print(op_table(variant, batch_sizes[0], args.uratio, args.device))


if __name__ == '__main__':
  main()
