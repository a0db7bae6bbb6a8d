"""Per-statement limits of the SQLite backend that live outside SQLite's own checks: the
deadline and value-size cap that Python SQL functions enforce, the statement memory budget
the progress handler checks, and SQLite's process-wide hard heap limit (through ctypes: the
``sqlite3`` module does not expose them)."""

from __future__ import annotations

import _sqlite3
import ctypes
import math
import time
from typing import Any

from cmat_jax.envs.sql_backend import LimitKind


class LimitExceeded(Exception):
    """Raised inside a Python SQL function; the statement fails with ``kind``."""

    def __init__(self, kind: LimitKind) -> None:
        super().__init__(kind)
        self.kind = kind


def _sqlite_call(name: str, restype: Any, argtypes: list[Any]) -> Any:
    """A function of the SQLite library this Python uses (None when it does not export it)."""
    try:
        fn = getattr(ctypes.CDLL(_sqlite3.__file__), name)
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = restype, argtypes
    return fn


_MEMORY_USED = _sqlite_call("sqlite3_memory_used", ctypes.c_int64, [])
_HARD_HEAP_LIMIT = _sqlite_call("sqlite3_hard_heap_limit64", ctypes.c_int64, [ctypes.c_int64])


def sqlite_memory_used() -> int:
    """Bytes SQLite holds now, process-wide (0 when the library does not say)."""
    return _MEMORY_USED() if _MEMORY_USED is not None else 0


class StatementGuard:
    """The running statement's deadline, value-size cap and memory budget, shared by the
    episode and its Python SQL functions (SQLite's progress handler never runs inside one
    function call or one in-memory sort)."""

    def __init__(self, max_value_bytes: int, max_statement_memory: int) -> None:
        self.max_value_bytes = max_value_bytes
        self.max_statement_memory = max_statement_memory
        self.deadline = math.inf
        self.memory_at_start = 0
        self.hit: LimitKind | None = None
        self.message: str | None = None  # the error text when it is not the limit's default

    def start(self, time_limit_s: float) -> None:
        self.deadline = time.monotonic() + time_limit_s
        self.memory_at_start = sqlite_memory_used()
        self.hit = self.message = None

    def over(self) -> bool:
        """Checked by the progress handler: past the deadline, or SQLite holding more than the
        statement's memory budget above where it started (this bounds what one in-memory
        sort, which runs without progress checks, has to sort)."""
        if self.expired():
            self.hit = "time"
            return True
        if sqlite_memory_used() - self.memory_at_start > self.max_statement_memory:
            self.hit = "memory"
            return True
        return False

    def stop(self) -> None:
        self.deadline = math.inf

    def expired(self) -> bool:
        return time.monotonic() > self.deadline

    def remaining(self) -> float:
        """Seconds left; raises when none are."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.fail("time")
        return min(left, 3600.0)

    def check_length(self, n_chars: int) -> None:
        if n_chars > self.max_value_bytes:
            self.fail("length")

    def fail(self, kind: LimitKind, message: str | None = None) -> None:
        self.hit, self.message = kind, message
        raise LimitExceeded(kind)


def limit_sqlite_heap(max_bytes: int) -> bool:
    """Cap all SQLite memory of this process at ``max_bytes`` (``sqlite3_hard_heap_limit64``;
    an allocation past it fails with SQLITE_NOMEM, which ends only the statement that made it).
    Process-wide: a lower cap already set is kept. Returns False when the SQLite library does
    not export the call (the statement caps still hold; only this backstop is missing)."""
    if _HARD_HEAP_LIMIT is None:
        return False
    current = _HARD_HEAP_LIMIT(-1)
    if current <= 0 or current > max_bytes:
        _HARD_HEAP_LIMIT(max_bytes)
    return True
