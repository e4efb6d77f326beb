"""The whole RLHF pipeline on the embedded task, from SFT to a report with pass/fail checks.

Stages, each the ``run(config, workdir)`` of its own experiment with the matching section
of ``experiments/configs/pipeline.py``, each in ``<workdir>/<stage>``:

1. ``sft``: supervised fine-tuning on the task's demonstrations;
2. ``reward_model`` and ``cost_model``: scalar models on the helpfulness and
   harmlessness preferences, their trunks initialised from the SFT policy;
3. from the same SFT policy (also the frozen reference): ``ppo`` against the reward model
   (Ouyang et al., 2022), ``nash_md`` against the task's non-transitive preference oracle
   (Munos et al., 2023) and ``safe_rlhf``, PPO-Lagrangian with the reward and cost models
   (Dai et al., 2023);

then the evaluation (:mod:`rlhf_jax.train.evaluation`) samples every policy, the SFT
policy included, on held-out prompts and reports gold reward, gold cost, harm rate, KL to
the SFT policy and the gold Bradley–Terry win rate against it, and the report
(:mod:`rlhf_jax.train.report`) writes ``report.md`` and its plots into the workdir.

A stage whose workdir holds its ``summary.json`` finished and is skipped; a stage killed
half-way resumes from its newest checkpoint when the pipeline runs again.

``python experiments/pipeline.py --workdir=runs/pipeline``
(``--config=experiments/configs/pipeline.py:tiny`` for a smoke run).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import tqdm
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from experiments import common, nash_md, ppo, reward_model, safe_rlhf, sft
from rlhf_jax.models import Decoder, ModelConfig, ScalarModel
from rlhf_jax.train import evaluation, report
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl

CONFIG_FILE = pathlib.Path(__file__).resolve().parent / "configs" / "pipeline.py"
RESULTS_FILE = "results.json"
REFERENCE = "sft"
StageRun = Callable[[ml_collections.ConfigDict, str], Mapping[str, Any]]
STAGE_RUNS: dict[str, StageRun] = {
    "sft": sft.run,
    "reward_model": reward_model.run,
    "cost_model": reward_model.run,
    "ppo": ppo.run,
    "nash_md": nash_md.run,
    "safe_rlhf": safe_rlhf.run,
}
"""Each stage's experiment entry point."""
STAGE_INITS: dict[str, dict[str, str]] = {
    "sft": {},
    "reward_model": {"init_from": "sft"},
    "cost_model": {"init_from": "sft"},
    "ppo": {"init_from": "sft", "reward_from": "reward_model"},
    "nash_md": {"init_from": "sft", "reward_from": "reward_model"},
    "safe_rlhf": {"init_from": "sft", "reward_from": "reward_model", "cost_from": "cost_model"},
}
"""Per stage, the config keys that point at an earlier stage's workdir, and that stage."""
STAGE_CURVES: dict[str, tuple[str, ...]] = {
    "sft": ("loss",),
    "reward_model": ("loss", "accuracy"),
    "cost_model": ("loss", "accuracy"),
    "ppo": ("reward_score", "kl", "loss"),
    "nash_md": ("preference", "kl", "loss"),
    "safe_rlhf": ("reward_score", "cost_score", "lambda", "kl"),
}
"""The training curves drawn per stage (metrics of its ``metrics.jsonl``)."""
POLICY_STAGES = ("sft", "ppo", "nash_md", "safe_rlhf")
"""Stages whose exported ``policy`` the evaluation samples (the first is the reference)."""


def stage_config(
    config: ml_collections.ConfigDict, stage: str, workdir: str
) -> ml_collections.ConfigDict:
    """The stage's section with its ``init_from``-like keys pointing at earlier stages."""
    section = ml_collections.ConfigDict(config[stage].to_dict())
    for key, source in STAGE_INITS[stage].items():
        section[key] = os.path.join(workdir, source)
    return section


def run_stage(stage: str, config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run one stage unless it finished before; returns its summary and wall time."""
    stage_dir = os.path.join(workdir, stage)
    summary_path = os.path.join(stage_dir, common.SUMMARY_FILE)
    timing_path = os.path.join(stage_dir, "wall_time.json")
    if os.path.exists(summary_path):
        print(f"== {stage}: finished before, skipped ==")
        with open(summary_path) as f:
            summary = json.load(f)
        timing = {"seconds": None, "cpu_seconds": None}
        if os.path.exists(timing_path):
            with open(timing_path) as f:
                timing |= json.load(f)
        return {"summary": summary, **timing, "skipped": True}
    print(f"== {stage} ==", flush=True)
    start, cpu_start = time.perf_counter(), time.process_time()
    summary = dict(STAGE_RUNS[stage](stage_config(config, stage, workdir), stage_dir))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    with open(timing_path, "w") as f:
        json.dump({"seconds": seconds, "cpu_seconds": cpu_seconds}, f)
    print(f"== {stage}: {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU ==", flush=True)
    return {"summary": summary, "seconds": seconds, "cpu_seconds": cpu_seconds, "skipped": False}


def _architecture(stage_dir: str) -> ModelConfig:
    """The decoder architecture a stage saved in its ``model.json``."""
    with open(os.path.join(stage_dir, common.MODEL_FILE)) as f:
        return ModelConfig(**json.load(f))


def load_policy(stage_dir: str) -> evaluation.Model:
    """The ``(graphdef, params)`` of the decoder a stage exported as ``policy``."""
    graphdef, params = nnx.split(Decoder(_architecture(stage_dir), rngs=nnx.Rngs(0)))
    return graphdef, common.import_params(stage_dir, "policy", params)


def load_scorer(stage_dir: str) -> evaluation.Model:
    """The ``(graphdef, params)`` of the scalar model a stage exported as ``scorer``."""
    graphdef, params = nnx.split(ScalarModel(_architecture(stage_dir), rngs=nnx.Rngs(0)))
    return graphdef, common.import_params(stage_dir, "scorer", params)


def stage_metrics(workdir: str, stages: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """Every stage's training records from its ``metrics.jsonl``."""
    found = {}
    for stage in stages:
        path = os.path.join(workdir, stage, JSONL_NAME)
        if os.path.exists(path):
            found[stage] = read_jsonl(path)
    return found


def overoptimisation_records(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """PPO's held-out evaluations over training: KL to the reference, proxy and gold reward.

    The PPO run evaluates its policy every ``eval_every`` steps on held-out prompts; each
    evaluation samples the replies once and reports, on those same replies, the k1
    estimate of KL(π‖π_SFT) (``eval_kl``), the reward-model score (``eval_reward_score``)
    and the gold reward (``eval_gold_reward``), so the three coordinates of a point are
    measured together.
    """
    return [
        {
            "step": point["step"],
            "kl": point["eval_kl"],
            "reward_score": point.get("eval_reward_score"),
            "gold_reward": point.get("eval_gold_reward"),
        }
        for point in summary.get("evaluations", [])
        if "eval_kl" in point
    ]


def evaluate(
    config: ml_collections.ConfigDict, workdir: str, stages: tuple[str, ...]
) -> list[evaluation.PolicyEvaluation]:
    """Sample and score every policy the stages produced (see :mod:`rlhf_jax.train.evaluation`)."""
    settings = config.evaluation
    task = common.build_task(config.sft)
    tokenizer = common.build_tokenizer(config.sft)
    prompts = [p.text for p in task.heldout_prompts[: settings.num_prompts]]
    policies = {
        stage: load_policy(os.path.join(workdir, stage))
        for stage in POLICY_STAGES
        if stage in stages
    }
    scorers = {
        name: evaluation.scalar_model_scorer(
            load_scorer(os.path.join(workdir, stage)), batch_size=settings.batch_size
        )
        for name, stage in (("rm_score", "reward_model"), ("cm_score", "cost_model"))
        if stage in stages
    }
    bar = tqdm.tqdm(total=2 * len(policies), desc="evaluation", disable=not sys.stderr.isatty())

    def progress(message: str) -> None:
        bar.set_postfix_str(message, refresh=False)
        bar.update(1)

    evaluations = evaluation.evaluate_policies(
        policies,
        prompts,
        tokenizer,
        jax.random.key(settings.seed),
        reference=REFERENCE,
        max_prompt_length=settings.prompt_length,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        temperature=config.sft.task.temperature,
        scorers=scorers,
        progress=progress,
    )
    bar.close()
    return evaluations


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run every stage (or skip the finished ones), evaluate, report; returns the results."""
    stages = tuple(config.stages)
    unknown = [s for s in stages if s not in STAGE_RUNS]
    if unknown:
        raise ValueError(f"config.stages: unknown stages {unknown}; known: {list(STAGE_RUNS)}")
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    stage_results = {stage: run_stage(stage, config, workdir) for stage in stages}
    print("== evaluation ==", flush=True)
    evaluation_start, cpu_start = time.perf_counter(), time.process_time()
    evaluations = evaluate(config, workdir, stages)
    timings = {s: (r["seconds"], r["cpu_seconds"]) for s, r in stage_results.items()}
    timings["evaluation"] = (
        time.perf_counter() - evaluation_start,
        time.process_time() - cpu_start,
    )
    checks = evaluation.science_checks({e.name: e for e in evaluations})
    total = time.perf_counter() - start
    timing = ", ".join(
        f"{s} {wall:.0f} s ({cpu:.0f} s CPU)" if wall is not None else f"{s} (earlier run)"
        for s, (wall, cpu) in timings.items()
    )
    rm_summary = stage_results.get("reward_model", {}).get("summary", {})
    metrics = stage_metrics(workdir, stages)
    files = report.write_report(
        workdir,
        evaluations=evaluations,
        checks=checks,
        stage_metrics=metrics,
        stage_curves=STAGE_CURVES,
        overoptimisation_records=overoptimisation_records(
            stage_results.get("ppo", {}).get("summary", {})
        ),
        reference=REFERENCE,
        reward_model_accuracy=rm_summary.get("heldout_accuracy"),
        bayes_optimal_accuracy=rm_summary.get("bayes_optimal_accuracy"),
        stage_summaries={s: r["summary"] for s, r in stage_results.items()},
        notes=[f"Wall time of this invocation: {total:.0f} s; per stage: {timing}."],
    )
    table = evaluation.format_table(evaluations)
    print(table)
    if rm_summary:
        print(
            f"reward model held-out accuracy {rm_summary['heldout_accuracy']:.3f} "
            f"(Bayes-optimal {rm_summary['bayes_optimal_accuracy']:.3f})"
        )
    for check in checks:
        print(check.line())
    print(f"report: {files.report} (wall time {total:.0f} s: {timing})")
    results = {
        "evaluations": [e.as_dict() for e in evaluations],
        "checks": [{"claim": c.claim, "passed": c.passed, "detail": c.detail} for c in checks],
        "seconds": {s: wall for s, (wall, _) in timings.items()},
        "cpu_seconds": {s: cpu for s, (_, cpu) in timings.items()},
        "total_seconds": total,
    }
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


def main(argv: list[str]) -> None:
    """``--workdir`` (required) and ``--config`` (default: ``configs/pipeline.py``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    if flags.FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    logging.set_verbosity(logging.WARNING)  # keep the console to progress bars and results
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", str(CONFIG_FILE), "The pipeline config file.")
    flags.DEFINE_string("workdir", None, "Directory of the whole pipeline run.")
    app.run(main)
