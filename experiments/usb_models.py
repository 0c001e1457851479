"""cmix_jax's cnn_small in PyTorch, shaped as a semilearn backbone, for experiments/usb_beside.py.

Same layers as cmix_jax/models/cnn.py: per width a 3x3 stride-2 conv (padding 1, no bias),
BatchNorm (eps 1e-3; Flax momentum m is PyTorch momentum 1 - m) and leaky ReLU 0.1, then a
global average pool and a dense head. Same init scheme: convs kaiming_normal_(fan_out,
leaky_relu) = variance_scaling(2, fan_out, normal), the head xavier_normal_ =
variance_scaling(1, fan_avg, normal) with a zero bias, BN scale 1 and bias 0 (the values
themselves come from torch's generator, not jax's).
"""

import torch
from torch import nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.1  # cnn.LEAKY_SLOPE
BN_EPS = 1e-3  # cnn.BN_EPS


class CNNSmall(nn.Module):
  """[stride-2 conv3x3 -> BN -> leaky ReLU] per width, global average pool, dense.

  forward(x [N, C, H, W]) returns semilearn's {'logits': [N, classes], 'feat': [N, widths[-1]]}.
  """

  def __init__(self, num_classes: int, in_channels: int, widths=(16, 32, 64), bn_momentum=0.999):
    super().__init__()
    chans = (in_channels, *widths)
    self.convs = nn.ModuleList(
      nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)
      for c_in, c_out in zip(chans[:-1], chans[1:])
    )
    self.bns = nn.ModuleList(
      nn.BatchNorm2d(w, eps=BN_EPS, momentum=round(1.0 - bn_momentum, 12)) for w in widths
    )
    self.classifier = nn.Linear(widths[-1], num_classes)
    init_weights(self)

  def forward(self, x, only_fc: bool = False, only_feat: bool = False):
    if only_fc:
      return self.classifier(x)
    for conv, bn in zip(self.convs, self.bns):
      x = F.leaky_relu(bn(conv(x)), LEAKY_SLOPE)
    feat = x.mean(dim=(2, 3))  # [N, widths[-1]]
    if only_feat:
      return feat
    return {'logits': self.classifier(feat), 'feat': feat}


def init_weights(model: nn.Module) -> None:
  """USB's initialisation, in place (cnn.py's initializers are the same scheme): convs
  kaiming_normal_(fan_out, leaky_relu), BN 1 and 0, dense xavier_normal_ with a zero bias."""
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
      nn.init.xavier_normal_(m.weight)
      nn.init.zeros_(m.bias)


def net_builder(in_channels: int, widths, bn_momentum: float):
  """semilearn's net_builder contract: builder(num_classes=..., pretrained=..., ...) -> module."""

  def build(num_classes: int, pretrained: bool = False, pretrained_path=None, **unused):
    if pretrained:
      raise ValueError('cnn_small has no pretrained weights; set use_pretrain=False.')
    return CNNSmall(num_classes, in_channels, tuple(widths), bn_momentum)

  return build


def param_counts(model: nn.Module) -> dict:
  """{'params': trainable tensors' elements, 'bn_running_stats': BN mean + var elements}."""
  stats = sum(
    m.running_mean.numel() + m.running_var.numel()
    for m in model.modules()
    if isinstance(m, nn.BatchNorm2d)
  )
  return {'params': sum(p.numel() for p in model.parameters()), 'bn_running_stats': stats}


def torch_summary() -> dict:
  """Versions and threads of the torch side."""
  return {'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}
