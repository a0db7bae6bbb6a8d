"""The journal of a running `cmat_jax.evaluate`: finished items, kept so that an interrupted
evaluation continues (`--resume`) without running them again.

`DIR/journal.jsonl` holds the evaluation's settings on its first line and then one line per
finished unit of work, appended (and flushed) as it finishes: `{"trial", "unit", "transcripts",
"stats", "ltm_records"}` — a unit is a chunk of episodes the model agent ran together (its start
index in the trial's item list) or one episode of another agent (its index). When the
evaluation completes, results.json and transcripts.jsonl are written and the journal removed.

`DIR/journal_ltm.sqlite` is the evaluation's own long-term memory (a copy of the run's, plus
the reflections a reflexion evaluation writes); a resumed evaluation cuts it back to the
records its last journaled unit had seen.

Opening an output directory: results.json present -> refused unless --overwrite; a journal
present -> refused unless --resume (continue it; its settings must match) or --overwrite
(start over); --resume and --overwrite together are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

JOURNAL = "journal.jsonl"
JOURNAL_LTM = "journal_ltm.sqlite"
# Settings that may differ between an evaluation and its resumption (they change no result).
RESUMABLE_SETTINGS = ("out", "resume", "overwrite", "progress")


class EvalJournal:
    """Finished units of one evaluation in DIR (see the module docstring)."""

    def __init__(self, out: Path, settings: dict[str, Any], *, resume: bool, overwrite: bool):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        self.out = Path(out)
        self.path = self.out / JOURNAL
        self.ltm_path = self.out / JOURNAL_LTM
        self.settings = {k: v for k, v in settings.items() if k not in RESUMABLE_SETTINGS}
        self._done: dict[tuple[int, int], dict[str, Any]] = {}
        self.resumed = False
        results = self.out / "results.json"
        if results.exists() and not overwrite:
            raise FileExistsError(f"{results} exists; pass --overwrite to replace it")
        if self.path.exists() and not (resume or overwrite):
            raise FileExistsError(
                f"{self.path}: an interrupted evaluation; pass --resume to continue it or "
                "--overwrite to start over"
            )
        if self.path.exists() and resume:
            self._load()

    def _load(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept: list[str] = []
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a kill cut short ends the journal
            if i == 0:
                old = rec.get("settings", {})
                diff = sorted(k for k in old.keys() | self.settings.keys()
                              if old.get(k) != self.settings.get(k))  # fmt: skip
                if diff:
                    raise ValueError(
                        f"{self.path}: cannot resume with different settings: "
                        + ", ".join(
                            f"{k} ({old.get(k)!r} -> {self.settings.get(k)!r})" for k in diff
                        )
                    )
            else:
                self._done[(int(rec["trial"]), int(rec["unit"]))] = rec
            kept.append(line)
        if len(kept) < len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(x + "\n" for x in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self.resumed = bool(kept)

    def start(self) -> None:
        """Begin writing: a fresh journal (settings line) unless this one is resumed."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resumed:
            self.ltm_path.unlink(missing_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"settings": self.settings}, default=str) + "\n")
            os.replace(tmp, self.path)

    def done(self, trial: int, unit: int) -> dict[str, Any] | None:
        """The journaled record of (trial, unit), or None when it has not finished."""
        return self._done.get((trial, unit))

    def last_ltm_records(self) -> int | None:
        """Long-term-memory records after the newest journaled unit (None: no unit yet)."""
        counts = [r.get("ltm_records") for r in self._done.values()]
        counts = [c for c in counts if c is not None]
        return max(counts) if counts else None

    def record(
        self,
        trial: int,
        unit: int,
        transcripts: list[dict[str, Any]],
        stats: dict[str, Any] | None = None,
        ltm_records: int | None = None,
    ) -> dict[str, Any]:
        """Append a finished unit; returns it as it reads back (JSON), which is what the
        results are computed from, resumed or not."""
        rec = {"trial": trial, "unit": unit, "transcripts": transcripts, "stats": stats or {},
               "ltm_records": ltm_records}  # fmt: skip
        # One write of a whole line: a kill leaves it complete or torn, never interleaved.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        self._done[(trial, unit)] = rec = json.loads(json.dumps(rec, default=str))
        return rec

    def finish(self) -> None:
        """The evaluation's results are written: drop the journal and its memory."""
        self.path.unlink(missing_ok=True)
        self.ltm_path.unlink(missing_ok=True)
