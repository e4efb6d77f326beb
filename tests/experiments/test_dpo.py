import math
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import common, dpo, sft  # noqa: E402
from experiments.configs import cpl as cpl_config  # noqa: E402
from experiments.configs import dpo as dpo_config  # noqa: E402
from experiments.configs import rationale as rationale_config  # noqa: E402
from experiments.configs import selm as selm_config  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402
from rlhf_jax.data import task_batches  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402

TASK = dict(
    num_train_prompts=100,
    num_heldout_prompts=40,
    num_sft=64,
    num_sft_heldout=8,
    num_preference_pairs=512,
    num_preference_heldout=128,
)
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64)


def shrink(config, num_steps, learning_rate):
    config.task.update(TASK)
    config.model.update(MODEL)
    config.max_length = 128
    config.batch_size = 16
    config.eval_batch_size = 64
    config.num_steps = num_steps
    config.log_every = 10
    config.checkpoint_every = num_steps
    config.optimizer.update(learning_rate=learning_rate, warmup_steps=0)
    return config


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sft")
    config = shrink(sft_config.get_config(), 10, 1e-2)
    config.num_samples = 0
    sft.run(config, str(workdir))
    return str(workdir)


def test_tiny_dpo_from_sft_raises_heldout_preference_accuracy(tmp_path, sft_workdir):
    config = shrink(dpo_config.get_config(), 40, 3e-3)
    config.init_from = sft_workdir
    summary = dpo.run(config, str(tmp_path))
    # Policy = reference at step 0: every implicit reward is 0, the loss is log 2 and the
    # accuracy 0 (no pair has a positive margin).
    assert summary["train_loss_first"] == pytest.approx(0.6931, abs=1e-4)
    assert summary["train_loss_last"] < summary["train_loss_first"]
    # 128 held-out pairs: chance is 0.5 ± 0.044, so 0.58 is ~2 standard errors above it.
    assert summary["heldout_reward_accuracy"] > 0.58
    assert summary["heldout_reward_margin"] > 0.0


def test_init_from_a_different_architecture_names_the_key(tmp_path, sft_workdir):
    config = shrink(dpo_config.get_config(), 1, 1e-3)
    config.init_from = sft_workdir
    config.model.hidden_size = 48
    with pytest.raises(ConfigError, match=r"config\.model\.hidden_size=48 differs"):
        dpo.run(config, str(tmp_path))
    config.model.hidden_size = MODEL["hidden_size"]
    config.hyper.betta = 0.1
    with pytest.raises(ConfigError, match=r"config\.hyper\.betta: not a hyper-parameter"):
        dpo.run(config, str(tmp_path))


@pytest.mark.parametrize("method", [cpl_config, selm_config, rationale_config])
def test_seed_method_configs_run_through_the_dpo_experiment_and_learn(
    tmp_path, sft_workdir, method
):
    config = shrink(method.get_config(), 40, 3e-3)
    config.init_from = sft_workdir
    config.prompt_length = 64
    config.explore_max_new_tokens = 16
    summary = dpo.run(config, str(tmp_path))
    assert summary["loss_name"] == config.loss_name
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["heldout_reward_margin"] > 0.0
    # 128 held-out pairs: chance is 0.5 ± 0.044; 0.55 is above it by more than one standard
    # error (the sharper bound for plain DPO is in the test above).
    assert summary["heldout_reward_accuracy"] > 0.55
    if config.loss_name in ("selm", "rationale_dpo"):
        # The DPO part of the loss has fallen below its value at the reference, log 2.
        assert summary["heldout_dpo_loss"] < math.log(2.0)
    if config.loss_name == "rationale_dpo":
        # At step 0 the DPO part is log 2, so the rest of the first loss is the initial
        # rationale NLL averaged over all pairs (0 where a pair has none): an upper bound
        # on the held-out NLL per rationale only if the policy learned the rationales.
        assert summary["heldout_rationale_nll"] < summary["train_loss_first"] - math.log(2.0)


def test_flipping_preferences_swaps_chosen_and_rejected_of_every_pair():
    task = common.build_task(shrink(dpo_config.get_config(), 1, 1e-3))
    tokenizer = common.build_tokenizer(dpo_config.get_config())
    pairs = task.preference_heldout[:16]
    plain, flipped = (
        task_batches.task_preference_arrays(p, tokenizer, max_length=128)
        for p in (pairs, dpo.flip_preferences(pairs))
    )
    for key in ("input_ids", "attention_mask", "response_mask", "reward", "cost", "is_safe"):
        np.testing.assert_array_equal(flipped[f"chosen_{key}"], plain[f"rejected_{key}"])
        np.testing.assert_array_equal(flipped[f"rejected_{key}"], plain[f"chosen_{key}"])


def test_reverse_dpo_learns_the_flipped_preferences_and_is_scored_on_them(tmp_path, sft_workdir):
    config = shrink(dpo_config.get_config(), 40, 3e-3)
    config.init_from = sft_workdir
    config.flip_preferences = True
    summary = dpo.run(config, str(tmp_path))
    assert summary["flip_preferences"] is True
    assert summary["train_loss_first"] == pytest.approx(math.log(2.0), abs=1e-4)
    # Held-out accuracy is measured on the flipped pairs: the reverse model prefers the
    # originally rejected reply, so it clears the same bar as the forward run (chance
    # 0.5 ± 0.044 on 128 pairs). Scored on the original labels it would fall below 0.42.
    assert summary["heldout_reward_accuracy"] > 0.58
    assert summary["heldout_reward_margin"] > 0.0
