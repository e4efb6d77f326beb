"""DeAL's lookahead search: reductions to greedy and beam search, and constraint satisfaction.

The reference decoders here run uncached forward passes over the whole sequence, an
implementation independent of the KV-cache search they are compared with.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Decoder
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.sampling.deal import (
    DeALConfig,
    KeywordReward,
    LengthPenalty,
    WeightedReward,
    deal_decode,
)

VOCAB = 48
NEW_TOKENS = 6
CONFIG = ModelConfig.llama(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_hidden_size=64,
    max_position_embeddings=64,
)
# Left-padded prompts of lengths 5, 2 and 4.
PROMPT_LENGTHS = np.array([5, 2, 4])
PROMPT_MASK = (np.arange(5)[None, :] >= 5 - PROMPT_LENGTHS[:, None]).astype(np.int32)
PROMPT_TOKENS = np.where(
    PROMPT_MASK == 1,
    np.asarray(jax.random.randint(jax.random.key(3), PROMPT_MASK.shape, 1, VOCAB)),
    0,
).astype(np.int32)


@pytest.fixture(scope="module")
def policy():
    """A random decoder with logits spread over a few nats (scaled output projection)."""
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    model.lm_head[...] = model.lm_head[...] * 8.0
    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=0)
def _last_log_probs(graphdef, params, tokens, mask):
    logits, _ = nnx.merge(graphdef, params)(tokens, attention_mask=mask)
    return jax.nn.log_softmax(logits[:, -1], axis=-1)


def next_log_probs(policy, prefixes):
    """log π(· | prefix) by an uncached forward pass over prefixes left-padded to one width."""
    width = PROMPT_MASK.shape[1] + NEW_TOKENS
    tokens = np.zeros((len(prefixes), width), np.int32)
    mask = np.zeros((len(prefixes), width), np.int32)
    for i, prefix in enumerate(prefixes):
        tokens[i, width - len(prefix) :], mask[i, width - len(prefix) :] = prefix, 1
    return np.asarray(_last_log_probs(*policy, tokens, mask), np.float64)


def prompt(row):
    return PROMPT_TOKENS[row, PROMPT_MASK[row] == 1]


def reference_beam_search(policy, row, width, steps):
    """Beam search of ``width`` over all V extensions, scoring by summed log-probs."""
    beams = [(prompt(row), 0.0)]
    for _ in range(steps):
        log_probs = next_log_probs(policy, [b for b, _ in beams])
        scored = [
            (score + log_probs[i, v], i, v)
            for i, (_, score) in enumerate(beams)
            for v in range(VOCAB)
        ]
        scored.sort(key=lambda s: -s[0])
        beams = [(np.append(beams[i][0], v), s) for s, i, v in scored[:width]]
    best, score = beams[0]
    return best[len(prompt(row)) :], score


def reply(output, row):
    tokens, mask = np.asarray(output.tokens[row]), np.asarray(output.response_mask[row], bool)
    return tokens[mask]


UNUSED_REWARD = KeywordReward((1,))  # with reward_weight = 0 it only fills `reward`


def decode(policy, reward_fn=UNUSED_REWARD, **settings):
    config = DeALConfig(**{"max_new_tokens": NEW_TOKENS, "eos_id": None, **settings})
    return deal_decode(*policy, reward_fn, None, PROMPT_TOKENS, PROMPT_MASK, config=config)


def test_zero_reward_weight_with_one_beam_is_greedy_decoding(policy):
    # eos_id = 7 lets rows stop early; both decoders must then pad identically.
    greedy = sample(
        *policy,
        PROMPT_TOKENS,
        PROMPT_MASK,
        jax.random.key(0),
        config=SamplingConfig(max_new_tokens=NEW_TOKENS, eos_id=7, greedy=True),
    )
    searched = decode(
        policy, beam_width=1, num_candidates=3, lookahead=2, reward_weight=0.0, eos_id=7
    )
    # Token for token (exact): both take the argmax of the same cached logits.
    np.testing.assert_array_equal(searched.tokens, greedy.tokens)
    np.testing.assert_array_equal(searched.response_mask, greedy.response_mask)
    # The reported log-likelihood is the sum of the greedy tokens' log-probs (float32 sums).
    np.testing.assert_allclose(searched.logprob, np.sum(greedy.logprobs, axis=1), atol=1e-4)


def test_zero_reward_weight_is_beam_search(policy):
    width = 3
    searched = decode(
        policy, beam_width=width, num_candidates=width, lookahead=1, reward_weight=0.0
    )
    greedy = decode(policy, beam_width=1, num_candidates=1, lookahead=0, reward_weight=0.0)
    differs = []
    for row in range(len(PROMPT_LENGTHS)):
        tokens, score = reference_beam_search(policy, row, width, NEW_TOKENS)
        np.testing.assert_array_equal(reply(searched, row), tokens)
        # Float32 cached vs float64-summed uncached log-probs over 6 tokens.
        np.testing.assert_allclose(searched.logprob[row], score, atol=1e-4)
        differs.append(not np.array_equal(tokens, reply(greedy, row)))
    assert any(differs), "the prompts must tell beam search from greedy decoding"


def test_keyword_reached_through_lookahead_is_included_where_greedy_omits_it(policy):
    """With one beam, λ large and a keyword that greedy decoding never emits but that is the
    greedy continuation of a non-greedy first token, the search must emit the keyword.

    Proof: at step 0 that candidate's lookahead holds the keyword (R = 1), and λ = 1e3
    exceeds any log-probability gap among the top-k, so the kept beam has R = 1. From a beam
    whose greedy lookahead holds the keyword at offset j, its greedy next token has the
    largest log-prob and a lookahead still holding it (at offset j − 1, or committed), so it
    is kept; the keyword is committed within ``lookahead`` steps ≤ ``NEW_TOKENS`` − 1.
    """
    lookahead, candidates = 2, 4
    greedy = decode(policy, beam_width=1, num_candidates=1, lookahead=0, reward_weight=0.0)
    row = 0
    greedy_reply = reply(greedy, row)
    first = next_log_probs(policy, [prompt(row)])[0]
    ranked = np.argsort(-first)
    keyword = None
    for candidate in ranked[1:candidates]:
        follow = int(np.argmax(next_log_probs(policy, [np.append(prompt(row), candidate)])[0]))
        if follow not in greedy_reply and follow != candidate:
            keyword = follow
            break
    assert keyword is not None, "precondition: some top-k candidate leads to a new token"
    assert first[ranked[candidates - 1]] - first[ranked[0]] > -1e3  # λ dominates the gaps
    searched = decode(
        policy,
        KeywordReward((keyword,)),
        beam_width=1,
        num_candidates=candidates,
        lookahead=lookahead,
        reward_weight=1e3,
    )
    assert keyword not in greedy_reply
    assert keyword in reply(searched, row)
    assert float(searched.reward[row]) == 1.0


def test_keyword_reward_counts_contiguous_reply_tokens_only():
    tokens = jnp.asarray([[4, 5, 6, 0], [5, 6, 9, 9], [4, 5, 6, 7], [6, 5, 0, 0]])
    response = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 0, 0]])
    rewards = KeywordReward((5, 6))(None, tokens, response, response)
    # Row 0 and 1 contain "5 6" in the reply; row 2 has it in the reply too (cols 1-2);
    # row 3 has the tokens in the wrong order.
    np.testing.assert_array_equal(rewards, [1.0, 1.0, 1.0, 0.0])
    prompt_only = jnp.asarray([[0, 0, 1, 1]])
    assert float(KeywordReward((5,))(None, tokens[:1], prompt_only, prompt_only)[0]) == 0.0


def test_length_penalty_and_weighted_sum():
    response = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    tokens = jnp.asarray([[3, 3, 3, 0], [3, 3, 3, 3], [3, 0, 0, 0]])
    np.testing.assert_array_equal(LengthPenalty(2)(None, tokens, response, response), [-1, -2, 0])
    combined = WeightedReward(((2.0, LengthPenalty(2)), (-1.0, KeywordReward((3,)))))
    np.testing.assert_array_equal(combined((None, None), tokens, response, response), [-3, -5, -1])
