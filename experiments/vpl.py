"""Variational Preference Learning (Poddar et al., 2024) on two opposed user groups.

Users come from two groups of the embedded task: group ``a`` labels a pair by the task's
helpfulness label (``better_response_id``, Bradley–Terry on the gold reward, as the
reward-model experiment does) and group ``b`` by the exact opposite. Each user annotates
``K`` context pairs and ``Q`` query pairs drawn from the task's pairs, all labelled by its
group. Training users are drawn afresh every step from the training pairs (a synthetic user
is only its group and its pairs, so the population grows with the run, ``num_steps ·
batch_size`` users; :class:`FreshUsers`); ``users.num_heldout`` fixed users read the
held-out pairs (disjoint prompts).

Two models are trained from the same trunk (``init_from``'s SFT policy):

- ``bt/``: a plain Bradley–Terry reward model on every pair of the training users, pooled
  (:mod:`rlhf_jax.train.steps.reward`). The groups cancel, so it cannot beat 0.5 on both.
- ``vpl/``: VPL (:mod:`rlhf_jax.train.steps.vpl`): the posterior encoder and the
  latent-conditioned reward on the trunk; ``trunk_from`` takes the trunk from a
  reward-model run instead (a Bradley–Terry model of group ``a``). ``freeze_trunk=True``
  (the default) keeps the trunk fixed, as the paper does: every pair of the two pools is
  embedded once and only the heads train (seconds for thousands of steps); ``False``
  trains the trunk end to end with the heads. ``vpl.free_bits = λ`` leaves the first λ
  nats of each user's KL uncharged, a departure from the paper's ELBO that keeps the
  posterior from collapsing (0 = the ELBO).

The summary gives, per group, the held-out accuracy on the query pairs of BT and of VPL
at the posterior mean ``z = μ`` of each user's context pairs, the mean held-out KL of the
posterior, the VPL accuracy when each user's context pairs carry the *other* group's
labels (it falls below 0.5 when z carries the group) and the Bayes-optimal accuracy of
the labels (the ceiling of any model). The trained parameters are exported to
``bt/scorer`` and ``vpl/vpl`` (``{"trunk", "encoder", "reward"}``, without the trunk when
frozen) under the workdir.

``python experiments/vpl.py --config=experiments/configs/vpl.py --workdir=runs/vpl
--config.init_from=runs/sft --config.trunk_from=runs/rm`` (the full recipe, with the SFT and
reward-model runs it starts from, is in ``configs/vpl.py``).
"""

import dataclasses
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
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_reward_eval, make_reward_step, split_model
from rlhf_jax.train.steps.vpl import (
    BATCH_KEYS,
    EMBEDDING_KEYS,
    embed_pairs,
    init_vpl_params,
    make_vpl_eval,
    make_vpl_step,
)

SCHEMA = {
    "trunk_from": Field(str),
    "freeze_trunk": Field(bool),
    "users": {
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
    "bt_batch_size": Field(int, minimum=1),
}
GROUPS = ("a", "b")
SIDES = ("chosen", "rejected")
TOKEN_FIELDS = ("input_ids", "attention_mask")


def group_labelled(pairs: dict, group: np.ndarray) -> dict:
    """Pairs with chosen and rejected exchanged where ``group`` is 1 (group ``b``).

    Every ``chosen<suffix>`` array is exchanged with its ``rejected<suffix>`` partner
    (token ids, masks, gold rewards or embeddings alike).
    """
    flip = group.astype(bool)
    labelled = {}
    for key in pairs:
        if not key.startswith("chosen"):
            continue
        suffix = key.removeprefix("chosen")
        chosen, rejected = pairs[key], pairs[f"rejected{suffix}"]
        rows = flip.reshape(-1, *([1] * (chosen.ndim - 1)))
        labelled[key] = np.where(rows, rejected, chosen)
        labelled[f"rejected{suffix}"] = np.where(rows, chosen, rejected)
    return labelled


def draw_users(
    pairs: dict, num_users: int, num_context: int, num_query: int, seed: int | tuple[int, ...]
) -> dict:
    """Users of alternating groups, each with its own pairs labelled by its group.

    Args:
      pairs: group-``a`` preference arrays ``chosen<suffix>``/``rejected<suffix>``
        ``[N, ...]`` (``_input_ids``, ``_attention_mask``, ``_reward``, or the bare
        ``chosen``/``rejected`` embeddings of a frozen trunk).
      num_users: U.
      num_context: K context pairs per user.
      num_query: Q query pairs per user.
      seed: seed (``numpy.random.default_rng``'s) of the draw of each user's K + Q
        distinct pairs.

    Returns:
      ``{context,query}_{chosen,rejected}<suffix>`` ``[U, K or Q, ...]``, ``group``
      ``[U]`` (0 = a, 1 = b) and ``context_group`` ``[U]`` (the group whose labels the
      context pairs carry, the same here).
    """
    size = len(pairs["chosen_reward"])
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


@dataclasses.dataclass(frozen=True)
class FreshUsers:
    """A schedule of new users every step: ``draw_users(pairs, U, K, Q, seed=(seed, step))``.

    A synthetic user is its group and its pairs, so the training population is as large
    as the run: ``num_steps · U`` distinct users, each seen once, drawn from the pool of
    pairs. The batch of a step is a function of the step alone, so resuming is exact.

    Attributes:
      pairs: the pool, as :func:`draw_users` takes it.
      num_users: U per step.
      num_context: K.
      num_query: Q.
      keys: the arrays of the users a batch keeps.
      seed: the draw's seed.
    """

    pairs: dict
    num_users: int
    num_context: int
    num_query: int
    keys: tuple[str, ...]
    seed: int = 0

    def batch_for_step(self, step: int) -> dict:
        """The users of ``step``."""
        users = draw_users(
            self.pairs, self.num_users, self.num_context, self.num_query, (self.seed, step)
        )
        return {k: users[k] for k in self.keys}


@dataclasses.dataclass(frozen=True)
class PooledPairs:
    """The pairs of a :class:`FreshUsers` batch pooled into one Bradley–Terry batch."""

    users: FreshUsers

    def batch_for_step(self, step: int) -> dict:
        """Every pair of the users of ``step``, labelled by its user's group."""
        return pooled_pairs(self.users.batch_for_step(step))


def swap_context(users: dict) -> dict:
    """The users with their context pairs labelled by the other group (queries unchanged)."""
    swapped = dict(users)
    for key in users:
        if key.startswith("context_chosen"):
            partner = key.replace("context_chosen", "context_rejected", 1)
            swapped[key], swapped[partner] = users[partner], users[key]
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


def train_bt(
    config, architecture, schedule: PooledPairs, heldout_users: dict, workdir: str
) -> dict:
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


def train_vpl(
    config: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef | None,
    params: dict,
    users: FreshUsers,
    heldout: dict,
    workdir: str,
) -> tuple[TrainState, dict]:
    """Train VPL on the stream of users; score it per group on the held-out users.

    Args:
      config: the run's config (``vpl``, the optimiser and the loop's keys).
      graphdef: the trunk's graph definition, or ``None`` for a frozen trunk (``params``
        then holds the heads and ``users``/``heldout`` hold embeddings).
      params: :func:`init_vpl_params`' pytree.
      users: the training schedule.
      heldout: :func:`draw_users`' held-out users (with ``group``).
      workdir: the run's checkpoints and metrics.

    Returns:
      The trained state and the summary entries: per-group accuracy before and after
      training, with the other group's context (``swapped``), the held-out KL and the
      training loss and KL.
    """
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
    state = TrainState.create(params, tx, rng=config.seed)
    initial = evaluate(state, heldout)
    state, run_summary, history = common.train(step, state, users, config, workdir)
    final = evaluate(state, heldout)
    swapped = evaluate(state, swap_context(heldout))
    return state, {
        "steps": run_summary.final_step,
        "train_users": run_summary.final_step * users.num_users,
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "train_kl_last": history[-1]["kl"],
        **per_group(initial, heldout, "vpl_heldout_accuracy_initial"),
        **per_group(final, heldout, "vpl_heldout_accuracy"),
        **per_group(swapped, heldout, "vpl_swapped_context_accuracy"),
        "vpl_heldout_kl": float(np.mean(final["kl"])),
    }


def embedded_pool(graphdef: nnx.GraphDef, trunk: object, pairs: dict, batch_size: int) -> dict:
    """The pool's pair embeddings ``chosen``/``rejected`` ``[N, E]`` and its gold rewards."""
    rewards = {k: pairs[k] for k in ("chosen_reward", "rejected_reward")}
    return {**embed_pairs(graphdef, trunk, pairs, batch_size=batch_size), **rewards}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train BT and VPL on the same stream of users; compare them per group on held-out users."""
    common.validate(config, SCHEMA)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    train_pairs, heldout_pairs = (
        task_batches.task_preference_arrays(pairs, tokenizer, max_length=config.max_length)
        for pairs in (task.preference_train, task.preference_heldout)
    )
    shape = (config.users.num_context, config.users.num_query)
    heldout_seed = config.seed + 1
    heldout_users = draw_users(heldout_pairs, config.users.num_heldout, *shape, heldout_seed)
    train_users = FreshUsers(train_pairs, config.batch_size, *shape, BATCH_KEYS, config.seed)
    architecture = common.model_config(config, tokenizer)
    os.makedirs(workdir, exist_ok=True)
    bt_users = dataclasses.replace(train_users, num_users=config.bt_batch_size)
    bt = train_bt(
        config, architecture, PooledPairs(bt_users), heldout_users, os.path.join(workdir, "bt")
    )

    graphdef, trunk_params = vpl_trunk(config, architecture)
    params = init_vpl_params(
        jax.random.key(config.seed + 2),
        trunk_params,
        embed_dim=architecture.hidden_size,
        hidden_dim=config.vpl.hidden_dim,
        latent_dim=config.vpl.latent_dim,
    )
    heldout_data = heldout_users
    if config.freeze_trunk:
        trunk = params.pop("trunk")
        pools = [
            embedded_pool(graphdef, trunk, p, config.eval_batch_size)
            for p in (train_pairs, heldout_pairs)
        ]
        train_users = dataclasses.replace(train_users, pairs=pools[0], keys=EMBEDDING_KEYS)
        # The same draw from the embedded pool: the same held-out users, as embeddings.
        heldout_data = draw_users(pools[1], config.users.num_heldout, *shape, heldout_seed)
        graphdef = None
    vpl_dir = os.path.join(workdir, "vpl")
    state, vpl_summary = train_vpl(config, graphdef, params, train_users, heldout_data, vpl_dir)
    common.export_params(vpl_dir, "vpl", state.params, architecture)
    summary = {
        "trunk": "trunk_from" if config.trunk_from else "init_from",
        "freeze_trunk": config.freeze_trunk,
        **bt,
        **vpl_summary,
        "bayes_optimal_accuracy": label_ceiling(heldout_users, config.task.temperature),
    }
    return common.finish(workdir, "VPL vs Bradley–Terry", summary)


if __name__ == "__main__":
    common.main(run)
