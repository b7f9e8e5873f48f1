"""The host-side state of one training run (:class:`Run`) and the train state.

The train state is ``{'params', 'batch_stats', 'opt_state'}``, built by
:func:`train_state` (from variables) or :func:`create_train_state` (from a model
and an initialization key), and nowhere else.

A :class:`Run` declares which of its fields a checkpoint holds
(:data:`HOST_FIELDS`: host-side method state, saved as JSON + arrays by
:mod:`demp.trainer.checkpoint`); the others are the train state and step (saved as
arrays), or are rebuilt from the config when a run resumes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from demp import deadunits, flops, surgery
from demp.trainer import compile_cache, parallel, steps

PyTree = Any


def train_state(variables: Mapping[str, PyTree], opt_state: PyTree) -> dict[str, PyTree]:
  """The train state of ``variables`` (``params``, optional ``batch_stats``) and ``opt_state``."""
  return {
    'params': variables['params'],
    'batch_stats': variables.get('batch_stats', {}),
    'opt_state': opt_state,
  }


def create_train_state(
  model, tx: optax.GradientTransformation, key: jax.Array, image_shape
) -> dict[str, PyTree]:
  """Initializes ``model`` on a ``[1, *image_shape]`` input and ``tx`` on its params."""
  dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  variables = model.init(key, dummy, train=False)
  return train_state(variables, tx.init(variables['params']))


def _host(**kwargs):
  """A field a checkpoint saves as host-side state (:data:`HOST_FIELDS`)."""
  return dataclasses.field(metadata={'checkpoint': 'host'}, **kwargs)


@dataclasses.dataclass
class Run:
  """Everything one run holds on the host: the model, its state, compiled steps.

  A method's hook may call :meth:`prune` (DemP's: :func:`demp.trainer.demp_policy.prune_dead`) or edit
  :attr:`state`; nothing else is hidden here. Fields made with ``_host`` are
  the host-side state a checkpoint saves (:data:`HOST_FIELDS`); ``model``
  (its widths), ``state`` and ``step`` are saved as the train state; the rest
  is rebuilt from the config.
  """

  config: ml_collections.ConfigDict
  model: Any
  tx: optax.GradientTransformation
  state: dict
  death_images: jax.Array
  dense_widths: dict
  dense_params: int
  step: int = 0
  compiled: Any = None
  step_flops: float = float('nan')
  events: list = _host(default_factory=list)
  log: Callable[[dict], None] = lambda record: None
  memo: dict = _host(default_factory=dict)  # a method's host state between hook calls
  stats: dict = _host(default_factory=dict)  # a method's numbers, copied into the summary
  unit_ids: dict = _host(default_factory=dict)  # group -> dense indices of the units present
  dead_set: frozenset | None = _host(default=None)  # (group, dense index) dead at the last check
  mesh: Any = None  # demp.trainer.parallel mesh: batch split on 'data', state replicated
  # A deferred prune (prune.switch_after): {'keeps', 'switch_step', 'cost'}; the units are
  # silenced (demp.surgery.silence) until the step compiled for the new widths takes over.
  pending: dict | None = _host(default=None)
  costs: list = _host(default_factory=list)  # per prune event: its times and stall
  step_s: float = float('nan')  # recent mean train-step time (the loop sets it)
  feed: Any = None  # demp.trainer.feed: where the step's batches come from (None: a batch arg)
  _inputs_spec: Any = None  # the step's inputs after the state, for compiling ahead
  _next: Any = None  # future of the background compile: (compiled, flops, seconds)
  # widths -> future of that architecture's other programs compiled in the background:
  # {'death_check', 'silence', 'finite_check'} (see _compile_extras)
  _extras: dict = dataclasses.field(default_factory=dict)
  _pool: Any = None

  @property
  def variables(self) -> dict:
    return {'params': self.state['params'], 'batch_stats': self.state['batch_stats']}

  def _lower(self, model, state, inputs):
    """The train step of ``model`` lowered for ``(state, *inputs)`` (see :mod:`demp.trainer.feed`)."""
    step = steps.make_train_step(model, self.tx, self.config.label_smoothing)
    if self.feed is not None and self.feed.on_device:  # k steps per call, batches made inside
      return jax.jit(self.feed.make_step(step), donate_argnums=0).lower(state, *inputs)
    shardings = parallel.step_shardings(self.mesh) if self.mesh is not None else {}
    return jax.jit(step, donate_argnums=0, **shardings).lower(state, *inputs)

  def _step_flops(self, compiled, model, state) -> float:
    """XLA's FLOPs of ONE train step (a scan's compiled cost counts its body once)."""
    if self.feed is None or not self.feed.on_device:
      return flops.compiled_flops(compiled)
    step = steps.make_train_step(model, self.tx, self.config.label_smoothing)
    return flops.lowered_flops(step, state, self.feed.batch_spec())

  def compile(self, inputs: tuple) -> float:
    """Compiles the train step for the current shapes (AOT); returns seconds.

    ``inputs``: the arguments after the state: ``(batch,)`` (or the batch itself)
    on the host feed, ``(data, start step)`` on the device feed. With a deferred prune pending (a resumed run), also starts
    compiling the step for the pending widths in the background.
    """
    t0 = time.perf_counter()
    if not isinstance(inputs, tuple):  # a batch, from a run driven by hand
      inputs = (inputs,)
    compile_cache.set_architecture(self.model.widths)
    self._inputs_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
    with compile_cache.phase('train_step', self.model.widths):
      self.compiled = self._lower(self.model, self.state, inputs).compile()
    self.step_flops = self._step_flops(self.compiled, self.model, self.state)
    if self.pending is not None and self._next is None:
      self._compile_ahead(self.pending['keeps'])
    return time.perf_counter() - t0

  def compile_ahead(self) -> None:
    """Starts compiling, in the background, this architecture's programs besides its step.

    Its finiteness check, death check and silencing (:meth:`_compile_extras`),
    used at the next metrics fetch and prune event instead of compiling them
    then. The trainer calls it after :meth:`compile`.
    """
    self._compile_extras(self.model, _abstract(self.state))

  def close(self) -> None:
    """Ends the background compiles: drops the queued ones, waits for a running one."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def _submit(self, work) -> concurrent.futures.Future:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='demp-compile')
    return self._pool.submit(work)

  def _compile_extras(self, model, shapes: Mapping[str, Any]) -> None:
    """Starts compiling, in the background, the programs an architecture runs besides its step.

    For ``model`` at train-state ``shapes``: the finiteness check of its params
    (every metrics fetch), the death check's pass (one device) and, when prune
    events are deferred, the silencing of units (:func:`demp.surgery.silence`, the
    keep-masks its arguments). One per architecture; queued behind a step
    being compiled ahead, which is needed first.
    """
    key = _key(model.widths)
    if key in self._extras:
      return
    images = jax.ShapeDtypeStruct(self.death_images.shape, self.death_images.dtype)
    c = self.config.prune
    deferred = c.switch_after > 0

    variables = {'params': shapes['params'], 'batch_stats': shapes['batch_stats']}

    def finite_check():
      return all_finite.lower(shapes['params']).compile()

    def death_check():
      return deadunits.compile_unit_stats(
        model, variables, images, criterion=self._criterion(), batch_size=c.batch_size
      )

    def silence():
      if deferred and surgery.silences_exactly(model):
        return surgery.compile_silence(model, variables, shapes['opt_state'])
      return None

    programs = {'finite_check': finite_check, 'silence': silence}
    if self.mesh is None or self.mesh.devices.size == 1:
      programs['death_check'] = death_check
    self._extras[key] = {
      name: self._submit(functools.partial(_in_phase, name, model.widths, fn))
      for name, fn in programs.items()
    }

  def _extra(self, name: str):
    """This architecture's program ``name`` compiled in the background (waits for it), or None."""
    future = self._extras.get(_key(self.model.widths), {}).get(name)
    return None if future is None else future.result()

  def params_finite(self) -> bool:
    """Whether every parameter is finite (one device-side reduction, a host sync)."""
    compiled = self._extra('finite_check')
    if compiled is not None:
      return bool(compiled(self.state['params']))
    with compile_cache.phase('finite_check', self.model.widths):
      return bool(all_finite(self.state['params']))

  # -- Deferred prunes: train on, silenced, while the smaller step compiles. ------------------

  def _compile_ahead(self, keeps: Mapping[str, np.ndarray]) -> None:
    """Starts compiling, in a background thread, the train step for the widths after ``keeps``."""
    widths = {**self.model.widths, **{k: int(np.sum(v)) for k, v in keeps.items()}}
    model = self.model.clone(widths=flax.core.FrozenDict(widths))
    shapes = surgery.pruned_shapes(self.model, self.state, keeps)  # shapes only: no array is read
    inputs = self._inputs_spec

    def work():
      t0 = time.perf_counter()
      with compile_cache.phase('train_step', model.widths):
        compiled = self._lower(model, shapes, inputs).compile()
      seconds = time.perf_counter() - t0
      return compiled, self._step_flops(compiled, model, shapes), seconds

    self._next = self._submit(work)
    self._compile_extras(model, shapes)  # behind the step, which the switch waits for

  def switch_delay(self) -> int:
    """Steps between a prune decision and its switch to the new widths; 0 = prune now.

    ``prune.switch_after`` × τ, at least 1, never past the next death check or
    the end of the run (a decision at the last step is synchronous); 0 when
    silencing is not exact for the model (:func:`demp.surgery.silences_exactly`)
    or no step was compiled yet (step 0). Depends on the config only, so every
    run and every host switches at the same step.
    """
    c = self.config.prune
    left = self.config.num_steps - self.step
    if c.switch_after == 0 or self._inputs_spec is None or left <= 1:
      return 0
    if not surgery.silences_exactly(self.model):
      return 0
    delay = max(1, round(c.switch_after * c.every))
    k = self.feed.k if self.feed is not None else 1
    if k == 1:
      return min(delay, max(1, c.every - 1), left - 1)
    # k steps per dispatch: the switch lands at the end of a dispatch, before the next check.
    delay = min(k * max(1, round(delay / k)), c.every - k, left - k)
    return delay if delay >= k else 0

  def _defer(self, keeps: Mapping[str, np.ndarray], delay: int) -> None:
    """Silences the units not kept and schedules their removal ``delay`` steps from now."""
    self._compile_ahead(keeps)
    with compile_cache.phase('silence', self.model.widths):  # compiled ahead: nothing compiles
      variables, opt_state = surgery.silence(
        self.model,
        self.variables,
        self.state['opt_state'],
        keeps,
        compiled=self._extra('silence'),
      )
    self.state = train_state(variables, opt_state)
    if self.mesh is not None:
      self.state = parallel.replicate(self.state, self.mesh)
    keeps = {k: np.asarray(v, bool) for k, v in keeps.items()}
    self.pending = {'keeps': keeps, 'switch_step': self.step + delay, 'cost': {}}

  def switch(self) -> dict[str, float]:
    """Ends a deferred prune: waits for the compiled step, removes the silenced units.

    Returns its times: ``wait_s`` (blocked on the compile), ``switch_s`` (the
    whole switch, wait included), ``compile_s`` (the background compile).
    """
    t0 = time.perf_counter()
    keeps = self.pending['keeps']
    if self._next is None:  # never started (no step compiled since the resume)
      self._compile_ahead(keeps)
    compiled, flops_, compile_s = self._next.result()
    waited = time.perf_counter() - t0
    self._cut(keeps)
    self.compiled, self.step_flops = compiled, flops_
    self.pending, self._next = None, None
    return {'wait_s': waited, 'switch_s': time.perf_counter() - t0, 'compile_s': compile_s}

  def _cut(self, keeps: Mapping[str, np.ndarray]) -> None:
    """Removes the units not kept: sliced on the host (nothing compiles), then back on device."""
    old = _key(self.model.widths)
    example = jax.ShapeDtypeStruct((1, *self.death_images.shape[1:]), self.death_images.dtype)
    with compile_cache.phase('switch', self.model.widths):
      self.model, variables, opt_state = surgery.prune(
        self.model, self.variables, self.state['opt_state'], keeps, example_input=example, host=True
      )
      state = train_state(variables, opt_state)
      if self.mesh is not None:
        self.state = parallel.replicate(state, self.mesh)
      else:
        self.state = jax.device_put(state)
    compile_cache.set_architecture(self.model.widths)
    if _key(self.model.widths) != old:
      self._extras.pop(old, None)  # that architecture's programs are not needed again

  @property
  def widths_after(self) -> dict[str, int]:
    """The widths once a pending deferred prune has switched (else the current ones)."""
    if self.pending is None:
      return dict(self.model.widths)
    return {**self.model.widths, **{k: int(np.sum(v)) for k, v in self.pending['keeps'].items()}}

  def switch_due(self) -> bool:
    """Whether a deferred prune switches now (after the step just taken): call after each step."""
    return self.pending is not None and self.step >= self.pending['switch_step']

  def finish_pending(self) -> dict[str, float] | None:
    """Switches now if a deferred prune is pending (before a check, an export, the end)."""
    return self.switch() if self.pending is not None else None

  def unit_stats(self) -> dict:
    """The death check's one pass: ``alive``, ``activity`` and per-unit output ranges."""
    self.finish_pending()
    c = self.config.prune
    with compile_cache.phase('death_check', self.model.widths):  # compiled ahead: nothing compiles
      return deadunits.unit_stats(
        self.model,
        self.variables,
        self.death_images,
        eps=c.eps,
        batch_size=c.batch_size,
        criterion=self._criterion(),
        compiled=self._extra('death_check'),
      )

  def _criterion(self) -> str:
    return self.config.prune.criterion or deadunits.criterion_for(self.model.activation)

  def dead_units(self) -> tuple[dict, dict]:
    stats = self.unit_stats()
    return stats['alive'], stats['activity']

  def prune(
    self, keeps: Mapping[str, np.ndarray], reason: str = '', *, defer: bool = False, **info
  ) -> bool:
    """Removes the units not kept; returns whether any unit was removed.

    With ``defer`` (DemP's prune events) and ``prune.switch_after`` > 0 the
    units are silenced now and removed :meth:`switch_delay` steps later, when
    the step for the new widths has compiled in the background; the event's
    ``widths`` are the new ones, ``run.model`` keeps the old ones until then.
    Without it (the baselines, which go on using ``run.model``) they go now.
    """
    self.finish_pending()
    parallel.assert_same_across_hosts(dict(keeps), 'keep-masks')  # every host cuts the same units
    before = dict(self.model.widths)
    removes = any(int(np.sum(k)) < before[name] for name, k in keeps.items())
    t0 = time.perf_counter()
    delay = self.switch_delay() if removes and defer else 0
    if delay:
      self._defer(keeps, delay)
      for name, keep in keeps.items():
        ids = self.unit_ids.get(name, np.arange(before[name]))
        self.unit_ids[name] = ids[np.asarray(keep, bool)]
    elif removes:
      self._cut(keeps)
      self.compiled = None  # compiled again, for the new shapes, before the next step
      for name, keep in keeps.items():
        ids = self.unit_ids.get(name, np.arange(before[name]))
        self.unit_ids[name] = ids[np.asarray(keep, bool)]
    widths = {**before, **{k: int(np.sum(v)) for k, v in keeps.items()}}
    event = {
      'event': 'prune',
      'step': self.step,
      'reason': reason,
      'removed': removes,
      'widths': widths,
      'surgery_s': time.perf_counter() - t0,
      **({'switch_step': self.pending['switch_step']} if delay else {}),
      **info,
    }
    self.events.append(event)
    self.log(event)
    return removes


def _key(widths: Mapping[str, int]) -> tuple:
  return tuple(sorted(widths.items()))


def _in_phase(function: str, widths, fn):
  with compile_cache.phase(function, widths):
    return fn()


def _abstract(tree):
  """``jax.ShapeDtypeStruct`` leaves (with their shardings) of a tree of arrays."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None)),
    tree,
  )


@jax.jit
def all_finite(tree: PyTree) -> jax.Array:
  """Whether every entry of every leaf is finite (one program per shapes)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


HOST_FIELDS: tuple[str, ...] = tuple(
  f.name for f in dataclasses.fields(Run) if f.metadata.get('checkpoint') == 'host'
)
"""The :class:`Run` fields a checkpoint saves as host-side state."""
