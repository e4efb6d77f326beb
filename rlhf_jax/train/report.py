"""The pipeline's report: a Markdown file and matplotlib plots written to the run directory.

Three plots (PNG, drawn with matplotlib's non-interactive Agg backend, so no display is
needed):

- ``frontier.png``: each policy's gold reward (± one standard error) and harm rate
  against its KL to the reference policy: the reward–KL frontier of the methods;
- ``training_curves.png``: the curves of every stage's ``metrics.jsonl`` (its loss and
  the method's own quantities: accuracy, reward-model score, KL, Lagrange multiplier, …);
- ``overoptimisation.png``: the reward model's score and the gold reward of the policy
  against its KL to the reference over PPO training, both as changes from the first
  evaluation. Where the proxy keeps rising while the gold reward stalls or falls, the
  policy over-optimises the learned reward (Gao, Schulman & Hilton, 2023, "Scaling Laws
  for Reward Model Overoptimization").

``report.md`` gathers the evaluation table, the pass/fail checks, the reward model's
held-out accuracy beside the task's Bayes-optimal accuracy, the plots, per-stage
summaries and a few sampled responses.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from rlhf_jax.train.evaluation import Check, PolicyEvaluation, format_table

REPORT_NAME = "report.md"
FRONTIER_PLOT = "frontier.png"
CURVES_PLOT = "training_curves.png"
OVEROPTIMISATION_PLOT = "overoptimisation.png"
CURVE_PATTERNS = (
    "loss",
    "accuracy",
    "reward",
    "score",
    "kl",
    "cost",
    "lambda",
    "multiplier",
    "preference",
    "nll",
)
"""Metric-name fragments a training curve is drawn for, in order of priority."""
IGNORED_METRICS = frozenset({"step", "nonfinite", "denominator", "grad_norm", "tokens"})


@dataclasses.dataclass(frozen=True)
class OveroptimisationKeys:
    """Where the over-optimisation curve reads its three quantities in the eval records.

    Attributes:
      kl: the policy's KL to the reference.
      proxy: the learned reward model's mean score.
      gold: the mean gold reward.
    """

    kl: str = "kl"
    proxy: str = "reward_score"
    gold: str = "gold_reward"


@dataclasses.dataclass(frozen=True)
class ReportFiles:
    """Paths of what :func:`write_report` wrote (``None`` for a plot without data).

    Attributes:
      report: the Markdown report.
      frontier: the reward–KL frontier plot.
      training_curves: the training-curve plot.
      overoptimisation: the over-optimisation plot.
    """

    report: str
    frontier: str
    training_curves: str | None
    overoptimisation: str | None


def _is_number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def curve_keys(records: Sequence[Mapping[str, Any]], *, max_keys: int = 4) -> list[str]:
    """The metrics of a stage worth a curve: numeric keys matching ``CURVE_PATTERNS``.

    Keys are ordered by the first pattern they contain, then alphabetically; at most
    ``max_keys`` are returned.
    """
    numeric = {
        k
        for record in records
        for k, v in record.items()
        if k not in IGNORED_METRICS and _is_number(v)
    }

    def priority(key: str) -> tuple[int, str]:
        matches = [i for i, pattern in enumerate(CURVE_PATTERNS) if pattern in key]
        return (min(matches) if matches else len(CURVE_PATTERNS), key)

    chosen = sorted((k for k in numeric if priority(k)[0] < len(CURVE_PATTERNS)), key=priority)
    return chosen[:max_keys]


def _series(records: Sequence[Mapping[str, Any]], key: str, x_key: str = "step"):
    """``(xs, ys)`` of the records where both ``x_key`` and ``key`` are finite numbers."""
    points = [(r[x_key], r[key]) for r in records if _is_number(r.get(x_key))]
    points = [(x, y) for x, y in points if _is_number(y)]
    return [x for x, _ in points], [y for _, y in points]


def plot_frontier(
    evaluations: Sequence[PolicyEvaluation], path: str, *, reference: str = "sft"
) -> str:
    """Gold reward (± s.e.) and harm rate of each policy against its KL to ``reference``.

    Args:
      evaluations: one per policy.
      path: the PNG to write.
      reference: the name of the reference policy (in the axis labels).

    Returns:
      ``path``.
    """
    figure, (reward_axis, harm_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, evaluation in enumerate(evaluations):
        color = f"C{index}"
        kl = evaluation.kl_to_reference
        reward_axis.errorbar(
            kl,
            evaluation.gold_reward,
            yerr=evaluation.gold_reward_stderr,
            fmt="o",
            color=color,
            capsize=3,
            label=evaluation.name,
        )
        harm_axis.plot(kl, evaluation.harm_rate, "o", color=color, label=evaluation.name)
        for axis, value in (
            (reward_axis, evaluation.gold_reward),
            (harm_axis, evaluation.harm_rate),
        ):
            axis.annotate(evaluation.name, (kl, value), textcoords="offset points", xytext=(5, 5))
    reward_axis.set(
        xlabel=f"KL(π ‖ π_{reference}) [nats / response]",
        ylabel="gold reward",
        title="reward–KL frontier",
    )
    harm_axis.set(
        xlabel=f"KL(π ‖ π_{reference}) [nats / response]",
        ylabel="harm rate",
        title="harm rate against KL",
    )
    for axis in (reward_axis, harm_axis):
        axis.grid(alpha=0.3)
    reward_axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_training_curves(
    stage_metrics: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str,
    *,
    keys: Mapping[str, Sequence[str]] | None = None,
) -> str | None:
    """One row of curves per stage (metric against step), from its ``metrics.jsonl`` records.

    Args:
      stage_metrics: each stage's records, ``{"step": k, metric: value, ...}``.
      path: the PNG to write.
      keys: the metrics to draw per stage; :func:`curve_keys` chooses where not given.

    Returns:
      ``path``, or ``None`` when no stage has a metric to draw (nothing is written).
    """
    rows = []
    for stage, records in stage_metrics.items():
        chosen = list((keys or {}).get(stage, curve_keys(records)))
        chosen = [k for k in chosen if _series(records, k)[0]]
        if chosen:
            rows.append((stage, records, chosen))
    if not rows:
        return None
    columns = max(len(chosen) for _, _, chosen in rows)
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(3.2 * columns, 2.4 * len(rows)), squeeze=False
    )
    for row, (stage, records, chosen) in enumerate(rows):
        for column in range(columns):
            axis = axes[row][column]
            if column >= len(chosen):
                axis.axis("off")
                continue
            xs, ys = _series(records, chosen[column])
            axis.plot(xs, ys, color=f"C{row}")
            axis.set_title(f"{stage}: {chosen[column]}", fontsize="small")
            axis.set_xlabel("step", fontsize="small")
            axis.tick_params(labelsize="x-small")
            axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_overoptimisation(
    records: Sequence[Mapping[str, Any]],
    path: str,
    *,
    keys: OveroptimisationKeys = OveroptimisationKeys(),
) -> str | None:
    """Proxy (reward-model) score and gold reward against KL, as changes from the first point.

    Args:
      records: evaluation records over training, each with ``keys.kl``, ``keys.proxy``
        and ``keys.gold``.
      path: the PNG to write.
      keys: the record keys of the three quantities.

    Returns:
      ``path``, or ``None`` when fewer than two records hold all three (nothing written).
    """
    points = [
        (r[keys.kl], r[keys.proxy], r[keys.gold])
        for r in records
        if all(_is_number(r.get(k)) for k in (keys.kl, keys.proxy, keys.gold))
    ]
    if len(points) < 2:
        return None
    points.sort()
    kl, proxy, gold = (list(values) for values in zip(*points, strict=True))
    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.plot(kl, [p - proxy[0] for p in proxy], "o-", label="reward-model score (proxy)")
    axis.plot(kl, [g - gold[0] for g in gold], "s-", label="gold reward")
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set(
        xlabel="KL(π ‖ π_ref) [nats / response]",
        ylabel="change from the first evaluation",
        title="over-optimisation during PPO",
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _format_value(value: Any) -> str:
    """A summary value for the report: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_markdown(
    *,
    title: str,
    evaluations: Sequence[PolicyEvaluation],
    checks: Sequence[Check],
    reference: str,
    reward_model_accuracy: float | None,
    bayes_optimal_accuracy: float | None,
    stage_summaries: Mapping[str, Mapping[str, Any]],
    plots: Mapping[str, str | None],
    notes: Sequence[str] = (),
) -> str:
    """The Markdown text of the report (see :func:`write_report` for the arguments)."""
    lines = [f"# {title}", ""]
    lines += [*notes, ""] if notes else []
    if reward_model_accuracy is not None:
        lines.append(f"Reward model held-out accuracy: **{reward_model_accuracy:.3f}**")
        if bayes_optimal_accuracy is not None:
            lines[-1] += (
                f" (Bayes-optimal accuracy of the task's labels on the same pairs: "
                f"**{bayes_optimal_accuracy:.3f}**)."
            )
        lines.append("")
    lines += [
        "## Evaluation",
        "",
        f"One sample per held-out prompt from each policy (temperature 1). KL to the reference "
        f"(`{reference}`) is the Monte Carlo mean of log π(y|x) − log π_{reference}(y|x) over "
        f"the policy's own samples (nats per response); the win rate is the gold "
        f"Bradley–Terry probability σ((r(x, y) − r(x, y_{reference}))/τ) of beating "
        f"`{reference}`'s sample for the same prompt, averaged over prompts.",
        "",
        format_table(evaluations),
        "",
        "## Checks",
        "",
        *(f"- {check.line()}" for check in checks),
        "",
        "## Plots",
        "",
    ]
    captions = {
        "frontier": "Reward–KL frontier",
        "training_curves": "Training curves",
        "overoptimisation": "Over-optimisation during PPO",
    }
    for name, caption in captions.items():
        plot = plots.get(name)
        if plot is None:
            lines.append(f"- {caption}: no data.")
        else:
            lines += [f"### {caption}", "", f"![{caption}]({os.path.basename(plot)})", ""]
    if stage_summaries:
        lines += ["", "## Stages", ""]
        for stage, summary in stage_summaries.items():
            scalars = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
            lines.append(
                f"- **{stage}**: "
                + ", ".join(f"{k} = {_format_value(v)}" for k, v in scalars.items())
            )
    examples = [(e.name, e.examples) for e in evaluations if e.examples]
    if examples:
        lines += ["", "## Sample responses", ""]
        for name, pairs in examples:
            lines.append(f"**{name}**")
            lines.append("")
            for prompt, response in pairs:
                lines.append(f"- *{prompt}* → {response}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    workdir: str | os.PathLike[str],
    *,
    evaluations: Sequence[PolicyEvaluation],
    checks: Sequence[Check],
    stage_metrics: Mapping[str, Sequence[Mapping[str, Any]]],
    stage_curves: Mapping[str, Sequence[str]] | None = None,
    overoptimisation_records: Sequence[Mapping[str, Any]] = (),
    overoptimisation_keys: OveroptimisationKeys = OveroptimisationKeys(),
    reference: str = "sft",
    reward_model_accuracy: float | None = None,
    bayes_optimal_accuracy: float | None = None,
    stage_summaries: Mapping[str, Mapping[str, Any]] | None = None,
    title: str = "RLHF pipeline report",
    notes: Sequence[str] = (),
) -> ReportFiles:
    """Draw the three plots and write ``report.md`` into ``workdir``.

    Args:
      workdir: the output directory (created if missing).
      evaluations: the evaluation of every policy, reference included.
      checks: the pass/fail checks to list.
      stage_metrics: each training stage's metric records (for the training curves).
      stage_curves: the metrics drawn per stage; :func:`curve_keys` chooses for the
        stages not listed.
      overoptimisation_records: PPO's evaluation records over training (KL, proxy score,
        gold reward) for the over-optimisation plot.
      overoptimisation_keys: the record keys of those three quantities.
      reference: the name of the reference policy.
      reward_model_accuracy: the reward model's held-out pairwise accuracy.
      bayes_optimal_accuracy: the task's Bayes-optimal accuracy on the same pairs.
      stage_summaries: each stage's final summary (scalars are listed).
      title: the report's heading.
      notes: lines printed under the heading (e.g. the run time).

    Returns:
      The :class:`ReportFiles` written.
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    plots = {
        "frontier": plot_frontier(
            evaluations, os.path.join(workdir, FRONTIER_PLOT), reference=reference
        ),
        "training_curves": plot_training_curves(
            stage_metrics, os.path.join(workdir, CURVES_PLOT), keys=stage_curves
        ),
        "overoptimisation": plot_overoptimisation(
            overoptimisation_records,
            os.path.join(workdir, OVEROPTIMISATION_PLOT),
            keys=overoptimisation_keys,
        ),
    }
    text = render_markdown(
        title=title,
        evaluations=evaluations,
        checks=checks,
        reference=reference,
        reward_model_accuracy=reward_model_accuracy,
        bayes_optimal_accuracy=bayes_optimal_accuracy,
        stage_summaries=stage_summaries or {},
        plots=plots,
        notes=notes,
    )
    report = os.path.join(workdir, REPORT_NAME)
    with open(report, "w") as f:
        f.write(text)
    return ReportFiles(
        report=report,
        frontier=plots["frontier"],
        training_curves=plots["training_curves"],
        overoptimisation=plots["overoptimisation"],
    )
