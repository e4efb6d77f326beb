"""Generation throughput: ``rlhf_jax.sampling.sample`` vs ``transformers`` ``generate``.

Same weights, prompt ``--prompt-len`` (32) tokens, exactly ``--new-tokens`` (64) new
tokens per row on both sides (no EOS id: ours ``eos_id=None``; ``generate`` with
``min_new_tokens = max_new_tokens`` and no EOS), KV cache on both, greedy and sampled
(temperature 1, no top-k/top-p filter), at each batch size. Tokens/s counts generated
tokens over the wall time of a whole call (prefill included); best of ``--repeats`` calls,
the two stacks' calls interleaved, after a warm-up (compiling) call. The matmul peak and
the memory read bandwidth are measured in the same run; "weights GB/s" is the parameter
bytes one decode step reads (every weight once, whatever the batch) times the decode steps
over our wall time, the figure that bounds batch-1 decoding when it nears the bandwidth.

Run from the repository root::

    python -m benchmarks.generation --config small --batches 1 8 64
    python -m benchmarks.generation --config medium --batches 1 8
    python -m benchmarks.generation --config small --batches 1 --new-tokens 8 --repeats 1  # smoke
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import (
    build_decoder,
    describe,
    export_hf,
    interleaved_best_times,
    llama_config,
    load_torch_model,
    print_table,
    random_ids,
    report_peak,
    report_read_bandwidth,
)
from rlhf_jax.sampling import SamplingConfig, sample


def jax_generation_call(
    graphdef: nnx.GraphDef, params: nnx.State, prompts: jax.Array, *, new_tokens: int, greedy: bool
) -> Callable[[], None]:
    """One blocking ``sample`` call producing ``new_tokens`` tokens per row."""
    config = SamplingConfig(max_new_tokens=new_tokens, eos_id=None, greedy=greedy)
    mask = jnp.ones(prompts.shape, jnp.int32)

    def run() -> None:
        sample(
            graphdef, params, prompts, mask, jax.random.key(0), config=config
        ).tokens.block_until_ready()

    return run


def torch_generation_call(model, prompts, *, new_tokens: int, greedy: bool) -> Callable[[], None]:
    """One ``generate`` call producing exactly ``new_tokens`` tokens per row."""
    import torch

    prompts = torch.as_tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(prompts)

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(
                input_ids=prompts,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=not greedy,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                use_cache=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.shape[1] == prompts.shape[1] + new_tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes", nargs="+", choices=("greedy", "sampled"), default=["greedy", "sampled"]
    )
    parser.add_argument("--skip-torch", action="store_true", help="time this framework only")
    args = parser.parse_args()

    config = llama_config(args.config)
    model = build_decoder(config)
    describe(args.config, model)
    peak = report_peak()
    bandwidth = report_read_bandwidth()
    graphdef, params = nnx.split(model)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    torch_model = None
    if not args.skip_torch:
        directory = tempfile.mkdtemp(prefix="bench_generation_")
        torch_model = load_torch_model(export_hf(model, directory))

    rows = []
    for mode in args.modes:
        greedy = mode == "greedy"
        for batch in args.batches:
            prompts = random_ids(batch, (batch, args.prompt_len), config.vocab_size)
            kwargs = {"new_tokens": args.new_tokens, "greedy": greedy}
            calls = {"ours": jax_generation_call(graphdef, params, jnp.asarray(prompts), **kwargs)}
            if torch_model is not None:
                calls["torch"] = torch_generation_call(torch_model, prompts, **kwargs)
            times = interleaved_best_times(calls, args.repeats)
            ours, generated = times["ours"], batch * args.new_tokens
            weights_rate = weight_bytes * args.new_tokens / ours / 1e9
            row = [
                mode,
                batch,
                f"{generated / ours:,.0f}",
                f"{ours * 1e3:,.0f}",
                f"{weights_rate:.1f}",
            ]
            if torch_model is not None:
                theirs = times["torch"]
                row += [
                    f"{generated / theirs:,.0f}",
                    f"{theirs * 1e3:,.0f}",
                    f"{theirs / ours:.2f}x",
                ]
            rows.append(row)
    headers = ["mode", "batch", "ours tok/s", "ours ms", "weights GB/s"]
    if torch_model is not None:
        headers += ["generate tok/s", "generate ms", "speed-up"]
    print(
        f"\ngeneration, prompt {args.prompt_len}, {args.new_tokens} new tokens per row "
        f"(matmul peak {peak:.1f} GFLOP/s, read bandwidth {bandwidth:.1f} GB/s, "
        f"{weight_bytes / 1e6:.1f} MB of weights):"
    )
    print_table(headers, rows)


if __name__ == "__main__":
    main()
