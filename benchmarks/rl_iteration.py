"""One RL iteration: this framework's PPO step vs TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

Equal samples and tokens on every side: ``--prompts`` (8) prompts of ``--prompt-len``
(32) tokens, ``--samples`` (4) responses each, exactly ``--new-tokens`` (64) new tokens per
response (no EOS can end a response early), a reward model of the policy's size, one
gradient step on the whole rollout per iteration.

Ours (:func:`rlhf_jax.train.steps.make_ppo_step`): the 8 × 4 rows are the prompts repeated;
the critic is a value head on the policy trunk (``shared_critic=True``), the reference is
a frozen copy of the policy (KL folded into the rewards, β = 0.05), PPO with 1 epoch and 1
minibatch. The whole iteration is one jitted call with the state donated. The breakdown
times each stage as its own jitted function on the same shapes: rollout (the sampler),
scoring (reward model), reference (frozen log-probs) and update
(:func:`~rlhf_jax.train.steps.ppo.single_pass_update`: one forward pass of the policy with
its value head that also gives ``π_old`` and the old values, GAE, backward, AdamW).

TRL: ``trainer.train()`` for ``--warmup + --iterations`` steps of 32 completions (8 prompts
× ``num_generations`` 4); a callback times each optimiser step (generation, reward,
reference when β > 0, forward, backward, optimiser), the warm-up steps are dropped and the
best is kept. TRL's defaults are kept otherwise (GRPO β = 0: no reference model; RLOO
β = 0.05). Its reward model is a ``LlamaForSequenceClassification`` of the same size
(random weights: only its cost matters here).

Run from the repository root::

    python -m benchmarks.rl_iteration --config small
    python -m benchmarks.rl_iteration --iterations 1 --warmup 1 --new-tokens 8 --prompts 2  # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import (
    best_time,
    build_decoder,
    describe,
    export_hf,
    ids_to_text,
    llama_config,
    load_torch_model,
    print_table,
    random_ids,
    report_peak,
    word_tokenizer,
)
from rlhf_jax.models.heads import PolicyWithValueHead, ScalarModel
from rlhf_jax.sampling import SamplingConfig
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import init_ppo_extra, make_optimizer, make_ppo_step
from rlhf_jax.train.steps.ppo import (
    PPOConfig,
    PPOModels,
    actor_critic_forward,
    single_pass_update,
)
from rlhf_jax.train.steps.rollout import (
    PPOUpdateConfig,
    frozen_token_logprobs,
    generate,
    sequence_scores,
)

KL_COEF = 0.05
LEARNING_RATE = 1e-6


def build_ppo(config, new_tokens: int) -> dict[str, Any]:
    """Models, optimiser, settings and initial state of the PPO iteration."""
    policy = PolicyWithValueHead(config, rngs=nnx.Rngs(0), policy=build_decoder(config, seed=0))
    reward = ScalarModel(config, rngs=nnx.Rngs(1))
    critic_graphdef, params = nnx.split(policy)
    policy_graphdef, policy_params = nnx.split(policy.policy)
    reward_graphdef, reward_params = nnx.split(reward)
    models = PPOModels(
        policy=policy_graphdef, critic=critic_graphdef, reward=reward_graphdef, shared_critic=True
    )
    tx = make_optimizer(learning_rate=LEARNING_RATE, num_steps=1000, max_grad_norm=1.0)
    ppo = PPOConfig(
        sampling=SamplingConfig(max_new_tokens=new_tokens, eos_id=None),
        update=PPOUpdateConfig(epochs=1, num_minibatches=1),
    )
    extra = init_ppo_extra(
        reference_params=jax.tree.map(jnp.copy, policy_params),
        reward_params=reward_params,
        kl_coef=KL_COEF,
    )
    return {
        "policy": policy.policy,
        "models": models,
        "tx": tx,
        "ppo": ppo,
        "state": TrainState.create(params, tx, 0, extra),
    }


def ppo_stage_functions(setup: Mapping[str, Any]) -> dict[str, Any]:
    """Each stage of the iteration as its own jitted function."""
    models, ppo = setup["models"], setup["ppo"]
    forward = actor_critic_forward(models)

    def update(state, output, ref_logprobs, scores):
        return single_pass_update(
            forward, setup["tx"], state, output, ref_logprobs, scores, ppo.update
        )[:2]

    return {
        "rollout": jax.jit(
            lambda params, prompts, key: generate(
                models.policy, params, prompts, key, sampling=ppo.sampling
            )
        ),
        "scoring": jax.jit(lambda params, t, m: sequence_scores(models.reward, params, t, m)),
        "reference": jax.jit(
            lambda params, t, m, r: frozen_token_logprobs(models.policy, params, t, m, r)
        ),
        "update": jax.jit(update),
    }


def ppo_breakdown(setup: Mapping[str, Any], prompts, repeats: int) -> dict[str, float]:
    """Best seconds of each stage of one iteration (stages jitted separately)."""
    stages = ppo_stage_functions(setup)
    state = setup["state"]
    params, extra = state.params, state.extra
    key = jax.random.key(1)
    out = stages["rollout"](params["policy"], prompts, key)
    tokens, mask, response = out.tokens, out.attention_mask, out.response_mask
    ref_logprobs = stages["reference"](extra["reference_params"], tokens, mask, response)
    scores = stages["scoring"](extra["reward_params"], tokens, mask)
    calls = {
        "rollout": lambda: stages["rollout"](params["policy"], prompts, key),
        "scoring": lambda: stages["scoring"](extra["reward_params"], tokens, mask),
        "reference": lambda: stages["reference"](extra["reference_params"], tokens, mask, response),
        "update": lambda: stages["update"](state, out, ref_logprobs, scores),
    }
    return {
        name: best_time(lambda call=call: jax.block_until_ready(call()), repeats)
        for name, call in calls.items()
    }


def ppo_iteration_seconds(setup: Mapping[str, Any], prompts, repeats: int) -> float:
    """Best seconds of one whole jitted PPO iteration (state donated)."""
    step = jax.jit(make_ppo_step(setup["models"], setup["tx"], setup["ppo"]), donate_argnums=0)
    state = jax.tree.map(jnp.copy, setup["state"])
    key = jax.random.key(2)

    def run() -> None:
        nonlocal state
        state, metrics = step(state, prompts, key)
        jax.block_until_ready(metrics)

    return best_time(run, repeats)


def trl_iteration_seconds(
    kind: str,
    directory,
    prompt_ids: np.ndarray,
    *,
    samples: int,
    new_tokens: int,
    warmup: int,
    iterations: int,
) -> float:
    """Best seconds per ``GRPOTrainer`` / ``RLOOTrainer`` step (after ``warmup`` steps)."""
    import datasets
    import torch
    import transformers
    import trl

    policy = load_torch_model(directory)
    config = policy.config
    vocab = config.vocab_size
    # EOS (and pad) gets id V, outside the model's vocabulary: no response ends early.
    tokenizer = word_tokenizer(vocab, eos="<eos>")
    torch.manual_seed(0)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    reward_config = transformers.LlamaConfig(**settings, num_labels=1)
    reward_config.pad_token_id = None  # the trainer sets the tokenizer's; no row is padded
    reward = transformers.LlamaForSequenceClassification(reward_config).eval()
    total = warmup + iterations
    prompts = [f"{ids_to_text(row)} " for _ in range(total) for row in prompt_ids]
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench_trl_{kind}_"),
        "per_device_train_batch_size": len(prompt_ids) * samples,
        "num_generations": samples,
        "max_completion_length": new_tokens,
        "max_steps": total,
        "learning_rate": LEARNING_RATE,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10**6,
        "dataloader_num_workers": 0,
        "shuffle_dataset": False,
        "seed": 0,
    }
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer_class, config_class = {
        "grpo": (trl.GRPOTrainer, trl.GRPOConfig),
        "rloo": (trl.RLOOTrainer, trl.RLOOConfig),
    }[kind]
    trainer = trainer_class(
        model=policy,
        reward_funcs=reward,
        args=config_class(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_processing_classes=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return min(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed TRL iterations")
    parser.add_argument("--trainers", nargs="*", choices=("grpo", "rloo"), default=["grpo", "rloo"])
    args = parser.parse_args()

    config = llama_config(args.config)
    setup = build_ppo(config, args.new_tokens)
    describe(args.config, setup["policy"])
    peak = report_peak()
    prompt_ids = random_ids(0, (args.prompts, args.prompt_len), config.vocab_size)
    rows = np.repeat(prompt_ids, args.samples, axis=0)
    prompts = {"input_ids": jnp.asarray(rows), "attention_mask": jnp.ones(rows.shape, jnp.int32)}

    whole = ppo_iteration_seconds(setup, prompts, args.iterations)
    parts = ppo_breakdown(setup, prompts, args.iterations)
    table = [["ours: PPO (jitted iteration)", f"{whole:.3f}", "1.00x"]]
    if args.trainers:
        directory = export_hf(setup["policy"], tempfile.mkdtemp(prefix="bench_rl_"))
        for kind in args.trainers:
            theirs = trl_iteration_seconds(
                kind,
                directory,
                prompt_ids,
                samples=args.samples,
                new_tokens=args.new_tokens,
                warmup=args.warmup,
                iterations=args.iterations,
            )
            table.append([f"TRL {kind.upper()}Trainer", f"{theirs:.3f}", f"{theirs / whole:.2f}x"])
    print(
        f"\none RL iteration, {args.prompts} prompts x {args.samples} samples x {args.new_tokens} "
        f"new tokens, same-size reward model (matmul peak {peak:.1f} GFLOP/s):"
    )
    print_table(["iteration", "s/iteration", "TRL / ours"], table)
    print("\nPPO iteration breakdown (each stage jitted alone):")
    total = sum(parts.values())
    print_table(
        ["stage", "seconds", "share"],
        [[name, f"{t:.3f}", f"{t / total:.0%}"] for name, t in parts.items()]
        + [["sum of stages", f"{total:.3f}", ""], ["whole iteration", f"{whole:.3f}", ""]],
    )


if __name__ == "__main__":
    main()
