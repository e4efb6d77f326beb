"""Shared pieces of the side-by-side benchmarks against the PyTorch stack.

Both stacks run the same random-init Llama weights: a :class:`rlhf_jax.models.Decoder` is
built here, exported with :func:`rlhf_jax.models.hf_checkpoint.save_hf_checkpoint` and
loaded by ``transformers`` from that directory (float32, ``torch.set_num_threads(2)``,
offline). Two sizes are defined (:data:`CONFIGS`): "small" (hidden 384, 6 layers, 6
heads, 2 key/value heads, MLP 1024, vocabulary 512, untied: 9.8M parameters) and
"medium" (hidden 768, 12 layers, 12 heads, 4 key/value heads, MLP 2048, vocabulary 512,
untied: 76M parameters).

TRL's trainers read text, so :func:`word_tokenizer` gives a ``transformers`` tokenizer
whose words ``t0 … t{V-1}`` are exactly the token ids ``0 … V-1``; random token ids are
written as such words (:func:`ids_to_text`) and tokenise back to the same ids.

Timings keep the best of several runs after a warm-up (compilation) run: other processes
only ever slow a run down. Model FLOPs follow Chowdhery et al. 2022 (PaLM, App. B), as in
:mod:`benchmarks.model_throughput`.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.matmul_peak import measure_matmul_peak
from benchmarks.model_throughput import parameter_counts, train_flops_per_token
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.hf_checkpoint import save_hf_checkpoint
from rlhf_jax.models.transformer import Decoder

TORCH_THREADS = 2
CONFIGS: dict[str, dict[str, int]] = {
    "small": {
        "vocab_size": 512,
        "hidden_size": 384,
        "num_layers": 6,
        "num_heads": 6,
        "num_kv_heads": 2,
        "mlp_hidden_size": 1024,
    },
    "medium": {
        "vocab_size": 512,
        "hidden_size": 768,
        "num_layers": 12,
        "num_heads": 12,
        "num_kv_heads": 4,
        "mlp_hidden_size": 2048,
    },
}


def llama_config(name: str, *, max_positions: int = 512) -> ModelConfig:
    """The float32 Llama config ``name`` (a key of :data:`CONFIGS`), untied embeddings."""
    return ModelConfig.llama(**CONFIGS[name], max_position_embeddings=max_positions)


def build_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    """A randomly initialised decoder."""
    return Decoder(config, rngs=nnx.Rngs(seed))


def export_hf(model: Decoder, directory: str | pathlib.Path) -> pathlib.Path:
    """Write ``model`` as a Hugging Face checkpoint directory and return its path."""
    directory = pathlib.Path(directory)
    save_hf_checkpoint(directory, model.config, nnx.state(model, nnx.Param))
    return directory


def load_torch_model(directory: str | pathlib.Path) -> Any:
    """``AutoModelForCausalLM`` in float32 from an exported directory, in eval mode."""
    import torch
    import transformers

    torch.set_num_threads(TORCH_THREADS)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def best_time(fn: Callable[[], Any], repeats: int, *, warmup: int = 1) -> float:
    """Best wall time over ``repeats`` calls of ``fn()`` after ``warmup`` untimed calls.

    ``fn`` must block until its result is ready.
    """
    for _ in range(warmup):
        fn()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved_best_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int, *, warmup: int = 1
) -> dict[str, float]:
    """Best wall time of each ``fn()``, the calls of the different ``fns`` interleaved.

    Round ``r`` calls every function once, so that a slow spell of a shared machine hits
    all of them alike; the ratio of two best times is then a fairer comparison than two
    measurements taken one after the other. Each ``fn`` must block until its result is
    ready.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, np.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def report_peak(sizes: Sequence[int] = (1024, 2048), repeats: int = 3) -> float:
    """Measure and print the dense f32 matmul peak (GFLOP/s) of this run; return it."""
    peak, per_size = measure_matmul_peak(sizes, repeats=repeats)
    detail = ", ".join(f"{n}: {g:.1f}" for n, g in per_size.items())
    print(f"matmul peak (jax f32, best of {repeats}): {peak:.1f} GFLOP/s ({detail})")
    return peak


def report_read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Measure and print this machine's memory read bandwidth (GB/s) through ``jax.jit``.

    A jitted sum over a float32 array of ``megabytes`` MB (far larger than the caches)
    reads every byte once; bytes over the best wall time of ``repeats`` calls.
    """
    values = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = best_time(lambda: total(values).block_until_ready(), repeats)
    bandwidth = values.nbytes / seconds / 1e9
    print(
        f"memory read bandwidth (jax, {megabytes} MB sum, best of {repeats}): {bandwidth:.1f} GB/s"
    )
    return bandwidth


def describe(config_name: str, model: Decoder) -> None:
    """Print the host, the model config and its parameter count."""
    counts = parameter_counts(model)
    config = model.config
    print(
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} "
        f"cores; torch threads {TORCH_THREADS}; float32"
    )
    print(
        f"model {config_name!r}: llama, vocab {config.vocab_size}, hidden {config.hidden_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads ({config.num_kv_heads} kv), "
        f"MLP {config.mlp_hidden_size}: {counts['total'] / 1e6:.1f}M parameters"
    )


def matmul_parameters(model: Decoder) -> int:
    """``N`` of the FLOP count: every parameter that takes part in a matmul."""
    return parameter_counts(model)["matmul"]


def forward_flops(config: ModelConfig, matmul_params: int, tokens: int, context: int) -> float:
    """Forward-pass model FLOPs of ``tokens`` tokens: a third of ``6N + 12LHDT`` per token."""
    return train_flops_per_token(config, matmul_params, context) / 3.0 * tokens


def training_flops(config: ModelConfig, matmul_params: int, tokens: int, context: int) -> float:
    """Forward-and-backward model FLOPs of ``tokens`` tokens: ``(6N + 12LHDT)`` each."""
    return train_flops_per_token(config, matmul_params, context) * tokens


def random_ids(seed: int, shape: tuple[int, ...], vocab_size: int) -> np.ndarray:
    """Uniform random int32 token ids."""
    return np.random.default_rng(seed).integers(0, vocab_size, shape, dtype=np.int32)


def word_tokenizer(vocab_size: int, *, eos: str) -> Any:
    """A ``PreTrainedTokenizerFast`` whose word ``t<i>`` is token id ``i`` (``i < V``).

    Args:
      vocab_size: ``V``.
      eos: the end-of-sequence word: ``"t<i>"`` (an ordinary token the model can emit) or a
        new word, which gets id ``V``, outside the model's vocabulary, so that generation
        never emits it (and runs to its length limit). It also serves as the pad token.

    Returns:
      The tokenizer (whitespace split, no special tokens added around a text). Only the
      EOS word is special (it is also the pad and unknown word), so decoding keeps every
      ``t<i>``; texts must keep words apart (a prompt that a completion is appended to
      ends with a space).
    """
    import tokenizers
    import transformers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    if eos not in vocab:
        vocab[eos] = vocab_size
    model = tokenizers.models.WordLevel(vocab=vocab, unk_token=eos)
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=eos, unk_token=eos
    )


def ids_to_text(ids: Sequence[int]) -> str:
    """Words ``t<i>`` of the ids, space-separated."""
    return " ".join(f"t{int(i)}" for i in ids)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` as an aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * w for w in widths))
