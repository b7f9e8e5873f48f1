"""Waiting on child processes in tests: deadlines that stretch with the machine's load.

A test that starts a child process gives it a budget in seconds, sized for an idle
2-core machine. The budget is spent on a clock that runs slower when the machine is
busy: each second of waiting counts ``1 / max(1, load)`` seconds, where ``load`` is
the 1-minute load average per core (``os.getloadavg()[0] / os.cpu_count()``, read
at every poll). Two CPU-bound processes beside the suite on 2 cores halve the
clock's speed, so a child that gets half the CPU gets twice the wall time. The
environment variable ``DEMP_TEST_TIMEOUT_FACTOR`` (default 1) multiplies every
budget, for machines slower than the reference. A child past its budget is killed
and the test fails naming what it waited for, the budget, the factor and the
load-scaled time spent.
"""

import os
import subprocess
import time

FACTOR_ENV = 'DEMP_TEST_TIMEOUT_FACTOR'
POLL_S = 1.0


def factor() -> float:
  """``DEMP_TEST_TIMEOUT_FACTOR`` (default 1): must be a number > 0."""
  raw = os.environ.get(FACTOR_ENV, '1')
  try:
    value = float(raw)
  except ValueError:
    value = float('nan')
  if not value > 0:
    raise ValueError(f'{FACTOR_ENV}={raw!r}: allowed is a number > 0 (default 1)')
  return value


def load_per_core() -> float:
  """The 1-minute load average per core, at least 1 (an idle machine's clock runs at 1)."""
  try:
    load = os.getloadavg()[0]
  except OSError:  # no load average on this platform: an idle clock
    return 1.0
  return max(1.0, load / (os.cpu_count() or 1))


class Deadline:
  """A budget of ``seconds`` (× :func:`factor`) on the load-scaled clock."""

  def __init__(self, seconds: float, what: str):
    self.budget = seconds * factor()
    self.what = what
    self.spent = 0.0  # load-scaled seconds
    self.wall = 0.0
    self._last = time.monotonic()

  def tick(self) -> bool:
    """Advances the clock; True while budget is left."""
    now = time.monotonic()
    dt, self._last = now - self._last, now
    self.wall += dt
    self.spent += dt / load_per_core()
    return self.spent < self.budget

  def message(self) -> str:
    return (
      f'{self.what}: no result within a budget of {self.budget:.0f} load-scaled seconds '
      f'({FACTOR_ENV}={factor():g}; {self.wall:.0f} s of wall time, '
      f'load per core now {load_per_core():.2f})'
    )


def _kill(child: subprocess.Popen) -> None:
  if child.poll() is None:
    child.kill()
    child.wait()


def communicate(child: subprocess.Popen, seconds: float, what: str):
  """``child.communicate()`` within the load-scaled budget; kills the child and fails past it."""
  deadline = Deadline(seconds, what)
  while True:
    try:
      return child.communicate(timeout=POLL_S)
    except subprocess.TimeoutExpired:
      if not deadline.tick():
        _kill(child)
        raise AssertionError(deadline.message()) from None


def wait(child: subprocess.Popen, seconds: float, what: str) -> int:
  """``child.wait()`` within the load-scaled budget; kills the child and fails past it."""
  deadline = Deadline(seconds, what)
  while True:
    try:
      return child.wait(timeout=POLL_S)
    except subprocess.TimeoutExpired:
      if not deadline.tick():
        _kill(child)
        raise AssertionError(deadline.message()) from None


def run(
  args, *, seconds: float, what: str = '', check: bool = False, capture_output=False, **popen
):
  """``subprocess.run`` with the load-scaled budget in place of ``timeout``."""
  if capture_output:
    popen['stdout'] = popen['stderr'] = subprocess.PIPE
  child = subprocess.Popen(args, **popen)
  try:
    out, err = communicate(child, seconds, what or f'the command {args!r}'[:200])
  finally:
    _kill(child)
  done = subprocess.CompletedProcess(args, child.returncode, out, err)
  if check:
    done.check_returncode()
  return done


def wait_until(ready, seconds: float, what: str, child: subprocess.Popen | None = None) -> None:
  """Polls ``ready()`` within the load-scaled budget; fails early if ``child`` exits first."""
  deadline = Deadline(seconds, what)
  while not ready():
    if child is not None and child.poll() is not None:
      out = child.communicate()[0] or ''
      raise AssertionError(f'{what}: the child exited with {child.returncode} first\n{out[-3000:]}')
    if not deadline.tick():
      raise AssertionError(deadline.message())
    time.sleep(0.1)


def set_keys(config, overrides):
  """``config`` with ``{'a.b.c': value}`` overrides set in place (dotted paths); returns it."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config
