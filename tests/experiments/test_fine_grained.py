"""Smoke test of experiments/fine_grained.py (tiny preset) and of its sentence labels.

The SFT policy is a freshly initialised tiny model exported by ``common.export_params``
(the layout an SFT run leaves in its workdir); the sentence reward models are trained in
the run itself.
"""

import numpy as np
import pytest
from flax import nnx

from experiments import common, fine_grained
from experiments.configs import fine_grained as fine_configs
from rlhf_jax.data.embedded_task import (
    EmbeddedTaskConfig,
    gold_cost,
    gold_reward,
    make_embedded_task,
)
from rlhf_jax.data.tokenizers import ByteTokenizer
from rlhf_jax.models import Decoder
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.steps.common import split_model


def test_sentence_labels_telescope_to_the_gold_reward_and_cost():
    sizes = {"num_train_prompts": 48, "num_heldout_prompts": 4, "num_sft": 48}
    sizes.update(num_sft_heldout=4, num_preference_pairs=4, num_preference_heldout=4)
    task = make_embedded_task(EmbeddedTaskConfig(**sizes))
    examples = task.sft_train
    arrays = fine_grained.segment_label_arrays(examples, ByteTokenizer(), max_length=512)
    ends = arrays["segment_ends"] > 0
    for name in fine_grained.SEGMENT_MODELS:
        assert not np.any(arrays[f"{name}_labels"][~ends])  # labels only at sentence ends
    # The increments of each response sum to its gold score (r(x, "") = 0); float32 sums.
    for row, example in enumerate(examples):
        np.testing.assert_allclose(
            arrays["helpfulness_labels"][row].sum(),
            gold_reward(example.prompt, example.response),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            arrays["harm_labels"][row].sum(), gold_cost(example.prompt, example.response), atol=1e-6
        )
    assert ends.sum(axis=1).max() > 1  # several sentences per response occur
    assert np.any(arrays["harm_labels"] > 0) and np.all(arrays["harm_labels"] >= 0)


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline") / "sft"
    root.mkdir()
    config = fine_configs.get_config("tiny")
    architecture = common.model_config(config, common.build_tokenizer(config))
    _, policy = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    common.export_params(str(root), "policy", policy, architecture)
    return root


def test_fine_grained_trains_sentence_models_and_raises_the_dense_reward(sft, tmp_path):
    config = fine_configs.get_config("tiny")
    config.init_from = str(sft)
    config.kl_coef = 0.01
    config.eval_every = 8  # evaluations at steps 0 and 8 only
    summary = fine_grained.run(config, str(tmp_path))
    # Sixteen steps of each sentence model from a random trunk: the regression loss of
    # the last four batches must be below that of the first four (per-batch losses are
    # noisy: the harm labels are mostly 0 with rare severities of 1 to 2).
    for name in fine_grained.SEGMENT_MODELS:
        losses = [r["loss"] for r in read_jsonl(tmp_path / f"{name}_rm" / JSONL_NAME)]
        assert np.mean(losses[-4:]) < np.mean(losses[:4]), (name, losses)
        assert (tmp_path / f"{name}_rm" / "scorer").is_dir()
    scores = [record["reward_score"] for record in read_jsonl(tmp_path / JSONL_NAME)]
    # As in the PPO smoke test: seeded means over 8 samples; PPO must raise the summed
    # dense reward it optimises.
    assert np.mean(scores[-3:]) > np.mean(scores[:3]) + 0.1, scores
    assert summary["steps"] == 8 and (tmp_path / "policy").is_dir()
    assert np.isfinite(summary["eval_gold_reward"]) and summary["sentences_last"] >= 1.0
