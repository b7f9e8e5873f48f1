"""Gate saliencies of unit groups: SNAP's |∂L/∂c| and CroP-S's |∂(gᵀ∇_θL)/∂c|.

A gate ``c_u = 1`` multiplies unit ``u``'s output at every site where the model
probes it (``demp.deadunits.probe`` multiplies by the ``gates`` collection when
one is passed). A group's gates are tied across its sites, so ``∂L/∂c_u`` sums
over sites, examples and positions of ``a · ∂L/∂a``: exactly the derivative of
the loss w.r.t. a scalar scaling the unit's output.

* :func:`snap_scores`: ``|Σ_b ∂L_b/∂c|`` (Verdenius et al., 2020).
* :func:`crop_s_scores`: ``|Σ_b ∂/∂c (gᵀ ∇_θ L_b)|`` with ``g = Σ_b ∇_θ L_b``
  held fixed and ``θ`` the conv/dense kernels, as in the authors' code
  (Rachwan et al., 2022): a mixed gate/parameter Hessian-gradient product,
  computed as the gate gradient of a ``jax.jvp`` of the loss along ``g``
  (reverse over forward), never a materialised Hessian.

Both run in eval mode (BN running statistics) over ``[n_batches, B, ...]``
images, each batch's loss the mean cross-entropy and the total their sum.

References:
  Verdenius et al., `Pruning via Iterative Ranking of Sensitivity Statistics
  <https://arxiv.org/abs/2006.00896>`_, 2020.
  Rachwan et al., `Winning the Lottery Ahead of Time: Efficient Early Network
  Pruning <https://arxiv.org/abs/2206.10451>`_, ICML 2022.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from demp.trainer import steps

PyTree = Any
GATES = 'gates'


def gate_tree(groups, gates: Mapping[str, jax.Array]) -> dict:
  """The ``gates`` collection: each group's ``[width]`` vector at each of its sites."""
  tree: dict = {}
  for g in groups:
    for site in g.sites:
      node = tree
      for k in site[:-1]:
        node = node.setdefault(k, {})
      node[site[-1]] = gates[g.name]
  return tree


def ones(model) -> dict[str, jax.Array]:
  """Gates of ones, one ``[width]`` vector per unit group."""
  return {name: jnp.ones((w,), jnp.float32) for name, w in model.widths.items()}


def _loss_fn(model, batch_stats):
  groups = model.unit_groups()

  def loss(params, gates, x_bhwc, labels_b):
    variables = {'params': params, 'batch_stats': batch_stats, GATES: gate_tree(groups, gates)}
    logits_bk = model.apply(variables, x_bhwc, train=False)
    return steps.cross_entropy(logits_bk, labels_b).mean()

  return loss


def _sum_over_batches(fn: Callable, images_nbhwc, labels_nb):
  """Σ_n fn(images[n], labels[n]) with ``lax.scan`` (fn returns a pytree)."""
  first = fn(images_nbhwc[0], labels_nb[0])

  def body(acc, xy):
    return jax.tree.map(jnp.add, acc, fn(*xy)), None

  total, _ = jax.lax.scan(body, first, (images_nbhwc[1:], labels_nb[1:]))
  return total


@functools.partial(jax.jit, static_argnames=('model',))
def snap_scores(
  model,
  variables: Mapping[str, PyTree],
  images_nbhwc: jax.Array,
  labels_nb: jax.Array,
  at: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
  """SNAP: ``|∂L/∂c|`` per unit, ``L`` summed over the batches.

  ``at`` is the gate value (default ones); a 0/1 keep-mask scores the network
  with the zero-gated units removed, exactly (their outputs are zero, so are
  their parameters' gradients), without re-compiling for the smaller shapes.
  """
  loss = _loss_fn(model, variables.get('batch_stats', {}))
  c = ones(model) if at is None else at
  grad_c = jax.grad(loss, argnums=1)
  total = _sum_over_batches(
    lambda x, y: grad_c(variables['params'], c, x, y), images_nbhwc, labels_nb
  )
  return jax.tree.map(jnp.abs, total)


@functools.partial(jax.jit, static_argnames=('model',))
def crop_s_scores(
  model,
  variables: Mapping[str, PyTree],
  images_nbhwc: jax.Array,
  labels_nb: jax.Array,
  at: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
  """CroP-S: ``|∂/∂c (gᵀ ∇_θ L)|`` per unit, ``g = ∇_θ L`` held fixed (``at`` as for SNAP)."""
  loss = _loss_fn(model, variables.get('batch_stats', {}))
  params = variables['params']
  c = ones(model) if at is None else at
  g = _sum_over_batches(lambda x, y: jax.grad(loss)(params, c, x, y), images_nbhwc, labels_nb)
  g = jax.lax.stop_gradient(kernels_only(g))

  def directional(c, x, y):  # gᵀ ∇_θ L(θ, c) as a forward-mode derivative along g
    return jax.jvp(lambda p: loss(p, c, x, y), (params,), (g,))[1]

  total = _sum_over_batches(lambda x, y: jax.grad(directional)(c, x, y), images_nbhwc, labels_nb)
  return jax.tree.map(jnp.abs, total)


def kernels_only(tree: PyTree) -> PyTree:
  """Zeros every leaf but the conv/dense ``kernel`` leaves (CroP's θ: the weights)."""
  return jax.tree.map_with_path(
    lambda kp, x: x if str(getattr(kp[-1], 'key', '')) == 'kernel' else jnp.zeros_like(x), tree
  )


SCORES: dict[str, Callable[..., dict[str, jax.Array]]] = {
  'snap': snap_scores,
  'crop_s': crop_s_scores,
}
