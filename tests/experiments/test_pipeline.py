"""The whole pipeline on the tiny config: every stage runs, the report holds every method.

This checks the wiring (stages chained through their workdirs, evaluation, report,
skipping finished stages), not the science: the tiny models are far too small for that.
"""

import importlib.util
import json
import os
import pathlib

import pytest

from rlhf_jax.train import report

ROOT = pathlib.Path(__file__).resolve().parents[2]
METHODS = ("sft", "ppo", "nash_md", "safe_rlhf")


def load(relative):
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_"), ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    pipeline = load("experiments/pipeline.py")
    config = load("experiments/configs/pipeline.py").get_config("tiny")
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    return pipeline, config, workdir, pipeline.run(config, workdir)


def test_every_stage_ran_in_its_own_workdir(finished):
    _, config, workdir, _ = finished
    for stage in config.stages:
        assert os.path.exists(os.path.join(workdir, stage, "summary.json")), stage
        assert os.path.exists(os.path.join(workdir, stage, "metrics.jsonl")), stage


def test_report_table_and_plots_hold_every_method(finished, capsys):
    _, _, workdir, results = finished
    assert [e["name"] for e in results["evaluations"]] == list(METHODS)
    with open(os.path.join(workdir, report.REPORT_NAME)) as f:
        text = f.read()
    for method in METHODS:
        assert f"| {method} |" in text
    for check in results["checks"]:
        assert check["claim"] in text
    assert len(results["checks"]) == 3
    assert "Reward model held-out accuracy" in text and "Bayes-optimal" in text
    for plot in (report.FRONTIER_PLOT, report.CURVES_PLOT, report.OVEROPTIMISATION_PLOT):
        with open(os.path.join(workdir, plot), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["checks"] == results["checks"]
    sft = results["evaluations"][0]
    assert sft["kl_to_reference"] == 0.0 and sft["win_rate"] == 0.5  # the reference itself


def test_running_again_skips_the_finished_stages(finished, capsys):
    pipeline, config, workdir, _ = finished
    config = config.copy_and_resolve_references()
    config.evaluation.num_prompts = 2  # only the evaluation runs again: keep it short
    second = pipeline.run(config, workdir)
    printed = capsys.readouterr().out
    for stage in config.stages:
        assert f"== {stage}: finished before, skipped ==" in printed
    assert [e["name"] for e in second["evaluations"]] == list(METHODS)
    assert second["evaluations"][0]["num_samples"] == 2


def test_overoptimisation_points_are_the_heldout_evaluations():
    pipeline = load("experiments/pipeline.py")
    summary = {
        "evaluations": [
            {"step": 0, "eval_kl": 0.0, "eval_reward_score": 0.1, "eval_gold_reward": 2.0},
            {"step": 20, "eval_kl": 3.5, "eval_reward_score": 0.9, "eval_gold_reward": 2.4},
        ]
    }
    assert pipeline.overoptimisation_records(summary) == [
        {"step": 0, "kl": 0.0, "reward_score": 0.1, "gold_reward": 2.0},
        {"step": 20, "kl": 3.5, "reward_score": 0.9, "gold_reward": 2.4},
    ]
    assert pipeline.overoptimisation_records({}) == []
