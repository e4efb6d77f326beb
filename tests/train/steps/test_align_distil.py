"""Tests of the AlignDistil step: teacher choice, contrastive anchor and adaptive coefficient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.objectives.align_distil import adaptive_coefficient, align_distil_loss, teacher_logp
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.align_distil import (
    AlignDistilConfig,
    build_teacher,
    init_align_distil_extra,
    make_align_distil_step,
)
from rlhf_jax.train.steps.rollout import generate, predicting_logits

TINY = ModelConfig(
    architecture="llama",
    vocab_size=16,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    mlp_hidden_size=32,
    max_position_embeddings=16,
)
BATCH, PROMPT, NEW = 4, 3, 5
SAMPLING = SamplingConfig(max_new_tokens=NEW, eos_id=1)
TX = optax.adam(1e-2)
RNG = jax.random.key(7)


@pytest.fixture(scope="module")
def logits():
    """Random ``[2, 3, 6]`` reference, DPO and reverse-DPO logits."""
    keys = jax.random.split(jax.random.key(0), 3)
    return [3.0 * jax.random.normal(k, (2, 3, 6)) for k in keys]


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dpo_teacher_with_fixed_c_is_teacher_logp_of_reference_and_dpo(logits):
    ref, dpo = logits[:2]
    config = AlignDistilConfig(sampling=SAMPLING, coefficient=1.5)
    teacher, coefficient = build_teacher(ref, dpo, None, config)
    np.testing.assert_array_equal(teacher, teacher_logp(ref, dpo, coefficient=1.5))
    np.testing.assert_array_equal(coefficient, np.full((2, 3), 1.5, np.float32))
    with pytest.raises(ValueError, match="needs the reverse DPO logits"):
        build_teacher(ref, dpo, None, AlignDistilConfig(sampling=SAMPLING, adaptive=True))


def test_contrastive_teacher_extrapolates_from_dpo_away_from_reverse_dpo(logits):
    ref, dpo, rev = logits
    c = 0.7
    config = AlignDistilConfig(sampling=SAMPLING, teacher="contrastive", coefficient=c)
    teacher, _ = build_teacher(ref, dpo, rev, config)
    # Figure 1 of the paper: softmax((1 + c) z_dpo − c z_rdpo), in float64; float32 log-softmax
    # of logits of size ~10 agrees to 1e-5.
    expected = log_softmax64((1 + c) * log_softmax64(dpo) - c * log_softmax64(rev))
    np.testing.assert_allclose(teacher, expected, atol=1e-5)
    # Anchored on the reference, the same contrastive reward plugged into the RLHF objective.
    anchored = AlignDistilConfig(
        sampling=SAMPLING, teacher="contrastive", anchor="reference", coefficient=c
    )
    expected = log_softmax64(log_softmax64(ref) + c * (log_softmax64(dpo) - log_softmax64(rev)))
    np.testing.assert_allclose(build_teacher(ref, dpo, rev, anchored)[0], expected, atol=1e-5)


def test_a_reverse_model_equal_to_the_reference_gives_back_the_dpo_teacher(logits):
    ref, dpo, _ = logits
    c = 0.7
    dpo_teacher, _ = build_teacher(
        ref, dpo, None, AlignDistilConfig(sampling=SAMPLING, coefficient=c)
    )
    anchored = AlignDistilConfig(
        sampling=SAMPLING, teacher="contrastive", anchor="reference", coefficient=c
    )
    # z_ref + c (z_dpo − z_ref) by the very same operations: bit for bit.
    np.testing.assert_array_equal(build_teacher(ref, dpo, ref, anchored)[0], dpo_teacher)
    # Anchored on the DPO model, (1 + c) z_dpo − c z_ref is the DPO teacher at c + 1
    # (float32 rounding of two different sums: 1e-5).
    on_dpo = AlignDistilConfig(sampling=SAMPLING, teacher="contrastive", coefficient=c)
    np.testing.assert_allclose(
        build_teacher(ref, dpo, ref, on_dpo)[0],
        teacher_logp(ref, dpo, coefficient=1 + c),
        atol=1e-5,
    )


@pytest.mark.parametrize("teacher", ["dpo", "contrastive"])
def test_adaptive_coefficient_is_the_per_token_scaled_l1_disagreement(logits, teacher):
    ref, dpo, rev = logits
    config = AlignDistilConfig(
        sampling=SAMPLING, teacher=teacher, adaptive=True, adaptive_scale=0.3
    )
    built, coefficient = build_teacher(ref, dpo, rev, config)
    expected_c = adaptive_coefficient(dpo, rev, scale=0.3)
    np.testing.assert_array_equal(coefficient, expected_c)
    # c_t = κ‖p − q‖₁ + ε lies in [ε, 2κ + ε].
    assert float(coefficient.min()) >= 1e-3 and float(coefficient.max()) <= 0.6 + 1e-3
    anchor, base = (ref, None) if teacher == "dpo" else (dpo, rev)
    expected = teacher_logp(anchor, dpo, base, coefficient=expected_c)
    np.testing.assert_array_equal(built, expected)


@pytest.fixture(scope="module")
def models():
    graphdef, policy = nnx.split(Decoder(TINY, rngs=nnx.Rngs(0)))
    frozen = {
        name: nnx.split(Decoder(TINY, rngs=nnx.Rngs(seed)))[1]
        for seed, name in enumerate(("reference", "dpo", "reverse_dpo"), start=1)
    }
    prompts = {
        "input_ids": jax.random.randint(jax.random.key(0), (BATCH, PROMPT), 2, 16),
        "attention_mask": jnp.ones((BATCH, PROMPT), jnp.int32).at[:2, 0].set(0),
    }
    extra = init_align_distil_extra(
        reference_params=frozen["reference"],
        dpo_params=frozen["dpo"],
        reverse_dpo_params=frozen["reverse_dpo"],
    )
    state = TrainState.create(policy, TX, rng=0, extra=extra)
    return graphdef, state, prompts


def rollout_logits(graphdef, state, prompts):
    """The reply the step samples with ``RNG`` and every model's logits on it."""
    output = generate(graphdef, state.params, prompts, RNG, sampling=SAMPLING)

    def logits_of(params):
        raw, _ = nnx.merge(graphdef, params)(output.tokens, attention_mask=output.attention_mask)
        return predicting_logits(raw)

    names = ("reference_params", "dpo_params", "reverse_dpo_params")
    return output, logits_of(state.params), *(logits_of(state.extra[n]) for n in names)


def previous_step(graphdef, config):
    """The step before the contrastive teacher existed: reference and DPO model, fixed c."""

    def step(state, prompts, rng):
        output = generate(graphdef, state.params, prompts, rng, sampling=config.sampling)

        def logits_of(params):
            raw, _ = nnx.merge(graphdef, params)(
                output.tokens, attention_mask=output.attention_mask
            )
            return predicting_logits(raw)

        teacher = teacher_logp(
            logits_of(state.extra["reference_params"]),
            logits_of(state.extra["dpo_params"]),
            coefficient=config.coefficient,
        )
        mask = output.response_mask.astype(jnp.float32)
        loss_fn = lambda p: align_distil_loss(logits_of(p), teacher, mask)[0]  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_finite_gradients(grads, TX, loss=loss)[0], loss

    return step


def test_dpo_teacher_with_fixed_c_is_the_previous_step(models):
    graphdef, state, prompts = models
    config = AlignDistilConfig(sampling=SAMPLING, coefficient=1.3)
    new_state, metrics = jax.jit(make_align_distil_step(graphdef, TX, config))(state, prompts, RNG)
    old_state, old_loss = jax.jit(previous_step(graphdef, config))(state, prompts, RNG)
    # The same operations on the same tokens; 1e-6 allows XLA to fuse the two programs
    # differently (float32 re-association), far below one Adam step of 1e-2.
    np.testing.assert_allclose(metrics["loss"], old_loss, rtol=1e-6)
    chex_close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)  # noqa: E731
    jax.tree.map(chex_close, new_state.params, old_state.params)
    assert float(metrics["coefficient"]) == pytest.approx(1.3)
    assert float(metrics["loss"]) > 0.0


def test_contrastive_adaptive_step_distils_toward_the_teacher_of_the_three_models(models):
    graphdef, state, prompts = models
    config = AlignDistilConfig(
        sampling=SAMPLING, teacher="contrastive", adaptive=True, adaptive_scale=0.2
    )
    _, metrics = jax.jit(make_align_distil_step(graphdef, TX, config))(state, prompts, RNG)
    output, student, _, dpo, rev = jax.jit(lambda s, p: rollout_logits(graphdef, s, p))(
        state, prompts
    )
    c_t = adaptive_coefficient(dpo, rev, scale=0.2)
    expected_teacher = log_softmax64(
        (1 + np.asarray(c_t)[..., None]) * log_softmax64(dpo)
        - np.asarray(c_t)[..., None] * log_softmax64(rev)
    )
    mask = output.response_mask.astype(jnp.float32)
    expected_loss, _ = align_distil_loss(
        student, jnp.asarray(expected_teacher, jnp.float32), mask, token_weights=1.0 / c_t
    )
    # Float32 logits and log-softmax against a float64 teacher: 1e-5 relative.
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["coefficient"], np.sum(c_t * mask) / np.sum(mask), rtol=1e-6)
