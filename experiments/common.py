"""Plumbing shared by the experiments: config keys, task data, models, optimiser, loop, export.

Every run has the keys of :func:`base_config` (seed, task sizes, tokenizer, model,
optimiser, batch and loop settings, ``init_from``) plus its own, validated against
``BASE_SCHEMA`` merged with the run's schema before anything is built. A run writes to its
workdir ``checkpoints/`` and ``metrics.jsonl`` (the loop), ``policy/`` or ``scorer/`` (the
final parameters, for later runs), ``model.json`` (the architecture) and
``summary.json`` (the printed final summary). A later run starts from an earlier one's
exported parameters with ``--config.init_from=<its workdir>``; the architecture is then
read from that workdir's ``model.json``, and ``config.model`` must agree with it.

Every run is sharded over a device mesh (:mod:`rlhf_jax.parallel`): ``config.mesh`` gives
the sizes of the ``data``, ``fsdp`` and ``tensor`` axes (``-1`` fills the devices the other
axes leave; the default is pure data parallelism over every device). :func:`train` places
the state by its logical axes and feeds each process its own rows of every batch, and the
loop jits the step with those shardings. A multi-host job (``experiments/tpu_pod.sh``,
``experiments/gpu_host.sh``) is connected by :func:`main` before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rlhf_jax.data import task_batches
from rlhf_jax.data.embedded_task import (
    EmbeddedTask,
    EmbeddedTaskConfig,
    make_embedded_task,
    score_responses,
)
from rlhf_jax.data.tokenizers import ByteTokenizer, Tokenizer
from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.parallel import initialize_from_env, make_mesh, mesh_shape, shard_step
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train import loop
from rlhf_jax.train.checkpoint import Checkpointer, abstract_state
from rlhf_jax.train.config import ConfigError, Field, Schema, main_from_flags, validate_config
from rlhf_jax.train.metrics import JSONL_NAME, read_jsonl
from rlhf_jax.train.state import PyTree, TrainState
from rlhf_jax.train.steps.common import StepFn, make_optimizer, split_model

MODEL_FILE = "model.json"
SUMMARY_FILE = "summary.json"
MODEL_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "mlp_hidden_size")
MESH_KEYS = ("data", "fsdp", "tensor")

BASE_SCHEMA: Schema = {
    "seed": Field(int, minimum=0),
    "init_from": Field(str),
    "tokenizer": Field(str, choices=("byte",)),
    "max_length": Field(int, minimum=8),
    "task": {
        "seed": Field(int, minimum=0),
        "num_train_prompts": Field(int, minimum=1),
        "num_heldout_prompts": Field(int, minimum=1),
        "num_sft": Field(int, minimum=1),
        "num_sft_heldout": Field(int, minimum=1),
        "num_preference_pairs": Field(int, minimum=1),
        "num_preference_heldout": Field(int, minimum=1),
        "harmful_rate": Field(float, minimum=0.0, maximum=0.625),
        "temperature": Field(float, minimum=1e-6),
        "cost_temperature": Field(float, minimum=1e-6),
    },
    "model": {
        "hidden_size": Field(int, minimum=1),
        "num_layers": Field(int, minimum=1),
        "num_heads": Field(int, minimum=1),
        "num_kv_heads": Field(int, minimum=1),
        "mlp_hidden_size": Field(int, minimum=1),
    },
    "optimizer": {
        "learning_rate": Field(float, minimum=0.0),
        "warmup_steps": Field(int, minimum=0),
        "weight_decay": Field(float, minimum=0.0),
        "max_grad_norm": Field(float, minimum=0.0),
        "b1": Field(float, minimum=0.0, maximum=1.0),
        "b2": Field(float, minimum=0.0, maximum=1.0),
    },
    "batch_size": Field(int, minimum=1),
    "num_micro_batches": Field(int, minimum=1),
    "eval_batch_size": Field(int, minimum=1),
    "num_steps": Field(int, minimum=1),
    "log_every": Field(int, minimum=1),
    "checkpoint_every": Field(int, minimum=1),
    "mesh": {axis: Field(int, minimum=-1) for axis in MESH_KEYS},
}


def base_config() -> ml_collections.ConfigDict:
    """The shared keys: a ~5M-parameter Llama-style byte model on the embedded task."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.init_from = ""
    config.tokenizer = "byte"
    config.max_length = 256
    config.task = dataclasses.asdict(EmbeddedTaskConfig())
    config.model = {
        "hidden_size": 256,
        "num_layers": 6,
        "num_heads": 8,
        "num_kv_heads": 4,
        "mlp_hidden_size": 768,
    }
    config.optimizer = {
        "learning_rate": 1e-3,
        "warmup_steps": 20,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "b1": 0.9,
        "b2": 0.95,
    }
    config.batch_size = 16
    config.num_micro_batches = 1
    config.eval_batch_size = 32
    config.num_steps = 150
    config.log_every = 10
    config.checkpoint_every = 100
    # Device mesh axis sizes; -1 fills the devices the other axes leave.
    config.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
    return config


def validate(config: ml_collections.ConfigDict, schema: Schema) -> None:
    """Check every key against ``BASE_SCHEMA`` merged with the run's ``schema``.

    Raises:
      ConfigError: naming each wrong key; also when ``num_micro_batches`` does not divide
        ``batch_size``, ``model.num_heads`` is not a multiple of ``model.num_kv_heads``,
        or ``mesh`` does not fit the devices.
    """
    validate_config(config, {**BASE_SCHEMA, **schema})
    mesh_sizes(config)
    if config.batch_size % config.num_micro_batches:
        raise ConfigError(
            f"config.num_micro_batches={config.num_micro_batches} must divide "
            f"config.batch_size={config.batch_size}"
        )
    if config.model.num_heads % config.model.num_kv_heads:
        raise ConfigError(
            f"config.model.num_kv_heads={config.model.num_kv_heads} must divide "
            f"config.model.num_heads={config.model.num_heads}"
        )


def build_task(config: ml_collections.ConfigDict) -> EmbeddedTask:
    """The embedded task of ``config.task``."""
    return make_embedded_task(EmbeddedTaskConfig(**config.task.to_dict()))


def build_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by ``config.tokenizer`` (the byte tokenizer)."""
    del config
    return ByteTokenizer()


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
    """The decoder architecture: ``config.model``, or the ``init_from`` run's when given.

    Raises:
      ConfigError: when ``config.model.<key>`` differs from the ``init_from`` run's model.
    """
    built = ModelConfig.llama(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=config.max_length,
        **{key: config.model[key] for key in MODEL_KEYS},
    )
    if not config.init_from:
        return built
    path = os.path.join(config.init_from, MODEL_FILE)
    if not os.path.exists(path):
        raise ConfigError(
            f"config.init_from={config.init_from!r}: no {MODEL_FILE} there; expected the "
            "workdir of a finished SFT run"
        )
    with open(path) as f:
        saved = ModelConfig(**json.load(f))
    for key in MODEL_KEYS:
        if getattr(saved, key) != getattr(built, key):
            raise ConfigError(
                f"config.model.{key}={getattr(built, key)} differs from the init_from run "
                f"({config.init_from}), whose model has {key}={getattr(saved, key)}"
            )
    if saved.vocab_size != built.vocab_size:
        raise ConfigError("config.tokenizer does not match the init_from run's vocabulary")
    if saved.max_position_embeddings < config.max_length:
        raise ConfigError(
            f"config.max_length={config.max_length} exceeds the init_from run's "
            f"max_position_embeddings={saved.max_position_embeddings}"
        )
    return saved


def export_params(workdir: str, name: str, params: PyTree, architecture: ModelConfig) -> None:
    """Save final parameters under ``workdir/name`` and the architecture in ``model.json``.

    An earlier export of the same name is replaced: the export is derived from the run's
    checkpoints, so running a finished run again (which resumes at its last step) writes
    it anew instead of failing on the existing one.
    """
    with open(os.path.join(workdir, MODEL_FILE), "w") as f:
        json.dump(dataclasses.asdict(architecture), f, indent=1)
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
    checkpointer = Checkpointer(
        os.path.join(workdir, name), save_every=1, max_to_keep=1, async_save=False
    )
    checkpointer.save(0, params, {"name": name})
    checkpointer.close()


def import_params(workdir: str, name: str, like: PyTree) -> PyTree:
    """Parameters exported by :func:`export_params`, restored onto the structure of ``like``."""
    checkpointer = Checkpointer(os.path.join(workdir, name), save_every=1, async_save=False)
    try:
        params, _ = checkpointer.restore(abstract_state(like))
    finally:
        checkpointer.close()
    return params


def build_decoder(config: ml_collections.ConfigDict, architecture: ModelConfig) -> Decoder:
    """A decoder initialised from ``config.seed``, or from the ``init_from`` run's policy."""
    decoder = Decoder(architecture, rngs=nnx.Rngs(config.seed))
    if config.init_from:
        _, params = split_model(decoder)
        nnx.update(decoder, import_params(config.init_from, "policy", params))
    return decoder


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """:func:`rlhf_jax.train.steps.common.make_optimizer` from ``config.optimizer``."""
    return make_optimizer(num_steps=config.num_steps, **config.optimizer.to_dict())


def mesh_sizes(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """``config.mesh`` resolved against the devices: ``(data, fsdp, tensor)``.

    Raises:
      ConfigError: naming ``config.mesh`` when the sizes do not fit the device count.
    """
    try:
        return mesh_shape(config.mesh, jax.device_count())
    except ValueError as error:
        raise ConfigError(f"config.mesh={config.mesh.to_dict()}: {error}") from error


def build_mesh(config: ml_collections.ConfigDict, batch_size: int) -> jax.sharding.Mesh:
    """The mesh of ``config.mesh`` for batches of ``batch_size`` rows.

    The batch is split over ``data * fsdp`` devices. When ``data`` is ``-1`` and that
    many devices would not divide the batch, ``data`` shrinks to the largest size that
    does on a single-process run (the other devices stay idle, with a warning), so a
    small run also works on a many-device host.

    Raises:
      ConfigError: the batch is not a multiple of ``data * fsdp`` for explicit sizes
        (or on several processes); the message names ``config.mesh`` and the size.
    """
    data, fsdp, tensor = mesh_sizes(config)
    if batch_size % (data * fsdp) == 0:
        return make_mesh((data, fsdp, tensor))
    shrinkable = config.mesh.data == -1 and jax.process_count() == 1
    if not shrinkable or batch_size % fsdp:
        raise ConfigError(
            f"config.mesh={config.mesh.to_dict()} splits each batch over data * fsdp = "
            f"{data * fsdp} devices, which does not divide the batch of {batch_size} rows"
        )
    fitting = max(d for d in range(1, data + 1) if batch_size % (d * fsdp) == 0)
    logging.warning(
        "config.mesh.data=-1: a batch of %d rows cannot be split over %d devices; using "
        "data=%d, %d of %d devices idle",
        batch_size,
        data * fsdp,
        fitting,
        (data - fitting) * fsdp * tensor,
        jax.device_count(),
    )
    return make_mesh((fitting, fsdp, tensor), devices=jax.devices()[: fitting * fsdp * tensor])


@dataclasses.dataclass(frozen=True)
class PlacedBatches:
    """A batch schedule whose batches are global arrays on the step's batch sharding.

    Every process computes the same host batch (the schedule is a function of the step)
    and transfers only the rows of its own devices.
    """

    schedule: loop.BatchSchedule
    place_batch: Callable[[PyTree], PyTree]

    def batch_for_step(self, step: int) -> PyTree:
        """The schedule's batch of ``step``, placed on the mesh."""
        return self.place_batch(self.schedule.batch_for_step(step))


def place_on_mesh(
    step_fn: StepFn,
    state: TrainState,
    schedule: loop.BatchSchedule,
    config: ml_collections.ConfigDict,
    *,
    tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, PlacedBatches, dict[str, PyTree]]:
    """The state, schedule and loop shardings of a run on the mesh of ``config.mesh``.

    The state is placed by its logical axes (:func:`rlhf_jax.parallel.shard_step`;
    ``tx`` finds the optimiser state's parameter-shaped parts exactly, without it they
    are found by structure) and each batch is split over ``data * fsdp``.

    Returns:
      ``(placed state, placed schedule, {"state_sharding": ..., "batch_sharding": ...})``,
      the last to be passed to :func:`rlhf_jax.train.loop.run`.
    """
    first_batch = schedule.batch_for_step(0)
    batch_size = int(np.shape(jax.tree.leaves(first_batch)[0])[0])
    sharded = shard_step(step_fn, build_mesh(config, batch_size), state, first_batch, tx=tx)
    shardings = {
        "state_sharding": sharded.state_sharding,
        "batch_sharding": sharded.batch_sharding,
    }
    return sharded.place_state(state), PlacedBatches(schedule, sharded.place_batch), shardings


def train(
    step_fn: StepFn,
    state: TrainState,
    schedule: loop.BatchSchedule,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    tx: optax.GradientTransformation | None = None,
) -> tuple[TrainState, loop.RunSummary, list[dict[str, Any]]]:
    """Run the loop driver to ``config.num_steps`` on the mesh of ``config.mesh``.

    See :func:`place_on_mesh`; the loop jits the step with those shardings and the
    returned state stays on the mesh.

    Returns:
      The state, the loop's summary and the metrics written.
    """
    state, placed, shardings = place_on_mesh(step_fn, state, schedule, config, tx=tx)
    state, summary = loop.run(
        step_fn,
        state,
        placed,
        num_steps=config.num_steps,
        workdir=workdir,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        config=config,
        progress=sys.stderr.isatty(),
        **shardings,
    )
    return state, summary, read_jsonl(os.path.join(workdir, JSONL_NAME))


def sample_replies(
    graphdef: nnx.GraphDef,
    params: PyTree,
    prompts: Sequence[str],
    tokenizer: Tokenizer,
    *,
    prompt_length: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
) -> list[str]:
    """Replies sampled from a policy to prompt texts (one human turn each), decoded."""
    if not prompts:
        return []
    arrays = task_batches.task_prompt_arrays(prompts, tokenizer, max_length=prompt_length)
    output = sample(
        graphdef,
        params,
        arrays["input_ids"],
        arrays["attention_mask"],
        jax.random.key(seed),
        config=SamplingConfig(
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            temperature=temperature,
        ),
    )
    tokens, mask = np.asarray(output.tokens), np.asarray(output.response_mask, bool)
    return [tokenizer.decode(row[keep]) for row, keep in zip(tokens, mask, strict=True)]


def gold_scores(prompts: Sequence[str], replies: Sequence[str]) -> dict[str, float]:
    """Mean gold reward, gold cost and harm rate of replies (``{}`` when there are none)."""
    if not prompts:
        return {}
    return {f"samples_{k}": v for k, v in score_responses(prompts, replies).items()}


def finish(workdir: str, title: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``summary.json``, print the summary and return it."""
    summary = json.loads(json.dumps(dict(summary), default=float))
    with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"== {title} ==")
    for key, value in summary.items():
        print(f"{key}: {value if not isinstance(value, float) else f'{value:.4f}'}")
    return summary


def main(run: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
    """The command line: ``--config=<file> [--config.key=value ...] --workdir=<dir>``.

    A multi-host job is connected first (``jax.distributed.initialize`` from the
    ``RLHF_JAX_*`` environment the launch scripts set, see
    :mod:`rlhf_jax.parallel.multihost`), before anything touches a device.
    """
    initialize_from_env()
    main_from_flags(run)
