"""experiments/fine_grained_qa_ppo.py: the paper's ±1 segment rewards through the PPO step's
placement, the prompts against the segment models' rendering, config errors, and a tiny run
from freshly initialised models exported in the layout the earlier runs leave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import fine_grained_qa, fine_grained_qa_ppo
from experiments.configs import fine_grained_qa as qa_configs
from experiments.configs import fine_grained_qa_ppo as ppo_configs
from rlhf_jax.data.chat import render_prompt
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.models import ModelConfig, ScalarModel
from rlhf_jax.train.config import ConfigError
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.steps.common import split_model
from rlhf_jax.train.steps.fine_grained import dense_rewards

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory, export_offline_runs):
    """A trunk (``sft/``) and C1, C2 models (``c1_rm/``, ``c2_rm/``), fresh, with the data
    settings of a tiny ``fine_grained_qa.py`` run."""
    root = tmp_path_factory.mktemp("qa_offline")
    export_offline_runs(root, ppo_configs.get_config("tiny"), scorers=("c1_rm", "c2_rm"))
    fine_grained_qa.save_data_settings(qa_configs.get_config("tiny"), str(root))
    return root


def tiny_config(root):
    config = ppo_configs.get_config("tiny")
    config.init_from = str(root / "sft")
    config.segment_models_from = str(root)
    return config


def test_paper_segment_params_give_the_paper_rewards_through_the_step_placement():
    architecture = ModelConfig.llama(
        vocab_size=TOKENIZER.vocab_size,
        max_position_embeddings=16,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        mlp_hidden_size=32,
    )
    graphdef, c1 = split_model(ScalarModel(architecture, rngs=nnx.Rngs(1)))
    _, c2 = split_model(ScalarModel(architecture, rngs=nnx.Rngs(2)))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 6, 200)
    attention = jnp.ones((2, 12), bool)
    mask = jnp.asarray([[0] * 4 + [1] * 8, [0] * 6 + [1] * 5 + [0]], jnp.float32)
    segment_ids = jnp.asarray([[0] * 6 + [1] * 3 + [2] * 3, [0] * 8 + [1] * 4])
    weights = (0.3, 0.7)

    @jax.jit
    def scalars(params):
        return nnx.merge(graphdef, params)(tokens, attention_mask=attention)

    before = np.asarray(scalars(c1))
    paper = [fine_grained_qa_ppo.paper_segment_params(graphdef, p) for p in (c1, c2)]
    placed = dense_rewards([scalars(p) for p in paper], segment_ids, mask, weights)
    expected = fine_grained_qa.paper_dense_rewards(
        [scalars(c1), scalars(c2)], segment_ids, mask, weights
    )
    # The same float32 forward up to the affine head: agreement to float32 rounding of
    # O(1) scalars.
    np.testing.assert_allclose(np.asarray(placed), np.asarray(expected), atol=1e-5)
    assert np.count_nonzero(np.asarray(expected)) == 5  # one reward per sentence end
    # The original models are untouched (the same forward again: bitwise equal).
    np.testing.assert_array_equal(np.asarray(scalars(c1)), before)


def test_prompts_are_the_segment_models_input_cut_to_the_prompt_length(offline_runs):
    config = tiny_config(offline_runs)
    settings = fine_grained_qa.load_data_settings(str(offline_runs), "segment_models_from")
    train, _ = fine_grained_qa.split_examples(settings, TOKENIZER, str(offline_runs / "work"))
    examples = train[:50]
    for length in (config.prompt_length, 600):
        turns = fine_grained_qa_ppo.prompt_turns(examples, TOKENIZER, prompt_length=length)
        arrays = fine_grained_qa_ppo.prompt_arrays(turns, TOKENIZER, prompt_length=length)
        assert arrays["input_ids"].shape == (50, length)
        for ex, turn, ids, keep in zip(
            examples, turns, arrays["input_ids"], arrays["attention_mask"], strict=True
        ):
            question = ex["question"] + "\n\n"
            passages = fine_grained_qa.passages_text(ex["passage_titles"], ex["passage_texts"])
            # The question whole, the passages a prefix; the prompt is the rendered human
            # turn, left padded, never cut.
            assert turn.startswith(question) and passages.startswith(turn[len(question) :])
            np.testing.assert_array_equal(ids[keep], render_prompt([("human", turn)], TOKENIZER))
            # The passages are cut only when the whole text would not fit.
            whole = len(render_prompt([("human", question + passages)], TOKENIZER))
            assert (turn == question + passages) == (whole < length)
    assert any(t != ex["question"] + "\n\n" for t, ex in zip(turns, examples, strict=True))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("segment_models_from", "/nonexistent", "config.segment_models_from"),
        ("max_new_tokens", 64, "config.prompt_length"),
        ("sft_steps", -1, "config.sft_steps"),
    ],
)
def test_config_errors_name_the_key(offline_runs, tmp_path, key, value, message):
    config = tiny_config(offline_runs)
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        fine_grained_qa_ppo.run(config, str(tmp_path))


def test_tiny_run_fine_tunes_then_raises_the_dense_reward(offline_runs, tmp_path):
    config = tiny_config(offline_runs)
    summary = fine_grained_qa_ppo.run(config, str(tmp_path))
    # SFT on the gold answers: four steps at lr 1e-2 from a random tiny trunk lower the
    # answer NLL from about ln 259 (uniform over bytes).
    assert summary["sft_loss_last"] < summary["sft_loss_first"] - 0.3
    # At step 0 the policy is the reference: the log-ratio of every reply is exactly 0.
    assert abs(summary["eval_kl_initial"]) < 1e-6
    # PPO raises the C1 + C2 dense return it optimises on the training prompts (seeded
    # rollouts of 8 replies; means of three iterations, as in the embedded-task test).
    scores = [r["reward_score"] for r in read_jsonl(tmp_path / JSONL_NAME)]
    assert len(scores) == config.num_steps
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    for name in fine_grained_qa_ppo.MODELS:
        assert 0.0 <= summary[f"eval_{name}_flagged"] <= 1.0
    assert summary["eval_reply_length"] <= config.max_new_tokens
    assert (tmp_path / "policy").is_dir() and (tmp_path / "sft" / "policy").is_dir()
