"""PKU-SafeRLHF builder: each record yields the helpfulness pair and the harmlessness pair
with each response's safety flag, and the bad-input policy."""

import json

import pytest

from rlhf_jax.data.builders import PkuSafeRlhf, prepare, to_text
from rlhf_jax.data.errors import DataError


def record(
    prompt="How do I pick a lock?",
    better=0,
    safer=1,
    safe=(False, True),
    responses=("Use a tension wrench...", "Call a locksmith."),
):
    return {
        "prompt": prompt,
        "response_0": responses[0],
        "response_1": responses[1],
        "prompt_source": "BeaverTails",
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": safe[0],
        "is_response_1_safe": safe[1],
    }


BAD = {
    "malformed_json": b'{"prompt": ',
    "missing_field": json.dumps(
        {k: v for k, v in record().items() if k != "safer_response_id"}
    ).encode(),
    "bad_value": json.dumps(record(better=2)).encode(),
    "empty_text": json.dumps(record(responses=("", "x"))).encode(),
    "tie": json.dumps(record(responses=("same", "same"))).encode(),
    "inconsistent": json.dumps(record(safer=0, safe=(False, True))).encode(),
    "invalid_utf8": json.dumps(record()).encode().replace(b"pick", b"p\xffck"),
    "too_long": json.dumps(record(prompt="?" * 300)).encode(),
}
LIMIT = 200  # characters: the default record's texts are shorter, the too_long prompt has 300


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize(
    ("better", "safer", "safe"),
    [(0, 1, (False, True)), (1, 1, (True, True)), (1, 0, (False, False))],
)
def test_both_pairs_and_flags(tmp_path, better, safer, safe):
    raw = record(better=better, safer=safer, safe=safe)
    write(tmp_path / "src/Alpaca-7B/train.jsonl", [json.dumps(raw).encode()])
    builder = prepare(PkuSafeRlhf, source_dir=tmp_path / "src", data_dir=tmp_path / "out")
    ex = to_text(builder.as_data_source()["train"][0])
    responses = [raw["response_0"], raw["response_1"]]
    assert (ex["better"], ex["worse"]) == (responses[better], responses[1 - better])
    assert (ex["safer"], ex["less_safe"]) == (responses[safer], responses[1 - safer])
    assert (ex["better_is_safe"], ex["worse_is_safe"]) == (safe[better], safe[1 - better])
    assert (ex["safer_is_safe"], ex["less_safe_is_safe"]) == (safe[safer], safe[1 - safer])
    assert (ex["is_response_0_safe"], ex["is_response_1_safe"]) == safe
    assert (ex["prompt"], ex["better_response_id"], ex["safer_response_id"]) == (
        raw["prompt"],
        better,
        safer,
    )


def test_skip_counts_every_reason(tmp_path):
    write(tmp_path / "src/test.jsonl", [json.dumps(record()).encode(), *BAD.values()])
    builder = prepare(
        PkuSafeRlhf,
        source_dir=tmp_path / "src",
        data_dir=tmp_path / "out",
        on_error="skip",
        max_text_chars=LIMIT,
    )
    assert builder.skipped == {"test": {reason: 1 for reason in BAD}}
    assert len(builder.as_data_source()["test"]) == 1


@pytest.mark.parametrize("reason", list(BAD))
def test_raise_names_file_line_and_reason(tmp_path, reason):
    write(tmp_path / "src/train.jsonl", [json.dumps(record()).encode(), BAD[reason]])
    with pytest.raises(DataError, match=rf"train.jsonl:2: {reason}:"):
        prepare(
            PkuSafeRlhf,
            source_dir=tmp_path / "src",
            data_dir=tmp_path / "out",
            on_tie="raise",
            max_text_chars=LIMIT,
        )
