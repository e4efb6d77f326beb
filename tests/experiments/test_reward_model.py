import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import reward_model  # noqa: E402
from experiments.configs import binary_feedback as binary_feedback_config  # noqa: E402
from experiments.configs import heron as heron_config  # noqa: E402
from experiments.configs import reward_contrastive as reward_contrastive_config  # noqa: E402
from experiments.configs import reward_model as reward_model_config  # noqa: E402
from experiments.configs import reward_strength as reward_strength_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402


def tiny_config(model_kind, num_steps, module=reward_model_config):
    config = module.get_config()
    config.model_kind = model_kind
    config.task.update(
        num_train_prompts=100,
        num_heldout_prompts=40,
        num_sft=8,
        num_sft_heldout=8,
        num_preference_pairs=512,
        num_preference_heldout=256,
    )
    config.model.update(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64
    )
    config.max_length = 128
    config.batch_size = 16
    config.eval_batch_size = 64
    config.num_steps = num_steps
    config.log_every = 10
    config.checkpoint_every = num_steps
    config.optimizer.update(learning_rate=3e-3, warmup_steps=0)
    return config


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rm")
    return str(workdir), reward_model.run(tiny_config("reward", 60), str(workdir))


def test_tiny_reward_model_beats_chance_on_heldout_pairs(reward_run):
    workdir, summary = reward_run
    # 256 held-out pairs: a chance-level model has accuracy 0.5 ± 0.031 (one standard
    # error), so 0.6 is more than three standard errors above chance. The labels are noisy:
    # no model can beat the Bayes-optimal accuracy by more than sampling error.
    assert summary["heldout_accuracy"] > 0.6
    assert summary["heldout_accuracy"] < summary["bayes_optimal_accuracy"] + 0.1
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]
    assert (pathlib.Path(workdir) / "scorer").exists()


def test_tiny_cost_model_learns_the_safety_labels(tmp_path):
    summary = reward_model.run(tiny_config("cost", 40), str(tmp_path))
    assert summary["loss"] == "cost"
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]
    # The sign term makes the cost positive on unsafe and negative on safe responses.
    assert summary["heldout_sign_accuracy"] > 0.6


def test_strength_variant_flips_smooths_and_learns(tmp_path, reward_run):
    config = tiny_config("reward", 40, reward_strength_config)
    config.strength.ensemble = f"{reward_run[0]},{reward_run[0]}"
    summary = reward_model.run(config, str(tmp_path))
    assert summary["loss"] == "strength"
    # The ensemble disagrees with some labels (it is 60-70% accurate on noisy labels) and
    # after flipping at û < 0 every pair has strength û ≥ 0.
    assert 0.0 < summary["train_flipped_fraction"] < 0.5
    assert summary["train_soft_fraction"] > 0.0
    assert summary["train_mean_strength"] > 0.0
    # Held-out pairs keep their labels: accuracy 3 standard errors above chance (as above).
    # (Not the held-out Bradley–Terry loss: the adaptive margins train larger score gaps
    # than the maximum-likelihood fit, which that loss penalises as overconfidence.)
    assert summary["heldout_accuracy"] > 0.6
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_initial"]


def test_heron_variant_learns_the_hierarchy(tmp_path):
    summary = reward_model.run(tiny_config("reward", 60, heron_config), str(tmp_path))
    assert summary["loss"] == "heron"
    assert 0.5 < summary["train_labelled_fraction"] <= 1.0
    # ~220 labelled held-out pairs: chance is 0.5 ± 0.034, so 0.56 is ~1.8 standard errors
    # above it (the first level, harmlessness, asks the model to find harm markers).
    assert summary["heldout_accuracy"] > 0.56
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_initial"]
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]


def test_binary_feedback_variant_orders_replies_like_the_gold_reward(tmp_path):
    summary = reward_model.run(tiny_config("reward", 60, binary_feedback_config), str(tmp_path))
    assert summary["loss"] == "binary_feedback"
    # σ((r − 6)/τ) on these replies: about 15% positives.
    assert 0.05 < summary["train_positive_rate"] < 0.3
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]
    # Trained on single bits only, the P[Love] score orders ~250 held-out pairs like the
    # gold reward: 0.58 is 2.5 standard errors above chance (0.5 ± 0.032).
    assert summary["heldout_gold_agreement"] > 0.58


def test_variant_settings_are_checked(tmp_path):
    config = tiny_config("reward", 1, heron_config)
    config.heron.factors = "harmlessness,wit"
    with pytest.raises(ConfigError, match=r"unknown factors \['wit'\]"):
        reward_model.run(config, str(tmp_path))
    config = tiny_config("reward", 1, reward_strength_config)
    with pytest.raises(ConfigError, match=r"config\.strength\.ensemble must name"):
        reward_model.run(config, str(tmp_path))


def test_swap_pairs_exchanges_the_flipped_rows_only():
    arrays = {
        "chosen_input_ids": np.array([[1, 1], [2, 2]]),
        "rejected_input_ids": np.array([[3, 3], [4, 4]]),
        "chosen_reward": np.array([1.0, 2.0]),
        "rejected_reward": np.array([3.0, 4.0]),
    }
    swapped = reward_model.swap_pairs(arrays, np.array([False, True]))
    np.testing.assert_array_equal(swapped["chosen_input_ids"], [[1, 1], [4, 4]])
    np.testing.assert_array_equal(swapped["rejected_input_ids"], [[3, 3], [2, 2]])
    np.testing.assert_array_equal(swapped["chosen_reward"], [1.0, 4.0])
    np.testing.assert_array_equal(swapped["rejected_reward"], [3.0, 2.0])


def test_contrastive_variant_learns_with_two_dropout_views(tmp_path):
    config = tiny_config("reward", 40, reward_contrastive_config)
    summary = reward_model.run(config, str(tmp_path))
    assert summary["loss"] == "bradley_terry"
    # InfoNCE over a batch of 16 pairs: matching each difference representation to a
    # random candidate costs log 16 ≈ 2.77 with accuracy 1/16. The second dropout view
    # of the same pair must be found far more often than that.
    assert summary["train_contrastive_loss"] < np.log(config.batch_size)
    assert summary["train_contrastive_accuracy"] > 0.5
    # Held-out pairs, scored without dropout: 3 standard errors above chance (as above).
    assert summary["heldout_accuracy"] > 0.6
    assert summary["heldout_accuracy"] > summary["heldout_accuracy_initial"]


def test_contrastive_settings_are_checked(tmp_path):
    config = tiny_config("reward", 1, reward_contrastive_config)
    config.dropout_rate = 0.0
    with pytest.raises(ConfigError, match=r"needs config\.dropout_rate > 0"):
        reward_model.run(config, str(tmp_path))
    config = tiny_config("reward", 1, heron_config)
    config.update(contrastive_weight=0.1, dropout_rate=0.1)
    with pytest.raises(ConfigError, match=r"not 'heron'"):
        reward_model.run(config, str(tmp_path))
    config.update(contrastive_weight=0.0, dropout_rate=1.0)
    with pytest.raises(ConfigError, match=r"config\.dropout_rate"):
        reward_model.run(config, str(tmp_path))
