"""DPO step time and MFU: ``rlhf_jax.train.steps.make_dpo_step`` vs TRL's ``DPOTrainer``.

Both sides train the same weights on the same shapes: ``--pairs`` (8) preference pairs
per step, each a ``--prompt-len`` (32) token prompt and ``--completion-len`` (96) token
chosen and rejected completions (sequences of 128 tokens, no padding), sigmoid loss
(Rafailov et al., 2023, eq. 7) with β = 0.1, AdamW with gradient clipping at norm 1. Two
variants each: the reference model evaluated inside the step, and reference log-probs
precomputed once before training (ours: ``reference="precomputed"``; TRL:
``precompute_ref_log_probs=True``, whose precomputation happens before the first step and
is not timed).

Ours: the step is jitted once with the state donated; the best of ``--steps`` timed
steps after one compiling step. TRL: ``trainer.train()`` for ``--warmup + --steps`` steps;
a callback times each optimiser step (``on_step_begin`` to ``on_step_end``: batch
collation, forwards, backward, optimiser), the first ``--warmup`` are dropped and the best
is kept. MFU = model FLOPs per second over the matmul peak measured in the same run, with
model FLOPs ``(6N + 12LHDT)`` per trained token (policy forward and backward over the
``2·pairs`` sequences) plus a third of that per token for the reference forward when it
runs in the step.

Run from the repository root::

    python -m benchmarks.dpo_step --config small
    python -m benchmarks.dpo_step --config medium --steps 3
    python -m benchmarks.dpo_step --config small --steps 1 --warmup 1 --pairs 2  # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import (
    best_time,
    build_decoder,
    describe,
    export_hf,
    forward_flops,
    ids_to_text,
    llama_config,
    load_torch_model,
    matmul_parameters,
    print_table,
    random_ids,
    report_peak,
    training_flops,
    word_tokenizer,
)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import (
    initial_dpo_extra,
    make_dpo_step,
    make_optimizer,
    precompute_reference_logps,
)

BETA = 0.1
LEARNING_RATE = 1e-6


def preference_arrays(pairs: int, prompt_len: int, completion_len: int, vocab: int, seed: int):
    """Random pairs as the DPO step's arrays ``chosen_*`` / ``rejected_*`` ``[pairs, L]``."""
    length = prompt_len + completion_len
    arrays = {}
    for offset, side in enumerate(("chosen", "rejected")):
        tokens = random_ids(seed + offset, (pairs, length), vocab)
        tokens[:, :prompt_len] = random_ids(seed, (pairs, prompt_len), vocab)
        response = np.zeros((pairs, length), np.int32)
        response[:, prompt_len:] = 1
        arrays[f"{side}_input_ids"] = tokens
        arrays[f"{side}_attention_mask"] = np.ones((pairs, length), np.int32)
        arrays[f"{side}_response_mask"] = response
    return arrays


def jax_step_seconds(graphdef, params, arrays, *, reference: str, steps: int) -> float:
    """Best seconds per jitted DPO step (state donated)."""
    tx = make_optimizer(learning_rate=LEARNING_RATE, num_steps=1000, max_grad_norm=1.0)
    step = jax.jit(
        make_dpo_step(graphdef, tx, loss_name="dpo", hyper={"beta": BETA}, reference=reference),
        donate_argnums=0,
    )
    reference_params = jax.tree.map(jnp.copy, params)
    if reference == "precomputed":
        arrays = precompute_reference_logps(
            graphdef, reference_params, arrays, batch_size=len(arrays["chosen_input_ids"])
        )
    extra = initial_dpo_extra(
        "dpo",
        reference=reference,
        reference_params=reference_params if reference == "in_step" else None,
    )
    state = TrainState.create(jax.tree.map(jnp.copy, params), tx, 0, extra)
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    key = jax.random.key(0)

    def run() -> None:
        nonlocal state
        state, metrics = step(state, batch, key)
        metrics["loss"].block_until_ready()

    return best_time(run, steps)


def trl_step_seconds(
    directory,
    arrays,
    *,
    vocab_size: int,
    prompt_len: int,
    precompute: bool,
    warmup: int,
    steps: int,
) -> float:
    """Best seconds per ``DPOTrainer`` optimiser step (after ``warmup`` steps)."""
    import datasets
    import transformers
    import trl

    eos = f"t{vocab_size - 1}"
    tokenizer = word_tokenizer(vocab_size, eos=eos)
    pairs = len(arrays["chosen_input_ids"])
    total = warmup + steps
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(total):
        for i in range(pairs):
            rows["prompt"].append(ids_to_text(arrays["chosen_input_ids"][i, :prompt_len]))
            for side in ("chosen", "rejected"):
                completion = arrays[f"{side}_input_ids"][i, prompt_len:-1]
                rows[side].append(f" {ids_to_text(completion)} {eos}")
    dataset = datasets.Dataset.from_dict(rows)
    output_dir = tempfile.mkdtemp(prefix="bench_trl_dpo_")
    config = trl.DPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=pairs,
        max_steps=total,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=None,
        precompute_ref_log_probs=precompute,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
        seed=0,
    )
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer = trl.DPOTrainer(
        model=load_torch_model(directory),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return min(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=96)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed TRL steps")
    parser.add_argument("--skip-trl", action="store_true", help="time this framework only")
    args = parser.parse_args()

    config = llama_config(args.config)
    model = build_decoder(config)
    describe(args.config, model)
    peak = report_peak()
    graphdef, params = nnx.split(model)
    arrays = preference_arrays(
        args.pairs, args.prompt_len, args.completion_len, config.vocab_size, seed=0
    )
    length = args.prompt_len + args.completion_len
    tokens = 2 * args.pairs * length
    n = matmul_parameters(model)
    train = training_flops(config, n, tokens, length)
    directory = None if args.skip_trl else export_hf(model, tempfile.mkdtemp(prefix="bench_dpo_"))

    rows = []
    for reference in ("in_step", "precomputed"):
        flops = train + (
            forward_flops(config, n, tokens, length) if reference == "in_step" else 0.0
        )
        ours = jax_step_seconds(graphdef, params, arrays, reference=reference, steps=args.steps)
        row = [
            reference,
            f"{ours:.3f}",
            f"{flops / ours / 1e9:.1f}",
            f"{flops / ours / 1e9 / peak:.0%}",
        ]
        if directory is not None:
            theirs = trl_step_seconds(
                directory,
                arrays,
                vocab_size=config.vocab_size,
                prompt_len=args.prompt_len,
                precompute=reference == "precomputed",
                warmup=args.warmup,
                steps=args.steps,
            )
            row += [f"{theirs:.3f}", f"{flops / theirs / 1e9 / peak:.0%}", f"{theirs / ours:.2f}x"]
        rows.append(row)
    headers = ["reference", "ours s/step", "ours GFLOP/s", "ours MFU"]
    if directory is not None:
        headers += ["TRL s/step", "TRL MFU", "speed-up"]
    reference_flops = forward_flops(config, n, tokens, length)
    print(
        f"\nDPO step, {args.pairs} pairs x ({args.prompt_len} + {args.completion_len}) tokens, "
        f"model FLOPs {train / 1e9:.1f} GFLOP/step (+{reference_flops / 1e9:.1f} reference), "
        f"matmul peak {peak:.1f} GFLOP/s:"
    )
    print_table(headers, rows)


if __name__ == "__main__":
    main()
