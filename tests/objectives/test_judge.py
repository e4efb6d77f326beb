import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data import chat
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.objectives import judge

TOKENIZER = ByteTokenizer()
VERDICT_IDS = (int(TOKENIZER.encode("A")[0]), int(TOKENIZER.encode("B")[0]))
INSTRUCTION = "Better: A or B?"
RENDER = functools.partial(chat.render_prompt, tokenizer=TOKENIZER)
EXAMPLES = [("2+2?", "4", "five"), ("Capital of France?", "Paris.", "Lyon, I think.")]
# Float32 logits of a small decoder; the same computation on padded and unpadded inputs
# differs only by summation order, ~1e-6 relative.
ATOL = 1e-5


@pytest.fixture(scope="module")
def forward():
    """``(tokens [B, T], mask [B, T]) -> logits [B, T, V]`` of a tiny random decoder."""
    config = ModelConfig.llama(
        vocab_size=TOKENIZER.vocab_size,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        mlp_hidden_size=64,
        max_position_embeddings=256,
    )
    # Weights N(0, 0.3²) (norm gains 1), filled from numpy on the abstract model so that
    # no initialiser is compiled; large enough that verdict logits differ visibly.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    leaves = []
    for path, variable in nnx.to_flat_state(abstract):
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        value = (1.0 if path[-1] == "scale" else 0.0) + 0.3 * rng.standard_normal(shape)
        leaves.append((path, variable.replace(jnp.asarray(value, dtype))))
    params = nnx.from_flat_state(leaves)

    @jax.jit
    def run(tokens, mask):
        return nnx.merge(graphdef, params)(tokens, attention_mask=mask)[0]

    return run


def next_token_logits(forward, ids):
    ids = jnp.asarray(ids)[None]
    return forward(ids, jnp.ones_like(ids, dtype=bool))[0, -1]


def test_probability_is_the_softmax_over_the_two_verdict_logits(forward):
    preference = judge.make_judge_preference(
        functools.partial(next_token_logits, forward),
        RENDER,
        VERDICT_IDS,
        symmetrise=False,
        instruction=INSTRUCTION,
    )
    for prompt, a, b in EXAMPLES:
        ids = chat.render_prompt(
            judge.judge_turns(prompt, a, b, instruction=INSTRUCTION), TOKENIZER
        )
        assert ids[-1] == TOKENIZER.role_ids["assistant"]  # the verdict comes next
        last = np.asarray(next_token_logits(forward, ids), np.float64)
        pair = last[list(VERDICT_IDS)]
        assert abs(pair[0] - pair[1]) > 1e-2  # a non-trivial verdict
        direct = np.exp(pair[0]) / np.exp(pair).sum()
        np.testing.assert_allclose(preference(prompt, a, b), direct, atol=ATOL)


def test_symmetrised_preference_is_complementary(forward):
    preference = judge.make_judge_preference(
        functools.partial(next_token_logits, forward), RENDER, VERDICT_IDS, instruction=INSTRUCTION
    )
    for prompt, a, b in EXAMPLES:
        forwards, backwards = preference(prompt, a, b), preference(prompt, b, a)
        # Exact in real arithmetic; float32 σ(x) + σ(−x) rounds to within an ulp or two.
        np.testing.assert_allclose(forwards + backwards, 1.0, atol=1e-6)
    # Identical responses: the symmetrised judge has no position to prefer.
    np.testing.assert_allclose(preference("Hi", "same", "same"), 0.5, atol=1e-6)


def test_batched_judging_runs_under_jit_and_matches_single_calls(forward):
    sequences = [
        chat.render_prompt(judge.judge_turns(p, a, b, instruction=INSTRUCTION), TOKENIZER)
        for p, a, b in EXAMPLES
    ]
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    mask = np.zeros((len(sequences), length), bool)
    for row, ids in enumerate(sequences):  # left padding
        tokens[row, length - len(ids) :] = ids
        mask[row, length - len(ids) :] = True

    @jax.jit
    def batched(tokens, mask):
        verdict = judge.last_token_logits(forward(tokens, mask), mask)
        return judge.verdict_probability(verdict, VERDICT_IDS)

    probs = batched(jnp.asarray(tokens), jnp.asarray(mask))
    for row, ids in enumerate(sequences):
        single = judge.verdict_probability(next_token_logits(forward, ids)[None], VERDICT_IDS)
        np.testing.assert_allclose(probs[row], single[0], atol=ATOL)


def test_last_token_logits_reads_the_last_real_position():
    logits = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[1, 1, 0, 0], [0, 1, 1, 1]])  # right padding, left padding
    np.testing.assert_array_equal(
        judge.last_token_logits(logits, mask), jnp.stack([logits[0, 1], logits[1, 3]])
    )
    swapped = judge.symmetrised_preference(logits[:, 0], logits[:, 1], (0, 2))
    direct = 0.5 * (
        jax.nn.sigmoid(logits[:, 0, 0] - logits[:, 0, 2])
        + 1
        - jax.nn.sigmoid(logits[:, 1, 0] - logits[:, 1, 2])
    )
    np.testing.assert_allclose(swapped, direct, rtol=1e-6)
