import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.sft import make_sft_eval, make_sft_step, target_mask

VOCAB, B, L = 64, 8, 16
CONFIG = ModelConfig.llama(
    vocab_size=VOCAB,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_hidden_size=32,
    max_position_embeddings=L,
)


def make_batch(seed):
    """Right-padded rows: a prompt of 3-5 tokens, a response to the row's length, padding."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, L + 1, size=B)
    prompt_lengths = rng.integers(3, 6, size=B)
    positions = np.arange(L)[None]
    attention = positions < lengths[:, None]
    return {
        "input_ids": np.where(attention, rng.integers(1, VOCAB, (B, L)), 0).astype(np.int32),
        "attention_mask": attention,
        "positions": np.where(attention, positions, 0).astype(np.int32),
        "loss_mask": attention & (positions >= prompt_lengths[:, None]),
    }


@pytest.fixture(scope="module")
def model():
    return split_model(Decoder(CONFIG, rngs=nnx.Rngs(0)))


def fresh_state(params, tx):
    return TrainState.create(jax.tree.map(jnp.copy, params), tx, rng=0)


def test_target_mask_excludes_first_token_and_segment_starts():
    batch = {
        "loss_mask": np.array([[1, 1, 1, 1, 1, 1, 0]], bool),
        "segment_ids": np.array([[1, 1, 1, 2, 2, 2, 0]]),
    }
    # Token 0 has no predecessor; token 3 starts segment 2 and is predicted from segment 1.
    expected = [[0, 1, 1, 0, 1, 1, 0]]
    np.testing.assert_array_equal(target_mask(batch), np.array(expected, bool))
    del batch["segment_ids"]
    np.testing.assert_array_equal(target_mask(batch), np.array([[0, 1, 1, 1, 1, 1, 0]], bool))


def test_heldout_nll_matches_an_independent_log_softmax(model):
    graphdef, params = model
    batch = make_batch(1)
    forward = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, attention_mask=m)[0])
    logits = forward(params, batch["input_ids"], batch["attention_mask"])
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
    total, count = 0.0, 0
    for b in range(B):
        for t in range(1, L):
            if batch["loss_mask"][b, t]:  # token t is predicted by the logits at t - 1
                total -= log_probs[b, t - 1, batch["input_ids"][b, t]]
                count += 1
    metrics = make_sft_eval(graphdef, batch_size=4)(fresh_state(params, optax.sgd(0.0)), batch)
    assert metrics["tokens"] == count
    # float32 forward against a float64 reduction of the same logits.
    np.testing.assert_allclose(metrics["nll_per_token"], total / count, rtol=1e-5)


def test_packed_rows_equal_each_dialogue_computed_alone(model):
    """Block-diagonal attention: a packed row's NLL is the sum of its dialogues' NLLs."""
    graphdef, params = model
    rng = np.random.default_rng(3)
    lengths, row = (5, 7, 4), []
    for length in lengths:
        row.append(rng.integers(1, VOCAB, length))
    tokens = np.concatenate(row)
    segment_ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    pad = L - tokens.size
    packed = {
        "input_ids": np.pad(tokens, (0, pad))[None].astype(np.int32),
        "segment_ids": np.pad(segment_ids, (0, pad))[None].astype(np.int32),
        "positions": np.pad(positions, (0, pad))[None].astype(np.int32),
        "attention_mask": np.pad(np.ones(tokens.size, bool), (0, pad))[None],
        "loss_mask": np.pad(np.ones(tokens.size, bool), (0, pad))[None],
    }
    evaluate = make_sft_eval(graphdef, batch_size=1)
    state = fresh_state(params, optax.sgd(0.0))
    packed_metrics = evaluate(state, packed)
    alone_nll, alone_tokens = 0.0, 0.0
    for dialogue in row:
        n = dialogue.size
        alone = {
            "input_ids": np.pad(dialogue, (0, L - n))[None].astype(np.int32),
            "positions": np.pad(np.arange(n), (0, L - n))[None].astype(np.int32),
            "attention_mask": np.pad(np.ones(n, bool), (0, L - n))[None],
            "loss_mask": np.pad(np.ones(n, bool), (0, L - n))[None],
        }
        metrics = evaluate(state, alone)
        alone_nll += metrics["nll_per_token"] * metrics["tokens"]
        alone_tokens += metrics["tokens"]
    assert packed_metrics["tokens"] == alone_tokens == sum(n - 1 for n in lengths)
    # Same f32 computations up to the masked-out scores: summation-order noise only.
    np.testing.assert_allclose(
        packed_metrics["nll_per_token"] * packed_metrics["tokens"], alone_nll, rtol=1e-5
    )
    # Without the segment mask (same targets) the later dialogues would read the earlier ones.
    leaky = {k: v for k, v in packed.items() if k != "segment_ids"}
    leaky["loss_mask"] = packed["loss_mask"] & (packed["positions"] > 0)
    leaky_metrics = evaluate(state, leaky)
    assert leaky_metrics["tokens"] == packed_metrics["tokens"]
    assert abs(leaky_metrics["nll_per_token"] - packed_metrics["nll_per_token"]) > 1e-4


TX = optax.sgd(1.0)  # plain SGD: the parameter change is the (accumulated) gradient itself


@pytest.fixture(scope="module")
def steps(model):
    """The SFT step jitted once per micro-batch count, with a trace counter."""
    graphdef, _ = model
    traces = {1: 0, 8: 0}

    def build(micro):
        step = make_sft_step(graphdef, TX, num_micro_batches=micro)

        def counted(state, batch, rng):
            traces[micro] += 1
            return step(state, batch, rng)

        return jax.jit(counted, donate_argnums=0)

    return {1: build(1), 8: build(8)}, traces


def test_loss_decreases_and_the_step_compiles_once(model, steps):
    _, params = model
    jitted, traces = steps
    state = fresh_state(params, TX)
    batch = make_batch(2)
    losses = []
    for i in range(6):
        state, metrics = jitted[1](state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    for seed in (3, 4):  # new batches of the same shape reuse the compiled step
        state, _ = jitted[1](state, make_batch(seed), jax.random.key(seed))
    assert traces[1] == 1
    # The initial NLL is about log(64) = 4.16; six steps on one batch remove a clear part.
    assert losses[-1] < losses[0] - 0.2, losses


def test_eight_micro_batches_of_one_equal_one_batch_of_eight(model, steps):
    _, params = model
    jitted, _ = steps
    batch = make_batch(5)
    results = [jitted[m](fresh_state(params, TX), batch, jax.random.key(0)) for m in (1, 8)]
    # Eight float32 partial sums against one sum: rounding is ~1e-7 relative to O(1) values.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
        results[0][0].params,
        results[1][0].params,
    )
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-5)
