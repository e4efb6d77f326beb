import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import pair_sequence_logprobs, split_model
from rlhf_jax.train.steps.dpo import (
    REFERENCE_KEYS,
    initial_dpo_extra,
    make_dpo_eval,
    make_dpo_step,
    pairwise_objective,
    precompute_reference_logps,
)

VOCAB, B, L = 64, 8, 12
CONFIG = ModelConfig.llama(
    vocab_size=VOCAB,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_hidden_size=32,
    max_position_embeddings=L,
)
TX = optax.sgd(0.5)  # plain SGD: the parameter change is the (accumulated) gradient itself
HYPER = {"beta": 0.5}
KEYS = ("input_ids", "attention_mask", "response_mask")


def make_pairs(seed):
    """A shared prompt of 3 tokens; chosen responses repeat token 1, rejected token 2."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, VOCAB, (B, 3))
    batch = {}
    for side, token in (("chosen", 1), ("rejected", 2)):
        lengths = rng.integers(5, L + 1, size=B)
        positions = np.arange(L)[None]
        mask = positions < lengths[:, None]
        ids = np.where(positions < 3, np.pad(prompt, ((0, 0), (0, L - 3))), token)
        batch[f"{side}_input_ids"] = np.where(mask, ids, 0).astype(np.int32)
        batch[f"{side}_attention_mask"] = mask
        batch[f"{side}_response_mask"] = mask & (positions >= 3)
    return batch


@pytest.fixture(scope="module")
def model():
    return split_model(Decoder(CONFIG, rngs=nnx.Rngs(0)))


def fresh_state(params, reference):
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731
    extra = initial_dpo_extra("dpo", reference=reference, reference_params=copy(params))
    return TrainState.create(copy(params), TX, rng=0, extra=extra)


def test_one_forward_over_both_sides_equals_independent_sums(model):
    graphdef, params = model
    batch = make_pairs(0)
    logps = jax.jit(pair_sequence_logprobs, static_argnums=0)(graphdef, params, batch)
    forward = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, attention_mask=m)[0])
    for side in ("chosen", "rejected"):
        logits = np.asarray(
            forward(params, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
        )
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids, mask = batch[f"{side}_input_ids"], batch[f"{side}_response_mask"]
        expected = [
            sum(log_probs[b, t - 1, ids[b, t]] for t in range(1, L) if mask[b, t]) for b in range(B)
        ]
        # float32 forward against a float64 sum over at most 9 tokens.
        np.testing.assert_allclose(logps[f"{side}_logps"], expected, rtol=1e-5)
        np.testing.assert_array_equal(logps[f"{side}_lengths"], mask.sum(1))


def test_in_step_reference_equals_precomputed_reference(model):
    graphdef, params = model
    batch = make_pairs(1)
    in_step = jax.jit(make_dpo_step(graphdef, TX, hyper=HYPER, reference="in_step"))
    precomputed = jax.jit(make_dpo_step(graphdef, TX, hyper=HYPER, reference="precomputed"))
    with_reference = precompute_reference_logps(graphdef, params, batch, batch_size=B)
    state_a, metrics_a = in_step(fresh_state(params, "in_step"), batch, jax.random.key(0))
    state_b, metrics_b = precomputed(
        fresh_state(params, "precomputed"), with_reference, jax.random.key(0)
    )
    # The same float32 program on the same inputs, up to fusion-order rounding.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
        state_a.params,
        state_b.params,
    )
    for name in ("loss", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(metrics_a[name], metrics_b[name], atol=1e-6)
    # Policy = reference at the start: every log-ratio is 0 and the DPO loss is log 2.
    np.testing.assert_allclose(metrics_a["loss"], math.log(2.0), rtol=1e-6)


def test_dpo_step_learns_accumulates_exactly_and_compiles_once(model):
    graphdef, params = model
    traces = []

    def build(micro):
        step = make_dpo_step(graphdef, TX, hyper=HYPER, num_micro_batches=micro)

        def counted(state, batch, rng):
            traces.append(micro)
            return step(state, batch, rng)

        return jax.jit(counted, donate_argnums=0)

    whole, split = build(1), build(8)
    # Start away from the reference so the gradient is not the symmetric one of h = 0.
    state, _ = whole(fresh_state(params, "in_step"), make_pairs(2), jax.random.key(0))
    one, _ = whole(jax.tree.map(jnp.copy, state), make_pairs(3), jax.random.key(1))
    eight, _ = split(jax.tree.map(jnp.copy, state), make_pairs(3), jax.random.key(1))
    # Eight float32 partial gradient sums against one sum: rounding ~1e-7 relative.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), one.params, eight.params
    )
    evaluate = make_dpo_eval(graphdef, batch_size=B, hyper=HYPER)
    heldout = {k: np.concatenate([v, make_pairs(99)[k]]) for k, v in make_pairs(98).items()}
    start = evaluate(fresh_state(params, "in_step"), heldout)
    np.testing.assert_allclose(start["loss"], math.log(2.0), rtol=1e-6)
    assert start["reward_margin"] == 0.0
    for i in range(6):
        one, _ = whole(one, make_pairs(10 + i), jax.random.key(i))
    assert traces == [1, 8]
    end = evaluate(one, heldout)
    assert end["loss"] < math.log(2.0) - 0.1, end
    assert end["reward_margin"] > 0.0
    assert end["reward_accuracy"] > 0.8, end


def test_configuration_errors_name_the_problem(model):
    graphdef, _ = model
    with pytest.raises(ValueError, match="unknown pairwise loss 'dpoo'"):
        make_dpo_step(graphdef, TX, loss_name="dpoo")
    with pytest.raises(ValueError, match="aot_pair couples the pairs"):
        make_dpo_step(graphdef, TX, loss_name="aot_pair", num_micro_batches=2)
    with pytest.raises(ValueError, match="reference_params"):
        initial_dpo_extra("dpo", reference="in_step")


def random_logps(seed, keys):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(-20.0, 3.0, B), jnp.float32) for k in keys}


@pytest.mark.parametrize(
    ("loss_name", "hyper", "extra_keys"),
    [
        ("cpl", {"alpha": 0.3, "conservative_bias": 1.0}, ()),
        ("selm", {"beta": 0.3, "alpha": 0.0}, ("explore_logps", "ref_explore_logps")),
        ("rationale_dpo", {"beta": 0.3, "rationale_weight": 0.0}, ("rationale_logps",)),
    ],
)
def test_registry_losses_reduce_to_dpo_at_their_limits(loss_name, hyper, extra_keys):
    # CPL with λ = 1 is DPO with β = α; SELM with α = 0 and rationale DPO with γ = 0 are DPO.
    pair_keys = ("chosen_logps", "rejected_logps", *REFERENCE_KEYS)
    logps = random_logps(0, (*pair_keys, *extra_keys))
    logps.update(
        chosen_lengths=jnp.full((B,), 5.0),
        rejected_lengths=jnp.full((B,), 7.0),
        rationale_lengths=jnp.full((B,), 9.0),
        has_rationale=jnp.ones((B,)),
    )
    loss, metrics = pairwise_objective(logps, loss_name=loss_name, hyper=hyper, reduction="sum")
    dpo, dpo_metrics = pairwise_objective(
        logps, loss_name="dpo", hyper={"beta": 0.3}, reduction="sum"
    )
    # The same float32 log-sigmoid of the same margins: rounding only.
    np.testing.assert_allclose(loss, dpo, rtol=1e-6)
    for name in ("denominator", "reward_margin", "reward_accuracy"):
        np.testing.assert_allclose(metrics[name], dpo_metrics[name], rtol=1e-6)


def test_conservative_cpl_penalises_the_rejected_score_less():
    # ℓ(S⁺ − λ S⁻) with λ < 1: at equal positive scores the loss is below log 2, so raising
    # both likelihoods lowers it (the in-distribution bias of Hejna et al., §3.2).
    logps = {k: jnp.zeros((B,)) for k in ("chosen_logps", "rejected_logps", *REFERENCE_KEYS)}
    logps.update(chosen_logps=jnp.full((B,), 2.0), rejected_logps=jnp.full((B,), 2.0))
    logps.update(chosen_lengths=jnp.ones((B,)), rejected_lengths=jnp.ones((B,)))
    hyper = {"alpha": 1.0, "conservative_bias": 0.5}
    loss, _ = pairwise_objective(logps, loss_name="cpl", hyper=hyper, reduction="mean")
    np.testing.assert_allclose(loss, -np.log(1.0 / (1.0 + np.exp(-1.0))), rtol=1e-6)


def with_group(batch, group, seed):
    """An extra response group: the chosen rows with their response tokens shuffled."""
    rng = np.random.default_rng(seed)
    ids = batch["chosen_input_ids"].copy()
    mask = batch["chosen_response_mask"]
    ids[mask] = rng.integers(3, VOCAB, mask.sum())
    return {
        **batch,
        f"{group}_input_ids": ids,
        f"{group}_attention_mask": batch["chosen_attention_mask"],
        f"{group}_response_mask": mask,
    }


def test_selm_step_lowers_the_likelihood_of_its_explore_rows(model):
    graphdef, params = model
    batch = with_group(make_pairs(4), "explore", 0)
    step = jax.jit(make_dpo_step(graphdef, TX, loss_name="selm", hyper={"beta": 0.5, "alpha": 1.0}))
    state, metrics = step(fresh_state(params, "in_step"), batch, jax.random.key(0))
    # At policy = reference the optimism term is 0 and the loss is DPO's log 2.
    np.testing.assert_allclose(metrics["loss"], math.log(2.0), rtol=1e-6)
    # The optimism gradient lowers the explored replies' likelihood.
    logps = jax.jit(pair_sequence_logprobs, static_argnums=0)
    explore = {f"{s}_{k}": batch[f"explore_{k}"] for s in ("chosen", "rejected") for k in KEYS}
    before = logps(graphdef, params, explore)["chosen_logps"]
    assert np.mean(logps(graphdef, state.params, explore)["chosen_logps"]) < np.mean(before)
    # Precomputed reference log-probs of the explore rows: those of the initial policy
    # (float32 forwards of the same rows, one fused with the pair: rounding only).
    precomputed = precompute_reference_logps(
        graphdef, params, batch, batch_size=B, loss_name="selm"
    )
    np.testing.assert_allclose(precomputed["ref_explore_logps"], before, rtol=1e-5)
    with pytest.raises(ValueError, match=r"loss 'selm' needs \['explore_input_ids'"):
        step(fresh_state(params, "in_step"), make_pairs(4), jax.random.key(0))
