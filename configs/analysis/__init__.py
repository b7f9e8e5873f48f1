"""Analysis experiments of the paper as configs, and the shared argument parser.

Each file's ``get_config(arg)`` takes ``'k=v,k=v'``; :func:`parse` types each
value like its default and rejects unknown keys.
"""

from __future__ import annotations

from typing import Any

_TRUE, _FALSE = ('true', '1', 'yes'), ('false', '0', 'no')


def _typed(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() not in _TRUE + _FALSE:
      raise ValueError(f'config argument {key}={text!r} must be a boolean (True/False).')
    return text.lower() in _TRUE
  if isinstance(default, int):
    return int(text)
  if isinstance(default, float):
    return float(text)
  return text


def parse(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """``'a=1,b=x'`` -> ``{'a': 1, 'b': 'x', ...defaults}``, typed like the defaults."""
  out = dict(defaults)
  for item in (arg or '').split(','):
    if not item.strip():
      continue
    if '=' not in item:
      raise ValueError(
        f'config argument {item!r} is not key=value; known keys: {sorted(defaults)}.'
      )
    key, text = (s.strip() for s in item.split('=', 1))
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(defaults)}.')
    out[key] = _typed(key, text, defaults[key])
  return out


def divisor_at_most(n: int, cap: int) -> int:
  """The largest divisor of ``n`` that is ``<= cap`` (a death-check batch size for all of n)."""
  return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)
