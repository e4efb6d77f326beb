"""Training and sampling throughput of a ~20M-parameter Llama-style decoder, and its MFU.

Prints, for one model size (all sizes are flags):

1. the exact parameter count, split into the embedding table and the rest;
2. this machine's dense matmul peak, measured in the same run (``benchmarks.matmul_peak``);
3. train-step tokens/s and MFU for a plain next-token cross-entropy step with
   ``optax.adamw``, jitted with the (params, optimiser state) donated;
4. greedy sampler tokens/s (``rlhf_jax.sampling.sample``) at each decode batch size.

Model FLOPs per trained token follow Chowdhery et al. 2022 (PaLM, App. B):
``6 · N + 12 · L · H · D · T``, where ``N`` counts the parameters that take part in a
matmul (every parameter except the token-embedding lookup table, norm scales included
(< 0.1%); the output projection is counted, and with tied embeddings ``E · V`` is added
back for it), and the second term is
the attention scores and weighted values (``QKᵀ`` and ``AV``, forward and backward) for
``L`` layers, ``H`` query heads of width ``D`` and context ``T``, counted over the full
``T × T`` square as in the paper. MFU = model FLOPs per second / measured matmul peak.

Timings exclude compilation: every jitted function runs once before it is timed; the
best of ``--train-steps`` timed steps and of ``--repeats`` timed sampler calls is
reported. Sampler tokens/s is generated tokens over the wall time of a whole ``sample``
call (prefill of the prompt included), without an EOS id so that every row generates
``--new-tokens`` tokens.

Run from the repository root::

    python -m benchmarks.model_throughput            # defaults: ~22M parameters
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.matmul_peak import measure_matmul_peak
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Decoder
from rlhf_jax.sampling import SamplingConfig, sample


def parameter_counts(model: Decoder) -> dict[str, int]:
    """Total, embedding-table and matmul parameter counts (see the module docstring)."""
    config = model.config
    state = nnx.state(model, nnx.Param)
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    embedding = config.vocab_size * config.hidden_size
    if config.position == "learned":
        embedding += config.max_position_embeddings * config.hidden_size
    matmul = total - embedding
    if config.tie_embeddings:
        matmul += config.vocab_size * config.hidden_size
    return {"total": total, "embedding": embedding, "matmul": matmul}


def train_flops_per_token(config: ModelConfig, matmul_params: int, context: int) -> float:
    """``6 N + 12 L H D T`` (Chowdhery et al. 2022, App. B)."""
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * context
    return 6.0 * matmul_params + attention


def best_time(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``fn()`` (which must block until its result is ready)."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation):
    """A jitted ``(params, opt_state), tokens -> (params, opt_state), loss`` step.

    The loss is the mean next-token cross-entropy of ``tokens[:, 1:]`` given
    ``tokens[:, :-1]``; the state argument is donated so XLA updates it in place.
    """

    def loss_fn(params: Any, tokens: jax.Array) -> jax.Array:
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :-1])
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.mean(losses)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state: tuple[Any, Any], tokens: jax.Array):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    return train_step


def benchmark_training(
    graphdef: nnx.GraphDef, params: Any, *, batch: int, seq_len: int, steps: int, vocab: int
) -> float:
    """Seconds per train step (best of ``steps`` after one compiling step)."""
    optimizer = optax.adamw(3e-4, weight_decay=0.1)
    train_step = make_train_step(graphdef, optimizer)
    # Copy the parameters: the step donates (invalidates) the buffers it is given.
    state = (jax.tree.map(jnp.copy, params), optimizer.init(params))
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, vocab)

    def run() -> None:
        nonlocal state
        state, loss = train_step(state, tokens)
        loss.block_until_ready()

    run()
    return best_time(run, steps)


def benchmark_decode(
    graphdef: nnx.GraphDef,
    params: Any,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    vocab: int,
    repeats: int,
) -> float:
    """Seconds per greedy ``sample`` call (best of ``repeats`` after one compiling call)."""
    config = SamplingConfig(max_new_tokens=new_tokens, eos_id=None, greedy=True)
    prompts = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, vocab)
    mask = jnp.ones((batch, prompt_len), jnp.int32)

    def run() -> None:
        out = sample(graphdef, params, prompts, mask, jax.random.key(2), config=config)
        out.tokens.block_until_ready()

    run()
    return best_time(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--mlp", type=int, default=1408)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed sampler calls")
    parser.add_argument("--matmul-sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--matmul-repeats", type=int, default=3)
    args = parser.parse_args()

    config = ModelConfig.llama(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        mlp_hidden_size=args.mlp,
        max_position_embeddings=max(args.seq_len, args.prompt_len + args.new_tokens),
    )
    model = Decoder(config, rngs=nnx.Rngs(0))
    counts = parameter_counts(model)
    graphdef, params = nnx.split(model)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), float32")
    print(
        f"model: llama, vocab {config.vocab_size}, hidden {config.hidden_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads ({config.num_kv_heads} kv, "
        f"head dim {config.head_dim}), MLP {config.mlp_hidden_size}"
    )
    print(
        f"parameters: {counts['total']:,} total = {counts['embedding']:,} embedding table "
        f"+ {counts['total'] - counts['embedding']:,} other; N (matmul) = {counts['matmul']:,}"
    )

    peak, per_size = measure_matmul_peak(args.matmul_sizes, repeats=args.matmul_repeats)
    sizes = ", ".join(f"{n}: {g:.1f}" for n, g in per_size.items())
    print(f"matmul peak: {peak:.1f} GFLOP/s (f32, best of {args.matmul_repeats}; per size {sizes})")

    step_time = benchmark_training(
        graphdef,
        params,
        batch=args.train_batch,
        seq_len=args.seq_len,
        steps=args.train_steps,
        vocab=args.vocab,
    )
    tokens_per_step = args.train_batch * args.seq_len
    flops_per_token = train_flops_per_token(config, counts["matmul"], args.seq_len)
    achieved = flops_per_token * tokens_per_step / step_time / 1e9
    print(
        f"train step (batch {args.train_batch} x {args.seq_len}, adamw): "
        f"{step_time * 1e3:.0f} ms, {tokens_per_step / step_time:,.0f} tokens/s, "
        f"{achieved:.1f} GFLOP/s model FLOPs (6N + 12LHDT = {flops_per_token / 1e6:.1f} "
        f"MFLOP/token), MFU {achieved / peak:.1%}"
    )

    for batch in args.decode_batches:
        call_time = benchmark_decode(
            graphdef,
            params,
            batch=batch,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            vocab=args.vocab,
            repeats=args.repeats,
        )
        print(
            f"sampler (greedy, batch {batch}, prompt {args.prompt_len}, "
            f"{args.new_tokens} new): {call_time * 1e3:.0f} ms per call, "
            f"{batch * args.new_tokens / call_time:,.1f} generated tokens/s"
        )


if __name__ == "__main__":
    main()
