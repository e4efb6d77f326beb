"""The report renders from synthetic metrics files: Markdown content and valid PNG plots."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.train import report
from rlhf_jax.train.evaluation import PolicyEvaluation, science_checks
from rlhf_jax.train.metrics import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ("sft", "ppo", "nash_md", "safe_rlhf")


def evaluation(name, reward, harm, kl):
    return PolicyEvaluation(
        name=name,
        gold_reward=reward,
        gold_reward_stderr=0.05,
        gold_cost=2 * harm,
        harm_rate=harm,
        kl_to_reference=kl,
        win_rate=0.5 + 0.1 * kl,
        response_length=40.0,
        num_samples=200,
        proxy_scores={"rm_score": reward + 1.0},
        examples=(("How do I make pancakes?", f"{name} says: mix 2 cups of flour."),),
    )


EVALUATIONS = [
    evaluation("sft", 2.0, 0.3, 0.0),
    evaluation("ppo", 3.0, 0.5, 4.0),
    evaluation("nash_md", 2.5, 0.35, 2.0),
    evaluation("safe_rlhf", 2.6, 0.1, 3.0),
]


def write_metrics(directory, records):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return read_jsonl(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    steps = np.arange(1, 21)
    stage_metrics = {
        "sft": write_metrics(
            root / "sft", [{"step": int(s), "loss": 3.0 / s, "grad_norm": 1.0} for s in steps]
        ),
        "ppo": write_metrics(
            root / "ppo",
            [{"step": int(s), "loss": 0.1, "reward_score": 0.1 * s, "kl": 0.2 * s} for s in steps],
        ),
        # NaN metrics (a skipped step) are written by Python's json and must not break plots.
        "safe_rlhf": write_metrics(
            root / "safe_rlhf",
            [
                {"step": int(s), "loss": float("nan") if s == 3 else 1.0, "lambda": 0.1 * s}
                for s in steps
            ],
        ),
    }
    overoptimisation = [
        {
            "step": 10 * i,
            "kl": 0.5 * i,
            "reward_score": 0.3 * i,
            "gold_reward": 2.0 + 0.2 * i - 0.05 * i**2,
        }
        for i in range(6)
    ]
    checks = science_checks({e.name: e for e in EVALUATIONS})
    files = report.write_report(
        root,
        evaluations=EVALUATIONS,
        checks=checks,
        stage_metrics=stage_metrics,
        overoptimisation_records=overoptimisation,
        reward_model_accuracy=0.71,
        bayes_optimal_accuracy=0.78,
        stage_summaries={"reward_model": {"heldout_accuracy": 0.71, "samples": [1, 2]}},
        notes=["Total wall time: 5.0 min."],
    )
    with open(files.report) as f:
        return files, f.read(), checks


def test_every_plot_is_a_png_in_the_workdir(written):
    files, _, _ = written
    for path in (files.frontier, files.training_curves, files.overoptimisation):
        assert path is not None and os.path.dirname(path) == os.path.dirname(files.report)
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert os.path.getsize(path) > 5_000  # a drawn figure, not an empty canvas


def test_markdown_holds_every_method_check_and_the_accuracies(written):
    _, text, checks = written
    for name in METHODS:
        assert f"| {name} |" in text  # a table row
        assert f"**{name}**" in text  # its sample responses
    for check in checks:
        assert f"- {check.line()}" in text
    assert text.count("✓") == 3  # the synthetic numbers satisfy all three claims
    assert "Reward model held-out accuracy: **0.710**" in text
    assert "Bayes-optimal accuracy of the task's labels on the same pairs: **0.780**" in text
    for image in (report.FRONTIER_PLOT, report.CURVES_PLOT, report.OVEROPTIMISATION_PLOT):
        assert f"]({image})" in text  # relative links: the report travels with its plots
    assert "heldout_accuracy = 0.71" in text and "samples =" not in text
    assert "Total wall time: 5.0 min." in text


def test_curve_keys_prefer_the_loss_and_skip_bookkeeping():
    records = [
        {"step": 1, "grad_norm": 1.0, "nonfinite": False, "kl": 0.1, "loss": 1.0, "lambda": 2.0},
        {"step": 2, "accuracy": 0.6, "learning_rate": 1e-3, "text": "x"},
    ]
    assert report.curve_keys(records) == ["loss", "accuracy", "kl", "lambda"]
    assert report.curve_keys(records, max_keys=2) == ["loss", "accuracy"]


def test_plots_without_data_are_reported_not_drawn(tmp_path):
    assert report.plot_overoptimisation([{"kl": 1.0}], str(tmp_path / "o.png")) is None
    assert report.plot_training_curves({"sft": [{"step": 1}]}, str(tmp_path / "c.png")) is None
    files = report.write_report(tmp_path, evaluations=EVALUATIONS[:1], checks=[], stage_metrics={})
    assert files.overoptimisation is None and files.training_curves is None
    assert not os.path.exists(tmp_path / report.OVEROPTIMISATION_PLOT)
    with open(files.report) as f:
        text = f.read()
    assert "- Over-optimisation during PPO: no data." in text
    assert "| sft |" in text
