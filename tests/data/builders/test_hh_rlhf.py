"""HH-RLHF builder: shared prompt and final replies, both splits, gzip, the bad-input
policy for every problem the format can have, and reading back without TensorFlow."""

import gzip
import json
import sys

import pytest
import tensorflow_datasets as tfds

from rlhf_jax.data.builders import AnthropicHhRlhf, prepare, to_text
from rlhf_jax.data.chat import format_anthropic
from rlhf_jax.data.errors import DataError

CONTEXT = [
    ("human", "How do I bake bread?"),
    ("assistant", "Flour, water, yeast."),
    ("human", "And salt?"),
]
GOOD = [
    {
        "chosen": format_anthropic([*CONTEXT, ("assistant", "Yes, about 2%.")]),
        "rejected": format_anthropic([*CONTEXT, ("assistant", "No.")]),
    },
    {
        "chosen": format_anthropic([("human", "Grüße? 🦜"), ("assistant", "Hallo!")]),
        "rejected": format_anthropic([("human", "Grüße? 🦜"), ("assistant", "Go away.")]),
    },
]
BAD = {
    "malformed_json": b'{"chosen": "\\n\\nHuman: x\\n\\nAssistant: y", ',
    "missing_field": json.dumps({"chosen": GOOD[0]["chosen"]}).encode(),
    "invalid_utf8": json.dumps(GOOD[1]).encode().replace(b"Hallo", b"Ha\xfflo"),
    "empty_text": json.dumps(
        {**GOOD[0], "chosen": format_anthropic([*CONTEXT, ("assistant", " ")])}
    ).encode(),
    "inconsistent": json.dumps(
        {**GOOD[0], "rejected": format_anthropic([("human", "other"), ("assistant", "No.")])}
    ).encode(),
    "bad_value": json.dumps({**GOOD[0], "chosen": "Human: missing the blank lines"}).encode(),
    "tie": json.dumps({**GOOD[0], "rejected": GOOD[0]["chosen"]}).encode(),
    "too_long": json.dumps(
        {**GOOD[0], "chosen": format_anthropic([*CONTEXT, ("assistant", "y" * 500)])}
    ).encode(),
}


def write_lines(path, lines, compress=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if compress else data)


def good_source(tmp_path):
    write_lines(
        tmp_path / "src/helpful-base/train.jsonl.gz", [json.dumps(GOOD[0]).encode()], compress=True
    )
    write_lines(tmp_path / "src/harmless-base/train.jsonl", [json.dumps(GOOD[1]).encode()])
    write_lines(tmp_path / "src/helpful-base/test.jsonl", [json.dumps(GOOD[1]).encode()])
    return tmp_path / "src"


def test_builds_both_splits_from_the_repository_layout(tmp_path):
    builder = prepare(AnthropicHhRlhf, source_dir=good_source(tmp_path), data_dir=tmp_path / "out")
    source = builder.as_data_source()
    train = sorted((to_text(source["train"][i]) for i in range(len(source["train"]))), key=len)
    assert len(train) == 2 and len(source["test"]) == 1
    by_reply = {ex["chosen"]: ex for ex in train}
    first = by_reply["Yes, about 2%."]
    assert list(zip(first["prompt_roles"], first["prompt_texts"], strict=True)) == CONTEXT
    assert first["rejected"] == "No."
    assert by_reply["Hallo!"]["prompt_texts"] == ["Grüße? 🦜"]
    assert builder.skipped == {"train": {}, "test": {}}
    assert "tensorflow" not in sys.modules


def test_manual_dir_is_the_default_source(tmp_path):
    builder = AnthropicHhRlhf(data_dir=str(tmp_path / "out"))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(good_source(tmp_path)))
    )
    assert len(builder.as_data_source()["train"]) == 2


def test_skip_counts_every_reason_and_saves_the_counts(tmp_path):
    lines = [json.dumps(GOOD[0]).encode(), *BAD.values()]
    write_lines(tmp_path / "src/train.jsonl", lines)
    builder = prepare(
        AnthropicHhRlhf,
        source_dir=tmp_path / "src",
        data_dir=tmp_path / "out",
        on_error="skip",
        max_text_chars=100,
    )
    expected = {reason: 1 for reason in BAD}
    assert builder.skipped == {"train": expected}
    assert len(builder.as_data_source()["train"]) == 1
    reloaded = AnthropicHhRlhf(data_dir=str(tmp_path / "out"))
    assert reloaded.info.metadata["skipped"] == {"train": expected}


@pytest.mark.parametrize("reason", list(BAD))
def test_raise_names_file_line_and_reason(tmp_path, reason):
    write_lines(tmp_path / "src/sub/train.jsonl", [json.dumps(GOOD[0]).encode(), BAD[reason]])
    with pytest.raises(DataError, match=rf"sub/train.jsonl:2: {reason}:"):
        prepare(
            AnthropicHhRlhf,
            source_dir=tmp_path / "src",
            data_dir=tmp_path / "out",
            on_error="raise",
            on_tie="raise",
            max_text_chars=100,
        )


def test_missing_source_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no source files in"):
        prepare(AnthropicHhRlhf, source_dir=tmp_path / "empty", data_dir=tmp_path / "out")
