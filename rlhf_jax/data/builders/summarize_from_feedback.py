r"""OpenAI summarize-from-feedback comparisons from local JSON-lines files.

Source: Stiennon et al. (2020), "Learning to summarize from human feedback". Each line is
one human comparison::

    {"info": {"id", "post" (or "article"), "title", "subreddit" (or "site"), ...},
     "summaries": [{"text", "policy", ...}, {"text", "policy", ...}],
     "choice": 0 | 1, "split": "train" | "valid1" | "valid2", "batch": ..., "extra": {...}}

Every file under the source directory is read (the repository ships ``batch*.json``);
the TFDS splits are the records' own ``"split"`` values. Each split's pass reads all the
files; a problem is reported by the split the record belongs to, and a problem that makes
the split unknowable (malformed JSON, no ``"split"``) by the first split in sorted order,
so every problem is counted exactly once.

The ``prompt`` feature is the paper's TL;DR query,
``"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data.builders.local_builder import (
    Example,
    LocalBuilder,
    Note,
    RecordError,
    check_text,
    field,
    find_files,
    iter_records,
    text_field,
)
from rlhf_jax.data.errors import ErrorPolicy, IssueLog, Reason

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """The query the policy summarises (Stiennon et al., 2020, TL;DR format)."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def _split_of(record: Any) -> str | None:
    if isinstance(record, dict) and isinstance(record.get("split"), str):
        split = record["split"]
        return split if _SPLIT_NAME.match(split) else None
    return None


class SummarizeFromFeedback(LocalBuilder):
    """Summary comparisons as (prompt, chosen summary, rejected summary).

    Features: ``id``, ``subreddit``, ``title``, ``post``, ``prompt`` (TL;DR query),
    ``chosen`` / ``rejected`` (summary texts), ``chosen_policy`` / ``rejected_policy``,
    ``batch``, ``confidence`` (the labeller's 1-9 confidence, -1 when absent).
    """

    SPLIT_STEMS = {"all": None}  # noqa: RUF012

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        names = ("id", "subreddit", "title", "post", "prompt", "chosen", "rejected")
        features = {name: text for name in names}
        features |= {"chosen_policy": text, "rejected_policy": text, "batch": text}
        features["confidence"] = tfds.features.Scalar(dtype=np.int32)
        return self._info_with(
            features, homepage="https://github.com/openai/summarize-from-feedback"
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        directory = self._source(dl_manager)
        paths = find_files(directory, None)
        if not paths:
            raise FileNotFoundError(f"no .json/.jsonl[.gz] files in {directory}")
        splits = set()
        counting_nothing = IssueLog(ErrorPolicy(on_error="skip", on_tie="skip"))
        for path in paths:
            for _, record in iter_records(path, path.name, counting_nothing):
                splits.add(_split_of(record))
        names = sorted(s for s in splits if s is not None) or ["train"]
        return {s: self._generate_split(directory, paths, s, s == names[0]) for s in names}

    def _generate_split(
        self, directory: pathlib.Path, paths: list[pathlib.Path], split: str, first: bool
    ):
        issues = IssueLog(self.policy)
        quiet = IssueLog(ErrorPolicy(on_error="skip", on_tie="skip"))
        for path in paths:
            name = str(path.relative_to(directory))
            for where, record in iter_records(path, name, issues if first else quiet):
                record_split = _split_of(record)
                if record_split == split:
                    yield from self._convert_or_report(where, record, issues)
                elif record_split is None and first:
                    detail = "no valid 'split' field (a name made of letters, digits, _)"
                    issues.report(Reason.MISSING_FIELD, where, detail)
        self._record_skipped(split, issues)

    def _convert(self, record: Any, note: Note) -> list[tuple[str, Example]]:
        limit = self.max_text_chars
        info = field(record, "info", dict)
        post_key = "post" if "post" in info else "article"
        post = text_field(info, post_key, limit)
        subreddit = info.get("subreddit") or info.get("site") or ""
        title = info.get("title") or ""
        summaries = field(record, "summaries", list)
        if len(summaries) != 2:
            raise RecordError(Reason.BAD_VALUE, f"{len(summaries)} summaries, expected 2")
        choice = field(record, "choice", int)
        if choice not in (0, 1):
            raise RecordError(Reason.BAD_VALUE, f"choice is {choice}, expected 0 or 1")
        texts = [
            check_text(field(s, "text", str), f"summary {k}", limit)
            for k, s in enumerate(summaries)
        ]
        if texts[0] == texts[1]:
            raise RecordError(Reason.TIE, "the two summaries are identical")
        policies = [str(s.get("policy") or "") for s in summaries]
        extra = record.get("extra") or {}
        confidence = extra.get("confidence") if isinstance(extra, dict) else None
        example = {
            "id": str(info.get("id") or ""),
            "subreddit": str(subreddit),
            "title": str(title),
            "post": post,
            "prompt": tldr_prompt(str(subreddit), str(title), post),
            "chosen": texts[choice],
            "rejected": texts[1 - choice],
            "chosen_policy": policies[choice],
            "rejected_policy": policies[1 - choice],
            "batch": str(record.get("batch") or ""),
            "confidence": confidence if isinstance(confidence, int) else -1,
        }
        return [("0", example)]
