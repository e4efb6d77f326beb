"""Cost of Nash-MD's geometric-mixture sampling relative to single-model sampling.

``sample_combined`` over (policy, reference) with weights ``(1 − β, β)`` draws from
``π^{1−β} · π_ref^β`` (Munos et al., 2024): both models advance their own KV cache at
every step, so the ideal cost ratio is 2 (two forward passes per token) plus the small
per-step combination of the two distributions. Sampled (temperature 1), exactly
``--new-tokens`` new tokens per row, best of ``--repeats`` interleaved calls after a compiling call;
the matmul peak is measured in the same run.

Run from the repository root::

    python -m benchmarks.mixture_sampling --config small --batches 1 8 64
    python -m benchmarks.mixture_sampling --batches 1 --new-tokens 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import (
    build_decoder,
    describe,
    interleaved_best_times,
    llama_config,
    print_table,
    random_ids,
    report_peak,
)
from rlhf_jax.sampling import SamplingConfig, sample, sample_combined

MIXTURE_BETA = 0.125


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = llama_config(args.config)
    policy = build_decoder(config, seed=0)
    describe(args.config, policy)
    peak = report_peak()
    graphdef, policy_params = nnx.split(policy)
    _, reference_params = nnx.split(build_decoder(config, seed=1))
    weights = jnp.asarray([1.0 - MIXTURE_BETA, MIXTURE_BETA], jnp.float32)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, eos_id=None)
    key = jax.random.key(0)

    rows = []
    for batch in args.batches:
        prompts = jnp.asarray(random_ids(batch, (batch, args.prompt_len), config.vocab_size))
        mask = jnp.ones(prompts.shape, jnp.int32)
        times = interleaved_best_times(
            {
                "single": lambda p=prompts, m=mask: sample(
                    graphdef, policy_params, p, m, key, config=sampling
                ).tokens.block_until_ready(),
                "mixture": lambda p=prompts, m=mask: sample_combined(
                    (graphdef, graphdef),
                    (policy_params, reference_params),
                    weights,
                    p,
                    m,
                    key,
                    config=sampling,
                ).tokens.block_until_ready(),
            },
            args.repeats,
        )
        single, mixture = times["single"], times["mixture"]
        rows.append(
            [batch, f"{single * 1e3:,.0f}", f"{mixture * 1e3:,.0f}", f"{mixture / single:.2f}"]
        )
    print(
        f"\nmixture vs single-model sampling, prompt {args.prompt_len}, {args.new_tokens} new "
        f"tokens, β = {MIXTURE_BETA} (matmul peak {peak:.1f} GFLOP/s):"
    )
    print_table(["batch", "single ms", "mixture ms", "cost ratio"], rows)


if __name__ == "__main__":
    main()
