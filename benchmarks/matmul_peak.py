"""Dense matmul throughput of this machine through ``jax.jit``: the denominator of MFU.

A square ``[n, n] @ [n, n]`` product costs ``2 n³`` FLOPs. For each size the compiled
product is run once to warm up, then ``repeats`` times; the best (shortest) time is kept,
since interference from other processes only ever slows a run down. The peak is the best
rate over the sizes.

Run from the repository root::

    python -m benchmarks.matmul_peak --sizes 1024 2048 4096 --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_SIZES = (1024, 2048, 4096)


def matmul_gflops(n: int, *, repeats: int = 3, dtype: jnp.dtype = jnp.float32) -> float:
    """Best-of-``repeats`` GFLOP/s of one jitted ``[n, n] @ [n, n]`` product."""
    a, b = jax.random.normal(jax.random.key(0), (2, n, n), dtype)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def measure_matmul_peak(
    sizes: Sequence[int] = DEFAULT_SIZES, *, repeats: int = 3, dtype: jnp.dtype = jnp.float32
) -> tuple[float, dict[int, float]]:
    """Peak dense matmul GFLOP/s over ``sizes``.

    Args:
      sizes: square matrix sizes ``n``.
      repeats: timed runs per size (after one warm-up run); the best is kept.
      dtype: operand dtype.

    Returns:
      ``(peak, per_size)``: the best GFLOP/s and the best GFLOP/s of each size.
    """
    per_size = {n: matmul_gflops(n, repeats=repeats, dtype=dtype) for n in sizes}
    return max(per_size.values()), per_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    peak, per_size = measure_matmul_peak(args.sizes, repeats=args.repeats, dtype=args.dtype)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}")
    for n, gflops in per_size.items():
        print(f"matmul {n}x{n}: {gflops:8.1f} GFLOP/s (best of {args.repeats})")
    print(f"peak: {peak:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
