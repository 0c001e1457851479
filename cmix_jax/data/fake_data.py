"""Fake data: small, deterministic, class-balanced images for tests and smoke runs, no files.

Each class is a random prototype image plus Gaussian noise, so a model learns it in few steps.
"""

import numpy as np


def make_fake(
  num_train: int = 256,
  num_test: int = 64,
  image_shape=(32, 32, 3),
  num_classes: int = 10,
  num_unlabeled: int = 0,
  seed: int = 0,
) -> dict:
  """Deterministic small data: class prototype + noise, labels exactly balanced (i % C)."""
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in image_shape)
  prototypes = rng.uniform(40, 215, (num_classes,) + shape)  # [C, H, W, C_img]

  def draw(n: int, labelled: bool):
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)  # [n]
    noise = rng.normal(0, 30, (n,) + shape)
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)  # [n, H, W, C]
    return images, labels if labelled else np.full((n,), -1, np.int32)

  out = {'train': draw(num_train, True), 'test': draw(num_test, True)}
  if num_unlabeled:
    out['unlabeled'] = draw(num_unlabeled, False)
  return out
