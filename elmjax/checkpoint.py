"""Checkpoints of a training run with orbax: trainable state, optimiser, step, data position.

What a checkpoint holds (``WORKDIR/checkpoints/<step>/``):

* ``state``: the trainable parameters and the optimiser state (``nnx.State``), saved sharded
  as they live on the devices, restored straight into the same shardings. With LoRA this is
  the adapter alone (and any trainable extra vocabulary rows): the frozen base reloads from its
  Hugging Face checkpoint, so a 1B-model run checkpoints a few megabytes.
* ``meta`` (JSON): the step, the data iterator's state (grain ``get_state()``: restoring it
  reproduces the exact next batches), the config hash, and the number of tokens seen.

Saves are asynchronous (training goes on while the files are written) and atomic (orbax writes
to a temporary directory and renames it), so a run killed at any moment leaves only complete
checkpoints; :meth:`Checkpointer.latest_step` is the last complete one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Saves and restores ``(state, meta)`` pairs under ``directory``, keeping the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of every complete checkpoint, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any], *, force: bool = False) -> bool:
        """Starts saving (asynchronously); returns whether a save was started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` of ``step``; ``target`` is the live state (or its abstract shape
        with shardings), which fixes the restored arrays' shardings and dtypes."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.meta

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
