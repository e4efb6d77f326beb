r"""Sentence-level reward models trained on the real QA-Feedback error spans.

Wu, Hu, Shi, Dziri, Suhr, Ammanabrolu, Smith, Ostendorf & Hajishirzi (2023),
"Fine-Grained Human Feedback Gives Better Rewards for Language Model Training", §4: the
long-form QA task's two dense reward models, trained here from the human error spans of
``"prediction 1"`` in the QA-Feedback file (by default the real development split shipped
with the package, :func:`rlhf_jax.data.builders.bundled_dev_dir`):

- ``c1``: irrelevance, repetition and incoherence (``Irrelevant``, ``Redundant``,
  ``Incoherent``);
- ``c2``: incorrect or unverifiable facts (``Wrong-Grounding``, ``Unverifiable``).

Labels. The answer is cut into sentences by
:func:`rlhf_jax.objectives.fine_grained.sentence_spans`, and each answer token gets its
sentence by :func:`~rlhf_jax.objectives.fine_grained.token_segment_ids` (the whitespace
before a sentence belongs to it, as does text after the last one; the closing eos belongs
to the last sentence). A token is labelled with an error type iff its character range
overlaps a span of that type (``qa_feedback.error_token_labels``), and a sentence has the
type iff one of its tokens does (:func:`~rlhf_jax.objectives.fine_grained.segment_labels`).
So the label of sentence ``j`` for model ``k`` is

    y_{k,j} = 1  iff  some error span [a, b) of one of k's types overlaps sentence j's
                      characters [e_{j−1}, e_j)  (e_{−1} = 0, the last one reaching the
                      end of the answer, e_j the end of sentence j),

else 0. Every span therefore labels each sentence it touches, and a sentence holding
several spans of k's types counts once. The paper rewards a flagged segment with −1 and a
clean one with +1; ``y = 1`` is the flagged case. (The paper's relevance model works on
sub-sentences and both use a trained sentence splitter; here both use the rule-based
sentences above.)

Input. ``render_chat([("human", question + "\n\n" + passages), ("assistant", answer)])``
with the chat template, the passages written one per line as ``title: text``. The answer
and the question are never cut; the passages are cut at their end, at a character
boundary, so that the rendered dialogue fits ``max_length`` tokens (exact for the byte
tokenizer, whose encoding of a concatenation is the concatenation of the encodings). A
record whose question and answer alone do not fit is left out and counted
(``records_too_long``).

Training. Records are split into training and held-out sets (``heldout_fraction``, by
record, seeded by ``seed``). Each model is a :class:`rlhf_jax.models.ScalarModel` (on the
language-model pretrained trunk below when ``lm_steps > 0``, else on the ``init_from``
trunk when given, else on a random one) trained by
:func:`rlhf_jax.train.steps.fine_grained.make_segment_reward_step`: its per-token scalar
``v`` at a sentence's last token regresses onto the sentence's label,
``½ Σ_j (v_{T_j} − y_j)²``, so ``v`` estimates the probability that the sentence is
flagged, having read the question, the passages and the answer up to there. The summary
reports per model, on the held-out sentences: the squared-error loss before and after
training and that of the constant training rate, the accuracy of ``v > ½`` against the
majority-class rate, the balanced accuracy and the AUC (the probability that a flagged
sentence scores above a clean one, ties counting half).

Pretraining. The paper fine-tunes a pretrained Longformer; here the trunk can first be
pretrained as a language model on the QA-Feedback text itself (``lm_steps > 0``,
:func:`pretrain_trunk`): the next-token loss on every token of the training records'
questions, passages, gold answers and four predictions (:func:`lm_arrays`), never on the
held-out records, whose text only measures the held-out NLL. Both segment models then
start from that trunk (exported under ``lm/``, also the policy trunk of
``fine_grained_qa_ppo.py``). Only ``"prediction 1"`` carries spans in the file (the
feedback of a record is about it alone), so the other three predictions enter the
pretraining text but get no labels.

Use as dense rewards. The models are exported under ``c1_rm/`` and ``c2_rm/`` (``scorer``
and ``model.json``, as a reward-model run leaves them, so
``experiments.ppo.load_scorer(workdir + "/c1_rm", ...)`` reads them), with the data
settings in ``data.json`` (:func:`save_data_settings`), so that a later run splits the
records as this one did (:func:`split_examples`); ``fine_grained_qa_ppo.py`` trains a
policy on them. For PPO, the
paper's segment reward is ``R_k(j) = 1 − 2 v_k(T_j)`` (+1 for a clean sentence, −1 for a
flagged one), and the per-token reward of eq. 1 is

    r_t = Σ_k w_k Σ_j 1(t = T_j) (1 − 2 v_k(T_j))  −  β KL_t,

:func:`paper_dense_rewards` (``combine_segment_rewards`` over the models' segment scores).
:func:`rlhf_jax.train.steps.fine_grained.make_fine_grained_step` places the raw scalars
``w'_k v_k(T_j)``; with ``reward_weights = (("c1", −2 w_1), ("c2", −2 w_2))`` it gives the
same rewards less the constant ``Σ_k w_k`` per sentence, which the paper's convention adds
(a bonus for each clean-looking sentence). That step splits sentences in the graph by
:func:`rlhf_jax.train.steps.fine_grained.sentence_segment_ids`; the summary's
``ppo_segmentation_agreement`` is the fraction of answers it splits exactly as the labels
here do (the two rules differ only on closing quotes or brackets after a sentence end and
on whitespace other than space and newline).

``python experiments/fine_grained_qa.py --config=experiments/configs/fine_grained_qa.py
--workdir=runs/fine_grained_qa`` (``fine_grained_qa.py:tiny`` is a smoke preset).
"""

import dataclasses
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax import Array
from scipy.stats import mannwhitneyu

from experiments import common
from experiments.fine_grained import sentence_token_ids
from rlhf_jax.data import task_batches
from rlhf_jax.data.builders import (
    ERROR_TYPES,
    QaFeedback,
    bundled_dev_dir,
    error_token_labels,
    prepare,
    to_text,
)
from rlhf_jax.data.chat import render_chat
from rlhf_jax.data.tokenizers import Tokenizer
from rlhf_jax.models import ModelConfig, ScalarModel
from rlhf_jax.objectives.fine_grained import (
    combine_segment_rewards,
    segment_ends,
    segment_labels,
    sentence_spans,
    token_segment_ids,
)
from rlhf_jax.train.config import ConfigError, Field, validate_config
from rlhf_jax.train.loop import EpochPermutationSchedule
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.steps import make_sft_eval, make_sft_step
from rlhf_jax.train.steps.common import collect, split_model
from rlhf_jax.train.steps.fine_grained import (
    make_segment_reward_step,
    segment_scores,
    sentence_segment_ids,
)

#: The dense reward models and the error types each is trained to flag.
MODEL_TYPES = {
    "c1": ("Irrelevant", "Redundant", "Incoherent"),
    "c2": ("Wrong-Grounding", "Unverifiable"),
}
OWN_SCHEMA = {
    "source_dir": Field(str),
    "split": Field(str, choices=("dev", "train")),
    "heldout_fraction": Field(float, minimum=0.0, maximum=1.0),
    "lm_steps": Field(int, minimum=0),
    "lm_learning_rate": Field(float, minimum=0.0),
}
SCHEMA = {**{k: v for k, v in common.BASE_SCHEMA.items() if k != "task"}, **OWN_SCHEMA}
#: The folder of a run's workdir that holds the language-model pretrained trunk.
LM_DIR = "lm"
#: The file of a run's workdir that records how its records were read and split.
DATA_FILE = "data.json"
DATA_KEYS = ("seed", "source_dir", "split", "heldout_fraction", "max_length")
#: Sizes the concatenated answers of :func:`label_answers` are padded to multiples of.
TOKEN_BUCKET, SPAN_BUCKET = 8192, 128


@dataclasses.dataclass(frozen=True)
class AnswerLabels:
    """The sentences of one answer and their error types.

    Attributes:
      sentences: ``S`` character spans ``[start, end)`` (``sentence_spans``).
      segment_ids: int32 ``[T]`` the sentence of each answer token.
      type_labels: bool ``[S, len(ERROR_TYPES)]``, sentence ``j`` has error type ``t``.
    """

    sentences: list[tuple[int, int]]
    segment_ids: np.ndarray
    type_labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class RenderedRecord:
    """A record rendered for the segment models.

    Attributes:
      ids: int32 ``[n]`` the rendered dialogue, ``n ≤ max_length``.
      response_start: index of the first answer token (the answer and its eos follow).
      labels: the answer's :class:`AnswerLabels`.
      passage_chars: characters of the passages text kept.
    """

    ids: np.ndarray
    response_start: int
    labels: AnswerLabels
    passage_chars: int


@dataclasses.dataclass(frozen=True)
class QaData:
    """The labelled rows of the kept records, split by record, and the records themselves.

    Attributes:
      train: :func:`segment_arrays` of the training records.
      heldout: :func:`segment_arrays` of the held-out records.
      report: record, sentence and label counts.
      train_examples: the training records (decoded ``ranked`` examples), row order.
      heldout_examples: the held-out records, row order.
    """

    train: dict[str, np.ndarray]
    heldout: dict[str, np.ndarray]
    report: dict[str, Any]
    train_examples: list[dict[str, Any]]
    heldout_examples: list[dict[str, Any]]


def load_records(config: ml_collections.ConfigDict, data_dir: str) -> list[dict[str, Any]]:
    """The ``ranked`` QaFeedback examples of ``config.split``, decoded to text.

    Raises:
      ConfigError: naming ``config.source_dir`` when it is not a folder.
    """
    source = config.source_dir or str(bundled_dev_dir())
    if not os.path.isdir(source):
        raise ConfigError(
            f"config.source_dir={config.source_dir!r} is not a folder; expected one holding "
            "dev_feedback.json(.gz) or train_feedback.json(.gz), or '' for the packaged dev file"
        )
    builder = prepare(QaFeedback, source_dir=source, data_dir=data_dir, config="ranked")
    data = builder.as_data_source()[config.split]
    return [to_text(ex) for ex in data.__getitems__(list(range(len(data))))]


def record_spans(example: Mapping[str, Any]) -> list[tuple[int, int, str]]:
    """``(start, end, error type)`` spans of ``"prediction 1"`` of a ``ranked`` example."""
    return list(
        zip(example["error_starts"], example["error_ends"], example["error_types"], strict=True)
    )


def label_answers(
    answers: Sequence[str],
    spans: Sequence[Sequence[tuple[int, int, str]]],
    tokenizer: Tokenizer,
    *,
    chunk_size: int = 32,
) -> list[AnswerLabels]:
    """Sentences and per-sentence error types of each answer (the rule of the module docstring).

    ``token_segment_ids`` and ``segment_labels`` run once per ``chunk_size`` answers,
    over their concatenation, instead of once per answer (each new shape compiles anew):
    each answer's characters and sentence ids are shifted past the previous answers', and
    its last sentence is stretched to the answer's end, which changes nothing within the
    answer (``token_segment_ids`` gives trailing text to the last sentence anyway) but
    keeps it from the next answer's first sentence. The concatenation is padded to a
    multiple of ``TOKEN_BUCKET`` tokens (empty, unlabelled, after the last answer) and
    ``SPAN_BUCKET`` sentences (empty, at the end), so that few shapes occur; the padding
    tokens can only join the last sentence or a padding one and carry no label, and no
    answer token reaches a padding sentence.

    Args:
      answers: the annotated answers.
      spans: per answer, ``(start, end, error type)`` character spans.
      tokenizer: gives the tokens and their character offsets.
      chunk_size: answers per call.

    Returns:
      One :class:`AnswerLabels` per answer.
    """
    if len(answers) != len(spans):
        raise ValueError(f"{len(answers)} answers but {len(spans)} span lists")
    results = []
    for first in range(0, len(answers), chunk_size):
        chunk = slice(first, first + chunk_size)
        results.extend(_label_chunk(answers[chunk], spans[chunk], tokenizer))
    return results


def _label_chunk(
    answers: Sequence[str], spans: Sequence[Sequence[tuple[int, int, str]]], tokenizer: Tokenizer
) -> list[AnswerLabels]:
    """:func:`label_answers` for answers labelled in one call over their concatenation."""
    offsets, token_labels, sentences, stretched = [], [], [], []
    char_base = 0
    for answer, answer_spans in zip(answers, spans, strict=True):
        _, labels = error_token_labels(answer, answer_spans, tokenizer)
        _, answer_offsets = tokenizer.encode_with_offsets(answer)
        answer_sentences = sentence_spans(answer)
        shifted = [(start + char_base, end + char_base) for start, end in answer_sentences]
        shifted[-1] = (shifted[-1][0], char_base + len(answer))
        offsets.append(answer_offsets + char_base)
        token_labels.append(labels)
        sentences.append(answer_sentences)
        stretched.extend(shifted)
        char_base += len(answer)
    padding = -sum(map(len, token_labels)) % TOKEN_BUCKET
    offsets.append(np.full((padding, 2), char_base, np.int32))
    token_labels.append(np.zeros((padding, len(ERROR_TYPES)), bool))
    stretched.extend([(char_base, char_base)] * (-len(stretched) % SPAN_BUCKET))
    all_ids = np.asarray(token_segment_ids(np.concatenate(offsets), stretched))
    all_labels = np.asarray(
        segment_labels(np.concatenate(token_labels), all_ids, num_segments=len(stretched))
    )
    results, token_base, sentence_base = [], 0, 0
    for answer_sentences, labels in zip(sentences, token_labels[:-1], strict=True):
        count = len(answer_sentences)
        ids = all_ids[token_base : token_base + len(labels)] - sentence_base
        results.append(
            AnswerLabels(
                answer_sentences,
                ids.astype(np.int32),
                all_labels[sentence_base : sentence_base + count],
            )
        )
        token_base, sentence_base = token_base + len(labels), sentence_base + count
    return results


def model_labels(type_labels: np.ndarray) -> np.ndarray:
    """Model flags ``[S, len(MODEL_TYPES)]``: sentence ``j`` has one of model ``k``'s types."""
    columns = [[ERROR_TYPES.index(t) for t in types] for types in MODEL_TYPES.values()]
    return np.stack([type_labels[:, c].any(axis=1) for c in columns], axis=1)


def passages_text(titles: Sequence[str], texts: Sequence[str]) -> str:
    """The passages, one ``title: text`` per line."""
    return "\n".join(f"{title}: {text}" for title, text in zip(titles, texts, strict=True))


def fitted_input(
    example: Mapping[str, Any], answer: str, tokenizer: Tokenizer, *, max_length: int
) -> str | None:
    r"""The human turn ``question + "\n\n" + passages``, the passages cut to fit.

    The passages are cut at their end, at a character boundary, so that
    ``render_chat([("human", turn), ("assistant", answer)])`` has at most ``max_length``
    tokens (with ``answer=""`` the rendered generation prompt then has fewer than
    ``max_length``).

    Returns:
      The turn, or ``None`` when the question and the answer alone exceed ``max_length``.
    """
    question = example["question"] + "\n\n"
    bare = render_chat([("human", question), ("assistant", answer)], tokenizer)
    room = max_length - len(bare.ids)
    if room < 0:
        return None
    passages = passages_text(example["passage_titles"], example["passage_texts"])
    passage_ids, passage_offsets = tokenizer.encode_with_offsets(passages)
    if len(passage_ids) > room:
        passages = passages[: int(passage_offsets[room, 0])]
    return question + passages


def render_record(
    example: Mapping[str, Any], labels: AnswerLabels, tokenizer: Tokenizer, *, max_length: int
) -> RenderedRecord | None:
    """The dialogue of the module docstring (:func:`fitted_input`), or ``None``.

    Returns:
      The rendered record, or ``None`` when the question and the answer alone exceed
      ``max_length`` tokens.
    """
    answer = example["predictions"][0]
    turn = fitted_input(example, answer, tokenizer, max_length=max_length)
    if turn is None:
        return None
    rendered = render_chat([("human", turn), ("assistant", answer)], tokenizer)
    passage_chars = len(turn) - len(example["question"]) - 2
    return RenderedRecord(rendered.ids, int(rendered.prompt_length), labels, passage_chars)


def segment_arrays(
    records: Sequence[RenderedRecord], tokenizer: Tokenizer, *, max_length: int
) -> dict[str, np.ndarray]:
    """Right-padded rows with sentence ids, sentence ends and each model's labels.

    Returns:
      ``input_ids`` int32, ``attention_mask`` bool, ``response_mask`` float32 (answer
      and eos), ``segment_ids`` int32 (0 off the answer), ``segment_ends`` float32 (the
      last token of each sentence, the eos for the last) and per model ``<name>_labels``
      float32 (its label of a sentence at the sentence's last token), each ``[N, L]``.
    """
    shape = (len(records), max_length)
    input_ids = np.full(shape, tokenizer.pad_id, np.int32)
    attention = np.zeros(shape, bool)
    response = np.zeros(shape, np.float32)
    segment_ids = np.zeros(shape, np.int32)
    for row, record in enumerate(records):
        start, stop = record.response_start, len(record.ids)
        input_ids[row, :stop] = record.ids
        attention[row, :stop] = True
        response[row, start:stop] = 1.0
        last = len(record.labels.sentences) - 1
        segment_ids[row, start:stop] = np.append(record.labels.segment_ids, last)
    ends = np.asarray(segment_ends(jnp.asarray(response), jnp.asarray(segment_ids)))
    arrays = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "response_mask": response,
        "segment_ids": segment_ids,
        "segment_ends": ends.astype(np.float32),
    }
    for name in MODEL_TYPES:
        arrays[f"{name}_labels"] = np.zeros(shape, np.float32)
    for row, record in enumerate(records):
        positions = np.flatnonzero(ends[row])
        flagged = model_labels(record.labels.type_labels)
        for k, name in enumerate(MODEL_TYPES):
            arrays[f"{name}_labels"][row, positions] = flagged[:, k]
    return arrays


def split_records(count: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """``(train, held-out)`` record indices: a seeded permutation, ``round(f · N)`` held out.

    Raises:
      ConfigError: naming ``config.heldout_fraction`` when either part would be empty.
    """
    heldout = round(heldout_fraction * count)
    if not 0 < heldout < count:
        raise ConfigError(
            f"config.heldout_fraction={heldout_fraction} holds out {heldout} of {count} "
            "records; both the training and the held-out part must be non-empty"
        )
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def classification_metrics(
    scores: np.ndarray, labels: np.ndarray, *, train_rate: float
) -> dict[str, float]:
    """Held-out per-sentence metrics of a segment model's scores.

    Args:
      scores: ``[M]`` the model's scalar at each sentence's end.
      labels: ``[M]`` bool, the sentence is flagged.
      train_rate: the flagged rate on the training sentences (the constant predictor).

    Returns:
      ``loss`` (``½ mean (v − y)²``), ``constant_loss`` (the same for ``v = train_rate``),
      ``accuracy`` (of ``v > ½``), ``majority_accuracy`` (``max(p, 1 − p)``, ``p`` the
      held-out flagged rate), ``balanced_accuracy`` (mean of the two per-class recalls)
      and ``auc`` (``P(v_flagged > v_clean) + ½ P(tie)``; both NaN with one class only).
    """
    labels = np.asarray(labels, bool)
    predicted = scores > 0.5
    rate = float(np.mean(labels))
    metrics = {
        "loss": float(np.mean(0.5 * np.square(scores - labels))),
        "constant_loss": float(np.mean(0.5 * np.square(train_rate - labels))),
        "accuracy": float(np.mean(predicted == labels)),
        "majority_accuracy": max(rate, 1.0 - rate),
        "balanced_accuracy": float("nan"),
        "auc": float("nan"),
    }
    positives, negatives = scores[labels], scores[~labels]
    if len(positives) and len(negatives):
        recalls = np.mean(predicted[labels]), np.mean(~predicted[~labels])
        metrics["balanced_accuracy"] = float(np.mean(recalls))
        statistic = mannwhitneyu(positives, negatives).statistic
        metrics["auc"] = float(statistic / (len(positives) * len(negatives)))
    return metrics


def paper_dense_rewards(
    model_scalars: Sequence[Array], segment_ids: Array, mask: Array, weights: Sequence[float]
) -> Array:
    """``r_t = Σ_k w_k Σ_j 1(t = T_j) (1 − 2 v_k(T_j))``: the paper's ±1 segment rewards.

    Wu et al. (2023), eq. 1 without the KL term, with ``v_k`` a model of this run (the
    flagged probability) read at each sentence's last token ``T_j``.

    Args:
      model_scalars: per model ``k``, its ``[B, L]`` per-token scalars.
      segment_ids: int ``[B, L]`` sentence ids (e.g. ``sentence_segment_ids``).
      mask: ``[B, L]`` response mask.
      weights: ``w_k``, one per model.

    Returns:
      ``[B, L]`` rewards, non-zero only at sentence ends.
    """
    rewards = [1.0 - 2.0 * segment_scores(v, segment_ids, mask) for v in model_scalars]
    return combine_segment_rewards(rewards, [segment_ids] * len(rewards), mask, weights)


def _scalars(graphdef: nnx.GraphDef, params: Any, batch: Mapping[str, Array]) -> dict:
    model = nnx.merge(graphdef, params)
    return {"scalars": model(batch["input_ids"], attention_mask=batch["attention_mask"])}


_jitted_scalars = jax.jit(_scalars, static_argnums=0)


def sentence_predictions(
    graphdef: nnx.GraphDef, params: Any, arrays: Mapping[str, np.ndarray], batch_size: int
) -> np.ndarray:
    """``[M]`` the model's scalar at every sentence end of ``arrays``, row by row."""
    data = {k: arrays[k] for k in ("input_ids", "attention_mask")}
    outputs = collect(_jitted_scalars, (graphdef, params), data, batch_size=batch_size)
    return outputs["scalars"][arrays["segment_ends"] > 0]


def segmentation_agreement(arrays: Mapping[str, np.ndarray], tokenizer: Tokenizer) -> float:
    """Fraction of answers that ``sentence_segment_ids`` (the PPO step's rule) splits alike."""
    in_graph = np.asarray(
        sentence_segment_ids(
            jnp.asarray(arrays["input_ids"]),
            jnp.asarray(arrays["response_mask"]),
            eos_id=tokenizer.eos_id,
            **sentence_token_ids(tokenizer),
        )
    )
    same = (in_graph == arrays["segment_ids"]) | (arrays["response_mask"] == 0)
    return float(np.mean(np.all(same, axis=1)))


def validate(config: ml_collections.ConfigDict) -> None:
    """Check every key (the shared ones less ``task``, which this run does not have).

    Raises:
      ConfigError: naming each wrong key (see :func:`experiments.common.validate`).
    """
    validate_config(config, SCHEMA)
    with_task = ml_collections.ConfigDict(config.to_dict())
    with_task.task = common.base_config().task  # only to reuse the shared cross-key checks
    common.validate(with_task, OWN_SCHEMA)


def prepare_data(config: ml_collections.ConfigDict, tokenizer: Tokenizer, workdir: str) -> QaData:
    """The labelled rows and the records of the QA-Feedback file, split by record.

    Raises:
      ConfigError: naming ``config.max_length`` when no record fits, or
        ``config.batch_size`` when the training records are fewer than a batch.
    """
    examples = load_records(config, os.path.join(workdir, "data"))
    labels = label_answers(
        [ex["predictions"][0] for ex in examples], [record_spans(ex) for ex in examples], tokenizer
    )
    rendered = [
        render_record(ex, lab, tokenizer, max_length=config.max_length)
        for ex, lab in zip(examples, labels, strict=True)
    ]
    kept = [r for r in rendered if r is not None]
    kept_examples = [ex for ex, r in zip(examples, rendered, strict=True) if r is not None]
    if not kept:
        raise ConfigError(
            f"config.max_length={config.max_length}: no record's question and answer fit"
        )
    train_index, heldout_index = split_records(len(kept), config.heldout_fraction, config.seed)
    if len(train_index) < config.batch_size:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {len(train_index)} training "
            "records; lower it or config.heldout_fraction"
        )
    arrays = segment_arrays(kept, tokenizer, max_length=config.max_length)
    counts = np.sum([lab.type_labels.sum(axis=0) for lab in labels], axis=0)
    report = {
        "records": len(examples),
        "records_too_long": len(examples) - len(kept),
        "train_records": len(train_index),
        "heldout_records": len(heldout_index),
        "sentences": int(sum(len(lab.sentences) for lab in labels)),
        **{f"sentences_{t.lower()}": int(n) for t, n in zip(ERROR_TYPES, counts, strict=True)},
        "passage_chars_kept": float(np.mean([r.passage_chars for r in kept])),
        "ppo_segmentation_agreement": segmentation_agreement(arrays, tokenizer),
    }
    return QaData(
        {k: v[train_index] for k, v in arrays.items()},
        {k: v[heldout_index] for k, v in arrays.items()},
        report,
        [kept_examples[i] for i in train_index],
        [kept_examples[i] for i in heldout_index],
    )


def save_data_settings(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Write the ``DATA_KEYS`` of ``config`` to ``workdir/data.json``."""
    with open(os.path.join(workdir, DATA_FILE), "w") as f:
        json.dump({key: config[key] for key in DATA_KEYS}, f, indent=1)


def load_data_settings(workdir: str, key: str) -> ml_collections.ConfigDict:
    """The data settings a run saved (:func:`save_data_settings`), to split records alike.

    Args:
      workdir: the workdir of a finished run of this experiment.
      key: the config key that named ``workdir``, for the error message.

    Raises:
      ConfigError: naming ``config.<key>`` when ``workdir`` has no ``data.json``.
    """
    path = os.path.join(workdir, DATA_FILE)
    if not os.path.exists(path):
        raise ConfigError(
            f"config.{key}={workdir!r}: no {DATA_FILE} there; expected the workdir of a "
            "finished fine_grained_qa.py run"
        )
    with open(path) as f:
        settings = ml_collections.ConfigDict(json.load(f))
    settings.batch_size = 1
    return settings


def split_examples(
    config: ml_collections.ConfigDict, tokenizer: Tokenizer, workdir: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training, held-out)`` records as :func:`prepare_data` splits them, without labels.

    A record is kept when its question and ``"prediction 1"`` fit ``config.max_length``
    (:func:`fitted_input`), and the kept ones are split by :func:`split_records`.
    """
    examples = load_records(config, os.path.join(workdir, "data"))
    kept = [
        ex
        for ex in examples
        if fitted_input(ex, ex["predictions"][0], tokenizer, max_length=config.max_length)
        is not None
    ]
    train_index, heldout_index = split_records(len(kept), config.heldout_fraction, config.seed)
    return [kept[i] for i in train_index], [kept[i] for i in heldout_index]


def lm_dialogues(
    example: Mapping[str, Any], tokenizer: Tokenizer, *, max_length: int
) -> list[list[tuple[str, str]]]:
    """A record's texts as dialogues for language-model pretraining.

    The gold answer after the input of :func:`fitted_input` (the question alone when the
    two do not fit), then each of the four predictions after the question alone (the
    passages are read once per record).
    """
    gold = example["gold"]
    turn = fitted_input(example, gold, tokenizer, max_length=max_length)
    dialogues = [[("human", turn or example["question"]), ("assistant", gold)]]
    dialogues += [
        [("human", example["question"]), ("assistant", p)] for p in example["predictions"]
    ]
    return dialogues


def lm_arrays(
    examples: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, max_length: int
) -> dict[str, np.ndarray]:
    """:func:`lm_dialogues` packed into rows of ``max_length``, every token a target.

    ``task_batches.packed_sft_arrays`` with ``loss_mask`` widened from the assistant
    turns to every real token: the next-token loss on the whole text (the SFT step still
    excludes each dialogue's first token, which has no predecessor in its segment).
    """
    dialogues = [d for ex in examples for d in lm_dialogues(ex, tokenizer, max_length=max_length)]
    arrays = task_batches.packed_sft_arrays(dialogues, tokenizer, row_length=max_length)
    arrays["loss_mask"] = arrays["attention_mask"].copy()
    return arrays


def pretrain_trunk(
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    architecture: ModelConfig,
    data: QaData,
    workdir: str,
) -> dict[str, float]:
    """Language-model pretraining of the trunk on the training records' text.

    ``config.lm_steps`` steps of :func:`rlhf_jax.train.steps.make_sft_step` (token-mean
    next-token NLL, at ``config.lm_learning_rate``) on :func:`lm_arrays` of the training
    records only, from ``init_from`` or a random decoder; the policy is exported under
    ``workdir/lm`` (``policy/`` and ``model.json``, an ``init_from`` for later runs).

    Returns:
      ``lm_heldout_nll_initial`` and ``lm_heldout_nll``: the NLL per token of the
      held-out records' text before and after (measured, never trained on), and the
      first and last training losses.
    """
    lm_dir = os.path.join(workdir, LM_DIR)
    train = lm_arrays(data.train_examples, tokenizer, max_length=config.max_length)
    heldout = lm_arrays(data.heldout_examples, tokenizer, max_length=config.max_length)
    if len(train["input_ids"]) < config.batch_size:
        raise ConfigError(
            f"config.batch_size={config.batch_size} exceeds the {len(train['input_ids'])} "
            "packed language-model rows; lower it"
        )
    graphdef, params = split_model(common.build_decoder(config, architecture))
    lm_config = ml_collections.ConfigDict(config.to_dict())
    lm_config.num_steps = config.lm_steps
    lm_config.optimizer.learning_rate = config.lm_learning_rate
    tx = common.build_optimizer(lm_config)
    step = make_sft_step(graphdef, tx, num_micro_batches=config.num_micro_batches)
    evaluate = make_sft_eval(graphdef, batch_size=config.eval_batch_size)
    state = TrainState.create(params, tx, rng=config.seed)
    initial = evaluate(state, heldout)
    state, _, history = common.train(
        step,
        state,
        EpochPermutationSchedule(train, config.batch_size, seed=config.seed),
        lm_config,
        lm_dir,
        tx=tx,
    )
    state = state.replace(params=jax.device_get(state.params))
    final = evaluate(state, heldout)
    common.export_params(lm_dir, "policy", state.params, architecture)
    return {
        "lm_train_rows": len(train["input_ids"]),
        "lm_train_loss_first": history[0]["loss"],
        "lm_train_loss_last": history[-1]["loss"],
        "lm_heldout_nll_initial": initial["nll_per_token"],
        "lm_heldout_nll": final["nll_per_token"],
    }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Label the sentences, train and evaluate the two segment models, export them."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    save_data_settings(config, workdir)
    tokenizer = common.build_tokenizer(config)
    data = prepare_data(config, tokenizer, workdir)
    train, heldout, summary = data.train, data.heldout, dict(data.report)
    architecture = common.model_config(config, tokenizer)
    trunk_config = config
    if config.lm_steps:
        summary.update(pretrain_trunk(config, tokenizer, architecture, data, workdir))
        trunk_config = ml_collections.ConfigDict(config.to_dict())
        trunk_config.init_from = os.path.join(workdir, LM_DIR)
    tx = common.build_optimizer(config)
    step = None
    for index, name in enumerate(MODEL_TYPES):
        trunk = common.build_decoder(trunk_config, architecture)
        model = ScalarModel(architecture, rngs=nnx.Rngs(config.seed + 1 + index), trunk=trunk)
        graphdef, params = split_model(model)
        step = step or make_segment_reward_step(
            graphdef, tx, num_micro_batches=config.num_micro_batches
        )
        data = {k: train[k] for k in ("input_ids", "attention_mask", "segment_ends")}
        data["segment_labels"] = train[f"{name}_labels"]
        ends = train["segment_ends"] > 0
        train_rate = float(np.mean(train[f"{name}_labels"][ends]))
        heldout_labels = heldout[f"{name}_labels"][heldout["segment_ends"] > 0] > 0
        initial = sentence_predictions(graphdef, params, heldout, config.eval_batch_size)
        model_dir = os.path.join(workdir, f"{name}_rm")
        state, _, history = common.train(
            step,
            TrainState.create(params, tx, rng=config.seed + index),
            EpochPermutationSchedule(data, config.batch_size, seed=config.seed + index),
            config,
            model_dir,
            tx=tx,
        )
        trained = jax.device_get(state.params)  # off the mesh, as the initial params
        final = sentence_predictions(graphdef, trained, heldout, config.eval_batch_size)
        common.export_params(model_dir, "scorer", state.params, architecture)
        before = classification_metrics(initial, heldout_labels, train_rate=train_rate)
        after = classification_metrics(final, heldout_labels, train_rate=train_rate)
        summary[f"{name}_train_flagged_rate"] = train_rate
        summary[f"{name}_train_loss_first"] = history[0]["loss"]
        summary[f"{name}_train_loss_last"] = history[-1]["loss"]
        summary[f"{name}_heldout_loss_initial"] = before["loss"]
        summary.update({f"{name}_heldout_{k}": v for k, v in after.items()})
    summary["steps"] = config.num_steps
    return common.finish(workdir, "Fine-grained reward models on QA-Feedback", summary)


if __name__ == "__main__":
    common.main(run)
