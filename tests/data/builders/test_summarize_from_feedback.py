"""Summarize-from-feedback builder: splits from the records' own field, chosen by
``choice``, the TL;DR prompt, and the bad-input policy."""

import json

import pytest

from rlhf_jax.data.builders import SummarizeFromFeedback, prepare, tldr_prompt, to_text
from rlhf_jax.data.errors import DataError


def comparison(post_id, split, choice, texts=(" He cheated.", " She left."), confidence=7):
    return {
        "info": {
            "id": post_id,
            "post": f"Long post {post_id}",
            "title": "Help",
            "subreddit": "relationships",
        },
        "split": split,
        "summaries": [
            {"text": texts[0], "policy": "sup2", "note": None},
            {"text": texts[1], "policy": "ppo_xl", "note": None},
        ],
        "choice": choice,
        "worker": "w7",
        "batch": "batch3",
        "extra": {"confidence": confidence},
    }


GOOD = [
    comparison("t3_a", "train", 1),
    comparison("t3_b", "valid1", 0),
    comparison("t3_c", "train", 0, confidence=None),
]
BAD = {
    "malformed_json": b"{not json",
    "missing_field": json.dumps(
        {k: v for k, v in comparison("t3_d", "train", 0).items() if k != "choice"}
    ).encode(),
    "bad_value": json.dumps(comparison("t3_e", "train", 2)).encode(),
    "empty_text": json.dumps(comparison("t3_f", "train", 0, texts=("", " x"))).encode(),
    "tie": json.dumps(comparison("t3_g", "train", 0, texts=(" same", " same"))).encode(),
    "invalid_utf8": json.dumps(comparison("t3_h", "train", 0))
    .encode()
    .replace(b"cheated", b"ch\xffated"),
    "too_long": json.dumps(comparison("t3_i", "train", 0, texts=(" x" * 150, " y"))).encode(),
}
LIMIT = 200  # characters: every GOOD text is shorter, the too_long summary has 300


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_splits_choice_and_prompt(tmp_path):
    write(tmp_path / "src/comparisons/batch3.json", [json.dumps(c).encode() for c in GOOD])
    builder = prepare(SummarizeFromFeedback, source_dir=tmp_path / "src", data_dir=tmp_path / "out")
    source = builder.as_data_source()
    assert set(source) == {"train", "valid1"}
    train = {
        ex["id"]: ex for ex in (to_text(source["train"][i]) for i in range(len(source["train"])))
    }
    assert set(train) == {"t3_a", "t3_c"}
    a = train["t3_a"]
    assert (a["chosen"], a["rejected"], a["chosen_policy"], a["rejected_policy"]) == (
        " She left.",
        " He cheated.",
        "ppo_xl",
        "sup2",
    )
    assert (
        a["prompt"] == "SUBREDDIT: r/relationships\n\nTITLE: Help\n\nPOST: Long post t3_a\n\nTL;DR:"
    )
    assert a["prompt"] == tldr_prompt("relationships", "Help", "Long post t3_a")
    assert (a["confidence"], train["t3_c"]["confidence"]) == (7, -1)
    valid = to_text(source["valid1"][0])
    assert (valid["id"], valid["chosen"]) == ("t3_b", " He cheated.")


def test_skip_counts_each_problem_once_across_splits(tmp_path):
    write(tmp_path / "src/batch.json", [json.dumps(c).encode() for c in GOOD] + list(BAD.values()))
    builder = prepare(
        SummarizeFromFeedback,
        source_dir=tmp_path / "src",
        data_dir=tmp_path / "out",
        on_error="skip",
        max_text_chars=LIMIT,
    )
    counts = {}
    for split_counts in builder.skipped.values():
        for reason, n in split_counts.items():
            counts[reason] = counts.get(reason, 0) + n
    assert counts == {reason: 1 for reason in BAD}
    assert builder.skipped["valid1"] == {}


@pytest.mark.parametrize("reason", list(BAD))
def test_raise_names_file_line_and_reason(tmp_path, reason):
    write(tmp_path / "src/batch.json", [json.dumps(GOOD[0]).encode(), BAD[reason]])
    with pytest.raises(DataError, match=rf"batch.json:2: {reason}:"):
        prepare(
            SummarizeFromFeedback,
            source_dir=tmp_path / "src",
            data_dir=tmp_path / "out",
            on_tie="raise",
            max_text_chars=LIMIT,
        )


def test_record_without_split_is_reported(tmp_path):
    record = {k: v for k, v in GOOD[0].items() if k != "split"}
    write(tmp_path / "src/batch.json", [json.dumps(GOOD[0]).encode(), json.dumps(record).encode()])
    with pytest.raises(DataError, match=r"batch.json:2: missing_field: no valid 'split'"):
        prepare(SummarizeFromFeedback, source_dir=tmp_path / "src", data_dir=tmp_path / "out")
