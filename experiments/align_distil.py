"""AlignDistil on the embedded task: distil an SFT policy toward a DPO-built teacher.

The policy and the frozen reference start from an SFT run (``--config.init_from``); the
DPO model is a DPO-family run from that SFT policy (``--config.dpo_from``) and the reverse
DPO model a DPO run on flipped preferences (``--config.reverse_dpo_from``, from
``experiments/dpo.py --config.flip_preferences=True``). Every step samples one reply per
training prompt from the current policy and takes one step of the token-level
distillation (Zhang et al., 2025) toward the teacher ``config.teacher``:

- ``"dpo"``: ``π_T ∝ π_ref^{1−c} π_dpo^c``;
- ``"contrastive"``: ``softmax(z_a + c (z_dpo − z_rdpo))`` with the anchor ``z_a`` the DPO
  model (``anchor="dpo"``) or the reference (``anchor="reference"``);

with ``c = coefficient`` (β_dpo/β), or with ``adaptive=True`` the per-token
``c_t = adaptive_scale · ‖π_dpo − π_rdpo‖₁ + 10⁻³`` with each token's KL weighted by ``1/c_t``.
Every ``eval_every``
steps the policy answers held-out prompts, scored by the gold reward, cost, harm rate
and the KL to the reference.

``python experiments/align_distil.py --config=experiments/configs/align_distil.py
--workdir=runs/align_distil --config.init_from=runs/sft --config.dpo_from=runs/dpo
--config.reverse_dpo_from=runs/reverse_dpo --config.teacher=contrastive
--config.adaptive=True``
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import ml_collections

from experiments import common
from experiments import ppo as rl
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps.align_distil import (
    ANCHORS,
    TEACHERS,
    AlignDistilConfig,
    init_align_distil_extra,
    make_align_distil_step,
)
from rlhf_jax.train.steps.common import split_model

SCHEMA = {
    **{k: v for k, v in rl.ROLLOUT_SCHEMA.items() if k != "reward_from"},
    "dpo_from": Field(str),
    "reverse_dpo_from": Field(str),
    "coefficient": Field(float, minimum=0.0),
    "direction": Field(str, choices=("reverse", "forward")),
    "teacher": Field(str, choices=TEACHERS),
    "anchor": Field(str, choices=ANCHORS),
    "adaptive": Field(bool),
    "adaptive_scale": Field(float, minimum=1e-12),
}


def validate(config: ml_collections.ConfigDict) -> None:
    """The schema, and the runs the chosen teacher reads."""
    rl.validate_rollout(config, SCHEMA)
    if not config.dpo_from:
        raise ConfigError("config.dpo_from must name the workdir of a DPO run")
    if (config.teacher == "contrastive" or config.adaptive) and not config.reverse_dpo_from:
        raise ConfigError(
            f"config.reverse_dpo_from must name the workdir of a reverse DPO run "
            f"(experiments/dpo.py with flip_preferences=True) when config.teacher="
            f"{config.teacher!r} and config.adaptive={config.adaptive}"
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Distil the policy toward the teacher, evaluate along the way, export; returns the summary."""
    validate(config)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    dpo_params = common.import_params(config.dpo_from, "policy", params)
    distil_config = AlignDistilConfig(
        sampling=rl.sampling_config(config, tokenizer),
        coefficient=config.coefficient,
        direction=config.direction,
        teacher=config.teacher,
        anchor=config.anchor,
        adaptive=config.adaptive,
        adaptive_scale=config.adaptive_scale,
    )
    reverse_dpo_params = (
        common.import_params(config.reverse_dpo_from, "policy", params)
        if distil_config.needs_reverse_dpo
        else None
    )
    extra = init_align_distil_extra(
        reference_params=rl.copy_tree(params),
        dpo_params=dpo_params,
        reverse_dpo_params=reverse_dpo_params,
    )
    tx = common.build_optimizer(config)
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    evaluate = rl.make_evaluator(config, tokenizer, task, graphdef, {}, reference_params=params)
    state, run_summary, history, evaluations = rl.train_with_evaluations(
        make_align_distil_step(graphdef, tx, distil_config),
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params,
    )
    common.export_params(workdir, "policy", state.params, architecture)
    keys = ("loss", "teacher_agreement", "response_length")
    summary = {
        "teacher": config.teacher,
        "adaptive": config.adaptive,
        "coefficient": config.coefficient,
        "direction": config.direction,
    }
    if config.adaptive:
        keys += ("coefficient",)
        summary["coefficient_mean"] = sum(h["coefficient"] for h in history) / len(history)
    summary.update(rl.training_summary(run_summary, history, evaluations, keys))
    return common.finish(workdir, "AlignDistil", summary)


if __name__ == "__main__":
    common.main(run)
