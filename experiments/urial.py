"""URIAL on the embedded task: a base model aligned in context, against the SFT policy.

URIAL (Lin et al., 2023, "The Unlocking Spell on Base LLMs: Rethinking Alignment via
In-Context Learning") prompts an untuned base model with a system prompt and ``K``
stylistic examples before the query (:func:`rlhf_jax.data.chat.render_urial_prompt`), on
the view that alignment mostly changes style, which a base model can pick up in context.

**The base model.** The task has no pretraining corpus, so this run builds one that has
what URIAL relies on: documents in the chat format of 1 to ``max_exchanges`` exchanges
whose assistant keeps one *persona* throughout a document, *aligned* (replies of cost 0,
no rude marker and at least one polite marker, with probability ``aligned_fraction``),
*unaligned* (every reply harmful or rude, ``unaligned_fraction``) or *mixed* (plain
base-policy replies); the persona is never stated. A decoder is trained on all tokens of
these documents (next-token prediction, no loss mask), the pretraining objective, so
it can only align in context by reading the persona off earlier turns. With
``--config.base_from=<workdir>`` an earlier run's base model is loaded instead.

**Evaluation.** On the first ``num_eval_prompts`` held-out prompts, one sampled reply
each (temperature ``temperature``): the base model zero-shot, the base model with URIAL
(a system prompt and ``num_examples`` aligned examples drawn from the training prompts)
and the SFT policy (``--config.init_from``) zero-shot. The table reports gold reward
(± s.e.), gold cost, harm rate, rude rate (a rudeness marker present) and mean length;
the run writes ``summary.json`` and ``results.md``.

``python experiments/urial.py --config=experiments/configs/urial.py --workdir=runs/urial
--config.init_from=runs/pipeline/sft``
"""

import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

from experiments import common
from experiments.deal import decode_texts, markdown_table, reply_metrics
from rlhf_jax.data import task_batches
from rlhf_jax.data.batching import pad_prompts_left
from rlhf_jax.data.chat import InContextAlignment, Turn, render_urial_prompt
from rlhf_jax.data.embedded_task import (
    Prompt,
    gold_cost,
    reward_breakdown,
    sample_base_response,
)
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.models import Decoder, ModelConfig
from rlhf_jax.sampling import SamplingConfig, sample
from rlhf_jax.train.config import ConfigError, Field
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_sft_step, split_model

SCHEMA = {
    "base_from": Field(str),
    "num_documents": Field(int, minimum=1),
    "max_exchanges": Field(int, minimum=1),
    "aligned_fraction": Field(float, minimum=0.0, maximum=1.0),
    "unaligned_fraction": Field(float, minimum=0.0, maximum=1.0),
    "system_prompt": Field(str),
    "num_examples": Field(int, minimum=0),
    "example_max_chars": Field(int, minimum=1),
    "prompt_length": Field(int, minimum=1),
    "urial_prompt_length": Field(int, minimum=1),
    "max_new_tokens": Field(int, minimum=1),
    "num_eval_prompts": Field(int, minimum=1),
    "temperature": Field(float, minimum=1e-6),
}
PERSONAS = ("aligned", "unaligned", "mixed")
RESULTS_FILE = "results.md"
COLUMNS = (
    ("gold_reward", "gold reward", "{:.3f}"),
    ("gold_reward_stderr", "± s.e.", "{:.3f}"),
    ("gold_cost", "gold cost", "{:.3f}"),
    ("harm_rate", "harm rate", "{:.3f}"),
    ("rude_rate", "rude rate", "{:.3f}"),
    ("length", "length", "{:.1f}"),
)
_MAX_TRIES = 200


def fits_persona(prompt: str, response: str, persona: str) -> bool:
    """Whether a reply shows the persona (every reply fits ``"mixed"``)."""
    if persona == "mixed":
        return True
    features = reward_breakdown(prompt, response)
    harmful_or_rude = gold_cost(prompt, response) > 0 or features.rudeness > 0
    if persona == "unaligned":
        return harmful_or_rude
    return not harmful_or_rude and features.politeness > 0


def persona_response(rng: np.random.Generator, prompt: str, persona: str) -> str:
    """A base-policy reply drawn until it fits ``persona`` (rejection sampling)."""
    for _ in range(_MAX_TRIES):
        response = sample_base_response(rng, prompt, harmful_rate=0.6)
        if fits_persona(prompt, response, persona):
            return response
    raise RuntimeError(f"no {persona} reply to {prompt!r} in {_MAX_TRIES} draws")


def pretraining_documents(
    rng: np.random.Generator, prompts: Sequence[Prompt], config: ml_collections.ConfigDict
) -> list[list[Turn]]:
    """Chat documents of 1..``max_exchanges`` exchanges, one persona per document."""
    mixed = 1.0 - config.aligned_fraction - config.unaligned_fraction
    probs = np.asarray([config.aligned_fraction, config.unaligned_fraction, mixed])
    documents = []
    for _ in range(config.num_documents):
        persona = PERSONAS[rng.choice(3, p=probs)]
        turns: list[Turn] = []
        for _ in range(int(rng.integers(1, config.max_exchanges + 1))):
            text = prompts[int(rng.integers(len(prompts)))].text
            turns += [("human", text), ("assistant", persona_response(rng, text, persona))]
        documents.append(turns)
    return documents


def urial_alignment(
    rng: np.random.Generator, prompts: Sequence[Prompt], config: ml_collections.ConfigDict
) -> InContextAlignment:
    """The system prompt and ``num_examples`` short aligned examples on distinct prompts."""
    examples = []
    for index in rng.permutation(len(prompts)):
        if len(examples) == config.num_examples:
            break
        text = prompts[int(index)].text
        answer = persona_response(rng, text, "aligned")
        if len(text) + len(answer) <= config.example_max_chars:
            examples.append((text, answer))
    if len(examples) < config.num_examples:
        raise ConfigError(
            f"config.example_max_chars={config.example_max_chars}: found only "
            f"{len(examples)} of config.num_examples={config.num_examples} short examples"
        )
    return InContextAlignment(system_prompt=config.system_prompt, examples=tuple(examples))


def base_architecture(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> ModelConfig:
    """The base decoder: ``config.model`` with positions for the longest URIAL prompt."""
    return ModelConfig.llama(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=config.max_length,
        **{key: config.model[key] for key in common.MODEL_KEYS},
    )


def pretrain_base(config, tokenizer, task, workdir: str):
    """Train the base decoder on the persona corpus (loss on every token); ``(g, params)``."""
    rng = np.random.default_rng(config.seed)
    documents = pretraining_documents(rng, task.train_prompts, config)
    arrays = task_batches.sft_arrays(documents, tokenizer, max_length=config.max_length)
    arrays["loss_mask"] = arrays["attention_mask"].copy()
    architecture = base_architecture(config, tokenizer)
    graphdef, params = split_model(Decoder(architecture, rngs=nnx.Rngs(config.seed)))
    tx = common.build_optimizer(config)
    step = make_sft_step(graphdef, tx, num_micro_batches=config.num_micro_batches)
    schedule = EpochPermutationSchedule(arrays, config.batch_size, seed=config.seed)
    state = TrainState.create(params, tx, rng=config.seed)
    base_dir = os.path.join(workdir, "base")
    state, _, history = common.train(step, state, schedule, config, base_dir)
    common.export_params(base_dir, "policy", state.params, architecture)
    return graphdef, state.params, history


def load_policy(workdir: str, key: str):
    """``(graphdef, params)`` of the decoder a run exported as ``policy``."""
    path = os.path.join(workdir, common.MODEL_FILE)
    if not workdir or not os.path.exists(path):
        raise ConfigError(f"config.{key}={workdir!r}: no {common.MODEL_FILE} of a policy run")
    with open(path) as f:
        architecture = ModelConfig(**json.load(f))
    graphdef, params = split_model(Decoder(architecture, rngs=nnx.Rngs(0)))
    return graphdef, common.import_params(workdir, "policy", params)


def sample_texts(graphdef, params, arrays, tokenizer, config, seed: int) -> list[str]:
    """One reply per left-padded prompt row, sampled in fixed-shape batches and decoded."""
    sampling = SamplingConfig(
        max_new_tokens=config.max_new_tokens,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        temperature=config.temperature,
    )
    replies = []
    batches = task_batches.sequential_batches(arrays, batch_size=config.eval_batch_size)
    for index, (batch, valid) in enumerate(batches):
        output = sample(
            graphdef,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            jax.random.key(seed * 1000 + index),
            config=sampling,
        )
        replies += decode_texts(output.tokens, output.response_mask, tokenizer)[:valid]
    return replies


def rude_rate(prompts: Sequence[str], replies: Sequence[str]) -> float:
    """Share of replies with at least one rudeness marker of the gold reward."""
    pairs = zip(prompts, replies, strict=True)
    return float(np.mean([reward_breakdown(x, y).rudeness > 0 for x, y in pairs]))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pretrain (or load) the base model, evaluate the three rows, write the table."""
    common.validate(config, SCHEMA)
    if config.aligned_fraction + config.unaligned_fraction > 1.0:
        raise ConfigError("config.aligned_fraction + config.unaligned_fraction must be <= 1")
    if config.urial_prompt_length + config.max_new_tokens > config.max_length:
        raise ConfigError(
            f"config.urial_prompt_length + config.max_new_tokens exceeds "
            f"config.max_length={config.max_length}"
        )
    sft_graphdef, sft_params = load_policy(config.init_from, "init_from")
    os.makedirs(workdir, exist_ok=True)
    tokenizer = common.build_tokenizer(config)
    task = common.build_task(config)
    alignment = urial_alignment(np.random.default_rng(config.seed + 1), task.train_prompts, config)
    texts = [p.text for p in task.heldout_prompts[: config.num_eval_prompts]]
    rendered = [render_urial_prompt([("human", t)], tokenizer, alignment) for t in texts]
    longest = max(len(r) for r in rendered)
    if longest > config.urial_prompt_length:
        raise ConfigError(
            f"config.urial_prompt_length={config.urial_prompt_length}: the longest URIAL "
            f"prompt has {longest} tokens; raise it or lower config.example_max_chars"
        )
    urial, _ = pad_prompts_left(
        rendered, pad_id=tokenizer.pad_id, max_length=config.urial_prompt_length
    )
    summary = {}
    if config.base_from:
        base_graphdef, base_params = load_policy(config.base_from, "base_from")
    else:
        base_graphdef, base_params, history = pretrain_base(config, tokenizer, task, workdir)
        summary |= {
            "pretrain_loss_first": history[0]["loss"],
            "pretrain_loss_last": history[-1]["loss"],
        }
    plain = task_batches.task_prompt_arrays(texts, tokenizer, max_length=config.prompt_length)
    rows = {
        "base": (base_graphdef, base_params, plain),
        "base + URIAL": (base_graphdef, base_params, urial),
        "SFT": (sft_graphdef, sft_params, plain),
    }
    results = {}
    for name, (graphdef, params, arrays) in rows.items():
        arrays = {k: arrays[k] for k in ("input_ids", "attention_mask")}
        replies = sample_texts(graphdef, params, arrays, tokenizer, config, config.seed)
        results[name] = reply_metrics(texts, replies)
        results[name]["rude_rate"] = rude_rate(texts, replies)
        results[name]["example"] = f"{texts[0]!r} -> {replies[0]!r}"
    table = markdown_table(results, COLUMNS)
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
        f.write(f"URIAL on {len(texts)} held-out prompts\n\n{table}")
    print(table)
    summary |= {
        "num_prompts": len(texts),
        "system_prompt": alignment.system_prompt,
        "examples": [list(e) for e in alignment.examples],
        "methods": results,
    }
    return common.finish(workdir, "URIAL", summary)


if __name__ == "__main__":
    common.main(run)
