import pathlib
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import common, merge, sft  # noqa: E402
from experiments.configs import merge as merge_config  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402
from rlhf_jax.train.steps.common import split_model  # noqa: E402

TASK = dict(num_train_prompts=32, num_heldout_prompts=8, num_sft=32, num_sft_heldout=8)
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64)


def shrink(config):
    config.task.update(TASK)
    config.model.update(MODEL)
    config.max_length = 96
    config.batch_size = 8
    config.eval_batch_size = 8
    config.log_every = 2
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    return config


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """A short SFT run (the pretrained policy) and a longer run continued from it."""
    workdirs = []
    for name, steps, init_from in (("pretrained", 2, ""), ("instruct", 6, None)):
        workdir = str(tmp_path_factory.mktemp(name))
        config = shrink(sft_config.get_config())
        config.num_steps = config.checkpoint_every = steps
        config.num_samples = 0
        config.init_from = workdirs[0] if init_from is None else init_from
        sft.run(config, workdir)
        workdirs.append(workdir)
    return workdirs


def merge_run(policies, workdir, instruct_weight, merged_weight):
    config = shrink(merge_config.get_config())
    config.pretrained_from, config.instruct_from = policies
    config.instruct_weight, config.merged_weight = instruct_weight, merged_weight
    config.prompt_length = 48
    config.num_eval_prompts = 8
    config.sample_max_new_tokens = 24
    return merge.run(config, str(workdir)), load_policy(str(workdir))


def load_policy(workdir):
    config = shrink(merge_config.get_config())
    architecture = common.model_config(config, common.build_tokenizer(config))
    _, like = split_model(common.build_decoder(config, architecture))
    return common.import_params(workdir, "policy", like)


def test_bai_merge_is_the_weighted_average_and_is_evaluated(policies, tmp_path):
    pretrained, instruct = (load_policy(w) for w in policies)
    summary, merged = merge_run(policies, tmp_path / "half", 0.5, 0.5)
    # Without a reasoning run stage 1 is the instruct policy itself, so the merge is
    # ½ θ_instruct + ½ θ_pretrained; float32 arithmetic, one rounding per leaf.
    jax.tree.map(
        lambda m, a, b: np.testing.assert_allclose(m, 0.5 * a + 0.5 * b, rtol=1e-6, atol=1e-7),
        merged,
        instruct,
        pretrained,
    )
    for name in ("pretrained", "instruct", "merged"):
        assert np.isfinite(summary[f"{name}_samples_gold_reward"])
        assert 0.0 <= summary[f"{name}_samples_harm_rate"] <= 1.0
    # Weight 1 in both stages returns the instruct policy bit for bit: with the same
    # sampling seed its replies, and so their gold scores, are the instruct policy's.
    summary, merged = merge_run(policies, tmp_path / "one", 1.0, 1.0)
    jax.tree.map(np.testing.assert_array_equal, merged, instruct)
    for key in ("gold_reward", "gold_cost", "harm_rate"):
        assert summary[f"merged_samples_{key}"] == summary[f"instruct_samples_{key}"]


def test_merge_needs_its_inputs(tmp_path):
    config = shrink(merge_config.get_config())
    with pytest.raises(ConfigError, match=r"config\.pretrained_from must name"):
        merge.run(config, str(tmp_path))
