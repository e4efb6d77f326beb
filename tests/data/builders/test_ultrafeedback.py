"""UltraFeedback builder: score lists and all strictly ordered pairs, overall or
fine-grained scores, ties counted, and the bad-input policy."""

import itertools
import json

import numpy as np
import pytest

from rlhf_jax.data.builders import UltraFeedback, fine_grained_score, prepare, to_text
from rlhf_jax.data.errors import DataError


def completion(response, overall, ratings):
    aspects = ("helpfulness", "honesty", "instruction_following", "truthfulness")
    return {
        "model": f"model-{response[:3]}",
        "principle": "helpfulness",
        "annotations": {
            a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings, strict=True)
        },
        "critique": "fine",
        "overall_score": overall,
        "response": response,
    }


SCORES = [8.5, 6.0, 8.5, 3.0]
RATINGS = [
    ("5", "4", "N/A", "5"),
    ("3", "3", "3", "3"),
    ("4", "4", "4", "4"),
    ("1", "2", "1", "N/A"),
]
FINE = [14 / 3, 3.0, 4.0, 4 / 3]  # means of the numeric ratings, by hand
RESPONSES = ["alpha answer", "beta answer", "gamma answer", "delta answer"]
GOOD = {
    "source": "evol_instruct",
    "instruction": "Explain recursion.",
    "models": ["a", "b", "c", "d"],
    "completions": [
        completion(r, s, g) for r, s, g in zip(RESPONSES, SCORES, RATINGS, strict=True)
    ],
}
BAD = {
    "malformed_json": b'{"instruction": [',
    "missing_field": json.dumps({k: v for k, v in GOOD.items() if k != "completions"}).encode(),
    "bad_value": json.dumps({**GOOD, "completions": GOOD["completions"][:1]}).encode(),
    "empty_text": json.dumps({**GOOD, "instruction": " "}).encode(),
    "invalid_utf8": json.dumps(GOOD).encode().replace(b"recursion", b"recursi\xffn"),
    "too_long": json.dumps({**GOOD, "instruction": "why? " * 60}).encode(),
}
LIMIT = 200  # characters: GOOD's texts are shorter, the too_long instruction has 300


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


def build(tmp_path, lines, config, **kwargs):
    write(tmp_path / "src/evol_instruct.jsonl", lines)
    return prepare(
        UltraFeedback,
        source_dir=tmp_path / "src",
        data_dir=tmp_path / "out",
        config=config,
        **kwargs,
    )


@pytest.mark.parametrize(("score", "expected"), [("overall_score", SCORES), ("fine_grained", FINE)])
def test_lists_keep_every_response_and_score(tmp_path, score, expected):
    builder = build(tmp_path, [json.dumps(GOOD).encode()], "lists", score=score)
    ex = to_text(builder.as_data_source()["train"][0])
    assert ex["responses"] == RESPONSES and ex["instruction"] == GOOD["instruction"]
    np.testing.assert_allclose(ex["scores"], expected, rtol=1e-6)  # float32 storage
    assert ex["models"] == [c["model"] for c in GOOD["completions"]]


def test_pairs_are_all_strictly_ordered_pairs_and_ties_are_counted(tmp_path):
    builder = build(tmp_path, [json.dumps(GOOD).encode()], "pairs")
    source = builder.as_data_source()["train"]
    got = {
        (ex["chosen"], ex["rejected"]) for ex in (to_text(source[i]) for i in range(len(source)))
    }
    expected = {
        (RESPONSES[i], RESPONSES[j])
        for i, j in itertools.permutations(range(4), 2)
        if SCORES[i] > SCORES[j]
    }
    assert got == expected and len(got) == 5
    assert builder.skipped == {"train": {"tie": 1}}


def test_fine_grained_score_ignores_not_applicable():
    assert (
        fine_grained_score({"a": {"Rating": "5"}, "b": {"Rating": "N/A"}, "c": {"Rating": "2"}})
        == 3.5
    )


def test_all_equal_scores_are_a_tie_in_lists(tmp_path):
    flat = {
        **GOOD,
        "completions": [completion(r, 5.0, g) for r, g in zip(RESPONSES, RATINGS, strict=True)],
    }
    builder = build(tmp_path, [json.dumps(GOOD).encode(), json.dumps(flat).encode()], "lists")
    assert builder.skipped == {"train": {"tie": 1}}
    with pytest.raises(DataError, match=r"evol_instruct\.jsonl:2: tie: all 4 scores equal"):
        build(
            tmp_path / "again",
            [json.dumps(GOOD).encode(), json.dumps(flat).encode()],
            "lists",
            on_tie="raise",
        )


def test_skip_counts_every_reason(tmp_path):
    lines = [json.dumps(GOOD).encode(), *BAD.values()]
    builder = build(tmp_path, lines, "lists", on_error="skip", max_text_chars=LIMIT)
    assert builder.skipped == {"train": {reason: 1 for reason in BAD}}


@pytest.mark.parametrize("reason", list(BAD))
def test_raise_names_file_line_and_reason(tmp_path, reason):
    with pytest.raises(DataError, match=rf"evol_instruct.jsonl:2: {reason}:"):
        build(tmp_path, [json.dumps(GOOD).encode(), BAD[reason]], "pairs", max_text_chars=LIMIT)


def test_missing_score_and_unknown_score_source(tmp_path):
    no_score = {**GOOD, "completions": [{**c, "overall_score": None} for c in GOOD["completions"]]}
    with pytest.raises(DataError, match="missing_field: field 'overall_score' is missing"):
        build(tmp_path, [json.dumps(no_score).encode()], "lists")
    with pytest.raises(ValueError, match="score must be"):
        UltraFeedback(score="median", data_dir=str(tmp_path))
