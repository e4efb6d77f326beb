"""The one loop driver every experiment uses.

:func:`run` calls a step ``step_fn(state, batch, rng) -> (state, metrics)`` for steps
``state.step, ..., num_steps - 1``. It feeds it ``data.batch_for_step(t)`` and the key
``fold_in(state.rng, t)``, advances ``state.step``, writes metrics every ``log_every``
steps (one device-to-host transfer for all pending steps) and saves a checkpoint every
``checkpoint_every`` steps and at the end.

Two kinds of step go through it, the same way:

- a *pure* step (``jit_step=True``, the default): the whole step is traceable, and the
  loop jits it once, with the state donated (and with explicit shardings when
  ``state_sharding`` / ``batch_sharding`` are given);
- a *host* step (``jit_step=False``): a step with Python work inside that cannot be
  traced, e.g. a preference oracle on decoded text. It composes its own jitted pieces
  (jitted sampling, labelling on the host, a jitted update) and the loop calls it as it
  is, with the same key, batch, step counting, metrics, checkpoints and non-finite
  handling. The loop places the state on ``state_sharding`` and each batch on
  ``batch_sharding`` (when given); the step's jitted pieces keep those layouts. A host
  step must still be a function of ``(state, batch, rng)`` only: the host work may not
  keep state between calls, or a resumed run would differ from an uninterrupted one.

Everything a run depends on is either in the state (parameters, optimiser, PRNG key,
algorithm state, step = data position) or a pure function of the step number (the batch,
the step's key), so a run killed at any point and started again with the same arguments
resumes from the newest committed checkpoint and ends with the same parameters as a run
never interrupted.

Non-finite steps. The step reports ``metrics["nonfinite"]`` (see
:meth:`~rlhf_jax.train.state.TrainState.apply_finite_gradients`, which also leaves the
parameters unchanged on such a step); without it, a non-finite ``metrics["loss"]`` counts.
With ``on_nonfinite="skip"`` the loop counts such steps and goes on. With
``on_nonfinite="stop"`` it raises :class:`NonFiniteError` naming the first bad step;
metrics are checked before every checkpoint is written, so the newest checkpoint on disk
is always from before that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from jax import Array

from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.metrics import MetricsWriter
from rlhf_jax.train.state import Metrics, PyTree, TrainState

StepFn = Callable[[TrainState, PyTree, Array], tuple[TrainState, Metrics]]
CHECKPOINT_DIR = "checkpoints"


class BatchSchedule(Protocol):
    """A deterministic data order: the batch of every step is a function of the step."""

    def batch_for_step(self, step: int) -> PyTree:
        """The batch consumed by step ``step`` (0-based)."""
        ...


@dataclasses.dataclass(frozen=True)
class EpochPermutationSchedule:
    """Mini-batches of in-memory arrays, reshuffled every epoch, addressable by step.

    Epoch ``e`` visits the examples in the order of a permutation drawn from
    ``numpy.random.default_rng((seed, e))``; step ``t`` takes the ``t mod S``-th slice of
    ``batch_size`` of epoch ``t // S``, where ``S = N // batch_size`` (the incomplete last
    batch is dropped). Any step's batch is computed without visiting earlier ones, which
    is what makes resuming exact.

    Attributes:
      arrays: a pytree of arrays sharing the leading example dimension ``N``.
      batch_size: examples per batch.
      seed: the shuffling seed.
    """

    arrays: PyTree
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        sizes = {np.shape(x)[0] for x in jax.tree.leaves(self.arrays)}
        if len(sizes) != 1:
            raise ValueError(f"arrays must share their leading dimension, got sizes {sizes}")
        if not 0 < self.batch_size <= sizes.pop():
            raise ValueError(f"batch_size {self.batch_size} must be in [1, number of examples]")

    @property
    def steps_per_epoch(self) -> int:
        """``N // batch_size``."""
        return jax.tree.leaves(self.arrays)[0].shape[0] // self.batch_size

    def batch_for_step(self, step: int) -> PyTree:
        """The batch of ``step``: slice ``step mod S`` of epoch ``step // S``."""
        epoch, position = divmod(step, self.steps_per_epoch)
        size = jax.tree.leaves(self.arrays)[0].shape[0]
        order = np.random.default_rng((self.seed, epoch)).permutation(size)
        index = order[position * self.batch_size : (position + 1) * self.batch_size]
        return jax.tree.map(lambda x: np.asarray(x)[index], self.arrays)


class NonFiniteError(RuntimeError):
    """A step produced a non-finite loss or gradient under ``on_nonfinite="stop"``.

    Attributes:
      step: the value ``state.step`` would have had after the bad step (it consumed
        ``batch_for_step(step - 1)``).
      record: that step's metrics.
      last_checkpoint: the newest committed checkpoint, all from before ``step``.
    """

    def __init__(self, step: int, record: Mapping[str, Any], last_checkpoint: int | None):
        self.step = step
        self.record = dict(record)
        self.last_checkpoint = last_checkpoint
        super().__init__(
            f"non-finite loss or gradient at step {step} (the step consuming "
            f"batch_for_step({step - 1})), metrics: {self.record}; training stopped; the "
            f"last good checkpoint is step {last_checkpoint}"
        )


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What a call of :func:`run` did.

    Attributes:
      start_step: the step training started from (0, or the restored checkpoint's step).
      resumed: whether a checkpoint was restored.
      final_step: ``state.step`` at the end.
      nonfinite_steps: steps reported non-finite over the whole run (across restarts).
      last_metrics: the last step's metrics as Python values (``{}`` if no step ran).
      checkpoint_steps: committed checkpoints kept in the workdir at the end.
    """

    start_step: int
    resumed: bool
    final_step: int
    nonfinite_steps: int
    last_metrics: dict[str, Any]
    checkpoint_steps: list[int]


def _is_nonfinite(record: Mapping[str, Any]) -> bool:
    """Whether a step's host metrics report a non-finite step."""
    if "nonfinite" in record:
        return bool(record["nonfinite"])
    loss = record.get("loss")
    return loss is not None and not math.isfinite(loss)


def _config_dict(config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> dict:
    """A JSON-serialisable copy of ``config`` (``{}`` for ``None``)."""
    if config is None:
        return {}
    plain = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    return json.loads(json.dumps(plain, default=repr))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "config") -> list:
    """Key paths whose values differ between two nested dicts, as ``path: old -> new``."""
    found = []
    for key in sorted(set(old) | set(new)):
        a, b, path = old.get(key), new.get(key), f"{prefix}.{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found.extend(_differences(a, b, path))
        elif a != b:
            found.append(f"{path}: {a!r} -> {b!r}")
    return found


def _advance(step_fn: StepFn, state: TrainState, batch: PyTree) -> tuple[TrainState, Metrics]:
    """One loop step: draw the step's key from the state, call ``step_fn``, count the step.

    ``state`` is read before ``step_fn`` runs: a host step may donate it to its own
    jitted update.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    next_step = state.step + 1
    new_state, metrics = step_fn(state, batch, rng)
    return new_state.replace(step=next_step), metrics


# ``step_fn`` is static, so runs of the same step function share one compilation.
_advance_jitted = jax.jit(_advance, static_argnums=0, donate_argnums=1)


def _host_step(
    step_fn: StepFn, batch_sharding: PyTree | None
) -> Callable[[TrainState, PyTree], tuple[TrainState, Metrics]]:
    """``_advance`` of a host step, called as it is, each batch placed on ``batch_sharding``."""

    def advance(state: TrainState, batch: PyTree) -> tuple[TrainState, Metrics]:
        if batch_sharding is not None:
            batch = jax.device_put(batch, batch_sharding)
        return _advance(step_fn, state, batch)

    return advance


def _jit_step(
    step_fn: StepFn, state_sharding: PyTree | None, batch_sharding: PyTree | None
) -> Callable[[TrainState, PyTree], tuple[TrainState, Metrics]]:
    """``_advance`` of ``step_fn`` jitted with the state donated (and sharded, if given)."""
    if state_sharding is None and batch_sharding is None:
        return functools.partial(_advance_jitted, step_fn)
    return jax.jit(
        functools.partial(_advance, step_fn),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


def run(
    step_fn: StepFn,
    state: TrainState,
    data: BatchSchedule,
    *,
    num_steps: int,
    workdir: str | os.PathLike[str],
    checkpoint_every: int,
    log_every: int = 10,
    max_to_keep: int | None = 3,
    on_nonfinite: Literal["stop", "skip"] = "stop",
    config: ml_collections.ConfigDict | Mapping[str, Any] | None = None,
    state_sharding: PyTree | None = None,
    batch_sharding: PyTree | None = None,
    progress: bool = True,
    progress_keys: Sequence[str] = ("loss", "grad_norm"),
    async_checkpointing: bool = True,
    jit_step: bool = True,
) -> tuple[TrainState, RunSummary]:
    """Train ``state`` with ``step_fn`` to ``num_steps``, resuming from ``workdir``.

    Args:
      step_fn: the step ``step_fn(state, batch, rng) -> (state, metrics)``, pure (jitted
        by the loop) or, with ``jit_step=False``, a host step (see the module docstring).
        It must not advance ``state.step`` (the loop does); its ``metrics`` are a flat
        dict of scalars, with ``"loss"`` and, ideally, ``"nonfinite"``.
      state: the initial state; when ``workdir`` holds a checkpoint it only gives the
        structure, dtypes and shardings the checkpoint is restored onto.
      data: the batch schedule (``data.batch_for_step(t)`` for step ``t``).
      num_steps: the step count to reach.
      workdir: where ``checkpoints/``, ``metrics.jsonl`` and ``tensorboard/`` go.
      checkpoint_every: save every this many steps (and always at ``num_steps``).
      log_every: fetch and write metrics every this many steps.
      max_to_keep: checkpoints kept (``None`` keeps all).
      on_nonfinite: ``"stop"`` raises :class:`NonFiniteError` at the first non-finite
        step; ``"skip"`` counts it (the step itself must leave the state unchanged).
      config: the run's config, saved in every checkpoint's metadata.
      state_sharding: optional sharding pytree of the state (jit in/out shardings;
        for a host step, the layout the state is placed on).
      batch_sharding: optional sharding pytree of a batch (for a host step, each batch
        is placed on it before the step).
      progress: show a progress bar.
      progress_keys: metrics shown beside the progress bar.
      async_checkpointing: write checkpoints in the background.
      jit_step: jit ``step_fn`` with the state donated (a pure step); ``False`` calls
        it as it is (a host step that jits its own pieces).

    Returns:
      ``(state, summary)``: the state at ``num_steps`` and a :class:`RunSummary`.

    Raises:
      NonFiniteError: under ``on_nonfinite="stop"``, naming the step.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    workdir = os.fspath(workdir)
    with contextlib.ExitStack() as cleanup:
        checkpointer = Checkpointer(
            os.path.join(workdir, CHECKPOINT_DIR),
            save_every=checkpoint_every,
            max_to_keep=max_to_keep,
            async_save=async_checkpointing,
        )
        cleanup.callback(checkpointer.close)
        nonfinite_steps = 0
        resumed = checkpointer.latest_step() is not None
        if resumed:
            state, metadata = checkpointer.restore(abstract_state(state, state_sharding))
            nonfinite_steps = int(metadata["nonfinite_steps"])
            logging.info("resumed from checkpoint at step %d in %s", metadata["step"], workdir)
        start_step = int(state.step)
        saved_config = _config_dict(config)
        if resumed and config is not None and metadata["config"] != saved_config:
            logging.warning(
                "resuming with a config that differs from the checkpoint's: %s",
                _differences(metadata["config"], saved_config),
            )
        writer = MetricsWriter(
            workdir,
            total_steps=num_steps,
            start_step=start_step,
            progress=progress,
            progress_keys=progress_keys,
        )
        cleanup.callback(writer.close)
        if jit_step:
            advance = _jit_step(step_fn, state_sharding, batch_sharding)
        else:
            if state_sharding is not None:
                state = jax.device_put(state, state_sharding)
            advance = _host_step(step_fn, batch_sharding)
        last_metrics: dict[str, Any] = {}

        def flush_and_check() -> None:
            nonlocal nonfinite_steps, last_metrics
            records = writer.flush()
            for record in records:
                if _is_nonfinite(record):
                    if on_nonfinite == "stop":
                        checkpointer.wait()
                        raise NonFiniteError(record["step"], record, checkpointer.latest_step())
                    nonfinite_steps += 1
                    logging.warning("skipped non-finite step %d: %s", record["step"], record)
            if records:
                last_metrics = {k: v for k, v in records[-1].items() if k != "step"}

        def save(step: int) -> None:
            metadata = {"step": step, "nonfinite_steps": nonfinite_steps, "config": saved_config}
            checkpointer.save(step, state, metadata)
            logging.info("checkpoint of step %d started", step)

        for step in range(start_step, num_steps):
            state, metrics = advance(state, data.batch_for_step(step))
            writer.record(step + 1, metrics)
            if (step + 1) % checkpoint_every == 0 or step + 1 == num_steps:
                flush_and_check()  # before saving: a checkpoint never follows a bad step
                save(step + 1)
            elif (step + 1) % log_every == 0:
                flush_and_check()
        flush_and_check()
        checkpointer.wait()
        summary = RunSummary(
            start_step=start_step,
            resumed=resumed,
            final_step=int(state.step),
            nonfinite_steps=nonfinite_steps,
            last_metrics=last_metrics,
            checkpoint_steps=checkpointer.all_steps(),
        )
    return state, summary
