"""The shared reading layer: JSON lines and JSON arrays (gzip or not) with file:line
locations, typed field access, and the raise/skip policy on malformed input."""

import gzip
import json

import pytest

from rlhf_jax.data.builders.local_builder import (
    RecordError,
    field,
    find_files,
    iter_records,
    text_field,
    to_text,
)
from rlhf_jax.data.errors import DataError, ErrorPolicy, IssueLog, Reason

SKIP = ErrorPolicy(on_error="skip")
RAISE = ErrorPolicy(on_error="raise")


def write(path, data: bytes, compress=False):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_json_lines_with_line_numbers_and_blank_lines(tmp_path, compress):
    data = b'{"a": 1}\n\n{"a": 2}\n{"a": 3}\n'
    path = write(tmp_path / "x.jsonl", data, compress)
    records = list(iter_records(path, "x.jsonl", IssueLog(RAISE)))
    assert records == [("x.jsonl:1", {"a": 1}), ("x.jsonl:3", {"a": 2}), ("x.jsonl:4", {"a": 3})]


@pytest.mark.parametrize("compress", [False, True])
def test_json_array_reports_the_line_each_element_starts_on(tmp_path, compress):
    elements = [{"a": 1}, {"b": [1, 2]}, {"c": "x\ny"}]
    text = json.dumps(elements, indent=2)
    path = write(tmp_path / "x.json", text.encode(), compress)
    records = list(iter_records(path, "x.json", IssueLog(RAISE)))
    assert [r for _, r in records] == elements
    lines = text.splitlines()
    for where, record in records:
        line = int(where.split(":")[1])
        assert lines[line - 1].strip() == "{", (where, record)
    assert list(iter_records(write(tmp_path / "e.json", b" [ ] "), "e.json", IssueLog(RAISE))) == []


def test_malformed_json_line_raises_with_location_or_is_counted(tmp_path):
    path = write(tmp_path / "x.jsonl", b'{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: malformed_json"):
        list(iter_records(path, "x.jsonl", IssueLog(RAISE)))
    issues = IssueLog(SKIP)
    assert [r for _, r in iter_records(path, "x.jsonl", issues)] == [{"a": 1}, {"a": 3}]
    assert issues.as_dict() == {"malformed_json": 1}


def test_malformed_json_array_loses_the_rest_of_the_file(tmp_path):
    path = write(tmp_path / "x.json", b'[\n {"a": 1},\n {"a": oops},\n {"a": 3}\n]')
    with pytest.raises(DataError, match=r"x.json:3: malformed_json"):
        list(iter_records(path, "x.json", IssueLog(RAISE)))
    issues = IssueLog(SKIP)
    assert [r for _, r in iter_records(path, "x.json", issues)] == [{"a": 1}]
    assert issues.as_dict() == {"malformed_json": 1}
    missing_comma = write(tmp_path / "y.json", b'[{"a": 1} {"a": 2}]')
    with pytest.raises(DataError, match=r"y.json:1: malformed_json: expected ','"):
        list(iter_records(missing_comma, "y.json", IssueLog(RAISE)))


def test_invalid_utf8_costs_only_the_record_that_holds_it(tmp_path):
    path = write(tmp_path / "x.jsonl", b'{"t": "ok"}\n{"t": "bad \xff byte"}\n')
    records = [r for _, r in iter_records(path, "x.jsonl", IssueLog(RAISE))]
    assert text_field(records[0], "t") == "ok"
    with pytest.raises(RecordError) as caught:
        text_field(records[1], "t")
    assert caught.value.reason is Reason.INVALID_UTF8


@pytest.mark.parametrize(
    "record, reason",
    [
        ({}, Reason.MISSING_FIELD),
        ({"t": None}, Reason.MISSING_FIELD),
        ({"t": 3}, Reason.BAD_VALUE),
        ({"t": "  \n"}, Reason.EMPTY_TEXT),
        ({"t": "x" * 11}, Reason.TOO_LONG),
        ({"t": "\udcff"}, Reason.INVALID_UTF8),
        ([1, 2], Reason.BAD_VALUE),
    ],
)
def test_text_field_problems(record, reason):
    with pytest.raises(RecordError) as caught:
        text_field(record, "t", max_chars=10)
    assert caught.value.reason is reason


def test_bool_is_not_an_int_field():
    assert field({"n": 1}, "n", int) == 1
    with pytest.raises(RecordError, match="expected int"):
        field({"n": True}, "n", int)
    assert field({"n": True}, "n", bool) is True


def test_find_files_and_to_text(tmp_path):
    for name in ["a/train.jsonl", "b/train.jsonl.gz", "test.json", "train.txt", "other.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in find_files(tmp_path, ("train",))] == [
        "a/train.jsonl",
        "b/train.jsonl.gz",
    ]
    assert len(find_files(tmp_path, None)) == 4
    assert to_text({"a": b"caf\xc3\xa9", "b": [b"x", 1]}) == {"a": "café", "b": ["x", 1]}
