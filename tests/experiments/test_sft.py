import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import sft  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402


def tiny_config():
    config = sft_config.get_config()
    config.task.update(
        num_train_prompts=60,
        num_heldout_prompts=20,
        num_sft=128,
        num_sft_heldout=32,
        num_preference_pairs=8,
        num_preference_heldout=8,
    )
    config.model.update(
        hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64
    )
    config.max_length = 96
    config.batch_size = 8
    config.eval_batch_size = 32
    config.num_steps = 30
    config.log_every = 10
    config.checkpoint_every = 15
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    config.prompt_length = 48
    config.num_samples = 2
    config.sample_max_new_tokens = 16
    return config


def test_tiny_sft_run_learns_and_writes_its_outputs(tmp_path):
    summary = sft.run(tiny_config(), str(tmp_path))
    # A fresh byte model starts near log(262) = 5.57 nats per token; the chat text is
    # templated enough that 30 steps of a tiny model remove well over a nat.
    assert summary["heldout_nll_initial"] > 5.0
    assert summary["heldout_nll"] < summary["heldout_nll_initial"] - 1.0
    assert summary["train_loss_last"] < summary["train_loss_first"] - 1.0
    assert len(summary["samples"]) == 2
    assert all(isinstance(s["reply"], str) for s in summary["samples"])
    for name in ("checkpoints", "policy", "metrics.jsonl", "model.json", "summary.json"):
        assert (tmp_path / name).exists(), name


def test_command_line_rejects_a_bad_key_by_name(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "sft.py"),
            f"--config={ROOT / 'experiments' / 'configs' / 'sft.py'}",
            "--config.model.hidden_size=-3",
            f"--workdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=120,
    )
    assert result.returncode != 0
    assert "config.model.hidden_size: got -3" in result.stderr


def test_in_process_config_errors_name_the_key(tmp_path):
    config = tiny_config()
    config.normalisation = "tokens"
    with pytest.raises(ValueError, match=r"config\.normalisation"):
        sft.run(config, str(tmp_path))
