"""Training checkpoints: orbax `CheckpointManager` over LoRA params, optimizer state and data state.

One checkpoint `<dir>/<step>/` holds four items:

- `lora`  — the LoRA parameters only (small: this is all an exported adapter needs),
- `train` — every other field of the train state (step, optimizer state, RNG, skip counter),
- `data`  — the data iterator's JSON state (its position in the stream),
- `meta`  — JSON about the run (model source, config fingerprint, metrics at this step).

The frozen base model is never saved; the run config names its source. Saves are async and
atomic (orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it when every item is done),
so a crash mid-save leaves no half checkpoint and resume picks the newest complete one.
Restore takes a target state (concrete or abstract) and restores onto its shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from cmat_jax.cli import storage_failure
from cmat_jax.faults import fault_point

# Field of the train state that holds the LoRA params (train_step.TrainState: "params").
_LORA_FIELDS = ("params", "lora")
_ITEMS = ("lora", "train", "data", "meta")


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns "Given directory is read only" whenever a manager opens a run to read it;
    that is what exporting and evaluating a run always do, so the warning says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_notice() -> Iterator[None]:
    """Drop that notice while a manager is built (orbax prints it in the constructor)."""
    absl_logger, notice = logging.getLogger("absl"), _DropReadOnlyNotice()
    absl_logger.addFilter(notice)
    try:
        yield
    finally:
        absl_logger.removeFilter(notice)


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit the run, or one that could not be written
    (disk full, read-only); the message names the path."""


@dataclass(frozen=True)
class CheckpointConfig:
    """When and how many checkpoints are written."""

    every: int = 100
    """Save every N optimizer steps (the last step is always saved)."""
    keep: int = 3
    """Keep the newest N checkpoints (older ones are deleted)."""
    async_save: bool = True
    """Write checkpoints in a background thread while training continues."""

    def __post_init__(self) -> None:
        if self.every < 1:
            raise CheckpointError(f"checkpoint.every must be >= 1, got {self.every}")
        if self.keep < 1:
            raise CheckpointError(f"checkpoint.keep must be >= 1, got {self.keep}")


def completed_steps(directory: str | Path) -> list[int]:
    """Steps of the finalized checkpoints in `directory` (read-only; safe while a run writes)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(ocp.step.checkpoint_steps(directory))


def abstract_like(tree: Any) -> Any:
    """`ShapeDtypeStruct`s (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _fields(state: Any) -> dict[str, Any]:
    if hasattr(state, "_fields"):  # NamedTuple
        return {f: getattr(state, f) for f in state._fields}
    if dataclasses.is_dataclass(state):
        return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    raise TypeError(f"train state must be a NamedTuple or dataclass, got {type(state).__name__}")


def _split(state: Any) -> tuple[str, Any, dict[str, Any]]:
    fields = _fields(state)
    for name in _LORA_FIELDS:
        if name in fields:
            return name, fields.pop(name), fields
    raise TypeError(f"train state {type(state).__name__} has no field among {_LORA_FIELDS}")


class Checkpointer:
    """Saves and restores train states in `directory` (created if missing)."""

    def __init__(
        self, directory: str | Path, config: CheckpointConfig | None = None, *, read_only=False
    ):
        self.directory = Path(directory).absolute()
        self.config = config or CheckpointConfig()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no checkpoint directory")
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, max_to_keep=None
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.config.keep,
                enable_async_checkpointing=self.config.async_save,
                # Leftovers of a save interrupted by a crash are never complete: remove them.
                cleanup_tmp_directories=True,
            )
        self._saving: int | None = None  # the step of a save that may still be running
        self._failed = False  # a save failed on a full or unwritable disk (and was reported)
        with _without_read_only_notice():
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=_ITEMS
            )

    # --- queries ---------------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # --- save ------------------------------------------------------------------------------

    def save(
        self,
        state: Any,
        *,
        data_state: dict | None = None,
        meta: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Save at `state.step` if it is a multiple of `every` (or `force`); returns whether
        a save started. Async: the arrays are copied off-device before this returns, so the
        caller may donate `state` to the next step right away."""
        step = int(jax.device_get(state.step))
        if not force and step % self.config.every:
            return False
        if step in self._manager.all_steps():
            return False
        self.wait()  # the previous save is complete (orbax would wait for it here anyway)
        fault_point("checkpoint_save")
        _, lora, rest = _split(state)
        args = ocp.args.Composite(
            lora=ocp.args.StandardSave(lora),
            train=ocp.args.StandardSave(rest),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave({"step": step, **(meta or {})}),
        )
        with self._storage_errors():  # may report the previous async save's failure
            started = self._manager.save(step, args=args, force=True)
        self._saving = step
        return started

    @contextlib.contextmanager
    def _storage_errors(self) -> Iterator[None]:
        """A save that fails on a full or unwritable disk -> one-line CheckpointError. orbax
        writes into a temporary directory and renames it only when complete, so the newest
        complete checkpoint is untouched (and the leftover is removed on the next start)."""
        try:
            yield
        except (OSError, ValueError) as e:
            cause = storage_failure(e)
            if cause is None or isinstance(e, CheckpointError):
                raise
            step, self._saving, self._failed = self._saving, None, True
            # orbax's abandoned write tasks report the same failure again as they are
            # collected ("Task exception was never retrieved"): this error says it once.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            kept = [s for s in completed_steps(self.directory) if s != step]
            last = f"newest complete checkpoint: {max(kept)}" if kept else "no complete checkpoint"
            raise CheckpointError(
                f"{self.directory}: saving checkpoint {step} failed: {cause} ({last})"
            ) from None

    def wait(self) -> None:
        """Block until every pending async save is finalized on disk."""
        with self._storage_errors():
            self._manager.wait_until_finished()
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except (OSError, ValueError):
                if not self._failed:  # else: the save's failure is what was reported
                    raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- restore ---------------------------------------------------------------------------

    def _step_or_latest(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint for step {step} (have {steps})")
        return step

    def _restore_as(self, step: int, args: Any, mismatch: str) -> Any:
        """`self._manager.restore`; orbax's structure errors become one CheckpointError line
        that names the step directory and says what does not match."""
        try:
            return self._manager.restore(step, args=args)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{self.directory / str(step)}: {mismatch} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            ) from None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """`(state, data_state, meta)` of `step` (default: newest complete checkpoint).

        `target` is a train state of the same structure (arrays or `ShapeDtypeStruct`s); the
        restored arrays get its shapes, dtypes and shardings, so a run restores onto its mesh.
        """
        step = self._step_or_latest(step)
        name, lora_t, rest_t = _split(target)
        args = ocp.args.Composite(
            lora=ocp.args.StandardRestore(abstract_like(lora_t)),
            train=ocp.args.StandardRestore(abstract_like(rest_t)),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        out = self._restore_as(
            step, args, "checkpoint does not match this run's model, LoRA or optimizer config"
        )
        state = type(target)(**{name: out["lora"]}, **out["train"])
        return state, dict(out["data"] or {}), dict(out["meta"] or {})

    def restore_lora(self, target_lora: Any = None, step: int | None = None) -> tuple[Any, dict]:
        """Only the LoRA params (for export / inference): `(lora, meta)`. Without a target
        they come back as saved (nested dicts of host arrays)."""
        step = self._step_or_latest(step)
        target = None if target_lora is None else abstract_like(target_lora)
        args = ocp.args.Composite(
            lora=ocp.args.StandardRestore(target),
            meta=ocp.args.JsonRestore(),
        )
        out = self._restore_as(step, args, "LoRA params do not match the run's LoRA config")
        return out["lora"], dict(out["meta"] or {})
