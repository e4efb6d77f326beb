"""The loop driver: same result as a hand-written loop, resume, non-finite policies, data order.

Both kinds of step are covered: a pure step (jitted by the loop) and a host step with
Python work between its own jitted pieces (``jit_step=False``).
"""

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.objectives.reduction import reduce_loss
from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.loop import EpochPermutationSchedule, NonFiniteError, run
from rlhf_jax.train.metrics import read_jsonl
from rlhf_jax.train.state import TrainState, make_gradient_step

TX = optax.sgd(0.05)
NOISE = 0.1


def sum_loss(params, batch, rng):
    x = batch["x"] + NOISE * jax.random.normal(rng, batch["x"].shape)
    residual = x @ params["w"] - batch["y"]
    loss, denominator = reduce_loss(residual**2, reduction="sum")
    return loss, {"denominator": denominator}


STEP = make_gradient_step(sum_loss, TX, num_micro_batches=2)


def make_data(num_examples=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, 3)).astype(np.float32)
    return {"x": x, "y": x @ np.array([1.0, -1.0, 2.0], np.float32)}


def initial_state(seed=0):
    return TrainState.create({"w": jnp.full((3,), float(seed))}, TX, seed)


class Poisoned:
    """A schedule whose batch of one step has a NaN target."""

    def __init__(self, inner, bad_step):
        self.inner, self.bad_step = inner, bad_step

    def batch_for_step(self, step):
        batch = self.inner.batch_for_step(step)
        if step == self.bad_step:
            batch = {**batch, "y": np.full_like(batch["y"], np.nan)}
        return batch


@pytest.fixture(scope="module")
def jitted_step():
    return jax.jit(STEP)


def manual_loop(jitted_step, state, data, num_steps, skip=()):
    """The loop's contract written out: key fold_in(rng, t), batch t, step counter t + 1."""
    for t in range(num_steps):
        if t not in skip:
            rng = jax.random.fold_in(state.rng, t)
            state, _ = jitted_step(state, data.batch_for_step(t), rng)
        state = state.replace(step=jnp.asarray(t + 1, jnp.int32))
    return state


def test_run_matches_manual_loop_then_resumes(tmp_path, jitted_step, caplog):
    data = EpochPermutationSchedule(make_data(), batch_size=8, seed=3)
    state, summary = run(
        STEP,
        initial_state(),
        data,
        num_steps=12,
        workdir=tmp_path,
        checkpoint_every=4,
        log_every=3,
        max_to_keep=2,
        config={"lr": 0.05},
        progress=False,
    )
    expected = manual_loop(jitted_step, initial_state(), data, 12)
    # Same float32 ops in a different jit boundary: rounding only.
    chex.assert_trees_all_close(state, expected, rtol=0, atol=1e-6)
    assert summary.start_step == 0 and not summary.resumed and summary.final_step == 12
    assert summary.checkpoint_steps == [8, 12] and summary.nonfinite_steps == 0
    assert summary.last_metrics.keys() >= {"loss", "grad_norm", "nonfinite", "denominator"}
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 13))
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=4)
    saved, metadata = checkpointer.restore(abstract_state(initial_state()))
    checkpointer.close()
    chex.assert_trees_all_equal(saved, state)
    assert metadata == {"step": 12, "nonfinite_steps": 0, "config": {"lr": 0.05}}

    # Extending the run: the initial state given now (other params) only supplies the
    # structure; training continues from the checkpoint of step 12. A changed config
    # is reported by key.
    with caplog.at_level(logging.WARNING):
        state, summary = run(
            STEP,
            initial_state(seed=5),
            data,
            num_steps=16,
            workdir=tmp_path,
            checkpoint_every=4,
            max_to_keep=2,
            config={"lr": 0.1},
            progress=False,
        )
    assert "config.lr: 0.05 -> 0.1" in caplog.text
    assert summary.resumed and summary.start_step == 12 and summary.final_step == 16
    expected = manual_loop(jitted_step, initial_state(), data, 16)
    chex.assert_trees_all_close(state, expected, rtol=0, atol=1e-6)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 17))


def test_skip_policy_counts_and_skips_the_bad_step(tmp_path, jitted_step):
    clean = EpochPermutationSchedule(make_data(), batch_size=8, seed=1)
    state, summary = run(
        STEP,
        initial_state(),
        Poisoned(clean, bad_step=5),
        num_steps=10,
        workdir=tmp_path,
        checkpoint_every=4,
        on_nonfinite="skip",
        progress=False,
    )
    assert summary.nonfinite_steps == 1
    assert np.all(np.isfinite(state.params["w"]))
    # Independent expectation: the clean run with step 5 simply left out.
    expected = manual_loop(jitted_step, initial_state(), clean, 10, skip={5})
    chex.assert_trees_all_close(state, expected, rtol=0, atol=1e-6)


def test_stop_policy_names_the_step_and_keeps_last_good_checkpoint(tmp_path):
    clean = EpochPermutationSchedule(make_data(), batch_size=8, seed=1)
    with pytest.raises(NonFiniteError, match=r"step 6 \(the step consuming batch_for_step\(5\)\)"):
        run(
            STEP,
            initial_state(),
            Poisoned(clean, bad_step=5),
            num_steps=12,
            workdir=tmp_path,
            checkpoint_every=4,
            log_every=10,
            progress=False,
        )
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=4)
    assert checkpointer.all_steps() == [4]  # step 8 came after the bad step: not saved
    saved, _ = checkpointer.restore(abstract_state(initial_state()))
    checkpointer.close()
    assert np.all(np.isfinite(saved.params["w"]))


def draw_noisy_inputs(x, rng):
    return x + NOISE * jax.random.normal(rng, x.shape)


def squared_error(params, batch, rng):
    del rng
    loss, denominator = reduce_loss((batch["x"] @ params["w"] - batch["y"]) ** 2, reduction="sum")
    return loss, {"denominator": denominator}


@pytest.fixture(scope="module")
def host_step():
    """Jitted sampling -> labels computed in Python on the host -> jitted update.

    The labels depend on the noise drawn from the step's key, so a resumed run only
    matches an uninterrupted one when the loop restores the key and the step counter.
    """
    draw = jax.jit(draw_noisy_inputs)
    update = jax.jit(make_gradient_step(squared_error, TX), donate_argnums=0)

    def step(state, batch, rng):
        draw_key, update_key = jax.random.split(rng)
        x = np.asarray(draw(batch["x"], draw_key))
        # Host work, one Python call per row: the target plus a margin of sign(x₀).
        labels = [
            float(t) + (0.1 if row[0] > 0 else -0.1) for row, t in zip(x, batch["y"], strict=True)
        ]
        return update(state, {"x": x, "y": np.asarray(labels, np.float32)}, update_key)

    return step


class Crashing:
    """A schedule that raises when asked for one step's batch (a crash mid-run)."""

    def __init__(self, inner, crash_step):
        self.inner, self.crash_step = inner, crash_step

    def batch_for_step(self, step):
        if step == self.crash_step:
            raise RuntimeError(f"crash before step {step}")
        return self.inner.batch_for_step(step)


def test_host_step_runs_under_the_loop_and_resumes_exactly(tmp_path, host_step):
    data = EpochPermutationSchedule(make_data(), batch_size=8, seed=2)
    settings = {"num_steps": 8, "checkpoint_every": 3, "progress": False, "jit_step": False}
    uninterrupted, summary = run(
        host_step, initial_state(), data, workdir=tmp_path / "whole", **settings
    )
    assert summary.final_step == 8 and summary.checkpoint_steps == [3, 6, 8]
    # The loop's contract written out: the same host step, key fold_in(rng, t), batch t.
    # Same compiled pieces on the same inputs, so equal bit for bit.
    expected = initial_state()
    for t in range(8):
        expected, _ = host_step(
            expected, data.batch_for_step(t), jax.random.fold_in(expected.rng, t)
        )
    chex.assert_trees_all_equal(uninterrupted.params, expected.params)

    # Crash after steps 0..4 (the last checkpoint is step 3), then start again.
    with pytest.raises(RuntimeError, match="crash before step 5"):
        run(host_step, initial_state(), Crashing(data, 5), workdir=tmp_path / "cut", **settings)
    resumed, summary = run(
        host_step, initial_state(seed=7), data, workdir=tmp_path / "cut", **settings
    )
    assert summary.resumed and summary.start_step == 3 and summary.final_step == 8
    # Restored state = saved state bit for bit, then the same compiled pieces on the same
    # inputs (XLA on CPU is deterministic): no tolerance.
    chex.assert_trees_all_equal(resumed, uninterrupted)
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 9))


def test_host_step_reports_nonfinite_steps_like_a_pure_step(tmp_path, host_step):
    clean = EpochPermutationSchedule(make_data(), batch_size=8, seed=2)
    with pytest.raises(NonFiniteError, match=r"step 3 \(the step consuming batch_for_step\(2\)\)"):
        run(
            host_step,
            initial_state(),
            Poisoned(clean, bad_step=2),
            num_steps=6,
            workdir=tmp_path,
            checkpoint_every=2,
            progress=False,
            jit_step=False,
        )
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=2)
    assert checkpointer.all_steps() == [2]  # nothing saved after the bad step
    checkpointer.close()


def test_epoch_permutation_schedule_visits_every_example_once_per_epoch():
    data = {"i": np.arange(12)}
    schedule = EpochPermutationSchedule(data, batch_size=4, seed=7)
    epochs = [
        np.concatenate([schedule.batch_for_step(3 * e + k)["i"] for k in range(3)])
        for e in range(3)
    ]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(12))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch
    # Random access: a step's batch does not depend on which steps were read before.
    np.testing.assert_array_equal(schedule.batch_for_step(4)["i"], epochs[1][4:8])
    other_seed = EpochPermutationSchedule(data, batch_size=4, seed=8)
    assert not np.array_equal(other_seed.batch_for_step(0)["i"], epochs[0][:4])
