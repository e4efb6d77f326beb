"""QA-Feedback builder on the real development file: counts, Copeland ranks, pairs without
ties, span counts against the NOTICE, per-token error labels, and the bad-input policy."""

import collections
import copy
import gzip
import json
import re

import numpy as np
import pytest
from scipy.stats import rankdata

from rlhf_jax.data.builders import (
    ERROR_TYPES,
    QaFeedback,
    bundled_dev_dir,
    copeland_ranks,
    error_token_labels,
    prepare,
    span_token_labels,
    to_text,
)
from rlhf_jax.data.errors import DataError
from rlhf_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer

FIXTURE = bundled_dev_dir()
PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


@pytest.fixture(scope="module")
def raw():
    with gzip.open(FIXTURE / "dev_feedback.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    return prepare(
        QaFeedback, source_dir=FIXTURE, data_dir=tmp_path_factory.mktemp("qa"), config="ranked"
    )


@pytest.fixture(scope="module")
def ranked_examples(ranked):
    source = ranked.as_data_source()["dev"]
    return [to_text(ex) for ex in source.__getitems__(list(range(len(source))))]


def by_question_and_answer(records):
    return {(r["question"], r["prediction 1"]): r for r in records}


def expected_ranks(preference):
    """Ranks by total points (1 per win, 1/2 per tie), equal points sharing the best rank."""
    points = np.zeros((4, 4))
    for (i, j), p in zip(PAIRS, preference, strict=True):
        points[i, j] = {0: 0.5, 1: 1.0, 2: 0.0}[p]
        points[j, i] = 1.0 - points[i, j]
    return rankdata(-points.sum(axis=1), method="min")


def test_ranked_has_every_record_with_its_ranks(ranked, ranked_examples, raw):
    assert len(ranked_examples) == len(raw) == 500
    assert ranked.skipped == {"dev": {}}
    records = by_question_and_answer(raw)
    for ex in ranked_examples:
        record = records[(ex["question"], ex["predictions"][0])]
        assert ex["predictions"] == [record[f"prediction {k}"] for k in range(1, 5)]
        assert ex["gold"] == record["gold"]
        assert ex["passage_titles"] == [p[0] for p in record["passages"]]
        assert ex["ranks"] == expected_ranks(record["preference"]).tolist()


def test_span_counts_match_the_notice(ranked_examples):
    notice = (FIXTURE / "NOTICE").read_text()
    stated = {name: int(n) for name, n in re.findall(r'"([A-Za-z-]+)" \((\d+)\)', notice)}
    assert set(stated) == set(ERROR_TYPES)
    counts = collections.Counter(t for ex in ranked_examples for t in ex["error_types"])
    assert counts == stated


def test_pairs_are_the_untied_judgements(tmp_path_factory, raw):
    builder = prepare(
        QaFeedback, source_dir=FIXTURE, data_dir=tmp_path_factory.mktemp("qa"), config="pairs"
    )
    source = builder.as_data_source()["dev"]
    ties = sum(p == 0 for r in raw for p in r["preference"])
    assert len(source) == 6 * len(raw) - ties
    assert builder.skipped == {"dev": {"tie": ties}}
    records = by_question_and_answer(raw)
    for index in range(0, len(source), 7):
        ex = to_text(source[index])
        good, bad = ex["chosen_index"], ex["rejected_index"]
        record = next(
            r
            for (q, _), r in records.items()
            if q == ex["question"] and r[f"prediction {good + 1}"] == ex["chosen"]
        )
        judgement = record["preference"][PAIRS.index(tuple(sorted((good, bad))))]
        assert judgement == (1 if good < bad else 2)
        assert ex["rejected"] == record[f"prediction {bad + 1}"]


def test_copeland_ranks_on_orders_cycles_and_ties():
    scores, ranks = copeland_ranks([1, 1, 1, 1, 1, 1])  # 1 > 2 > 3 > 4
    assert scores.tolist() == [3, 2, 1, 0] and ranks.tolist() == [1, 2, 3, 4]
    _, ranks = copeland_ranks([1, 2, 1, 1, 1, 1])  # 1 > 2 > 3 > 1, all beat 4
    assert ranks.tolist() == [1, 1, 1, 4]
    scores, ranks = copeland_ranks([0] * 6)
    assert scores.tolist() == [1.5] * 4 and ranks.tolist() == [1] * 4
    with pytest.raises(ValueError, match="six values"):
        copeland_ranks([1, 1, 3, 1, 1, 1])


def test_span_token_labels_use_interval_overlap():
    offsets = np.array([[0, 3], [3, 5], [5, 5], [5, 9], [9, 12]])
    labels = span_token_labels(offsets, [(4, 6, 0), (9, 10, 1), (3, 3, 1)], num_labels=2)
    # [4, 6) touches tokens 1 and 3; the empty token 2 and the empty span touch nothing.
    assert labels.tolist() == [
        [False, False],
        [True, False],
        [False, False],
        [True, False],
        [False, True],
    ]


def expected_labels(text, spans, offsets):
    """Labels from character coverage: a token is labelled if any of its characters is."""
    covered = np.zeros((len(text), len(ERROR_TYPES)), dtype=bool)
    for start, end, name in spans:
        covered[start:end, ERROR_TYPES.index(name)] = True
    return np.stack([covered[s:e].any(axis=0) for s, e in offsets]) if len(offsets) else covered[:0]


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory, raw):
    corpus = [r[f"prediction {k}"] for r in raw[:100] for k in range(1, 5)]
    return SentencePieceTokenizer.train(corpus, tmp_path_factory.mktemp("sp"), vocab_size=800)


def test_error_token_labels_cover_exactly_the_overlapping_tokens(ranked_examples, sentencepiece):
    for tokenizer, examples in (
        (ByteTokenizer(), ranked_examples),
        (sentencepiece, ranked_examples[::5]),
    ):
        labelled_tokens = 0
        for ex in examples:
            text = ex["predictions"][0]
            spans = list(zip(ex["error_starts"], ex["error_ends"], ex["error_types"], strict=True))
            ids, labels = error_token_labels(text, spans, tokenizer)
            _, offsets = tokenizer.encode_with_offsets(text)
            np.testing.assert_array_equal(ids, tokenizer.encode(text))
            np.testing.assert_array_equal(labels, expected_labels(text, spans, offsets))
            labelled_tokens += labels.any(axis=1).sum()
        assert labelled_tokens > 0


def test_unknown_error_type_in_labels_is_named():
    with pytest.raises(ValueError, match="unknown error types"):
        error_token_labels("abc", [(0, 1, "Rude")], ByteTokenizer())


def write_array(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")


def broken(raw):
    good = raw[0]
    cases = {}
    cases["missing_field"] = {k: v for k, v in good.items() if k != "gold"}
    cases["bad_value"] = {**good, "preference": [1, 1, 3, 1, 1, 1]}
    out_of_range = copy.deepcopy(good)
    out_of_range["feedback"]["errors"][0]["end"] = len(good["prediction 1"]) + 5
    cases["bad_value_span"] = out_of_range
    cases["empty_text"] = {**good, "prediction 3": ""}
    return cases


@pytest.mark.parametrize("case", ["missing_field", "bad_value", "bad_value_span", "empty_text"])
def test_raise_names_file_line_and_reason(tmp_path, raw, case):
    write_array(tmp_path / "src/dev_feedback.json", [raw[1], broken(raw)[case]])
    reason = case.removesuffix("_span")
    with pytest.raises(DataError, match=rf"dev_feedback.json:3: {reason}:"):
        prepare(QaFeedback, source_dir=tmp_path / "src", data_dir=tmp_path / "out", config="ranked")


def test_ties_can_be_made_an_error(tmp_path, raw):
    record = next(r for r in raw if 0 in r["preference"])
    write_array(tmp_path / "src/dev_feedback.json", [record])
    with pytest.raises(DataError, match=r"dev_feedback\.json:2: tie: predictions"):
        prepare(
            QaFeedback,
            source_dir=tmp_path / "src",
            data_dir=tmp_path / "out",
            config="pairs",
            on_tie="raise",
        )


def test_skip_counts_and_a_malformed_array_loses_its_tail(tmp_path, raw):
    cases = broken(raw)
    write_array(tmp_path / "src/train_feedback.json", [raw[1], *cases.values(), raw[2]])
    (tmp_path / "src/dev_feedback.json").write_text(
        "[" + json.dumps(raw[3]) + ", {oops}, " + json.dumps(raw[4]) + "]"
    )
    builder = prepare(
        QaFeedback,
        source_dir=tmp_path / "src",
        data_dir=tmp_path / "out",
        config="ranked",
        on_error="skip",
    )
    assert builder.skipped == {
        "train": {"missing_field": 1, "bad_value": 2, "empty_text": 1},
        "dev": {"malformed_json": 1},
    }
    source = builder.as_data_source()
    assert (len(source["train"]), len(source["dev"])) == (2, 1)
