"""Base SSL algorithms (docs/method.md §2) behind one interface.

  algo = get_algorithm(config)
  algo_state = algo.init_state(num_unlabeled, num_classes)      # replicated pytree
  pseudo, algo_state, metrics = algo.pseudo_label(algo_state, logits_w, idx_ulb,
                                                  axis_name='batch')  # or None
  loss_u = unsup_loss(logits_s, pseudo)

Every hyperparameter, in one place (config field -> who reads it; USB classic-CV value):

| config field       | read by             | meaning                                   | USB   |
|--------------------|---------------------|-------------------------------------------|-------|
| algorithm          | get_algorithm       | one of ALGORITHM_NAMES                    |       |
| ssl.p_cutoff       | fixmatch, flexmatch | confidence threshold tau                  | 0.95  |
| ssl.thresh_warmup  | flexmatch           | count unused (-1) samples in sigma's max  | True  |
| ssl.dist_align     | softmatch           | uniform alignment of the weak probs       | True  |
| ssl.ema_p          | softmatch           | EMA momentum of p_model, mu, sigma^2      | 0.999 |
| ssl.n_sigma        | softmatch           | Gaussian std = sqrt(sigma^2) / n_sigma    | 2     |
| ssl.ulb_loss_ratio | trainer             | lambda_u, weight of unsup_loss            | 1.0   |
| ssl.label_smoothing| supervised_loss     | (1 - a) * onehot + a / C (not in USB)     | 0     |

Fixed as in USB (not configurable): hard pseudo-labels (hard_label=True, so the
temperature T=0.5 is unused), FlexMatch's convex mapping x / (2 - x), SoftMatch's
uniform p_target (dist_uniform=True), one global Gaussian (per_class=False),
alignment eps 1e-6, mu_0 = 1/C, sigma^2_0 = 1.
"""

import ml_collections

from cmix_jax import checks
from cmix_jax.algorithms import base
from cmix_jax.algorithms.base import Algorithm
from cmix_jax.algorithms.base import PseudoLabels
from cmix_jax.algorithms.base import supervised_loss
from cmix_jax.algorithms.base import unsup_loss
from cmix_jax.algorithms.fixmatch import FixMatch
from cmix_jax.algorithms.flexmatch import FlexMatch
from cmix_jax.algorithms.flexmatch import FlexMatchState
from cmix_jax.algorithms.softmatch import SoftMatch
from cmix_jax.algorithms.softmatch import SoftMatchState
from cmix_jax.algorithms.supervised import Supervised

__all__ = [
  'Algorithm',
  'PseudoLabels',
  'supervised_loss',
  'unsup_loss',
  'FixMatch',
  'FlexMatch',
  'FlexMatchState',
  'SoftMatch',
  'SoftMatchState',
  'Supervised',
  'ALGORITHMS',
  'ALGORITHM_NAMES',
  'ssl_errors',
  'get_algorithm',
]

ALGORITHMS = (Supervised, FixMatch, FlexMatch, SoftMatch)
ALGORITHM_NAMES = tuple(a.name for a in ALGORITHMS)


def ssl_errors(ssl: ml_collections.ConfigDict) -> list[str]:
  """Every problem with `config.ssl`, whichever algorithm runs (a bad value is never right)."""
  errors = base.label_smoothing_errors(ssl.label_smoothing)
  errors += checks.out_of_range(
    'ssl.ulb_loss_ratio', ssl.ulb_loss_ratio, '[0, inf)', 'lambda_u; USB: 1.0'
  )
  for algorithm in ALGORITHMS:
    errors += [e for e in algorithm.ssl_errors(ssl) if e not in errors]  # p_cutoff is shared
  return errors


def get_algorithm(config: ml_collections.ConfigDict) -> Algorithm:
  """The algorithm named by `config.algorithm`, with its hyperparameters from `config.ssl`."""
  name = config.algorithm
  if name not in ALGORITHM_NAMES:
    raise ValueError(
      f'unknown algorithm {name!r}: use one of {", ".join(ALGORITHM_NAMES)} (--config.algorithm).'
    )
  errors = ssl_errors(config.ssl)
  if errors:
    raise ValueError(' '.join(errors))
  ssl = config.ssl
  if name == 'supervised':
    return Supervised()
  if name == 'fixmatch':
    return FixMatch(p_cutoff=float(ssl.p_cutoff))
  if name == 'flexmatch':
    return FlexMatch(p_cutoff=float(ssl.p_cutoff), thresh_warmup=bool(ssl.thresh_warmup))
  return SoftMatch(
    ema_p=float(ssl.ema_p), n_sigma=float(ssl.n_sigma), dist_align=bool(ssl.dist_align)
  )
