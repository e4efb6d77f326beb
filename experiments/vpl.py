"""Variational Preference Learning (Poddar et al., 2024) on two opposed user groups.

Users come from two groups of the embedded task: group ``a`` labels a pair by the task's
helpfulness label (``better_response_id``, Bradley–Terry on the gold reward, as the
reward-model experiment does) and group ``b`` by the exact opposite. Each user annotates
``K`` context pairs and ``Q`` query pairs drawn from the task's pairs, all labelled by its
group; the training users read the training pairs and the held-out users the held-out
pairs (disjoint prompts).

Two models are trained from the same trunk (``init_from``'s SFT policy):

- ``bt/``: a plain Bradley–Terry reward model on every pair of every training user, pooled
  (:mod:`rlhf_jax.train.steps.reward`). The groups cancel, so it cannot beat 0.5 on both.
- ``vpl/``: VPL (:mod:`rlhf_jax.train.steps.vpl`), trunk trained end to end with the
  posterior encoder and the latent-conditioned reward; ``trunk_from`` instead starts the
  trunk from a reward-model run's trunk (a Bradley–Terry model of group ``a``).
  ``freeze_trunk=True`` keeps the trunk fixed, as the paper does: every user's pairs are
  embedded once and only the heads train (fast enough for many more steps).
  ``vpl.free_bits = λ`` leaves the first λ nats of each user's KL uncharged, a departure
  from the paper's ELBO that keeps the posterior from collapsing (0 = the ELBO).

The summary gives, per group, the held-out accuracy on the query pairs of BT and of VPL
at the posterior mean ``z = μ`` of each user's context pairs, the mean held-out KL of the
posterior, the VPL accuracy when each user's context pairs carry the *other* group's
labels (it falls below 0.5 when z carries the group) and the Bayes-optimal accuracy of
the labels (the ceiling of any model). The trained parameters are exported to
``bt/scorer`` and ``vpl/vpl`` (``{"trunk", "encoder", "reward"}``, without the trunk when
frozen) under the workdir.

``python experiments/vpl.py --config=experiments/configs/vpl.py --workdir=runs/vpl
--config.init_from=runs/sft``
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from experiments.ppo import load_scorer
from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import bayes_optimal_accuracy
from rlhf_jax.models import ScalarModel
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_reward_eval, make_reward_step, split_model
from rlhf_jax.train.steps.vpl import embed_users, init_vpl_params, make_vpl_eval, make_vpl_step

SCHEMA = {
    "trunk_from": Field(str),
    "freeze_trunk": Field(bool),
    "users": {
        "num_train": Field(int, minimum=1),
        "num_heldout": Field(int, minimum=1),
        "num_context": Field(int, minimum=1),
        "num_query": Field(int, minimum=1),
    },
    "vpl": {
        "beta": Field(float, minimum=0.0),
        "free_bits": Field(float, minimum=0.0),
        "num_samples": Field(int, minimum=1),
        "latent_dim": Field(int, minimum=1),
        "hidden_dim": Field(int, minimum=1),
    },
    "bt_num_steps": Field(int, minimum=1),
}
GROUPS = ("a", "b")
SIDES = ("chosen", "rejected")
TOKEN_FIELDS = ("input_ids", "attention_mask")


def group_labelled(pairs: dict, group: np.ndarray) -> dict:
    """Pairs with chosen and rejected exchanged where ``group`` is 1 (group ``b``)."""
    flip = group.astype(bool)
    labelled = {}
    for field in (*TOKEN_FIELDS, "reward"):
        chosen, rejected = pairs[f"chosen_{field}"], pairs[f"rejected_{field}"]
        rows = flip.reshape(-1, *([1] * (chosen.ndim - 1)))
        labelled[f"chosen_{field}"] = np.where(rows, rejected, chosen)
        labelled[f"rejected_{field}"] = np.where(rows, chosen, rejected)
    return labelled


def draw_users(pairs: dict, num_users: int, num_context: int, num_query: int, seed: int) -> dict:
    """Users of alternating groups, each with its own pairs labelled by its group.

    Args:
      pairs: group-``a`` preference arrays ``chosen_*``/``rejected_*`` ``[N, ...]``.
      num_users: U.
      num_context: K context pairs per user.
      num_query: Q query pairs per user.
      seed: seed of the draw of each user's K + Q distinct pairs.

    Returns:
      ``{context,query}_{chosen,rejected}_{input_ids,attention_mask,reward}``
      ``[U, K or Q, ...]``, ``group`` ``[U]`` (0 = a, 1 = b) and ``context_group``
      ``[U]`` (the group whose labels the context pairs carry, the same here).
    """
    size = len(pairs["chosen_input_ids"])
    if num_context + num_query > size:
        raise ConfigError(
            f"config.users.num_context + num_query = {num_context + num_query} exceeds the "
            f"{size} pairs users draw from"
        )
    rng = np.random.default_rng(seed)
    index = np.stack(
        [rng.choice(size, num_context + num_query, replace=False) for _ in range(num_users)]
    )
    group = np.arange(num_users) % 2
    users = {"group": group, "context_group": group}
    for name, columns in (("context", index[:, :num_context]), ("query", index[:, num_context:])):
        per_pair = {k: v[columns.reshape(-1)] for k, v in pairs.items()}
        labelled = group_labelled(per_pair, np.repeat(group, columns.shape[1]))
        for key, value in labelled.items():
            users[f"{name}_{key}"] = value.reshape(num_users, columns.shape[1], *value.shape[1:])
    return users


def swap_context(users: dict) -> dict:
    """The users with their context pairs labelled by the other group (queries unchanged)."""
    swapped = dict(users)
    for field in (*TOKEN_FIELDS, "reward"):
        swapped[f"context_chosen_{field}"] = users[f"context_rejected_{field}"]
        swapped[f"context_rejected_{field}"] = users[f"context_chosen_{field}"]
    swapped["context_group"] = 1 - users["context_group"]
    return swapped


def pooled_pairs(users: dict, which: tuple[str, ...] = ("context", "query")) -> dict:
    """Every pair of the users as one Bradley–Terry set ``chosen_*``/``rejected_*`` ``[N, ...]``."""
    pooled = {}
    for side in SIDES:
        for field in TOKEN_FIELDS:
            parts = [users[f"{name}_{side}_{field}"] for name in which]
            pooled[f"{side}_{field}"] = np.concatenate([p.reshape(-1, *p.shape[2:]) for p in parts])
    return pooled


def select_users(users: dict, keep: np.ndarray) -> dict:
    """The users where ``keep`` is true."""
    return {k: v[keep] for k, v in users.items()}


def train_bt(config, architecture, train_users: dict, heldout_users: dict, workdir: str) -> dict:
    """Bradley–Terry on the pooled pairs of the training users; per-group held-out accuracy."""
    bt_config = config.copy_and_resolve_references()
    bt_config.num_steps = config.bt_num_steps
    model = ScalarModel(
        architecture,
        rngs=nnx.Rngs(config.seed + 1),
        trunk=common.build_decoder(config, architecture),
    )
    graphdef, params = split_model(model)
    tx = common.build_optimizer(bt_config)
    step = make_reward_step(graphdef, tx, num_micro_batches=config.num_micro_batches)
    evaluate = make_reward_eval(graphdef, batch_size=config.eval_batch_size)
    pairs_per_user = config.users.num_context + config.users.num_query
    schedule = EpochPermutationSchedule(
        pooled_pairs(train_users), config.batch_size * pairs_per_user, seed=config.seed
    )
    state = TrainState.create(params, tx, rng=config.seed)
    state, _, _ = common.train(step, state, schedule, bt_config, workdir)
    common.export_params(workdir, "scorer", state.params, architecture)
    return {
        f"bt_heldout_accuracy_{name}": evaluate(
            state,
            pooled_pairs(select_users(heldout_users, heldout_users["group"] == g), ("query",)),
        )["accuracy"]
        for g, name in enumerate(GROUPS)
    }


def vpl_trunk(config, architecture) -> tuple[nnx.GraphDef, object]:
    """The decoder's ``(graphdef, params)``: ``init_from``'s, or ``trunk_from``'s scorer trunk."""
    graphdef, params = split_model(common.build_decoder(config, architecture))
    if config.trunk_from:
        _, scorer, scorer_architecture = load_scorer(config.trunk_from, "trunk_from", config.seed)
        if scorer_architecture != architecture:
            raise ConfigError(
                f"config.trunk_from={config.trunk_from!r}: its architecture differs from the "
                "run's model"
            )
        params = scorer["trunk"]
    return graphdef, params


def per_group(predictions: dict, users: dict, prefix: str) -> dict:
    """Mean per-user accuracy of each group under ``prefix``."""
    return {
        f"{prefix}_{name}": float(np.mean(predictions["accuracy"][users["group"] == g]))
        for g, name in enumerate(GROUPS)
    }


def label_ceiling(users: dict, temperature: float) -> float:
    """Bayes-optimal accuracy of the query labels (the same for both groups by symmetry)."""
    chosen, rejected = users["query_chosen_reward"], users["query_rejected_reward"]
    return bayes_optimal_accuracy(chosen.reshape(-1), rejected.reshape(-1), temperature)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train BT and VPL on the same users; compare them per group on held-out users."""
    common.validate(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    train_pairs, heldout_pairs = (
        task_batches.task_preference_arrays(pairs, tokenizer, max_length=config.max_length)
        for pairs in (task.preference_train, task.preference_heldout)
    )
    shape = (config.users.num_context, config.users.num_query)
    train_users = draw_users(train_pairs, config.users.num_train, *shape, config.seed)
    heldout_users = draw_users(heldout_pairs, config.users.num_heldout, *shape, config.seed + 1)
    architecture = common.model_config(config, tokenizer)
    os.makedirs(workdir, exist_ok=True)
    bt = train_bt(config, architecture, train_users, heldout_users, os.path.join(workdir, "bt"))

    graphdef, trunk_params = vpl_trunk(config, architecture)
    params = init_vpl_params(
        jax.random.key(config.seed + 2),
        trunk_params,
        embed_dim=architecture.hidden_size,
        hidden_dim=config.vpl.hidden_dim,
        latent_dim=config.vpl.latent_dim,
    )
    train_data, heldout_data, swapped_data = train_users, heldout_users, swap_context(heldout_users)
    if config.freeze_trunk:
        trunk = params.pop("trunk")
        train_data, heldout_data, swapped_data = (
            embed_users(graphdef, trunk, users, batch_size=config.eval_batch_size)
            for users in (train_data, heldout_data, swapped_data)
        )
        graphdef = None
    else:
        train_data = {k: v for k, v in train_data.items() if k.endswith(TOKEN_FIELDS)}
    tx = common.build_optimizer(config)
    step = make_vpl_step(
        graphdef,
        tx,
        beta=config.vpl.beta,
        num_samples=config.vpl.num_samples,
        free_bits=config.vpl.free_bits,
        num_micro_batches=config.num_micro_batches,
    )
    evaluate = make_vpl_eval(graphdef, batch_size=config.eval_batch_size)
    schedule = EpochPermutationSchedule(train_data, config.batch_size, seed=config.seed)
    state = TrainState.create(params, tx, rng=config.seed)
    initial = evaluate(state, heldout_data)
    state, run_summary, history = common.train(
        step, state, schedule, config, os.path.join(workdir, "vpl")
    )
    final = evaluate(state, heldout_data)
    swapped = evaluate(state, swapped_data)
    common.export_params(os.path.join(workdir, "vpl"), "vpl", state.params, architecture)
    summary = {
        "trunk": "trunk_from" if config.trunk_from else "init_from",
        "freeze_trunk": config.freeze_trunk,
        "steps": run_summary.final_step,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "train_kl_last": history[-1]["kl"],
        **bt,
        **per_group(initial, heldout_users, "vpl_heldout_accuracy_initial"),
        **per_group(final, heldout_users, "vpl_heldout_accuracy"),
        **per_group(swapped, heldout_users, "vpl_swapped_context_accuracy"),
        "vpl_heldout_kl": float(np.mean(final["kl"])),
        "bayes_optimal_accuracy": label_ceiling(heldout_users, config.task.temperature),
    }
    return common.finish(workdir, "VPL vs Bradley–Terry", summary)


if __name__ == "__main__":
    common.main(run)
