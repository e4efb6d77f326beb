"""Metric writers: a JSONL file, TensorBoard event files and a console progress bar.

A jitted step returns its metrics as device arrays. Converting them to Python numbers
every step would make the host wait for the device every step, so :class:`MetricsWriter`
only *keeps* the arrays in :meth:`MetricsWriter.record` and fetches all pending steps with
one ``jax.device_get`` in :meth:`MetricsWriter.flush`, which the loop calls every
``log_every`` steps. Every step's metrics are written, one JSON object per line
(``{"step": k, "loss": ...}``, non-finite values as Python's ``json`` writes them:
``NaN``, ``Infinity``) and as TensorBoard scalars.

When a run resumes from step ``s``, lines of steps after ``s`` (written after the
checkpoint by the interrupted run) are dropped from the JSONL file and TensorBoard is
told to purge them, so each step appears once.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorboardX
import tqdm
from jax import Array
from tensorboardX.proto import event_pb2

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _to_python(value: Any) -> Any:
    """A host value as a JSON-friendly Python scalar (or nested list)."""
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every JSON object of a JSONL file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_jsonl(path: str, last_step: int) -> None:
    """Rewrite ``path`` without the lines whose ``step`` exceeds ``last_step``."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def read_event_scalars(logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file in ``logdir``, as ``{tag: [(step, value)]}``.

    Parses the TFRecord framing (``uint64`` length, ``uint32`` length CRC, payload,
    ``uint32`` payload CRC) and the ``Event`` protocol buffers directly, so it needs no
    TensorBoard or TensorFlow install. Files are read oldest first; as in TensorBoard, a
    session-start event at step ``s`` (written when a run resumes) discards the values
    logged at steps ``>= s`` before it, and a later value of a step replaces an earlier one.

    Args:
      logdir: the directory holding ``events.out.tfevents.*`` files.

    Returns:
      For each tag, ``(step, value)`` pairs sorted by step.
    """
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(os.fspath(logdir), "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            payload = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(payload)
            if event.session_log.status == event_pb2.SessionLog.START:
                for points in scalars.values():
                    for step in [s for s in points if s >= event.step]:
                        del points[step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return {tag: sorted(points.items()) for tag, points in scalars.items()}


class MetricsWriter:
    """Buffers per-step device metrics and writes them in batches.

    Args:
      workdir: the run directory; writes ``workdir/metrics.jsonl`` and
        ``workdir/tensorboard/``.
      total_steps: the run's last step (the progress bar's total).
      start_step: the step the run starts (or resumes) from; logged steps after it are
        dropped from earlier files.
      progress: show a ``tqdm`` progress bar on stderr.
      progress_keys: metrics shown beside the bar.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        progress_keys: Sequence[str] = ("loss", "grad_norm"),
    ) -> None:
        workdir = os.fspath(workdir)
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, JSONL_NAME)
        self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
        _truncate_jsonl(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a")  # noqa: SIM115 (closed in close())
        self._tensorboard = tensorboardX.SummaryWriter(
            self.tensorboard_dir,
            purge_step=start_step + 1 if start_step else None,
            # Event files are named by the second they were opened; the suffix keeps a
            # writer opened in the same second from overwriting the previous one.
            filename_suffix=f".{time.time_ns()}",
        )
        self._bar = tqdm.tqdm(
            total=total_steps, initial=start_step, disable=not progress, dynamic_ncols=True
        )
        self._progress_keys = tuple(progress_keys)
        self._pending: list[tuple[int, Mapping[str, Array]]] = []

    def record(self, step: int, metrics: Mapping[str, Array]) -> None:
        """Keep ``metrics`` of ``step`` (device arrays are not read here)."""
        self._pending.append((step, metrics))

    def flush(self) -> list[dict[str, Any]]:
        """Fetch every pending step with one transfer and write it everywhere.

        Returns:
          The written records, ``{"step": k, **metrics}`` with Python values, in order.
        """
        if not self._pending:
            return []
        steps, device_metrics = zip(*self._pending, strict=True)
        self._pending = []
        records = [
            {"step": step, **{k: _to_python(v) for k, v in metrics.items()}}
            for step, metrics in zip(steps, jax.device_get(device_metrics), strict=True)
        ]
        for record in records:
            self._jsonl.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, float(value), record["step"])
        self._jsonl.flush()
        self._tensorboard.flush()
        last = records[-1]
        self._bar.update(last["step"] - self._bar.n)
        self._bar.set_postfix(
            {k: f"{last[k]:.4g}" for k in self._progress_keys if _is_number(last.get(k))},
            refresh=False,
        )
        return records

    def close(self) -> None:
        """Flush pending metrics and close the files and the progress bar."""
        self.flush()
        self._jsonl.close()
        self._tensorboard.close()
        self._bar.close()


def _is_number(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) that ``:.4g`` can format."""
    return isinstance(value, int | float) and not isinstance(value, bool)
