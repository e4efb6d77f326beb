"""Peak resident memory of one PPO iteration next to what it has to hold.

Builds the PPO iteration of :mod:`benchmarks.rl_iteration` (policy with value head, frozen
reference, same-size reward model, AdamW) and prints:

- the bytes of each model's parameters and of the optimiser state (two AdamW moments of
  the trainable parameters, plus counters);
- one minibatch of activations: XLA's temporary buffers of the compiled update stage alone
  (forward and backward of the policy-with-value-head over the whole rollout, which is one
  minibatch here), from ``compiled.memory_analysis()``;
- the same analysis for the whole jitted iteration (rollout, scoring, reference and
  update in one program);
- the process's peak resident set size (``ru_maxrss``) after one iteration, and its
  growth over the resident size measured after importing JAX, before any model is built.

Run it in its own process (the peak RSS is a process-wide high-water mark)::

    python -m benchmarks.ppo_memory --config small
    python -m benchmarks.ppo_memory --config small --new-tokens 8 --prompts 2  # smoke
"""

from __future__ import annotations

import argparse
import resource

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import llama_config, print_table, random_ids
from benchmarks.rl_iteration import build_ppo, ppo_stage_functions
from rlhf_jax.train.steps import make_ppo_step

MIB = 2**20


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """The process's resident set size now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    jnp.zeros(()).block_until_ready()
    baseline = current_rss_bytes()
    config = llama_config(args.config)
    setup = build_ppo(config, args.new_tokens)
    state = setup["state"]
    rows_ids = np.repeat(
        random_ids(0, (args.prompts, args.prompt_len), config.vocab_size), args.samples, axis=0
    )
    prompts = {
        "input_ids": jnp.asarray(rows_ids),
        "attention_mask": jnp.ones(rows_ids.shape, jnp.int32),
    }
    key = jax.random.key(0)

    step = jax.jit(make_ppo_step(setup["models"], setup["tx"], setup["ppo"]), donate_argnums=0)
    iteration = step.lower(state, prompts, key).compile().memory_analysis()
    stages = ppo_stage_functions(setup)
    output = jax.eval_shape(stages["rollout"], state.params["policy"], prompts, key)
    ref_logprobs = jax.ShapeDtypeStruct(output.tokens.shape, jnp.float32)
    scores = jax.ShapeDtypeStruct(output.tokens.shape[:1], jnp.float32)
    update = stages["update"].lower(state, output, ref_logprobs, scores).compile().memory_analysis()

    state, metrics = step(state, prompts, key)
    jax.block_until_ready(metrics)
    peak = peak_rss_bytes()

    parts = {
        "policy + value head params": tree_bytes(state.params),
        "reference params": tree_bytes(state.extra["reference_params"]),
        "reward model params": tree_bytes(state.extra["reward_params"]),
        "optimizer state (AdamW)": tree_bytes(state.opt_state),
        "one minibatch of activations (update temp)": update.temp_size_in_bytes,
    }
    table = [[name, f"{size / MIB:,.1f}"] for name, size in parts.items()]
    table.append(["sum", f"{sum(parts.values()) / MIB:,.1f}"])
    table.append(
        ["whole iteration: XLA temp buffers", f"{iteration.temp_size_in_bytes / MIB:,.1f}"]
    )
    io_bytes = (
        iteration.argument_size_in_bytes
        + iteration.output_size_in_bytes
        - iteration.alias_size_in_bytes
    )
    table.append(["whole iteration: arguments + outputs - aliased", f"{io_bytes / MIB:,.1f}"])
    table.append(["process RSS after importing jax", f"{baseline / MIB:,.1f}"])
    table.append(["process peak RSS after one iteration", f"{peak / MIB:,.1f}"])
    table.append(["peak RSS - import baseline", f"{(peak - baseline) / MIB:,.1f}"])
    print(
        f"PPO iteration memory, {args.config!r}, {args.prompts} prompts x {args.samples} samples x "
        f"({args.prompt_len} + {args.new_tokens}) tokens, float32:"
    )
    print_table(["item", "MiB"], table)


if __name__ == "__main__":
    main()
