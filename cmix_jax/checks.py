"""Pure value checks shared by config validation and the classes that read the values.

Each check returns a list of problem lines (empty when the value is fine), so callers can
collect every problem of a config before refusing it, and the same rule text serves both
`config_validation` and a dataclass's `__post_init__`.
"""

import math
from typing import Any


def out_of_range(field: str, value: Any, interval: str, note: str = '') -> list[str]:
  """[] if `value` lies in `interval` ('[0, 1)', '(0, inf)', ...), else one line naming the fix.

  NaN, None and non-numbers are never in range.
  """
  low_text, high_text = interval[1:-1].split(',')
  low, high = float(low_text), float(high_text)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
  if ok:
    above_low = value >= low if interval[0] == '[' else value > low
    below_high = value <= high if interval[-1] == ']' else value < high
    ok = above_low and below_high
  if ok:
    return []
  note = f' ({note})' if note else ''
  return [f'{field}={value!r} must be in {interval}{note}: set --config.{field} accordingly.']


def not_one_of(field: str, value: Any, choices: tuple) -> list[str]:
  """[] if `value` is one of `choices`, else one line listing them."""
  if value in choices:
    return []
  return [f'{field}={value!r}: use one of {", ".join(map(repr, choices))} (--config.{field}).']


def not_integer(field: str, value: Any, low: int) -> list[str]:
  """[] if `value` is an int >= `low`, else one line naming the bound."""
  if isinstance(value, int) and not isinstance(value, bool) and value >= low:
    return []
  return [f'{field}={value!r} must be an integer >= {low}: set --config.{field} accordingly.']
