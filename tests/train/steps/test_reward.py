import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import ModelConfig, ScalarModel
from rlhf_jax.objectives.reward_model import bradley_terry_loss
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.reward import (
    make_reward_eval,
    make_reward_step,
    pair_scores,
    reward_objective,
    reward_sum_loss,
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


def make_pairs(seed):
    """Pairs whose chosen rows end with token 1 and rejected rows with token 2 (learnable)."""
    rng = np.random.default_rng(seed)
    batch = {}
    for side, last in (("chosen", 1), ("rejected", 2)):
        lengths = rng.integers(4, L + 1, size=B)
        mask = np.arange(L)[None] < lengths[:, None]
        ids = np.where(mask, rng.integers(3, VOCAB, (B, L)), 0)
        ids[np.arange(B), lengths - 1] = last
        batch[f"{side}_input_ids"] = ids.astype(np.int32)
        batch[f"{side}_attention_mask"] = mask
    batch["chosen_is_safe"] = rng.random(B) < 0.5
    batch["rejected_is_safe"] = rng.random(B) < 0.5
    return batch


@pytest.fixture(scope="module")
def model():
    return split_model(ScalarModel(CONFIG, rngs=nnx.Rngs(0)))


def fresh_state(params):
    return TrainState.create(jax.tree.map(jnp.copy, params), TX, rng=0)


def test_accuracy_metrics_on_a_hand_built_case():
    scores = {
        "chosen_scores": jnp.array([1.0, 0.0, 3.0, -1.0]),
        "rejected_scores": jnp.array([0.0, 2.0, 1.0, -2.0]),
        "chosen_is_safe": jnp.array([True, True, False, True]),
        "rejected_is_safe": jnp.array([False, True, False, False]),
    }
    # Chosen above rejected in pairs 0, 2 and 3.
    _, metrics = reward_objective(scores, loss="bradley_terry")
    assert float(metrics["accuracy"]) == pytest.approx(3 / 4)
    # The cost model reads chosen as the safer response: right when C(rejected) > C(chosen),
    # which holds in pair 1 only. A cost has the right sign when > 0 on an unsafe and < 0
    # on a safe response.
    _, cost_metrics = reward_objective(scores, loss="cost")
    assert float(cost_metrics["accuracy"]) == pytest.approx(1 / 4)
    costs = np.concatenate([scores["chosen_scores"], scores["rejected_scores"]])
    unsafe = ~np.concatenate([scores["chosen_is_safe"], scores["rejected_is_safe"]])
    right_sign = np.where(unsafe, costs > 0, costs < 0)
    assert float(cost_metrics["sign_accuracy"]) == pytest.approx(right_sign.mean())
    ranked = {"ranked_scores": jnp.array([[2.0, 1.0, 0.0], [0.0, 1.0, -1.0]])}
    _, list_metrics = reward_objective(ranked, loss="plackett_luce")
    assert float(list_metrics["accuracy"]) == pytest.approx(1 / 2)


def test_one_forward_over_both_sides_equals_separate_scoring(model):
    graphdef, params = model
    batch = make_pairs(0)
    chosen, rejected = jax.jit(pair_scores, static_argnums=0)(graphdef, params, batch)
    score = jax.jit(lambda p, x, m: nnx.merge(graphdef, p).score(x, m))
    for side, scores in (("chosen", chosen), ("rejected", rejected)):
        alone = score(params, batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"])
        # Same float32 program on a different batch size: agreement to rounding.
        np.testing.assert_allclose(scores, alone, atol=1e-5)


def test_plackett_luce_over_lists_of_two_is_bradley_terry(model):
    graphdef, params = model
    pairs = make_pairs(1)
    lists = {
        k: np.stack([pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]], axis=1)
        for k in ("input_ids", "attention_mask")
    }
    list_loss, _ = reward_sum_loss(graphdef, loss="plackett_luce")(params, lists, None)
    chosen, rejected = pair_scores(graphdef, params, pairs)
    pair_loss, _ = bradley_terry_loss(chosen, rejected, reduction="sum")
    # −log σ(a − b) = logsumexp(a, b) − a: two float32 evaluations of the same number.
    np.testing.assert_allclose(list_loss, pair_loss, rtol=1e-5)


def counted_step(graphdef, traces, **options):
    step = make_reward_step(graphdef, TX, **options)

    def counted(state, batch, rng):
        traces.append(options)
        return step(state, batch, rng)

    return jax.jit(counted, donate_argnums=0)


def test_reward_step_learns_and_compiles_once(model):
    graphdef, params = model
    traces = []
    step = counted_step(graphdef, traces, loss="bradley_terry")
    state, losses = fresh_state(params), []
    for i in range(8):
        state, metrics = step(state, make_pairs(10 + i), jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert len(traces) == 1
    evaluate = make_reward_eval(graphdef, batch_size=B)
    heldout = {k: np.concatenate([v, make_pairs(99)[k]]) for k, v in make_pairs(98).items()}
    before, after = evaluate(fresh_state(params), heldout), evaluate(state, heldout)
    assert after["loss"] < before["loss"] - 0.1, (before, after)
    # The last token decides the label, so the rule is learnt within a few steps.
    assert after["accuracy"] > 0.8, after


def test_cost_step_eight_micro_batches_of_one_equal_one_batch_of_eight(model):
    graphdef, params = model
    traces = []
    batch = make_pairs(2)
    one, _ = counted_step(graphdef, traces, loss="cost")(
        fresh_state(params), batch, jax.random.key(0)
    )
    eight, _ = counted_step(graphdef, traces, loss="cost", num_micro_batches=8)(
        fresh_state(params), batch, jax.random.key(0)
    )
    # Eight float32 partial gradient sums against one sum: rounding ~1e-7 relative.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0), one.params, eight.params
    )
    changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), one.params, params)
    assert max(jax.tree.leaves(changed)) > 1e-3  # the step did move the parameters


def variant_scores(seed, size=16):
    rng = np.random.default_rng(seed)
    return {
        "chosen_scores": jnp.asarray(rng.normal(size=size), jnp.float32),
        "rejected_scores": jnp.asarray(rng.normal(size=size), jnp.float32),
    }


def test_strength_and_heron_reduce_to_bradley_terry():
    scores = variant_scores(0)
    size = scores["chosen_scores"].shape[0]
    plain, plain_metrics = reward_objective(scores, loss="bradley_terry", reduction="sum")
    # Hard labels (p = 1) and no margin: the maximum-likelihood Bradley–Terry loss.
    strength = {**scores, "label_probs": jnp.ones(size), "margins": jnp.zeros(size)}
    value, metrics = reward_objective(strength, loss="strength", reduction="sum")
    np.testing.assert_allclose(value, plain, rtol=1e-6)  # the same log-sigmoids
    np.testing.assert_allclose(metrics["accuracy"], plain_metrics["accuracy"])
    # HERON labels all +1 (the hierarchy agrees with the pair's order): Bradley–Terry too;
    # a 0 label removes its pair from the sum and from the denominator.
    value, metrics = reward_objective(
        {**scores, "heron_labels": jnp.ones(size)}, loss="heron", reduction="sum"
    )
    np.testing.assert_allclose(value, plain, rtol=1e-6)
    labels = jnp.ones(size).at[:4].set(0.0)
    value, metrics = reward_objective(
        {**scores, "heron_labels": labels}, loss="heron", reduction="sum"
    )
    kept = {k: v[4:] for k, v in scores.items()}
    expected, _ = reward_objective(kept, loss="bradley_terry", reduction="sum")
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    assert metrics["denominator"] == size - 4


def test_binary_feedback_scores_both_replies_of_each_pair():
    scores = variant_scores(1)
    size = scores["chosen_scores"].shape[0]
    feedback = {
        "chosen_feedback": jnp.asarray(np.arange(size) % 3 == 0, jnp.float32),
        "rejected_feedback": jnp.zeros(size),
    }
    value, metrics = reward_objective(
        {**scores, **feedback},
        loss="binary_feedback",
        positive_weight=3.0,
        negative_weight=0.5,
        reduction="sum",
    )
    logits = np.concatenate([scores["chosen_scores"], scores["rejected_scores"]])
    labels = np.concatenate([feedback["chosen_feedback"], feedback["rejected_feedback"]])
    log_sigmoid = lambda z: -np.logaddexp(0.0, -z)  # noqa: E731
    expected = -np.sum(
        3.0 * labels * log_sigmoid(logits) + 0.5 * (1 - labels) * log_sigmoid(-logits)
    )
    # float32 against float64 on 32 terms of size ~1.
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert metrics["denominator"] == 2 * size  # replies, not pairs


def test_contrastive_and_dropout_off_is_exactly_the_old_loss(model):
    graphdef, params = model
    batch = make_pairs(3)
    old = jax.value_and_grad(reward_sum_loss(graphdef), has_aux=True)
    new = jax.value_and_grad(
        reward_sum_loss(
            graphdef, contrastive_weight=0.0, contrastive_temperature=0.5, dropout_rate=0.0
        ),
        has_aux=True,
    )
    both = jax.jit(lambda p: (old(p, batch, None), new(p, batch, jax.random.key(1))))
    ((old_value, old_metrics), old_grads), ((value, metrics), grads) = both(params)
    # The key is not read and the loss is the old one: equal bit for bit.
    assert float(old_value) == float(value)
    jax.tree.map(np.testing.assert_array_equal, old_grads, grads)
    assert metrics.keys() == old_metrics.keys()


def numpy_info_nce(anchors, positives, temperature):
    """Σ_i −log softmax_j(cos(a_i, p_j)/τ)_i in float64, and the top-1 accuracy."""
    a = anchors / np.linalg.norm(anchors, axis=1, keepdims=True)
    p = positives / np.linalg.norm(positives, axis=1, keepdims=True)
    logits = a @ p.T / temperature
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))
    return -np.sum(np.diag(log_probs)), np.mean(np.argmax(logits, 1) == np.arange(len(a)))


def test_contrastive_loss_is_bradley_terry_plus_weighted_info_nce_of_two_views(model):
    graphdef, params = model
    batch = make_pairs(4)
    weight, temperature, rate = 0.5, 0.1, 0.1
    loss_fn = reward_sum_loss(
        graphdef, contrastive_weight=weight, contrastive_temperature=temperature, dropout_rate=rate
    )
    rng = jax.random.key(5)
    tokens = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])

    def view(params, index):
        """Scores [2B] and representations [2B, E] (chosen rows, then rejected) of view
        ``index``, under the key the loss documents: ``fold_in(rng, index)``."""
        return nnx.merge(graphdef, params).score_and_representation(
            tokens, mask, dropout_rate=rate, dropout_key=jax.random.fold_in(rng, index)
        )

    def rm(params):
        scores, _ = view(params, 0)
        return jnp.sum(jnp.logaddexp(0.0, -(scores[:B] - scores[B:])))

    def contrastive(params, stop_second):
        (_, first), (_, second) = view(params, 0), view(params, 1)
        second = jax.lax.stop_gradient(second) if stop_second else second
        unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        logits = unit(first[:B] - first[B:]) @ unit(second[:B] - second[B:]).T / temperature
        return -jnp.sum(jnp.diagonal(jax.nn.log_softmax(logits, axis=-1)))

    @jax.jit
    def compute(params):
        (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        references = (
            jax.grad(rm)(params),
            jax.grad(contrastive)(params, False),
            jax.grad(contrastive)(params, True),
        )
        return value, metrics, grads, view(params, 0), view(params, 1), references

    value, metrics, grads, first, second, references = compute(params)
    (scores, reprs), (_, reprs_view) = jax.tree.map(np.asarray, (first, second))
    differences = (reprs[:B] - reprs[B:]).astype(np.float64)
    differences_view = (reprs_view[:B] - reprs_view[B:]).astype(np.float64)
    rm_sum = np.sum(np.logaddexp(0.0, -(scores[:B] - scores[B:]).astype(np.float64)))
    nce_sum, nce_accuracy = numpy_info_nce(differences, differences_view, temperature)
    # float32 against float64 on sums of 8 O(1) terms; cosines over τ = 0.1 reach 10, so
    # float32 rounding of the logits is ~1e-6 relative: rtol 1e-5.
    np.testing.assert_allclose(value, rm_sum + weight * nce_sum, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_loss"], nce_sum / B, rtol=1e-5)
    assert float(metrics["contrastive_accuracy"]) == pytest.approx(nce_accuracy)
    # Dropout makes the two views differ, so the positive is not a trivial copy.
    assert np.abs(differences - differences_view).max() > 1e-3
    # The gradient is ∇ L_rm(view 1) + β ∇ InfoNCE(view 1, view 2) with the gradient
    # flowing through both views; the one-sided gradient (view 2 stopped) differs from it
    # by far more than rounding, so this comparison can tell the two apart.
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])  # noqa: E731
    rm_grads, two_sided, one_sided = map(flat, references)
    expected = rm_grads + weight * two_sided
    scale = np.abs(expected).max()
    # float32 gradients of the same computation: ~1e-5 of the largest entry.
    np.testing.assert_allclose(flat(grads), expected, atol=1e-5 * scale)
    assert np.abs(two_sided - one_sided).max() > 1e-2 * scale


def test_dropout_alone_trains_on_one_view_and_bad_settings_are_refused(model):
    graphdef, params = model
    batch = make_pairs(5)
    loss_fn = reward_sum_loss(graphdef, dropout_rate=0.2)

    @jax.jit
    def compute(params, rng):
        chosen, rejected = pair_scores(
            graphdef, params, batch, dropout_rate=0.2, dropout_key=jax.random.fold_in(rng, 0)
        )
        return loss_fn(params, batch, rng), bradley_terry_loss(chosen, rejected, reduction="sum")

    (value, metrics), (expected, _) = compute(params, jax.random.key(9))
    # The same forward under the documented key fold_in(rng, 0): float32 rounding.
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    assert "contrastive_loss" not in metrics
    (other, _), _ = compute(params, jax.random.key(10))
    assert abs(float(other) - float(value)) > 1e-4  # another key, another mask
    with pytest.raises(ValueError, match="needs dropout_rate > 0"):
        reward_sum_loss(graphdef, contrastive_weight=0.1)
    with pytest.raises(ValueError, match="denominator counts pairs"):
        reward_sum_loss(graphdef, loss="plackett_luce", contrastive_weight=0.1, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"dropout_rate must be in \[0, 1\)"):
        reward_sum_loss(graphdef, dropout_rate=1.0)
