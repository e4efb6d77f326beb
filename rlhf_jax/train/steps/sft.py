"""Supervised fine-tuning step: masked token negative log-likelihood on assistant tokens.

``L = Σ_{b,t} m_{b,t} (−log π(x_{b,t} | x_{b,<t})) / Σ_{b,t} m_{b,t}`` with ``m`` the loss
mask (assistant tokens and the eos closing each assistant turn), token-normalised by
default (or per sequence, :func:`rlhf_jax.objectives.sft.sft_loss`), as in the SFT stage of
Ouyang et al. (2022). Gradients accumulate over micro-batches with ``reduction="sum"`` and
one division by the whole batch's token count, so any split gives the same update.

Batches (from :mod:`rlhf_jax.data.task_batches`): ``input_ids``, ``attention_mask``,
``positions`` and ``loss_mask``, ``[B, L]``. A packed batch adds ``segment_ids`` (several
dialogues per row, positions restarting at 0 in each): a token is then a target only when
its predecessor belongs to the same segment, so no loss crosses a boundary, and the
decoder's attention is block-diagonal over the segments (``segment_ids`` passed to the
model), so every packed dialogue is computed exactly as it would be alone in its row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import Array

from rlhf_jax.models.logprobs import response_logprobs
from rlhf_jax.objectives.sft import Normalisation, sft_loss
from rlhf_jax.train.state import Metrics, PyTree, SumLossFn, TrainState, make_gradient_step
from rlhf_jax.train.steps.common import Batch, Evaluator, StepFn, evaluate

SFT_KEYS = ("input_ids", "attention_mask", "positions", "loss_mask")


def target_mask(batch: Batch) -> Array:
    """The tokens whose log-probability is trained: ``loss_mask``, within one segment.

    Token 0 has no predecessor and is never a target; in a packed batch, the first token
    of every segment is predicted from the previous segment and is excluded too.
    """
    mask = jnp.asarray(batch["loss_mask"], jnp.bool_)
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        same_segment = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (1, 0)))
        mask = mask & same_segment
    return mask.at[:, 0].set(False)


def token_logprobs_and_mask(
    graphdef: nnx.GraphDef, params: PyTree, batch: Batch
) -> tuple[Array, Array]:
    """``(log π(x_t | x_<t) · m_t, m_t)``, ``[B, L]`` each, targets of :func:`target_mask`."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(
        batch["input_ids"],
        positions=batch["positions"],
        attention_mask=batch["attention_mask"],
        segment_ids=batch.get("segment_ids"),
    )
    mask = target_mask(batch)
    per_token, _ = response_logprobs(logits, batch["input_ids"], mask)
    return per_token, mask


def sft_sum_loss(graphdef: nnx.GraphDef, *, normalisation: Normalisation = "token") -> SumLossFn:
    """``loss_fn(params, batch, rng) -> (Σ NLL, metrics)`` with ``metrics['denominator']``.

    The denominator is the number of target tokens (``"token"``) or of sequences with at
    least one target token (``"sequence"``).
    """

    def loss_fn(params: PyTree, batch: Batch, rng: Array) -> tuple[Array, Metrics]:
        del rng
        per_token, mask = token_logprobs_and_mask(graphdef, params, batch)
        return sft_loss(per_token, mask, normalisation=normalisation, reduction="sum")

    return loss_fn


def make_sft_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    normalisation: Normalisation = "token",
    num_micro_batches: int = 1,
) -> StepFn:
    """The pure SFT step ``step(state, batch, rng) -> (state, metrics)``.

    Args:
      graphdef: the policy's graph definition (static; ``state.params`` are its params).
      tx: the optax transformation ``state.opt_state`` belongs to.
      normalisation: ``"token"`` (default) or ``"sequence"``.
      num_micro_batches: micro-batches each batch is split into for accumulation.

    Returns:
      The step, to be jitted once by the caller with the state donated; its metrics are
      ``loss`` (mean NLL under the normalisation), ``nll_per_token``, ``tokens``,
      ``denominator``, ``grad_norm`` and ``nonfinite``.
    """
    return make_gradient_step(
        sft_sum_loss(graphdef, normalisation=normalisation),
        tx,
        num_micro_batches=num_micro_batches,
    )


def summarise_sft(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Set-level NLL per token and perplexity from per-row NLL sums and token counts."""
    tokens = float(np.sum(outputs["tokens"]))
    nll = float(np.sum(outputs["nll"])) / max(tokens, 1.0)
    return {"nll_per_token": nll, "perplexity": float(np.exp(nll)), "tokens": tokens}


def make_sft_eval(graphdef: nnx.GraphDef, *, batch_size: int) -> Evaluator:
    """``evaluate(state, arrays) -> {"nll_per_token", "perplexity", "tokens"}`` on a held-out set.

    The per-row forward is jitted once (batches of ``batch_size`` rows); the NLL is the
    token-weighted mean over the whole set.
    """

    @jax.jit
    def forward(params: PyTree, batch: Batch) -> dict[str, Array]:
        per_token, mask = token_logprobs_and_mask(graphdef, params, batch)
        return {"nll": -jnp.sum(per_token, axis=-1), "tokens": jnp.sum(mask, axis=-1)}

    def evaluator(state: TrainState, arrays) -> dict[str, float]:
        data = {k: arrays[k] for k in (*SFT_KEYS, "segment_ids") if k in arrays}
        return evaluate(forward, (state.params,), data, summarise_sft, batch_size=batch_size)

    return evaluator
