"""Weight-space merging of models with the same architecture, as pytree operations.

Every function takes parameter pytrees of identical structure and shapes (an
``nnx.State`` from ``nnx.split(model, nnx.Param)``, a dict of arrays, ...) and returns a
pytree of the same structure and dtypes. Arithmetic is done in float32 (or the leaf's
own dtype when wider) and cast back, so a bfloat16 checkpoint stays bfloat16 and a merge
weight of 0 or 1 returns an input bit for bit.

- :func:`interpolate`: ``(1 − t) θ_a + t θ_b`` (linear interpolation; equal to
  ``θ_a + t (θ_b − θ_a)`` up to rounding, and exact at the end points).
- :func:`weighted_merge`: ``Σ_i w_i θ_i``.
- :func:`task_vector`, :func:`add_task_vectors`: task arithmetic (Ilharco et al., 2023,
  "Editing Models with Task Arithmetic"): ``τ = θ_ft − θ_base``,
  ``θ = θ_base + Σ_i λ_i τ_i``.
- :func:`balanced_actor_initialization`: the two-stage weighted merge of Zheng et al.
  (2025), "Balanced Actor Initialization: Stable RLHF Training of Distillation-Based
  Reasoning Models" (BAI). Stage 1 merges the instruction-following (SFT / RLHF-aligned)
  model with the distillation-trained reasoning model; stage 2 merges that intermediate
  model with the pretrained base model to keep its general knowledge:

      θ_1   = α θ_instruct + (1 − α) θ_reasoning
      θ_BAI = β θ_1 + (1 − β) θ_pretrained

  The result initialises the RLHF actor; the paper reports that balanced ratios give
  the best trade-off between training stability and reasoning ability. Stage 2 is a
  task-vector scaling: ``θ_BAI = θ_pretrained + β (θ_1 − θ_pretrained)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp

PyTree = Any


def _check_compatible(trees: Sequence[PyTree]) -> None:
    first = jax.tree.structure(trees[0])
    for index, tree in enumerate(trees[1:], start=1):
        if jax.tree.structure(tree) != first:
            raise ValueError(
                f"parameter tree {index} has structure {jax.tree.structure(tree)}, "
                f"expected that of tree 0: {first}"
            )
    chex.assert_trees_all_equal_shapes(*trees)

    def require_float(path, leaf):
        if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
            name = jax.tree_util.keystr(path)
            raise ValueError(
                f"leaf {name} has dtype {jnp.asarray(leaf).dtype}; merging needs floats"
            )

    jax.tree_util.tree_map_with_path(require_float, trees[0])


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def weighted_merge(trees: Sequence[PyTree], weights: Sequence[float]) -> PyTree:
    """``Σ_i w_i θ_i`` leaf by leaf, in float32 or wider, cast back to each leaf's dtype.

    Args:
      trees: parameter pytrees of identical structure, shapes and dtypes.
      weights: one weight per tree (not required to sum to 1).

    Returns:
      The merged pytree, with the structure and dtypes of ``trees[0]``.

    Raises:
      ValueError: on a count mismatch, a different tree structure, or a non-float leaf.
    """
    if len(trees) != len(weights) or not trees:
        raise ValueError(f"weighted_merge: {len(trees)} trees and {len(weights)} weights")
    _check_compatible(trees)

    def merge_leaves(*leaves):
        dtype = leaves[0].dtype
        wide = _compute_dtype(dtype)
        total = weights[0] * leaves[0].astype(wide)
        for weight, leaf in zip(weights[1:], leaves[1:], strict=True):
            total = total + weight * leaf.astype(wide)
        return total.astype(dtype)

    return jax.tree.map(merge_leaves, *trees)


def interpolate(tree_a: PyTree, tree_b: PyTree, t: float) -> PyTree:
    """Linear interpolation ``(1 − t) θ_a + t θ_b``; ``t = 0`` gives θ_a, ``t = 1`` θ_b exactly."""
    return weighted_merge([tree_a, tree_b], [1.0 - t, t])


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """The task vector ``τ = θ_finetuned − θ_base`` (Ilharco et al., 2023)."""
    return weighted_merge([finetuned, base], [1.0, -1.0])


def add_task_vectors(base: PyTree, vectors: Sequence[PyTree], scales: Sequence[float]) -> PyTree:
    """``θ_base + Σ_i λ_i τ_i`` (Ilharco et al., 2023, task addition and negation)."""
    return weighted_merge([base, *vectors], [1.0, *scales])


def balanced_actor_initialization(
    instruct: PyTree,
    reasoning: PyTree,
    pretrained: PyTree,
    *,
    instruct_weight: float = 0.5,
    merged_weight: float = 0.5,
) -> PyTree:
    """BAI: two-stage weighted merge (Zheng et al., 2025; see the module docstring).

    Args:
      instruct: parameters of the instruction-following (SFT / aligned) model.
      reasoning: parameters of the distillation-trained reasoning model.
      pretrained: parameters of the pretrained base model both were trained from.
      instruct_weight: α, the instruction model's share in stage 1 (the reasoning model
        gets 1 − α).
      merged_weight: β, the stage-1 model's share in stage 2 (the pretrained model gets
        1 − β).

    Returns:
      ``β (α θ_instruct + (1 − α) θ_reasoning) + (1 − β) θ_pretrained``, each stage
      rounded to the parameters' dtype as a saved checkpoint would be.
    """
    stage_one = interpolate(reasoning, instruct, instruct_weight)
    return interpolate(pretrained, stage_one, merged_weight)
