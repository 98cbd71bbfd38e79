"""Checkpoints with orbax: the full training state (params, optimiser, EMA, best model) plus JSON counters.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed with SIGKILL
leaves only whole checkpoints behind; `--resume` restores the newest one. A checkpoint damaged afterwards (a
truncated or deleted file) is skipped with one warning and the previous one restored; `CheckpointError` when
none can be.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logging.getLogger("absl").setLevel(logging.WARNING)
log = logging.getLogger("so3lib.train")


class CheckpointError(ValueError):
    """No checkpoint in the folder can be restored."""


def _reason(e: BaseException, limit: int = 300) -> str:
    """One line for why a restore failed: the innermost cause (tensorstore's message) without the specs it
    appends, at most ``limit`` characters."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).split(" [tensorstore_spec")[0].split(" See full TensorStore details")[0]
    text = " ".join(re.sub(r'Error opening "\w+" driver: ', "", text).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


_QUIETED = False


def _quiet_abandoned_reads() -> None:
    """Once per process. A failed restore abandons orbax's other reads: their coroutines and the tensorstore
    completions that reach orbax's closed event loop each print a traceback ("Exception ignored in: <coroutine
    ...>", "RuntimeError: Event loop is closed"; hundreds of lines for one damaged checkpoint). Drop exactly those;
    every other unraisable exception goes to the previous hook."""
    global _QUIETED
    if _QUIETED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    sys.unraisablehook, _QUIETED = hook, True


class Checkpointer:
    """``single_writer``: in a run of several processes, only this process (process 0) writes and reads: the
    state is saved from its own copy of the replicated arrays and orbax synchronises with no other process."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2, single_writer: bool = False):
        self.directory = Path(directory).absolute()
        self.single_writer = single_writer
        extra = {}
        if single_writer:
            self.directory.mkdir(parents=True, exist_ok=True)  # orbax refuses create=True with active_processes
            extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=not single_writer, enable_async_checkpointing=False, **extra
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps held, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Write ``state`` (a pytree) and ``meta`` (JSON) at ``step``. Checkpoints at ``step`` or later are
        replaced: they are a second save at the same step, or ahead of a run resumed from an earlier one."""
        if self.single_writer:
            from so3lib.training.distributed import to_host

            state = to_host(state)
        for s in self.steps():
            if s >= step:
                self.manager.delete(s)
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )
        self.manager.wait_until_finished()

    def _restore_step(self, template: Any, step: int) -> tuple[Any, dict]:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        state = jax.tree_util.tree_map(np.asarray, out["state"])
        return state, dict(out["meta"])

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """(state with ``template``'s structure, as numpy arrays; meta) of ``step``, or of the newest checkpoint
        that can be read: an unreadable one is skipped with one warning naming its step and the reason.

        Raises:
            FileNotFoundError: the folder holds no checkpoint.
            CheckpointError: none of the checkpoints (or ``step``'s) can be restored.
        """
        steps = self.steps() if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        _quiet_abandoned_reads()
        failures = []
        for s in reversed(steps):
            try:
                return self._restore_step(template, s)
            except Exception as e:  # orbax and tensorstore raise many kinds, with pages of context
                failures.append((s, _reason(e)))
                rest = [t for t in steps if t < s]
                log.warning(
                    "checkpoint at step %d in %s cannot be restored (%s); %s",
                    s,
                    self.directory,
                    failures[-1][1],
                    f"trying step {rest[-1]}" if rest else "no earlier checkpoint",
                )
        tried = ", ".join(str(s) for s, _ in failures)
        raise CheckpointError(
            f"{self.directory}: no checkpoint can be restored (tried steps {tried}; step {failures[0][0]}: "
            f"{failures[0][1]})"
        )

    def close(self) -> None:
        self.manager.close()


class NoCheckpointer:
    """What processes other than process 0 of a multi-process run hold: they write no checkpoint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()

    def latest_step(self) -> int | None:
        return None

    def save(self, step: int, state: Any, meta: dict) -> None:
        pass

    def close(self) -> None:
        pass
