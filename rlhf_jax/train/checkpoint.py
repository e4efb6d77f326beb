"""Checkpoints of the training state with orbax: periodic, atomic, asynchronous.

A checkpoint of step ``k`` is a directory ``<directory>/<k>`` holding the state pytree
(``state``, written by ``ocp.args.StandardSave``) and a JSON document (``metadata``: the
config, the data position, counters). Orbax writes each checkpoint into a temporary
directory and renames it only once every file is on disk, so a process killed during a
save leaves at most an unfinished temporary directory, which :meth:`Checkpointer.latest_step`
never reports. Saves run in a background thread; :meth:`Checkpointer.wait` (called by
:meth:`Checkpointer.close`) blocks until the last one is committed.

Restoring takes an *abstract* state: the same pytree with ``jax.ShapeDtypeStruct``
leaves that carry the target sharding (:func:`abstract_state`). Built from a state laid
out on another mesh, it restores the checkpoint onto that mesh.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Sharding

PyTree = Any


def abstract_state(state: PyTree, sharding: Sharding | PyTree | None = None) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves with the shape, dtype and sharding of ``state``.

    Args:
      state: a pytree of arrays (or of ``ShapeDtypeStruct``).
      sharding: ``None`` keeps each leaf's own sharding; one ``Sharding`` applies to
        every leaf; a pytree of shardings (the structure of ``state``) sets each leaf.

    Returns:
      The abstract pytree to pass to :meth:`Checkpointer.restore`.
    """
    if sharding is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), state)
    elif isinstance(sharding, Sharding):
        shardings = jax.tree.map(lambda _: sharding, state)
    else:
        shardings = sharding
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


class Checkpointer:
    """Periodic, atomic, asynchronous checkpoints of a state pytree plus JSON metadata.

    Args:
      directory: where step directories are written (created if missing).
      save_every: a call of :meth:`maybe_save` at step ``k`` saves when
        ``k % save_every == 0``.
      max_to_keep: how many of the newest checkpoints are kept (``None`` keeps all).
      async_save: write in a background thread (``True``) or block in :meth:`save`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        save_every: int,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ) -> None:
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.fspath(os.path.abspath(directory))
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                enable_async_checkpointing=async_save,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every committed checkpoint still kept, in increasing order."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any]) -> None:
        """Start saving ``state`` and ``metadata`` as the checkpoint of ``step``.

        Args:
          step: the step number (the directory name).
          state: the pytree of arrays to save.
          metadata: a JSON-serialisable mapping saved beside it.
        """
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(dict(metadata))
            ),
            force=True,
        )

    def maybe_save(self, step: int, state: PyTree, metadata: Mapping[str, Any]) -> bool:
        """Save when ``step`` is a multiple of ``save_every``; returns whether it did."""
        if step % self.save_every:
            return False
        self.save(step, state, metadata)
        return True

    def restore(self, abstract: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Read a checkpoint onto the shapes, dtypes and shardings of ``abstract``.

        Args:
          abstract: the state's structure with ``jax.ShapeDtypeStruct`` leaves (see
            :func:`abstract_state`).
          step: which checkpoint; the latest committed one by default.

        Returns:
          ``(state, metadata)``.

        Raises:
          FileNotFoundError: when ``directory`` holds no committed checkpoint (of ``step``).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no committed checkpoint{'' if step is None else f' of step {step}'} in "
                f"{self.directory}; committed steps: {self.all_steps()}"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()
            ),
        )
        return restored.state, dict(restored.metadata)

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()
