"""A training run directory: resolved config, metrics (JSONL + TensorBoard), checkpoints, progress.

Layout::

    DIR/config.json      the resolved run config (what to pass to resume or export it)
    DIR/metrics.jsonl    one JSON object per logged step: {"step": N, "loss": ..., ...}
    DIR/tb/              TensorBoard event files
    DIR/checkpoints/     orbax checkpoints (see cmat_jax.training.checkpoint)

A run directory that holds anything is never overwritten: opening it again needs
`resume=True`, and then its config must equal the new one except for the fields in
`RESUMABLE_FIELDS` (logging / saving cadence) — anything else would change the numbers.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from cmat_jax.textfile import read_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"

# Top-level config fields that may change between a run and its resumption.
RESUMABLE_FIELDS = ("out", "resume", "log_every", "progress", "checkpoint.every", "checkpoint.keep")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names it."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict, new: dict) -> list[str]:
    """Dotted names of fields that differ (ignoring RESUMABLE_FIELDS)."""
    a, b = _flatten(old), _flatten(new)
    allowed = lambda k: any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
    return sorted(k for k in a.keys() | b.keys() if not allowed(k) and a.get(k) != b.get(k))


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def tb_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def read_config(self) -> dict:
        try:
            cfg = read_json(self.config_path, RunDirError)
        except FileNotFoundError:
            raise RunDirError(f"{self.path}: not a run directory (no {CONFIG})") from None
        except OSError as e:
            raise RunDirError(f"{self.config_path}: unreadable run config ({e.strerror})") from None
        if not isinstance(cfg, dict):
            raise RunDirError(f"{self.config_path}: expected a JSON object")
        return cfg

    def is_fresh(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def open(self, config: dict, *, resume: bool) -> bool:
        """Create the run dir for `config`, or (resume) check it matches. Returns whether
        an existing run is being resumed."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path}: exists and is not a directory")
        if self.is_fresh():
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(self.config_path, config)
            return False
        if not resume:
            raise RunDirError(
                f"{self.path}: run directory already exists; pass --resume to continue it "
                "or choose another --out"
            )
        old = self.read_config()
        diff = config_differences(old, config)
        if diff:
            shown = ", ".join(
                f"{k} ({_flatten(old).get(k)!r} -> {_flatten(config).get(k)!r})" for k in diff[:5]
            )
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise RunDirError(
                f"{self.config_path}: cannot resume with a different config: {shown}{more}"
            )
        _write_json_atomic(self.config_path, config)  # picks up changed logging cadence
        return True


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    v = float(v) if not isinstance(v, (int, str, bool)) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _summary_writer_class() -> type:
    """tensorboardX.SummaryWriter without importing torch (its optional import costs ~6 s of
    start-up; we log plain floats only). Harmless if torch is already imported."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail fast
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Appends step metrics to metrics.jsonl and TensorBoard. On resume from step S, records
    after S (written before a crash, then recomputed) are dropped first, so the log of a
    resumed run equals that of an uninterrupted one."""

    def __init__(self, run: RunDir, *, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            truncate_metrics(run.metrics_path, resume_step)
        SummaryWriter = _summary_writer_class()
        self._file = run.metrics_path.open("a", encoding="utf-8")
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(run.tb_dir), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:  # disk full: name the file (the CLI prints it as one line)
            raise OSError(e.errno, e.strerror, self._file.name) from None
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(k, v, global_step=int(step))

    def close(self) -> None:
        if self._file is None:
            return
        try:
            self._file.close()  # on a full disk this raises (the caller reports it) ...
        finally:
            self._close_tb()  # ... and the TensorBoard writer thread is still stopped
            self._file = self._tb = None

    def _close_tb(self) -> None:
        try:
            self._tb.close()
        except OSError as e:
            # A full disk: the events are a view of metrics.jsonl, so say so and go on (the
            # error that stops the run, if any, is the one to report). Stop each writer's
            # thread and mark it closed, or at exit tensorboardX's hook retries the flush and
            # the thread dies on its torn-down queue, each printing a traceback after it.
            for writer in getattr(self._tb, "all_writers", {}).values():
                events = writer.event_writer
                worker = getattr(events, "_worker", None)
                if worker is not None:
                    worker.stop()
                events._closed = True
            print(f"warning: {self._tb.logdir}: TensorBoard events not flushed ({e.strerror})",
                  file=sys.stderr)  # fmt: skip


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash mid-write ends the log
    return out


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (and drop a torn last line)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if int(r.get("step", -1)) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (off when not enabled)."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        self._bar = None
        self._t0 = time.perf_counter()
        self._tokens = 0
        self._first = True
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, n: int, tokens: int, loss: float | None) -> float:
        """Advance n steps that processed `tokens`; returns tokens/s since the first update
        (the first step, which compiles, is not counted)."""
        now = time.perf_counter()
        if self._first:
            self._first, self._t0 = False, now
        else:
            self._tokens += tokens
        tok_s = self._tokens / max(now - self._t0, 1e-9)
        if self._bar is not None:
            post = {"tok/s": f"{tok_s:,.0f}"}
            if loss is not None:
                post = {"loss": f"{loss:.4f}", **post}
            self._bar.set_postfix(post, refresh=False)
            self._bar.update(n)
        return tok_s

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
