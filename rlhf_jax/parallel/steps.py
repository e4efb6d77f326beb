"""Any training step, and the sampler, jitted over a device mesh with explicit shardings.

The design: steps stay mesh-agnostic. Every step builder (``make_sft_step``,
``make_reward_step``, ``make_dpo_step``, ``make_ppo_step``, ``make_nash_md_step``,
``make_safe_rlhf_step``) returns a pure ``step(state, batch, rng) -> (state, metrics)``
that never names a device or a mesh; this module wraps any such function. It reads the
layout from the data itself (the logical axis names each model's parameters carry) and
compiles the step once with ``jax.jit(in_shardings=..., out_shardings=...,
donate_argnums=0)`` (pjit), so the same step runs on one CPU, a multi-GPU host or a TPU
pod slice, and XLA's SPMD partitioner inserts the collectives (Xu et al., 2021, "GSPMD").

Layout of a training state ``TrainState(step, params, opt_state, rng, extra)``
(:func:`state_shardings`):

* ``params``: by their logical axes through ``rules`` (FSDP over ``fsdp``, tensor
  parallelism over ``tensor``, see :mod:`rlhf_jax.parallel.rules`);
* ``opt_state``: every parameter-shaped subtree like the parameters, the rest replicated
  (so FSDP also shards Adam's moments: ZeRO, Rajbhandari et al., 2020);
* ``extra``: each entry by its own logical axes, with its own rules when
  ``extra_rules[key]`` is given: a frozen reference, reward, cost or critic model may be
  laid out differently from the policy (e.g. replicated for speed when it fits, or only
  tensor-parallel). Leaves without axis metadata (the KL coefficient, a Lagrange
  multiplier, BCO's reward shift) are replicated;
* ``step`` and ``rng``: replicated.

Batches are split along their leading axis over ``('data', 'fsdp')``; the metrics come
back replicated. Because every device of a ``data``/``fsdp`` group computes on its own
rows and the gradients are all-reduced, one sharded step equals the single-device step up
to floating-point reduction order.

Sampling inside a sharded step (PPO, Nash-MD, Safe-RLHF) draws the same tokens on every
mesh: JAX's ``jax_threefry_partitionable`` (on by default since JAX 0.5) makes the random
bits of an array independent of how it is sharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from rlhf_jax.parallel.multihost import local_rows, make_global_array
from rlhf_jax.parallel.rules import DEFAULT_RULES, LogicalRules
from rlhf_jax.parallel.sharding import (
    batch_shardings,
    batch_spec,
    jit_sharded,
    optimizer_state_shardings,
    param_shardings,
    replicated,
)
from rlhf_jax.sampling import SampleOutput, SamplingConfig, sample

PyTree = Any
StepFn = Callable[[Any, PyTree, jax.Array], tuple[Any, dict[str, jax.Array]]]
SampleFn = Callable[[PyTree, jax.Array, jax.Array, jax.Array], SampleOutput]


def _like_params(opt_state: PyTree, params: PyTree, shardings: PyTree, mesh: Mesh) -> PyTree:
    """Shardings of ``opt_state`` by structure: subtrees shaped like ``params`` follow them."""
    params_def = jax.tree.structure(params)
    shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]

    def mirrors_params(node: Any) -> bool:
        return (
            jax.tree.structure(node) == params_def
            and [np.shape(leaf) for leaf in jax.tree.leaves(node)] == shapes
        )

    def assign(node: Any) -> Any:
        if mirrors_params(node):
            return shardings
        return jax.tree.map(lambda _: replicated(mesh), node)

    return jax.tree.map(assign, opt_state, is_leaf=mirrors_params)


def state_shardings(
    state: Any,
    tx: optax.GradientTransformation | None,
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
    extra_rules: Mapping[str, LogicalRules] | None = None,
) -> Any:
    """The ``NamedSharding`` of every leaf of a training state (see the module docstring).

    Args:
      state: a ``TrainState`` (or any struct with the fields ``step``, ``params``,
        ``opt_state``, ``rng``, ``extra`` and a ``replace`` method); leaves may be arrays
        or ``jax.ShapeDtypeStruct`` s.
      tx: the optax transformation of ``state.opt_state``; its parameter-shaped state is
        found with ``optax.tree_map_params``. ``None`` finds it by structure instead:
        every subtree of ``opt_state`` with the tree structure and leaf shapes of
        ``params`` (Adam's moments, momentum traces) is sharded like the parameters.
      mesh: the ``('data', 'fsdp', 'tensor')`` mesh.
      rules: logical-axis rules of ``state.params`` and, by default, of ``extra``.
      extra_rules: rules for individual ``extra`` entries, by key (e.g.
        ``{"reward_params": tensor_only_rules}``).

    Returns:
      A state of the same type and structure whose leaves are ``NamedSharding`` s.
    """
    extra_rules = dict(extra_rules or {})
    unknown = set(extra_rules) - set(state.extra)
    if unknown:
        raise KeyError(
            f"extra_rules names {sorted(unknown)}, which state.extra does not hold; "
            f"its keys are {sorted(state.extra)}"
        )
    params = param_shardings(state.params, mesh, rules)
    if tx is None:
        opt_state = _like_params(state.opt_state, state.params, params, mesh)
    else:
        opt_state = optimizer_state_shardings(tx, state.params, params)
    extra = {
        key: param_shardings(value, mesh, extra_rules.get(key, rules))
        for key, value in state.extra.items()
    }
    return state.replace(
        step=replicated(mesh),
        params=params,
        opt_state=opt_state,
        rng=replicated(mesh),
        extra=extra,
    )


def _fully_addressable(shardings: PyTree) -> bool:
    return all(s.is_fully_addressable for s in jax.tree.leaves(shardings))


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Put ``tree`` on its ``shardings``, in one process or across several.

    In a multi-process job every process passes the same full values (e.g. the same
    seeded initialisation); each keeps only its own devices' shards. An array that
    already has its target sharding is returned as is: if the caller keeps using it,
    copy it first, since a donating step deletes its buffers.
    """
    if _fully_addressable(shardings):
        return jax.device_put(tree, shardings)
    return jax.device_put(jax.tree.map(np.asarray, tree), shardings)


def place_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """A host batch as global arrays split over ``('data', 'fsdp')``, fed per process.

    Every process calls this with the same global host batch; each transfers only the
    rows its own devices hold (:func:`rlhf_jax.parallel.multihost.local_rows`), and the
    global ``jax.Array`` s are assembled from them. On one process this is a
    ``device_put`` onto the batch sharding.
    """
    batch_shardings(batch, mesh)  # names a leaf whose size the batch axes do not divide
    return make_global_array(local_rows(batch, mesh), mesh)


@dataclasses.dataclass(frozen=True)
class ShardedStep:
    """A training step compiled over a mesh, with the shardings it was compiled for.

    Attributes:
      mesh: the mesh.
      state_sharding: the state's shardings (:func:`state_shardings`).
      batch_sharding: the batch's shardings (leading axis over ``('data', 'fsdp')``).
      step: ``step(state, batch, rng) -> (state, metrics)``, jitted once with these in
        and out shardings, the state donated, metrics replicated; ``step.lower(...)``
        gives the lowered program (e.g. for ``compile().memory_analysis()``).
    """

    mesh: Mesh
    state_sharding: Any
    batch_sharding: PyTree
    step: Callable[..., tuple[Any, dict[str, jax.Array]]]

    def __call__(self, state: Any, batch: PyTree, rng: jax.Array) -> tuple[Any, dict]:
        """Run the compiled step (the state's buffers are donated)."""
        return self.step(state, batch, rng)

    def place_state(self, state: Any) -> Any:
        """``state`` on :attr:`state_sharding` (see :func:`place`)."""
        return place(state, self.state_sharding)

    def place_batch(self, batch: PyTree) -> PyTree:
        """A host batch on :attr:`batch_sharding` (see :func:`place_batch`)."""
        return place_batch(batch, self.mesh)


def shard_step(
    step_fn: StepFn,
    mesh: Mesh,
    state: Any,
    example_batch: PyTree,
    *,
    tx: optax.GradientTransformation | None = None,
    rules: LogicalRules = DEFAULT_RULES,
    extra_rules: Mapping[str, LogicalRules] | None = None,
) -> ShardedStep:
    """Jit any pure step over ``mesh`` with explicit in/out shardings (pjit), state donated.

    The step builders take no mesh: this function is the only place a step meets one.
    Shardings come from :func:`state_shardings` (the state's logical axes) and
    :func:`rlhf_jax.parallel.sharding.batch_shardings` (the batch's leading axis over
    ``('data', 'fsdp')``); the key ``rng`` and the metrics are replicated. Nothing is
    compiled until the first call (or ``.step.lower``).

    Args:
      step_fn: ``step_fn(state, batch, rng) -> (state, metrics)``, e.g. from
        ``make_sft_step``.
      mesh: the mesh.
      state: the state, or its abstract version (only shapes and axis metadata are read).
      example_batch: a batch (arrays or ``jax.ShapeDtypeStruct`` s) with the shapes every
        call will use.
      tx: the optax transformation of ``state.opt_state`` (see :func:`state_shardings`).
      rules: logical-axis rules of the trained parameters (and by default of ``extra``).
      extra_rules: per-``extra``-entry rules.

    Returns:
      The :class:`ShardedStep`; place the state with ``place_state`` and batches with
      ``place_batch`` (or pass host arrays on one process).
    """
    state_sharding = state_shardings(state, tx, mesh, rules, extra_rules)
    batch_sharding = batch_shardings(example_batch, mesh)
    step = jit_sharded(
        step_fn,
        mesh,
        in_shardings=(state_sharding, batch_sharding, replicated(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=0,
    )
    return ShardedStep(mesh, state_sharding, batch_sharding, step)


def sharded_sampler(
    graphdef: Any, config: SamplingConfig, mesh: Mesh, params_shardings: PyTree
) -> SampleFn:
    """:func:`rlhf_jax.sampling.sample` jitted over ``mesh`` with explicit shardings.

    The parameters keep ``params_shardings`` (e.g. ``param_shardings(params, mesh)``),
    prompts and every output array are split along the batch over ``('data', 'fsdp')``,
    the key is replicated. Partitionable threefry keys make the draws independent of the
    mesh: the same key gives the same tokens on any mesh.

    Args:
      graphdef: the model's graph definition.
      config: static sampling settings.
      mesh: the mesh.
      params_shardings: shardings of the parameters the sampler will be called with.

    Returns:
      ``sample_fn(params, prompt_tokens, prompt_mask, rng) -> SampleOutput`` with
      ``[B, P + max_new_tokens]`` arrays; ``B`` must be a multiple of ``data * fsdp``.
    """
    rows = NamedSharding(mesh, batch_spec(2))

    def sample_on_mesh(params, prompt_tokens, prompt_mask, rng):
        return sample(graphdef, params, prompt_tokens, prompt_mask, rng, config=config)

    jitted = jit_sharded(
        sample_on_mesh,
        mesh,
        in_shardings=(params_shardings, rows, rows, replicated(mesh)),
        out_shardings=rows,
    )

    def sample_fn(
        params: PyTree, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array
    ) -> SampleOutput:
        batch_shardings({"prompt_tokens": prompt_tokens}, mesh)
        return jitted(params, prompt_tokens, prompt_mask, rng)

    return sample_fn
