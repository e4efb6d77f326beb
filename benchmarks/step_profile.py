"""Where a jitted DPO step or sampler spends its time: XLA's ops by kind, from a profiler trace.

Traces ``--steps`` calls of the benchmark's DPO step (``--target dpo``: as
``benchmarks.dpo_step``, same model, shapes, loss and optimiser) or of the KV-cache sampler
(``--target sample``: greedy, ``--batch`` rows, ``--prompt-len`` prompt tokens and
``--new-tokens`` new ones, as ``benchmarks.generation``) with ``jax.profiler`` and reads the
trace back (``jax.profiler.ProfileData``). Each XLA op the CPU runtime executed is an event named
after its HLO instruction; the compiled HLO module tells what the instruction is, and
its time goes to one of:

- ``matmul``: a dot, or a fusion that contains one (the CPU backend's matmul fusions);
- ``copy/transpose``: a copy or transpose, or a fusion of nothing but those (and
  bitcasts/reshapes/broadcasts/slices): data movement only;
- ``reduce``: a fusion with a reduction (softmax and norm statistics, loss sums);
- ``elementwise``: any other fusion or arithmetic op;
- ``other``: gathers, scatters, dynamic slices, custom calls and the rest.

The table gives each kind's share of the summed op time (the CPU runtime runs
independent ops on its threads at once, so the sum exceeds the wall time) and the
costliest instructions that are not matmuls, with their output shapes: the evidence for
what keeps the step below the matmul peak.

Run from the repository root::

    python -m benchmarks.step_profile --config small
    python -m benchmarks.step_profile --config medium --steps 1
    python -m benchmarks.step_profile --target sample --batch 64
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

import jax
import jax.numpy as jnp
from flax import nnx
from jax.profiler import ProfileData

from benchmarks.common import (
    build_decoder,
    describe,
    forward_flops,
    llama_config,
    matmul_parameters,
    print_table,
    random_ids,
    report_peak,
    training_flops,
)
from benchmarks.dpo_step import BETA, LEARNING_RATE, preference_arrays
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import initial_dpo_extra, make_dpo_step, make_optimizer

DATA_MOVEMENT = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "parameter"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(")
_COMPUTATION = re.compile(r"^\s*%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def parse_hlo(text: str) -> tuple[dict[str, tuple[str, str, str | None]], dict[str, set[str]]]:
    """``name -> (opcode, shape, called computation)`` per instruction; opcodes per computation."""
    instructions: dict[str, tuple[str, str, str | None]] = {}
    opcodes: dict[str, set[str]] = collections.defaultdict(set)
    computation = None
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            name, shape, opcode = match.groups()
            called = _CALLS.search(line)
            instructions[name] = (opcode, shape, called.group(1) if called else None)
            if computation is not None:
                opcodes[computation].add(opcode)
            continue
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            computation = header.group(1)
    return instructions, opcodes


def op_kind(
    name: str,
    instructions: dict[str, tuple[str, str, str | None]],
    opcodes: dict[str, set[str]],
) -> str:
    """The kind (module docstring) of the HLO instruction ``name``."""
    opcode, _, called = instructions[name]
    inner = opcodes.get(called, set()) if called else {opcode}
    if {"dot", "convolution"} & inner:
        return "matmul"
    if inner <= DATA_MOVEMENT:
        return "copy/transpose"
    if "reduce" in inner:
        return "reduce"
    if opcode in ("fusion", "add", "multiply", "subtract", "divide", "exponential", "select"):
        return "elementwise"
    return "other"


def profile_calls(fn, args, calls: int) -> dict[str, int]:
    """Nanoseconds per trace event name over ``calls`` traced calls of ``fn(*args)``."""
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    directory = tempfile.mkdtemp(prefix="step_profile_")
    with jax.profiler.trace(directory):
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
    durations: dict[str, int] = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            for event in line.events:
                durations[event.name] += event.duration_ns
    return durations


def dpo_call(graphdef, params, config, args):
    """The jitted DPO step (no donation, so one state serves every call) and its arguments."""
    tx = make_optimizer(learning_rate=LEARNING_RATE, num_steps=1000, max_grad_norm=1.0)
    step = jax.jit(
        make_dpo_step(graphdef, tx, loss_name="dpo", hyper={"beta": BETA}, reference="in_step")
    )
    extra = initial_dpo_extra(
        "dpo", reference="in_step", reference_params=jax.tree.map(jnp.copy, params)
    )
    state = TrainState.create(params, tx, 0, extra)
    arrays = preference_arrays(
        args.pairs, args.prompt_len, args.completion_len, config.vocab_size, seed=0
    )
    batch = {k: jnp.asarray(v) for k, v in arrays.items()}
    return step, (state, batch, jax.random.key(0))


def sample_call(graphdef, params, config, args):
    """The jitted greedy sampler (no EOS: every row generates ``--new-tokens``) and its args."""
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, eos_id=None, greedy=True)
    prompts = jnp.asarray(random_ids(0, (args.batch, args.prompt_len), config.vocab_size))
    mask = jnp.ones(prompts.shape, jnp.int32)
    fn = jax.jit(lambda p, x, m, k: sample(graphdef, p, x, m, k, config=sampling).tokens)
    return fn, (params, prompts, mask, jax.random.key(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("small", "medium"), default="small")
    parser.add_argument("--target", choices=("dpo", "sample"), default="dpo")
    parser.add_argument("--pairs", type=int, default=8, help="DPO pairs")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--completion-len", type=int, default=96, help="DPO completion tokens")
    parser.add_argument("--batch", type=int, default=64, help="sampler rows")
    parser.add_argument("--new-tokens", type=int, default=64, help="sampler new tokens")
    parser.add_argument("--steps", type=int, default=2, help="traced calls")
    args = parser.parse_args()

    config = llama_config(args.config)
    model = build_decoder(config)
    describe(args.config, model)
    peak = report_peak()
    graphdef, params = nnx.split(model)
    if args.target == "dpo":
        fn, call_args = dpo_call(graphdef, params, config, args)
    else:
        fn, call_args = sample_call(graphdef, params, config, args)
    instructions, opcodes = parse_hlo(fn.lower(*call_args).compile().as_text())
    durations = profile_calls(fn, call_args, args.steps)
    wall = durations.get("ThunkExecutor::Execute (wait for completion)", 0) / args.steps / 1e9
    if args.target == "dpo":
        length = args.prompt_len + args.completion_len
        tokens = 2 * args.pairs * length
        n = matmul_parameters(model)
        flops = training_flops(config, n, tokens, length) + forward_flops(config, n, tokens, length)
        headline = (
            f"DPO step (in-step reference), {args.pairs} pairs x {length} tokens: "
            f"{flops / 1e9:.1f} model GFLOP; traced wall {wall:.3f} s/step "
            f"(MFU {flops / wall / 1e9 / peak:.0%} of {peak:.1f} GFLOP/s)"
        )
    else:
        generated = args.batch * args.new_tokens
        headline = (
            f"greedy sampling, {args.batch} rows x {args.new_tokens} new tokens: traced wall "
            f"{wall:.3f} s/call ({generated / wall:,.0f} tok/s)"
        )

    per_kind: dict[str, int] = collections.Counter()
    ops = {name: ns for name, ns in durations.items() if name in instructions}
    for name, ns in ops.items():
        per_kind[op_kind(name, instructions, opcodes)] += ns
    total = sum(per_kind.values())
    print(f"\n{headline}; op time summed over threads {total / 1e9 / args.steps:.3f} s/call")
    print_table(
        ["kind", "s/call", "share"],
        [
            [kind, f"{ns / 1e9 / args.steps:.3f}", f"{ns / total:.1%}"]
            for kind, ns in sorted(per_kind.items(), key=lambda kv: -kv[1])
        ],
    )
    print("\ncostliest instructions other than matmuls:")
    others = [
        (name, ns) for name, ns in ops.items() if op_kind(name, instructions, opcodes) != "matmul"
    ]
    print_table(
        ["instruction", "kind", "output", "ms/call", "share"],
        [
            [
                name,
                op_kind(name, instructions, opcodes),
                instructions[name][1],
                f"{ns / 1e6 / args.steps:.1f}",
                f"{ns / total:.1%}",
            ]
            for name, ns in sorted(others, key=lambda kv: -kv[1])[:12]
        ],
    )


if __name__ == "__main__":
    main()
