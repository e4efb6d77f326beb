"""SFT step time and per-device memory of one model on 1 and 8 devices, for each mesh shape.

For a Llama-style decoder (default: ~5M parameters, the experiments' base model with a
256-token vocabulary and 8 key/value heads so that every width divides by 8) the script
compiles the project's real SFT step (``make_sft_step`` with AdamW) with
:func:`rlhf_jax.parallel.shard_step` on every mesh ``(data, fsdp, tensor)`` that fits the
device count, and prints per mesh:

- the best wall time of ``--steps`` timed steps (after one untimed compile-and-run step);
- the per-device memory XLA plans for the compiled programme
  (``compiled.memory_analysis()``): arguments (parameters, optimiser state, batch),
  outputs, temporaries, and the argument bytes the donated state lets the outputs reuse.

Each device count runs in its own subprocess, which sets ``XLA_FLAGS`` (8 fake CPU
devices, or 1) before JAX is imported: the device count is fixed when JAX starts. Fake CPU
devices share the host's cores, so the 8-device times show partitioning and collective
overhead, not a speed-up; with ``--real`` one more subprocess runs on the accelerators JAX
finds (every mesh whose size is their count, and one device).

Run from the repository root::

    python -m benchmarks.mesh_scaling
    python -m benchmarks.mesh_scaling --layers 1 --hidden 64 --mlp 128 --seq-len 32 --steps 2
    python -m benchmarks.mesh_scaling --real          # also on the local GPUs / TPUs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

MESH_SHAPES = ((8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 1, 1))
RESULT_PREFIX = "RESULT "
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (model size, batch, steps, which devices)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--mlp", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mesh")
    parser.add_argument("--real", action="store_true", help="also run on the real devices")
    parser.add_argument("--worker", choices=("cpu1", "cpu8", "real"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_environment(kind: str) -> dict[str, str]:
    """The environment of a worker: ``XLA_FLAGS`` fixing the fake CPU device count."""
    env = dict(os.environ)
    if kind == "real":
        return env
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={kind[3:]}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return env


def run_worker(args: argparse.Namespace) -> None:
    """Measure every mesh that fits this process's devices; print one JSON line each."""
    if args.worker != "real":  # before JAX is imported: the device count is fixed then
        os.environ.update(worker_environment(args.worker))

    import jax
    import numpy as np
    import optax
    from flax import nnx

    from rlhf_jax.models import Decoder, ModelConfig
    from rlhf_jax.parallel import make_mesh, shard_step
    from rlhf_jax.train.state import TrainState
    from rlhf_jax.train.steps import make_sft_step

    config = ModelConfig.llama(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        mlp_hidden_size=args.mlp,
        max_position_embeddings=args.seq_len,
    )
    graphdef, params = nnx.split(Decoder(config, rngs=nnx.Rngs(0)))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = optax.adamw(1e-3)
    step_fn = make_sft_step(graphdef, tx)
    host_state = jax.tree.map(np.asarray, TrainState.create(params, tx, rng=0))
    tokens = np.random.default_rng(0).integers(
        0, args.vocab, (args.batch_size, args.seq_len), np.int32
    )
    batch = {
        "input_ids": tokens,
        "attention_mask": np.ones_like(tokens),
        "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch_size, 1)),
        "loss_mask": np.ones_like(tokens),
    }
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    num_devices = jax.device_count()
    shapes = [s for s in MESH_SHAPES if math.prod(s) in (num_devices, 1)]
    for shape in shapes:
        mesh = make_mesh(shape, devices=jax.devices()[: math.prod(shape)])
        sharded = shard_step(step_fn, mesh, host_state, batch, tx=tx)
        state, placed = sharded.place_state(host_state), sharded.place_batch(batch)
        compiled = sharded.step.lower(state, placed, key).compile()
        memory = compiled.memory_analysis()
        state, metrics = compiled(state, placed, key)
        jax.block_until_ready(metrics)
        best = math.inf
        for _ in range(args.steps):
            start = time.perf_counter()
            state, metrics = compiled(state, placed, key)
            jax.block_until_ready((state, metrics))
            best = min(best, time.perf_counter() - start)
        result = {
            "platform": jax.devices()[0].platform,
            "devices": num_devices,
            "mesh": list(shape),
            "params": num_params,
            "step_ms": 1e3 * best,
            "loss": float(metrics["loss"]),
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes,
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)


def collect(kind: str, argv: list[str]) -> list[dict]:
    """Run one worker subprocess and parse its result lines."""
    command = [sys.executable, "-m", "benchmarks.mesh_scaling", *argv, "--worker", kind]
    completed = subprocess.run(
        command, env=worker_environment(kind), capture_output=True, text=True, check=False
    )
    if completed.returncode:
        raise RuntimeError(f"worker {kind} failed:\n{completed.stderr[-4000:]}")
    lines = completed.stdout.splitlines()
    return [
        json.loads(line[len(RESULT_PREFIX) :]) for line in lines if line.startswith(RESULT_PREFIX)
    ]


def format_table(results: list[dict]) -> str:
    """One row per (device count, mesh): time and per-device memory in MiB."""
    header = (
        f"{'platform':>8} {'devices':>7} {'mesh (d,f,t)':>12} {'step ms':>9} "
        f"{'args MiB':>9} {'out MiB':>8} {'temp MiB':>9} {'alias MiB':>9} {'loss':>7}"
    )
    rows = [header, "-" * len(header)]
    for r in results:
        mesh = ",".join(map(str, r["mesh"]))
        rows.append(
            f"{r['platform']:>8} {r['devices']:>7} {mesh:>12} {r['step_ms']:>9.1f} "
            f"{r['argument_bytes'] / MIB:>9.2f} {r['output_bytes'] / MIB:>8.2f} "
            f"{r['temp_bytes'] / MIB:>9.2f} {r['alias_bytes'] / MIB:>9.2f} {r['loss']:>7.4f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Spawn one worker per device count and print the table."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    forwarded = [a for a in argv if a != "--real"]
    results = collect("cpu1", forwarded) + collect("cpu8", forwarded)
    if args.real:
        results += collect("real", forwarded)
    print(
        f"SFT step (AdamW), Llama {results[0]['params'] / 1e6:.2f}M parameters, batch "
        f"{args.batch_size} x {args.seq_len} tokens; memory is per device (XLA's plan)"
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
