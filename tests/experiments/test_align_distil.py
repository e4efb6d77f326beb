import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # experiments/ is a directory of scripts, not an installed package

from experiments import align_distil, sft  # noqa: E402
from experiments.configs import align_distil as align_distil_config  # noqa: E402
from experiments.configs import sft as sft_config  # noqa: E402
from rlhf_jax.train.config import ConfigError  # noqa: E402

TASK = dict(num_train_prompts=64, num_heldout_prompts=8, num_sft=64, num_sft_heldout=8)
MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_hidden_size=64)


def shrink(config, num_steps):
    config.task.update(TASK)
    config.model.update(MODEL)
    config.max_length = 96
    config.batch_size = 16
    config.eval_batch_size = 8
    config.num_steps = config.checkpoint_every = num_steps
    config.log_every = 4
    config.optimizer.update(learning_rate=1e-2, warmup_steps=0)
    return config


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """A short SFT run (reference and start) and a longer run from it (the teacher's DPO side).

    The step treats the second policy exactly as it treats a DPO run's: as π_dpo.
    """
    workdirs = []
    for steps in (2, 8):
        workdir = str(tmp_path_factory.mktemp("policy"))
        config = shrink(sft_config.get_config(), steps)
        config.num_samples = 0
        config.init_from = workdirs[0] if workdirs else ""
        sft.run(config, workdir)
        workdirs.append(workdir)
    return workdirs


def distil_config(policies, num_steps):
    config = shrink(align_distil_config.get_config(), num_steps)
    config.init_from, config.dpo_from = policies
    config.coefficient = 1.0  # the teacher is π_dpo itself
    config.prompt_length = 48
    config.max_new_tokens = 24
    config.num_eval_prompts = 8
    config.eval_every = num_steps
    config.optimizer.learning_rate = 3e-3
    return config


def test_align_distil_pulls_the_policy_onto_the_teacher(tmp_path, policies):
    summary = align_distil.run(distil_config(policies, 12), str(tmp_path))
    # The per-token KL(π_θ ‖ π_T) on the policy's own replies falls and the student's
    # argmax agrees with the teacher's more often.
    assert summary["loss_last"] < 0.5 * summary["loss_first"]
    assert summary["teacher_agreement_last"] > summary["teacher_agreement_first"]
    assert 0.0 <= summary["eval_harm_rate"] <= 1.0


def test_align_distil_needs_a_dpo_run(tmp_path, policies):
    config = distil_config(policies, 1)
    config.dpo_from = ""
    with pytest.raises(ConfigError, match=r"config\.dpo_from must name"):
        align_distil.run(config, str(tmp_path))


@pytest.mark.parametrize("teacher, adaptive", [("contrastive", False), ("dpo", True)])
def test_a_teacher_that_reads_the_reverse_dpo_model_needs_its_run(
    tmp_path, policies, teacher, adaptive
):
    config = distil_config(policies, 1)
    config.teacher, config.adaptive = teacher, adaptive
    with pytest.raises(ConfigError, match=r"config\.reverse_dpo_from must name"):
        align_distil.run(config, str(tmp_path))
    config.teacher = "contrastiv"
    with pytest.raises(ConfigError, match=r"config\.teacher"):
        align_distil.run(config, str(tmp_path))


def test_contrastive_adaptive_run_reports_the_mean_coefficient(tmp_path, policies):
    config = distil_config(policies, 4)
    # The start policy stands in for the reverse DPO run: the step treats it as π_rdpo.
    config.reverse_dpo_from = policies[0]
    config.teacher, config.adaptive = "contrastive", True
    config.adaptive_scale = 0.5
    summary = align_distil.run(config, str(tmp_path))
    assert summary["teacher"] == "contrastive" and summary["adaptive"] is True
    # c_t = κ‖π_dpo − π_rdpo‖₁ + 10⁻³ lies in [10⁻³, 2κ + 10⁻³] token by token, so does its mean.
    assert 1e-3 <= summary["coefficient_mean"] <= 1.0 + 1e-3
    assert math.isfinite(summary["eval_kl"])  # the evaluation measures the KL to the reference
