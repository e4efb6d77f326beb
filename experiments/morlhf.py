"""MORLHF against MODPO: a Pareto front of (gold reward, gold cost) over reward weightings.

Two objectives, helpfulness ``r`` (a reward model, ``--config.reward_from``) and
harmlessness ``−c`` (a Safe-RLHF cost model, ``--config.cost_from``), are combined with
a weight ``w ∈ (0, 1]`` into ``r_w = w·r − (1 − w)·c``. For every ``w`` in
``weightings``, starting from the SFT policy (``--config.init_from``, also the frozen
reference):

- **MORLHF** (the baseline of Zhou et al., 2023): PPO against the scalarised reward
  ``r_w`` (:class:`WeightedScorer`, a scalar model whose score is the weighted sum of the
  two models' scores), with the PPO step of :mod:`rlhf_jax.train.steps.ppo` unchanged and
  a value head on the policy's trunk;
- **MODPO** (Zhou et al., 2023, "Beyond One-Preference-Fits-All Alignment:
  Multi-Objective Direct Preference Optimization", eq. 7): on the helpfulness pairs, with
  the cost model's ``−c`` as the margin reward,
  ``L = −log σ((β h − (1 − w)(c(y_l) − c(y_w))) / w)``, ``h`` the DPO log-ratio
  difference (:func:`rlhf_jax.objectives.modpo.modpo_loss`). The run trains it with the
  DPO step of :mod:`rlhf_jax.train.steps.dpo` unchanged: DPO with ``β' = β / w`` on
  reference log-probs shifted by ``Δ_y = (1 − w)(−c(y)) / β`` is exactly that loss
  (:func:`modpo_reference_shift`), since ``β' ((a_w − Δ_w) − (a_l − Δ_l)) =
  (β h − (1 − w)(c(y_l) − c(y_w))) / w`` with ``a = log π − log π_ref``.

Each policy answers ``num_eval_prompts`` held-out prompts once (sampled at
``temperature``); the gold reward, gold cost and harm rate of its replies, with the reward
and cost models' scores, go into ``results.md`` and ``summary.json``, and ``pareto.png``
plots gold reward against gold cost for both methods (the SFT policy as a reference point).

``python experiments/morlhf.py --config=experiments/configs/morlhf.py --workdir=runs/morlhf
--config.init_from=runs/pipeline/sft --config.reward_from=runs/pipeline/reward_model
--config.cost_from=runs/pipeline/cost_model``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx
from jax import Array

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from experiments import common
from experiments import ppo as rl
from experiments.deal import markdown_table
from rlhf_jax.data import task_batches
from rlhf_jax.models import PolicyWithValueHead, ScalarModel
from rlhf_jax.models.heads import sequence_score
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import (
    initial_dpo_extra,
    make_dpo_step,
    precompute_reference_logps,
    split_model,
)
from rlhf_jax.train.steps.common import make_optimizer
from rlhf_jax.train.steps.ppo import (
    PPOConfig,
    PPOModels,
    init_ppo_extra,
    make_ppo_step,
)

SCHEMA = {
    **rl.ROLLOUT_SCHEMA,
    **rl.PPO_SCHEMA,
    "cost_from": Field(str),
    "weightings": Field(tuple),
    "modpo_beta": Field(float, minimum=1e-6),
    "modpo_num_steps": Field(int, minimum=1),
    "modpo_batch_size": Field(int, minimum=1),
    "modpo_learning_rate": Field(float, minimum=0.0),
}
RESULTS_FILE = "results.md"
PLOT_FILE = "pareto.png"
COLUMNS = (
    ("weight", "w", "{:g}"),
    ("gold_reward", "gold reward", "{:.3f}"),
    ("gold_cost", "gold cost", "{:.3f}"),
    ("harm_rate", "harm rate", "{:.3f}"),
    ("reward_score", "RM score", "{:.3f}"),
    ("cost_score", "CM score", "{:.3f}"),
)


class WeightedScorer(nnx.Module):
    """``w·r − (1 − w)·c`` of a reward and a cost model, per token and per sequence.

    The weight is a (non-trainable) variable of the module's state, so every weighting
    shares one graph definition and one compiled step.

    Args:
      reward: the reward model.
      cost: the cost model.
      weight: ``w``, the helpfulness weight.
    """

    def __init__(self, reward: ScalarModel, cost: ScalarModel, weight: float):
        self.reward = reward
        self.cost = cost
        self.weight = nnx.Variable(jnp.asarray(weight, jnp.float32))

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
    ) -> Array:
        """Per-token ``w·r_t − (1 − w)·c_t`` ``[B, T]``."""
        weight = self.weight[...]
        kwargs = {"positions": positions, "attention_mask": attention_mask}
        return weight * self.reward(tokens, **kwargs) - (1.0 - weight) * self.cost(tokens, **kwargs)

    def score(self, tokens: Array, attention_mask: Array) -> Array:
        """Sequence scores ``[B]`` at each row's last real token."""
        return sequence_score(self(tokens, attention_mask=attention_mask), attention_mask)


def modpo_reference_shift(
    ref_logps: Array, margin_rewards: Array, *, margin_weight: float, beta: float
) -> Array:
    """Reference log-probs under which DPO with ``β / w`` is MODPO's loss.

    ``log π_ref(y) + (margin_weight · r_m(y)) / β``: the DPO margin then subtracts
    ``margin_weight (r_m(y_w) − r_m(y_l))`` from ``β h`` as MODPO does (Zhou et al.,
    2023, eq. 7).

    Args:
      ref_logps: ``[N]`` reference log-probs of the responses.
      margin_rewards: ``[N]`` the margin reward model's scores of the same responses.
      margin_weight: ``1 − w``, the margin objective's weight.
      beta: MODPO's β.

    Returns:
      ``[N]`` shifted reference log-probs.
    """
    return ref_logps + margin_weight * margin_rewards / beta


def validate(config: ml_collections.ConfigDict) -> None:
    """Rollout checks of the PPO run plus the weightings, naming the key."""
    rl.validate_rollout(config, SCHEMA)
    weights = config.weightings
    if not weights or any(
        isinstance(w, bool) or not isinstance(w, int | float) or not 0.0 < w <= 1.0 for w in weights
    ):
        raise ConfigError(f"config.weightings: got {weights!r}; expected numbers in (0, 1]")
    if not config.cost_from:
        raise ConfigError("config.cost_from must name the workdir of a cost-model run")


def scorer_modules(config: ml_collections.ConfigDict) -> tuple[ScalarModel, ScalarModel]:
    """The trained reward and cost models as modules."""
    reward = nnx.merge(*rl.load_scorer(config.reward_from, "reward_from", config.seed)[:2])
    cost = nnx.merge(*rl.load_scorer(config.cost_from, "cost_from", config.seed)[:2])
    return reward, cost


def final_metrics(evaluation: Mapping[str, Any], weight: float | None) -> dict[str, Any]:
    """The table row of an evaluation from :func:`experiments.ppo.make_evaluator`."""
    row = {k[len("eval_") :]: v for k, v in evaluation.items() if k.startswith("eval_")}
    return {**row, **({} if weight is None else {"weight": weight})}


def morlhf_step(config, tokenizer, scorers):
    """The PPO step shared by every weighting (the weight lives in the scorer's state)."""
    architecture = common.model_config(config, tokenizer)
    decoder = common.build_decoder(config, architecture)
    head = PolicyWithValueHead(architecture, rngs=nnx.Rngs(config.seed + 1), policy=decoder)
    models = PPOModels(
        split_model(decoder)[0],
        split_model(head)[0],
        split_model(WeightedScorer(*scorers, 1.0))[0],
        shared_critic=True,
    )
    ppo_config = PPOConfig(
        sampling=rl.sampling_config(config, tokenizer),
        update=rl.update_config(config),
        kl_target=config.kl_target or None,
        kl_horizon=config.kl_horizon,
    )
    tx = rl.build_rl_optimizer(config)
    return make_ppo_step(models, tx, ppo_config), tx


def train_morlhf(config, tokenizer, task, weight, scorers, step, evaluate, workdir):
    """PPO against ``w·r − (1 − w)·c``; returns the initial and final evaluations."""
    step_fn, tx = step
    _, scorer_params = split_model(WeightedScorer(*scorers, weight))
    scorer_params = rl.copy_tree(scorer_params)  # the loop donates the state, extra included
    architecture = common.model_config(config, tokenizer)
    decoder = common.build_decoder(config, architecture)
    reference_params = rl.copy_tree(split_model(decoder)[1])
    head = PolicyWithValueHead(architecture, rngs=nnx.Rngs(config.seed + 1), policy=decoder)
    extra = init_ppo_extra(
        reference_params=reference_params, reward_params=scorer_params, kl_coef=config.kl_coef
    )
    state = TrainState.create(split_model(head)[1], tx, rng=config.seed, extra=extra)
    _, _, _, evaluations = rl.train_with_evaluations(
        step_fn,
        state,
        rl.prompt_schedule(config, tokenizer, task),
        config,
        workdir,
        evaluate,
        lambda s: s.params["policy"],
    )
    return evaluations[0], evaluations[-1]


def margin_scores(cost_graphdef, cost_params, arrays, batch_size: int) -> dict[str, np.ndarray]:
    """``−c`` of the chosen and rejected responses of a preference set (``[N]`` each)."""
    scores = {}
    for side in ("chosen", "rejected"):
        data = {k: arrays[f"{side}_{k}"] for k in ("input_ids", "attention_mask")}
        values = []
        for batch, valid in task_batches.sequential_batches(data, batch_size=batch_size):
            score = rl.score_sequences(
                cost_graphdef, cost_params, batch["input_ids"], batch["attention_mask"]
            )
            values.append(-np.asarray(score)[:valid])
        scores[side] = np.concatenate(values)
    return scores


def modpo_data(config, tokenizer, task, cost_model) -> dict[str, np.ndarray]:
    """Helpfulness pairs with the SFT reference's log-probs and the margin rewards ``−c``."""
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    arrays = task_batches.task_preference_arrays(
        task.preference_train, tokenizer, max_length=config.max_length
    )
    arrays = precompute_reference_logps(graphdef, params, arrays, batch_size=config.eval_batch_size)
    margins = margin_scores(*split_model(cost_model), arrays, config.eval_batch_size)
    return {**arrays, **{f"{side}_margin": margins[side] for side in ("chosen", "rejected")}}


def train_modpo(config, tokenizer, weight, data, evaluate, workdir):
    """MODPO of weight ``w`` on :func:`modpo_data`; returns the final evaluation."""
    arrays = dict(data)
    for side in ("chosen", "rejected"):
        key = f"ref_{side}_logps"
        arrays[key] = np.asarray(
            modpo_reference_shift(
                jnp.asarray(data[key]),
                jnp.asarray(data[f"{side}_margin"]),
                margin_weight=1.0 - weight,
                beta=config.modpo_beta,
            )
        )
    architecture = common.model_config(config, tokenizer)
    graphdef, params = split_model(common.build_decoder(config, architecture))
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.num_steps = config.modpo_num_steps
    optimizer = {**config.optimizer.to_dict(), "learning_rate": config.modpo_learning_rate}
    tx = make_optimizer(num_steps=config.modpo_num_steps, **optimizer)
    step = make_dpo_step(
        graphdef,
        tx,
        loss_name="dpo",
        hyper={"beta": config.modpo_beta / weight},
        reference="precomputed",
        num_micro_batches=config.num_micro_batches,
    )
    schedule = EpochPermutationSchedule(arrays, config.modpo_batch_size, seed=config.seed)
    extra = initial_dpo_extra("dpo", reference="precomputed")
    state = TrainState.create(params, tx, rng=config.seed, extra=extra)
    state, _, _ = common.train(step, state, schedule, run_config, workdir)
    return evaluate(state.params)


def plot_front(rows: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """Gold reward against gold cost, one line per method, points labelled with ``w``."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for method, marker in (("MORLHF", "o"), ("MODPO", "s")):
        points = sorted(
            (row["weight"], row["gold_cost"], row["gold_reward"])
            for name, row in rows.items()
            if name.startswith(method)
        )
        if not points:
            continue
        _, costs, rewards = zip(*points, strict=True)
        axis.plot(costs, rewards, marker=marker, label=method)
        for weight, cost, reward in points:
            axis.annotate(
                f"w={weight:g}", (cost, reward), textcoords="offset points", xytext=(4, 4)
            )
    if "SFT" in rows:
        axis.scatter([rows["SFT"]["gold_cost"]], [rows["SFT"]["gold_reward"]], c="k", label="SFT")
    axis.set_xlabel("gold cost (lower is safer)")
    axis.set_ylabel("gold reward")
    axis.set_title("Pareto front: w·reward − (1 − w)·cost")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train MORLHF and MODPO for every weighting, evaluate, plot and tabulate."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    architecture = common.model_config(config, tokenizer)
    policy_graphdef, _ = split_model(common.build_decoder(config, architecture))
    reward, cost = scorer_modules(config)
    evaluate = rl.make_evaluator(
        config,
        tokenizer,
        task,
        policy_graphdef,
        {"reward": split_model(reward), "cost": split_model(cost)},
    )

    step = morlhf_step(config, tokenizer, (reward, cost))
    data = modpo_data(config, tokenizer, task, cost)
    rows: dict[str, dict[str, Any]] = {}
    for weight in config.weightings:
        name = f"{weight:g}"
        initial, final = train_morlhf(
            config,
            tokenizer,
            task,
            weight,
            (reward, cost),
            step,
            evaluate,
            os.path.join(workdir, f"morlhf_w{name}"),
        )
        rows.setdefault("SFT", final_metrics(initial, None))
        rows[f"MORLHF w={name}"] = final_metrics(final, weight)
        evaluation = train_modpo(
            config, tokenizer, weight, data, evaluate, os.path.join(workdir, f"modpo_w{name}")
        )
        rows[f"MODPO w={name}"] = final_metrics(evaluation, weight)
    table = markdown_table(rows, COLUMNS)
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
        f.write(
            f"MORLHF vs MODPO on {config.num_eval_prompts} held-out prompts, "
            f"r_w = w·r − (1 − w)·c\n\n{table}\n![Pareto front]({PLOT_FILE})\n"
        )
    plot_front(rows, os.path.join(workdir, PLOT_FILE))
    print(table)
    return common.finish(workdir, "MORLHF vs MODPO", {"rows": rows})


if __name__ == "__main__":
    common.main(run)
