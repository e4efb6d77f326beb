import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.objectives.reward_model import bradley_terry_loss
from rlhf_jax.objectives.vpl import (
    latent_reward,
    posterior_encoder,
    sample_latents,
    vpl_loss,
)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.vpl import (
    embed_pairs,
    init_vpl_params,
    make_vpl_eval,
    make_vpl_step,
    posterior_mean_predictions,
)

VOCAB, L, U, K, Q = 48, 10, 4, 2, 3
E, HIDDEN, LATENT = 16, 8, 3
CONFIG = ModelConfig.llama(
    vocab_size=VOCAB,
    hidden_size=E,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_hidden_size=32,
    max_position_embeddings=L,
)
LEARNING_RATE = 0.1
TX = optax.sgd(LEARNING_RATE)  # plain SGD: the parameter change is −lr times the gradient


def make_users(seed):
    """Random right-padded rows ``[U, K or Q, L]`` for every set and side."""
    rng = np.random.default_rng(seed)
    batch = {}
    for name, count in (("context", K), ("query", Q)):
        for side in ("chosen", "rejected"):
            lengths = rng.integers(3, L + 1, size=(U, count))
            mask = np.arange(L) < lengths[..., None]
            ids = np.where(mask, rng.integers(1, VOCAB, (U, count, L)), 0)
            batch[f"{name}_{side}_input_ids"] = ids.astype(np.int32)
            batch[f"{name}_{side}_attention_mask"] = mask
    return batch


@pytest.fixture(scope="module")
def model():
    graphdef, trunk = split_model(Decoder(CONFIG, rngs=nnx.Rngs(0)))
    params = init_vpl_params(
        jax.random.key(1), trunk, embed_dim=E, hidden_dim=HIDDEN, latent_dim=LATENT
    )
    return graphdef, params


def hand_embeddings(graphdef, trunk, batch, name):
    """Each row's hidden state at its last real token, each row through the trunk alone."""
    decoder = nnx.merge(graphdef, trunk)
    ids, mask = batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"]
    rows, masks = ids.reshape(-1, L), mask.reshape(-1, L)
    hidden = jax.vmap(lambda i, m: decoder.hidden(i[None], attention_mask=m[None])[0])(
        jnp.asarray(rows), jnp.asarray(masks)
    )
    last = masks.sum(axis=1) - 1  # right padding: the last real token is at length − 1
    return hidden[np.arange(len(rows)), last].reshape(*ids.shape[:2], E)


def all_hand_embeddings(graphdef, trunk, batch):
    names = [f"{s}_{side}" for s in ("context", "query") for side in ("chosen", "rejected")]
    return {n: hand_embeddings(graphdef, trunk, batch, n) for n in names}


BETA, NUM_SAMPLES = 0.7, 3


@pytest.fixture(scope="module")
def elbo_step(model):
    """The step with β = 0.7 and S = 3, compiled once for the tests that share it."""
    return jax.jit(make_vpl_step(model[0], TX, beta=BETA, num_samples=NUM_SAMPLES))


def fresh_state(params):
    return TrainState.create(jax.tree.map(jnp.copy, params), TX, rng=0)


def test_step_loss_is_the_negative_elbo_of_hand_computed_embeddings(model, elbo_step):
    graphdef, params = model
    batch = make_users(0)
    rng = jax.random.key(5)
    _, metrics = elbo_step(fresh_state(params), batch, rng)

    emb = jax.jit(lambda t: all_hand_embeddings(graphdef, t, batch))(params["trunk"])
    mean, log_var = posterior_encoder(
        params["encoder"], emb["context_chosen"], emb["context_rejected"]
    )
    # The step draws the samples of its (only) micro-batch from fold_in(rng, 0).
    z = sample_latents(jax.random.fold_in(rng, 0), mean, log_var, NUM_SAMPLES)[:, :, None]
    expected, parts = vpl_loss(
        latent_reward(params["reward"], emb["query_chosen"], z),
        latent_reward(params["reward"], emb["query_rejected"], z),
        mean,
        log_var,
        beta=BETA,
    )
    # float32 forwards of padded batches against unpadded single rows: the same sums in
    # another order, ~1e-6 relative; 1e-5 leaves room and still catches any wrong token,
    # pair or user (those change the loss by > 1e-2).
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], parts["kl"], rtol=1e-5)
    assert metrics["denominator"] == U * Q


def test_zero_beta_single_sample_and_ignored_latent_is_bradley_terry(model):
    graphdef, params = model
    # Zero the latent's input weights: r(x, y, z) no longer depends on z.
    reward = dict(params["reward"])
    reward["hidden_w"] = reward["hidden_w"].at[E:].set(0.0)
    params = {**params, "reward": reward}
    batch = make_users(1)
    step = jax.jit(make_vpl_step(graphdef, TX, beta=0.0, num_samples=1))
    new_state, metrics = step(fresh_state(params), batch, jax.random.key(0))

    def bradley_terry(p):
        emb = all_hand_embeddings(graphdef, p["trunk"], batch)
        zero = jnp.zeros((LATENT,))
        chosen = latent_reward(p["reward"], emb["query_chosen"], zero)
        rejected = latent_reward(p["reward"], emb["query_rejected"], zero)
        loss, _ = bradley_terry_loss(chosen.reshape(-1), rejected.reshape(-1))
        return loss

    loss, grads = jax.jit(jax.value_and_grad(bradley_terry))(params)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)  # as above
    # Under SGD the update is −lr ∇L: the step's gradient of the trunk and of the reward
    # head is Bradley–Terry's (the encoder gets none, its latent being ignored). 1e-5
    # absolute on updates of order 1e-2.
    for part in ("trunk", "reward", "encoder"):
        update = jax.tree.map(jnp.subtract, new_state.params[part], params[part])
        expected = jax.tree.map(lambda g: -LEARNING_RATE * g, grads[part])
        if part == "reward":  # the zeroed latent rows still get ∂r/∂W = z δ from z ≠ 0
            update["hidden_w"], expected["hidden_w"] = (
                update["hidden_w"][:E],
                expected["hidden_w"][:E],
            )
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), update, expected)


def test_gradients_reach_the_trunk(model, elbo_step):
    _, params = model
    new_state, metrics = elbo_step(fresh_state(params), make_users(2), jax.random.key(3))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.params, params)
    # Every block of the trunk (attention, MLP, norms) moves, not only the heads; a
    # stop-gradient anywhere between the trunk and the loss would leave them at 0 exactly.
    trunk_moves = jax.tree.leaves(moved["trunk"])
    assert sum(m > 0 for m in trunk_moves) >= len(trunk_moves) - 1  # lm_head is not used
    assert max(jax.tree.leaves(moved["encoder"])) > 0
    assert not metrics["nonfinite"]


def test_eval_scores_query_pairs_at_the_posterior_mean(model):
    graphdef, params = model
    batch = make_users(3)
    predictions = make_vpl_eval(graphdef, batch_size=3)(fresh_state(params), batch)
    emb = jax.jit(lambda t: all_hand_embeddings(graphdef, t, batch))(params["trunk"])
    mean, _ = posterior_encoder(params["encoder"], emb["context_chosen"], emb["context_rejected"])
    chosen = latent_reward(params["reward"], emb["query_chosen"], mean[:, None])
    rejected = latent_reward(params["reward"], emb["query_rejected"], mean[:, None])
    # U = 4 users in batches of 3: the padded last batch must be dropped, one row per user.
    assert predictions["accuracy"].shape == (U,)
    np.testing.assert_array_equal(predictions["correct"], np.asarray(chosen > rejected))
    np.testing.assert_allclose(predictions["mean"], mean, rtol=1e-5, atol=1e-6)
    direct = posterior_mean_predictions(graphdef, params, batch)
    np.testing.assert_allclose(predictions["kl"], direct["kl"], rtol=1e-5)


def test_a_frozen_trunk_step_on_precomputed_embeddings_equals_the_trunk_step(model):
    # The frozen path embeds pairs once (embed_pairs) and trains the heads alone. Its loss
    # and head gradients must be those of the trunk path on the same tokens; the trunk
    # path's trunk gradient is simply not taken. Float32 reordering: 1e-5.
    graphdef, params = model
    batch = make_users(5)
    heads = {k: v for k, v in params.items() if k != "trunk"}
    embedded = {}
    for name in ("context", "query"):
        flat = {
            f"{side}_{field}": batch[f"{name}_{side}_{field}"].reshape(-1, L)
            for side in ("chosen", "rejected")
            for field in ("input_ids", "attention_mask")
        }
        pairs = embed_pairs(graphdef, params["trunk"], flat, batch_size=3)  # padded last batch
        assert set(pairs) == {"chosen", "rejected"}
        for side, value in pairs.items():
            embedded[f"{name}_{side}"] = value.reshape(U, -1, E)
    rng = jax.random.key(4)
    kwargs = {"beta": BETA, "num_samples": NUM_SAMPLES, "free_bits": 0.5}
    frozen_state, frozen = jax.jit(make_vpl_step(None, TX, **kwargs))(
        TrainState.create(heads, TX, rng=0), embedded, rng
    )
    full_state, full = jax.jit(make_vpl_step(graphdef, TX, **kwargs))(
        TrainState.create(params, TX, rng=0), batch, rng
    )
    for name in ("loss", "kl", "log_likelihood"):
        np.testing.assert_allclose(frozen[name], full[name], rtol=1e-5, err_msg=name)
    for name in ("encoder", "reward"):
        moved = jax.tree.map(lambda a, b: a - b, frozen_state.params[name], heads[name])
        expected = jax.tree.map(lambda a, b: a - b, full_state.params[name], params[name])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), moved, expected)
    frozen_eval = make_vpl_eval(None, batch_size=3)(frozen_state, embedded)
    full_eval = make_vpl_eval(graphdef, batch_size=3)(
        TrainState.create(params, TX, rng=0).replace(params={**params, **frozen_state.params}),
        batch,
    )
    np.testing.assert_allclose(frozen_eval["accuracy"], full_eval["accuracy"])
    np.testing.assert_allclose(frozen_eval["kl"], full_eval["kl"], rtol=1e-5)
