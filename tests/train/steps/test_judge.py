import jax
import numpy as np
import pytest
from flax import nnx

from rlhf_jax.data.chat import render_prompt
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.objectives.judge import judge_turns, last_token_logits
from rlhf_jax.train.steps import judge as judge_module
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.judge import make_lm_judge, verdict_token_ids

TOKENIZER = ByteTokenizer()
MAX_LENGTH = 384
CONFIG = ModelConfig.llama(
    vocab_size=TOKENIZER.vocab_size,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    mlp_hidden_size=32,
    max_position_embeddings=MAX_LENGTH,
)
PROMPT = "How do I make pancakes?"
REPLIES = ("Mix 2 cups of flour and bake for 20 minutes.", "Ugh, figure it out yourself.")


@pytest.fixture(scope="module")
def judge_model():
    return split_model(Decoder(CONFIG, rngs=nnx.Rngs(3)))


def test_judge_reads_the_verdict_logits_of_the_unpadded_prompt(judge_model):
    graphdef, params = judge_model
    judge = make_lm_judge(graphdef, params, TOKENIZER, max_length=MAX_LENGTH, symmetrise=False)
    ids = render_prompt(judge_turns(PROMPT, *REPLIES), TOKENIZER)
    assert len(ids) < MAX_LENGTH  # padded, not cut
    logits, _ = nnx.merge(graphdef, params)(ids[None], attention_mask=np.ones((1, len(ids))))
    a, b = verdict_token_ids(TOKENIZER)
    expected = jax.nn.sigmoid(logits[0, -1, a] - logits[0, -1, b])
    # Left padding changes only masked positions: float32 forwards agree to rounding.
    np.testing.assert_allclose(judge(PROMPT, *REPLIES), expected, atol=1e-5)


def test_symmetrised_judge_is_a_preference_and_compiles_once(judge_model, monkeypatch):
    graphdef, params = judge_model
    traces = []

    def counted(logits, mask):
        traces.append(logits.shape)  # runs only while tracing the jitted forward
        return last_token_logits(logits, mask)

    monkeypatch.setattr(judge_module, "last_token_logits", counted)
    judge = make_lm_judge(graphdef, params, TOKENIZER, max_length=MAX_LENGTH)
    forward_ab = judge(PROMPT, *REPLIES)
    forward_ba = judge(PROMPT, REPLIES[1], REPLIES[0])
    # ½[P(a|a first) + 1 − P(b|b first)] + ½[P(b|b first) + 1 − P(a|a first)] = 1 exactly
    # in real arithmetic; float32 rounding only.
    np.testing.assert_allclose(forward_ab + forward_ba, 1.0, atol=1e-6)
    assert 0.0 < forward_ab < 1.0
    # Replies of other lengths reuse the one compiled forward (fixed padded width).
    judge("Define gravity for me.", "The pull between masses.", "No.")
    assert traces == [(1, MAX_LENGTH, TOKENIZER.vocab_size)]


def test_verdicts_must_be_single_tokens():
    with pytest.raises(ValueError, match="verdict 'AB' encodes to 2 tokens"):
        verdict_token_ids(TOKENIZER, ("AB", "B"))
