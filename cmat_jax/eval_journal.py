"""The journal of a running ``cmat_jax.evaluate``: finished chunks of episodes, kept so that an
interrupted evaluation continues (``--resume``) without running them again.

``DIR/journal.jsonl`` holds the evaluation's settings on its first line and then one line per
finished chunk (the episodes the model agent ran together), appended and fsynced as it
finishes: ``{"trial", "unit", "lines", "records", "counters", "ltm_records"}`` — ``unit`` is the
chunk's start index in the trial's item list, ``lines`` its episodes.jsonl lines, ``records``
the engine's episode records (what ``summarize`` reads), ``counters`` the engine counters and
``ltm_records`` the size of the evaluation's long-term memory after the chunk. The final
outputs are computed from these lines, resumed or not, so both end byte-identical.

``DIR/journal_ltm.sqlite`` is the evaluation's own long-term memory (a copy of the run's plus
what a reflexion evaluation writes); a resumed evaluation cuts it back to the records its last
journaled chunk had seen, so every chunk sees the memory an uninterrupted run gives it.

Opening an output directory: results.json present -> refused unless --overwrite; a journal
present -> refused unless --resume (continue it; its settings must match) or --overwrite
(start over); --resume and --overwrite together are refused. --resume without a journal starts
a fresh evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmat_jax.faults import fault_point

JOURNAL = "journal.jsonl"
JOURNAL_LTM = "journal_ltm.sqlite"
# Settings that may differ between an evaluation and its resumption (they change no result).
RESUMABLE_SETTINGS = frozenset({"out", "resume", "overwrite", "progress"})


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """The existing-output rules above; raises before anything is loaded or written."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    results = out / "results.json"
    if results.exists() and not overwrite:
        raise FileExistsError(f"{results} exists; pass --overwrite to replace it")
    journal = out / JOURNAL
    if journal.exists() and not (resume or overwrite):
        raise FileExistsError(
            f"{journal}: an interrupted evaluation; pass --resume to continue it or "
            "--overwrite to start over"
        )


class EvalJournal:
    """Finished chunks of one evaluation in DIR (see the module docstring)."""

    def __init__(self, out: Path, settings: Mapping[str, Any], *, resume: bool, overwrite: bool):
        check_output_dir(out, resume=resume, overwrite=overwrite)
        self.out = Path(out)
        self.path = self.out / JOURNAL
        self.ltm_path = self.out / JOURNAL_LTM
        # JSON-normalised, so settings read back from the journal compare equal.
        self.settings = json.loads(
            json.dumps(
                {k: v for k, v in settings.items() if k not in RESUMABLE_SETTINGS}, default=str
            )
        )
        self._done: dict[tuple[int, int], dict[str, Any]] = {}
        self._valid_bytes = 0
        if resume and self.path.exists():
            self._load()

    @property
    def resumed(self) -> bool:
        return self._valid_bytes > 0

    def _load(self) -> None:
        data = self.path.read_bytes()
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                break  # a kill cut the last line short: it ends the journal
            try:
                rec = json.loads(data[pos:end])
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            if pos == 0:
                self._check_settings(rec.get("settings") if isinstance(rec, dict) else None)
            else:
                self._done[(int(rec["trial"]), int(rec["unit"]))] = rec
            pos = end + 1
        self._valid_bytes = pos

    def _check_settings(self, old: Any) -> None:
        if not isinstance(old, dict):
            raise ValueError(f"{self.path}: line 1: not an evaluation journal's settings")
        diff = sorted(
            k for k in old.keys() | self.settings.keys() if old.get(k) != self.settings.get(k)
        )
        if diff:
            changes = ", ".join(f"{k} ({old.get(k)!r} -> {self.settings.get(k)!r})" for k in diff)
            raise ValueError(f"{self.path}: --resume with different settings: {changes}")

    def start(self) -> None:
        """Begin writing (after validation): cut a torn last line of a resumed journal, or
        write a fresh journal's settings line (dropping an old journal's memory)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed:
            with self.path.open("r+b") as f:
                f.truncate(self._valid_bytes)
            return
        _remove_sqlite(self.ltm_path)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"settings": self.settings}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self, trial: int, unit: int) -> dict[str, Any] | None:
        """The journaled chunk (trial, unit), or None when it has not finished."""
        return self._done.get((trial, unit))

    def last_ltm_records(self) -> int | None:
        """Long-term-memory records after the newest journaled chunk (None: none yet)."""
        counts = [r["ltm_records"] for r in self._done.values() if r["ltm_records"] is not None]
        return max(counts) if counts else None

    def record(
        self, trial: int, unit: int, chunk: Mapping[str, Any], ltm_records: int | None
    ) -> dict[str, Any]:
        """Append a finished chunk (fsynced); returns it as it reads back from JSON, which is
        what the results are computed from, resumed or not."""
        line = json.dumps(
            {"trial": trial, "unit": unit, **chunk, "ltm_records": ltm_records},
            ensure_ascii=False,
            default=str,
        )
        fault_point("eval_journal_append")
        # One write of a whole line: a kill leaves it complete or torn, never interleaved.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        rec = json.loads(line)
        self._done[(trial, unit)] = rec
        return rec

    def finish(self) -> None:
        """The evaluation's outputs are written: drop the journal and its memory."""
        self.path.unlink(missing_ok=True)
        _remove_sqlite(self.ltm_path)


def _remove_sqlite(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)
