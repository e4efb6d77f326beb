import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import reward_model  # noqa: E402
from experiments.configs import reward_model as reward_model_config  # noqa: E402


def tiny_config(model_kind, num_steps):
    config = reward_model_config.get_config()
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


def test_tiny_reward_model_beats_chance_on_heldout_pairs(tmp_path):
    summary = reward_model.run(tiny_config("reward", 60), str(tmp_path))
    # 256 held-out pairs: a chance-level model has accuracy 0.5 ± 0.031 (one standard
    # error), so 0.6 is more than three standard errors above chance. The labels are noisy:
    # no model can beat the Bayes-optimal accuracy by more than sampling error.
    assert summary["heldout_accuracy"] > 0.6
    assert summary["heldout_accuracy"] < summary["bayes_optimal_accuracy"] + 0.1
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]
    assert (tmp_path / "scorer").exists()


def test_tiny_cost_model_learns_the_safety_labels(tmp_path):
    summary = reward_model.run(tiny_config("cost", 40), str(tmp_path))
    assert summary["loss"] == "cost"
    assert summary["heldout_loss"] < summary["heldout_loss_initial"]
    # The sign term makes the cost positive on unsafe and negative on safe responses.
    assert summary["heldout_sign_accuracy"] > 0.6
