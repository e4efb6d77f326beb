"""What every local preference-data builder shares.

File discovery, JSON/JSONL readers that report problems with file and line, typed field
accessors, and the builder base.

Reading. A source file is JSON lines or one JSON array, optionally gzip-compressed
(detected from its first bytes, so ``.json``, ``.jsonl`` and ``.gz`` names all work).
Bytes are decoded as UTF-8 with ``surrogateescape``: invalid bytes survive as lone
surrogates and the text accessors report them as ``invalid_utf8`` for the record that
holds them, so one bad byte costs one record, not the file. A malformed JSON line costs
that line; a malformed JSON *array* cannot be resynchronised, so it costs the rest of the
file (one ``malformed_json`` count, or the error under ``on_error="raise"``).

Building. Builders read local files only: the directory comes from the builder argument
``source_dir`` or, failing that, ``DownloadConfig(manual_dir=...)``. They default to
``file_format="array_record"``, so ``builder.as_data_source()`` reads them without
TensorFlow. Skipped records are counted by split and reason in ``builder.skipped`` and in
the dataset metadata (``builder.info.metadata["skipped"]``), which is saved with the data.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from rlhf_jax.data.errors import ErrorPolicy, IssueLog, OnError, Reason

EXTENSIONS = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_GZIP_MAGIC = b"\x1f\x8b"
_WHITESPACE = re.compile(r"\s*")

Example = dict[str, Any]
Note = Callable[[Reason, str], None]


class RecordError(Exception):
    """Raised by field accessors and converters: this record has ``reason``."""

    def __init__(self, reason: Reason, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


def read_text(path: pathlib.Path) -> str:
    """The file's text, gunzipped if gzip-compressed; invalid UTF-8 kept as surrogates."""
    data = path.read_bytes()
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="surrogateescape")


def _iter_json_lines(text: str, name: str, issues: IssueLog) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            issues.report(Reason.MALFORMED_JSON, where, f"{error.msg} at column {error.colno}")


def _iter_json_array(text: str, name: str, issues: IssueLog) -> Iterator[tuple[str, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    position = _WHITESPACE.match(text, text.index("[") + 1).end()
    if text.startswith("]", position):
        return
    while True:
        try:
            element, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            issues.report(
                Reason.MALFORMED_JSON, f"{name}:{error.lineno}", f"{error.msg}; rest of file lost"
            )
            return
        yield f"{name}:{line_at(position)}", element
        position = _WHITESPACE.match(text, end).end()
        if text.startswith(",", position):
            position = _WHITESPACE.match(text, position + 1).end()
        elif text.startswith("]", position):
            return
        else:
            where = f"{name}:{line_at(position)}"
            issues.report(Reason.MALFORMED_JSON, where, "expected ',' or ']'; rest of file lost")
            return


def iter_records(path: pathlib.Path, name: str, issues: IssueLog) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of a JSON-lines or JSON-array file.

    ``where`` is ``"name:line"``; malformed JSON is reported to ``issues``.
    """
    text = read_text(path)
    if text.lstrip().startswith("["):
        return _iter_json_array(text, name, issues)
    return _iter_json_lines(text, name, issues)


def field(record: Mapping[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    """``record[key]``, checked to be of ``types`` (``bool`` is never accepted as ``int``)."""
    if not isinstance(record, Mapping):
        raise RecordError(Reason.BAD_VALUE, f"record is {type(record).__name__}, not an object")
    if key not in record or record[key] is None:
        raise RecordError(Reason.MISSING_FIELD, f"field {key!r} is missing")
    value = record[key]
    wanted = types if isinstance(types, tuple) else (types,)
    is_bool_for_int = isinstance(value, bool) and bool not in wanted
    if is_bool_for_int or not isinstance(value, wanted):
        names = "/".join(t.__name__ for t in wanted)
        raise RecordError(Reason.BAD_VALUE, f"field {key!r} is {value!r}, expected {names}")
    return value


def check_text(value: str, name: str, max_chars: int | None = None) -> str:
    """Return ``value`` if it is valid, non-blank and short enough, else raise RecordError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RecordError(Reason.INVALID_UTF8, f"{name} is not valid UTF-8") from None
    if not value.strip():
        raise RecordError(Reason.EMPTY_TEXT, f"{name} is empty")
    if max_chars is not None and len(value) > max_chars:
        detail = f"{name} has {len(value)} characters > max_text_chars {max_chars}"
        raise RecordError(Reason.TOO_LONG, detail)
    return value


def text_field(record: Mapping[str, Any], key: str, max_chars: int | None = None) -> str:
    """A required, non-blank, valid UTF-8 string field."""
    return check_text(field(record, key, str), repr(key), max_chars)


def find_files(directory: pathlib.Path, stems: Iterable[str] | None) -> list[pathlib.Path]:
    """Files under ``directory`` (recursively) named ``stem + ext`` for a known extension.

    ``stems=None`` accepts every file with a known extension.
    """
    found = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        for ext in EXTENSIONS:
            if path.name.endswith(ext) and (stems is None or path.name[: -len(ext)] in stems):
                found.append(path)
                break
    return found


def to_text(example: Any) -> Any:
    """Decode the ``bytes`` a data source returns for Text features into ``str``, recursively."""
    if isinstance(example, bytes):
        return example.decode("utf-8")
    if isinstance(example, Mapping):
        return {k: to_text(v) for k, v in example.items()}
    if isinstance(example, list | tuple):
        return [to_text(v) for v in example]
    return example


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the preference builders: local files in, counted problems, array_record out.

    Subclasses set ``SPLIT_STEMS`` (split name -> accepted file stems, ``None`` for any
    file) and implement ``_info`` and ``_convert(record, note) -> [(key, example)]``,
    raising :class:`RecordError` for a record that must be dropped whole and calling
    ``note(reason, detail)`` for a part of a record that is dropped (e.g. one tied pair).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}  # noqa: RUF012
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place the source files in the manual directory."
    SPLIT_STEMS: Mapping[str, tuple[str, ...] | None] = {"train": ("train",), "test": ("test",)}

    def __init__(
        self,
        *,
        source_dir: str | pathlib.Path | None = None,
        on_error: OnError = "raise",
        on_tie: OnError = "skip",
        max_text_chars: int | None = None,
        **kwargs,
    ):
        """Create the builder.

        Args:
          source_dir: directory of the source files; ``None`` uses ``manual_dir``.
          on_error: ``"raise"`` or ``"skip"`` for malformed, missing, empty, invalid,
            inconsistent or too-long records.
          on_tie: ``"raise"`` or ``"skip"`` for ties.
          max_text_chars: texts longer than this are ``too_long``; ``None``: no limit.
          **kwargs: passed to ``tfds.core.GeneratorBasedBuilder`` (``data_dir``,
            ``config``, ...); ``file_format`` defaults to ``"array_record"``.
        """
        self.policy = ErrorPolicy(on_error=on_error, on_tie=on_tie)
        self.source_dir = None if source_dir is None else pathlib.Path(source_dir)
        self.max_text_chars = max_text_chars
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _source(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path:
        directory = self.source_dir or pathlib.Path(dl_manager.manual_dir)
        if not directory.is_dir():
            raise FileNotFoundError(f"source directory {directory} does not exist")
        return directory

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        directory = self._source(dl_manager)
        generators = {}
        for split, stems in self.SPLIT_STEMS.items():
            paths = find_files(directory, stems)
            if paths:
                generators[split] = self._generate_examples(directory, paths, split)
        if not generators:
            expected = {
                s: [f"{stem}{EXTENSIONS}" for stem in v or ("*",)]
                for s, v in self.SPLIT_STEMS.items()
            }
            raise FileNotFoundError(f"no source files in {directory}; expected {expected}")
        return generators

    def _generate_examples(self, directory: pathlib.Path, paths: list[pathlib.Path], split: str):
        issues = IssueLog(self.policy)
        for path in paths:
            name = str(path.relative_to(directory))
            for where, record in iter_records(path, name, issues):
                yield from self._convert_or_report(where, record, issues)
        self._record_skipped(split, issues)

    def _convert_or_report(self, where: str, record: Any, issues: IssueLog):
        def note(reason: Reason, detail: str) -> None:
            issues.report(reason, where, detail)

        try:
            converted = self._convert(record, note)
        except RecordError as problem:
            issues.report(problem.reason, where, problem.detail)
            return
        for key, example in converted:
            yield f"{where}:{key}", example

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        """Skipped records by split and reason, as saved in the dataset metadata.

        Filled while the dataset is generated, and read back from the data directory when
        an already built dataset is loaded.
        """
        return {split: dict(c) for split, c in self.info.metadata.get("skipped", {}).items()}

    def _record_skipped(self, split: str, issues: IssueLog) -> None:
        self.info.metadata.setdefault("skipped", {})[split] = issues.as_dict()
        issues.log_summary(f"{self.name}/{split}")

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        raise NotImplementedError

    def _info_with(self, features: dict[str, Any], homepage: str) -> tfds.core.DatasetInfo:
        """Dataset info with typed ``features`` and an empty metadata dict for the counts."""
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(features),
            homepage=homepage,
            metadata=tfds.core.MetadataDict(),
        )


def prepare(
    builder_cls: type[LocalBuilder],
    *,
    source_dir: str | pathlib.Path,
    data_dir: str | pathlib.Path,
    config: str | None = None,
    **builder_kwargs,
) -> LocalBuilder:
    """Build ``builder_cls`` from ``source_dir`` into ``data_dir`` (array_record) and return it.

    Read the result with ``builder.as_data_source()[split]``; decode text with
    :func:`to_text`.
    """
    builder = builder_cls(
        source_dir=source_dir, data_dir=str(data_dir), config=config, **builder_kwargs
    )
    builder.download_and_prepare()
    return builder
