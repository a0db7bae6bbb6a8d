"""Embedded DBBench backend: one in-memory SQLite database per episode, sandboxed, speaking
enough MySQL that scoring comes out as on MySQL.

Sandbox (model SQL touches only its own in-memory database, within fixed limits):
- the shared statement policy (:func:`check_statement`: one statement, allowed keywords);
- an authorizer that denies ATTACH/DETACH, every PRAGMA outside a read-only allow-list,
  virtual tables, triggers and the functions in :data:`DENIED_FUNCTIONS` (file access,
  extensions, and the SQLite-only ``printf`` / ``glob`` whose C loops run unbounded inside one
  call); attached-database limit 0; extension loading off; temp storage in memory (no files);
- time: a wall-clock limit per statement, checked by the progress handler between VM steps and
  by every Python SQL function and the collation; ``REGEXP`` runs on the ``regex`` engine with
  the remaining time as its timeout, ``LIKE`` on a backtracking-free matcher; ``INSTR``,
  ``REPLACE`` and two-argument ``TRIM`` are linear-time Python versions (SQLite's are
  quadratic in their arguments' length);
- size: ``SQLITE_LIMIT_LENGTH`` caps any value, Python functions check their result's size
  before building it, ``max_page_count`` caps each database (main and temp; reapplied after a
  restore), results are fetched one row at a time up to a row and a byte cap;
- memory: a per-statement budget of SQLite memory (checked by the progress handler; it also
  bounds how much one in-memory sort has to sort, which SQLite does without progress checks)
  and SQLite's hard heap limit (process-wide, :func:`limit_sqlite_heap`) as the backstop;
  past the deadline the collation raises, so a sort under way finishes on C-level returns.
A statement over a limit ends with an error observation naming it (``ExecResult.limit``).

MySQL emulation: text columns use a case- and accent-insensitive collation, ``LIKE`` follows
it (with ``\\`` as the default escape), ``LOWER``/``UPPER`` are Unicode-aware, and common MySQL
functions exist (``CONCAT``, ``CONCAT_WS``, ``MD5``, ``LEFT``, ``RIGHT``, ``IF``, ``LOCATE``,
``INSTR``, ``REPEAT``, ``FORMAT``, ``REGEXP``, ``DATABASE()``, ...). Syntax is rewritten by
:mod:`cmat_jax.envs.mysql_dialect`.
"""

from __future__ import annotations

import _sqlite3
import concurrent.futures
import ctypes
import decimal
import functools
import hashlib
import math
import re
import sqlite3
import time
import unicodedata
from collections.abc import Callable
from typing import Any, TypeVar

import regex

from cmat_jax.envs.mysql_dialect import (
    ShowCommand,
    SQLSyntaxError,
    parse_show,
    sqlite_ident,
    to_sqlite,
)
from cmat_jax.envs.sql_backend import (
    MAX_STATEMENT_CHARS,
    ExecResult,
    LimitKind,
    TableSpec,
    check_statement,
    fetch_capped,
    mysql_table_hash,
)

COLLATION = "MYSQL_CI"
DB_NAME = "dbbench"  # what DATABASE() reports
READ_ONLY_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
DENIED_FUNCTIONS = frozenset(
    {"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit", "load_file",
     "printf", "glob"}
)  # fmt: skip
DENIED_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH, sqlite3.SQLITE_CREATE_VTABLE,
        sqlite3.SQLITE_DROP_VTABLE, sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
    }
)  # fmt: skip
# SQLITE_LIMIT_SQL_LENGTH: one agent statement after translation (NUL bytes become hex)
MAX_SQL_BYTES = 4 * MAX_STATEMENT_CHARS
MAX_COLUMNS = 128  # SQLITE_LIMIT_COLUMN: bounds one row at MAX_COLUMNS values
_FOLD_CACHE_CHARS = 256  # only short strings are cached (a cache of 1 MB values is a bomb)
# A match that needs more CPU than this reruns on a worker thread whose wall time is bounded
# (the regex engine's own timeout counts CPU time, which a loaded machine stretches).
INLINE_MATCH_S = 0.02
_MATCH_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="cmat-match")
_T = TypeVar("_T")


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


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


_fold_cached = functools.lru_cache(maxsize=65536)(_fold)


def fold(text: str) -> str:
    """Case- and accent-insensitive comparison key (like MySQL's ``*_ai_ci`` collations)."""
    return _fold_cached(text) if len(text) <= _FOLD_CACHE_CHARS else _fold(text)


LIKE_PATTERN_CHARS = 50_000  # SQLite's own SQLITE_LIMIT_LIKE_PATTERN_LENGTH default
REGEX_PATTERN_CHARS = 8 << 10  # as the MariaDB setup caps values (max_allowed_packet)
REGEX_EXPANDED_SIZE = 100_000  # the regex engine expands counted repeats when it compiles
_REPEAT_RE = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def regex_expanded_size(pattern: str) -> int:
    """Upper estimate of a regular expression's size once counted repeats are expanded
    (``((a{100}){100}){100}`` is 10^6: it compiles for seconds into hundreds of MB)."""
    stack, total, i = [], 0, 0
    while i < len(pattern):
        c = pattern[i]
        if c == "(":
            stack.append(total)
            total, i = 0, i + 1
            continue
        if c == ")" and stack:
            item, total, i = max(total, 1), stack.pop(), i + 1
        elif c == "\\":
            item, i = 1, i + 2
        elif c == "[":
            item, i = 1, _class_end(pattern, i)
        else:
            item, i = 1, i + 1
        if m := _REPEAT_RE.match(pattern, i):
            low, high = int(m.group(1)), m.group(2)
            item *= max(low, int(high)) if high else low
            i = m.end()
        total += item
    while stack:
        total += stack.pop()
    return total


def _class_end(pattern: str, start: int) -> int:
    """Index after the character class opening at ``start`` (a ``]`` first in it, or escaped,
    is a member)."""
    j = start + 1
    if pattern.startswith("^", j):
        j += 1
    j += 2 if pattern.startswith("\\", j) else 1  # the first member, even "]"
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


@functools.lru_cache(maxsize=1024)
def _like_segments(pattern: str, escape: str) -> tuple[tuple[str | regex.Pattern[str], int], ...]:
    """The pattern split at its unescaped ``%``: each piece a literal string, or a regex of
    literals and ``.`` where it has ``_``, with the number of characters it matches."""
    segments: list[list[str]] = [[]]
    wild: list[bool] = [False]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == escape and i + 1 < len(pattern):
            segments[-1].append(pattern[i + 1])
            i += 2
            continue
        if c == "%":
            segments.append([])
            wild.append(False)
        elif c == "_":
            segments[-1].append("")  # one wildcard character
            wild[-1] = True
        else:
            segments[-1].append(c)
        i += 1
    out: list[tuple[str | regex.Pattern[str], int]] = []
    for seg, has_wild in zip(segments, wild, strict=True):
        if has_wild:
            rx = "".join(regex.escape(ch) if ch else "." for ch in seg)
            out.append((regex.compile(rx, regex.DOTALL), len(seg)))
        else:
            out.append(("".join(seg), len(seg)))
    return tuple(out)


def like_match(pattern: str, value: str, escape: str = "\\", timeout: float = 3600.0) -> bool:
    """SQL ``LIKE`` without backtracking: the pieces between ``%`` have fixed lengths, so the
    first must match at the start, the last at the end, and each middle one at its leftmost
    place after the previous (any later place leaves less room, never more). Literal pieces
    use ``str.find`` (linear); pieces with ``_`` a regex search bounded by ``timeout``."""
    segments = _like_segments(pattern, escape)

    def at(seg: str | regex.Pattern[str], pos: int, end: int) -> bool:  # seg fills [pos, end)
        if isinstance(seg, str):
            return value.startswith(seg, pos, end) and end - pos == len(seg)
        return seg.fullmatch(value, pos, end, concurrent=True, timeout=timeout) is not None

    if len(segments) == 1:
        seg, n = segments[0]
        return len(value) == n and at(seg, 0, n)
    (first, n_first), *middle, (last, n_last) = segments
    end = len(value) - n_last
    if end < n_first or not at(first, 0, n_first) or not at(last, end, len(value)):
        return False
    pos = n_first
    for seg, n in middle:
        if isinstance(seg, str):
            found = value.find(seg, pos, end)
            if found < 0:
                return False
            pos = found + n
        else:
            m = seg.search(value, pos, end, concurrent=True, timeout=timeout)
            if m is None:
                return False
            pos = m.end()
    return True


def _like(pattern: Any, value: Any, escape: Any = "\\") -> int | None:
    """MySQL ``LIKE`` under the case- and accent-insensitive collation (no time limit: for
    the backend's own SHOW ... LIKE; the agent's statements use :class:`_Functions`)."""
    if pattern is None or value is None or escape is None:
        return None
    return int(like_match(fold(str(pattern)), fold(str(value)), str(escape)[:1] or "\\"))


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return str(v)


def _locate(sub: Any, s: Any, pos: Any = 1) -> int | None:
    if sub is None or s is None or pos is None:
        return None
    start = max(int(pos), 1) - 1
    return fold(_text(s)).find(fold(_text(sub)), start) + 1


_NUM_PREFIX = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def mysql_number(value: Any) -> int | float:
    """MySQL's string-to-number conversion: the longest numeric prefix, else 0."""
    if isinstance(value, int | float):
        return value
    m = _NUM_PREFIX.match(_text(value))
    return float(m.group()) if m else 0.0


def _format(x: Any, d: Any, _locale: Any = None) -> str | None:
    """MySQL ``FORMAT(X, D)``: X rounded half away from zero to D decimals (0..30), with
    thousands separators."""
    if x is None or d is None:
        return None
    places = min(max(int(mysql_number(d)), 0), 30)
    try:
        q = decimal.Decimal(str(mysql_number(x))).quantize(
            decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_UP
        )
    except decimal.InvalidOperation:
        return None
    return f"{q:,.{places}f}"


class _MySQLSum:
    """``SUM`` as MySQL computes it over TEXT columns: strings become doubles (so the sum of
    '7', '12', '3' is 22.0, not SQLite's integer 22)."""

    def __init__(self) -> None:
        self.total: int | float | None = None
        self.as_float = False

    def step(self, value: Any) -> None:
        if value is None:
            return
        if not isinstance(value, int):
            self.as_float = True
        self.total = (self.total or 0) + mysql_number(value)

    def finalize(self) -> int | float | None:
        if self.total is None:
            return None
        return float(self.total) if self.as_float else self.total


class _Functions:
    """The episode's Python SQL functions, bound to its :class:`StatementGuard`: each checks
    the time left and the size of what it would build before building it."""

    def __init__(self, guard: StatementGuard) -> None:
        self.guard = guard

    def collate(self, a: str, b: str) -> int:
        if self.guard.expired():
            # the sort goes on, but the sqlite3 module then skips this callback (a C-level
            # return per comparison) and raises this once the step returns
            self.guard.fail("time")
        fa, fb = fold(a), fold(b)
        return (fa > fb) - (fa < fb)

    def bounded(self, match: Callable[[float], _T]) -> _T:
        """``match(timeout)`` inline with a short timeout; when it needs longer, again on a
        worker thread, waited for at most the statement's remaining wall time (a thread left
        behind stops at its own timeout, the same remaining time in CPU seconds)."""
        try:
            return match(min(self.guard.remaining(), INLINE_MATCH_S))
        except TimeoutError:
            pass
        left = self.guard.remaining()
        job = _MATCH_POOL.submit(match, left)
        try:
            return job.result(timeout=left)
        except TimeoutError:
            job.cancel()
            self.guard.fail("time")
            raise  # unreachable: fail() raises

    def like(self, pattern: Any, value: Any, escape: Any = "\\") -> int | None:
        if pattern is None or value is None or escape is None:
            return None
        if len(str(pattern)) > LIKE_PATTERN_CHARS:
            self.guard.fail("length", "LIKE or GLOB pattern too complex")
        p, v, e = fold(str(pattern)), fold(str(value)), str(escape)[:1] or "\\"
        return int(self.bounded(lambda timeout: like_match(p, v, e, timeout)))

    def regexp(self, pattern: Any, value: Any) -> int | None:
        if pattern is None or value is None:
            return None
        pattern = str(pattern)
        if len(pattern) > REGEX_PATTERN_CHARS or regex_expanded_size(pattern) > REGEX_EXPANDED_SIZE:
            self.guard.fail("length", "1139 (42000): Got error 'regular expression is too large'")
        try:
            compiled = regex.compile(pattern, regex.IGNORECASE)
        except regex.error as e:
            raise ValueError(f"invalid regular expression: {e}") from e
        text = str(value)
        found = self.bounded(
            lambda timeout: compiled.search(text, concurrent=True, timeout=timeout)
        )
        return int(found is not None)

    def concat(self, *args: Any) -> str | None:
        if any(a is None for a in args):
            return None
        parts = [_text(a) for a in args]
        self.guard.check_length(sum(map(len, parts)))
        return "".join(parts)

    def concat_ws(self, sep: Any, *args: Any) -> str | None:
        if sep is None:
            return None
        parts = [_text(a) for a in args if a is not None]
        sep = _text(sep)
        self.guard.check_length(sum(map(len, parts)) + len(sep) * max(len(parts) - 1, 0))
        return sep.join(parts)

    def repeat(self, s: Any, n: Any) -> str | None:
        """MySQL ``REPEAT``: NULL when the result would be over the value cap (as MySQL's is
        over ``max_allowed_packet``)."""
        if s is None or n is None:
            return None
        s, count = _text(s), int(mysql_number(n))
        if count <= 0 or not s:
            return ""
        if len(s) * count > self.guard.max_value_bytes:
            self.guard.hit = "length"
            return None
        return s * count

    def replace(self, s: Any, old: Any, new: Any) -> str | None:
        if s is None or old is None or new is None:
            return None
        s, old, new = _text(s), _text(old), _text(new)
        if not old:
            return s
        self.guard.check_length(len(s) + s.count(old) * (len(new) - len(old)))
        return s.replace(old, new)

    def instr(self, s: Any, sub: Any) -> int | None:
        return _locate(sub, s)

    def trim(self, s: Any, chars: Any, left: bool = True, right: bool = True) -> str | None:
        if s is None or chars is None:
            return None
        s, drop = _text(s), set(_text(chars))
        i, j = 0, len(s)
        while left and i < j and s[i] in drop:
            i += 1
        while right and j > i and s[j - 1] in drop:
            j -= 1
        return s[i:j]

    def register(self, conn: sqlite3.Connection) -> None:
        det = {"deterministic": True}
        conn.create_collation(COLLATION, self.collate)
        conn.create_function("like", 2, self.like, **det)
        conn.create_function("like", 3, self.like, **det)
        conn.create_function("regexp", 2, self.regexp, **det)
        conn.create_aggregate("sum", 1, _MySQLSum)
        conn.create_function("lower", 1, lambda s: None if s is None else _text(s).lower(), **det)
        conn.create_function("upper", 1, lambda s: None if s is None else _text(s).upper(), **det)
        conn.create_function("lcase", 1, lambda s: None if s is None else _text(s).lower(), **det)
        conn.create_function("ucase", 1, lambda s: None if s is None else _text(s).upper(), **det)
        conn.create_function("concat", -1, self.concat, **det)
        conn.create_function("concat_ws", -1, self.concat_ws, **det)
        conn.create_function("repeat", 2, self.repeat, **det)
        conn.create_function("replace", 3, self.replace, **det)
        conn.create_function("instr", 2, self.instr, **det)
        conn.create_function("trim", 2, self.trim, **det)
        conn.create_function("ltrim", 2, lambda s, c: self.trim(s, c, right=False), **det)
        conn.create_function("rtrim", 2, lambda s, c: self.trim(s, c, left=False), **det)
        conn.create_function("format", 2, _format, **det)
        conn.create_function("format", 3, _format, **det)
        conn.create_function(
            "md5",
            1,
            lambda s: None if s is None else hashlib.md5(_text(s).encode()).hexdigest(),
            **det,
        )
        conn.create_function(
            "left", 2, lambda s, n: None if s is None or n is None else _text(s)[: max(int(n), 0)]
        )
        conn.create_function(
            "right",
            2,
            lambda s, n: (
                None if s is None or n is None else (_text(s)[-int(n) :] if int(n) > 0 else "")
            ),
        )
        conn.create_function("if", 3, lambda c, a, b: a if c else b, **det)
        conn.create_function("locate", 2, _locate, **det)
        conn.create_function("locate", 3, _locate, **det)
        conn.create_function(
            "char_length", 1, lambda s: None if s is None else len(_text(s)), **det
        )
        conn.create_function("database", 0, lambda: DB_NAME, **det)


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


class SQLiteEpisode:
    """One episode's in-memory database."""

    def __init__(
        self,
        table: TableSpec,
        *,
        time_limit_s: float,
        max_rows: int,
        max_value_bytes: int,
        max_result_bytes: int,
        max_db_bytes: int,
        max_statement_memory: int,
    ) -> None:
        self.table = table
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self.max_result_bytes = max_result_bytes
        self.max_db_bytes = max_db_bytes
        self._guard = StatementGuard(max_value_bytes, max_statement_memory)
        self._trusted = False
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.conn = conn
        _Functions(self._guard).register(conn)
        conn.execute("PRAGMA temp_store = MEMORY")
        cols = ", ".join(f"{sqlite_ident(c)} TEXT COLLATE {COLLATION}" for c in table.columns)
        conn.execute(f"CREATE TABLE {sqlite_ident(table.name)} ({cols})")
        if table.rows:
            marks = ", ".join("?" for _ in table.columns)
            conn.executemany(f"INSERT INTO {sqlite_ident(table.name)} VALUES ({marks})", table.rows)
        # Lock down only after our own setup statements ran.
        self._cap_db_size()
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, MAX_COLUMNS)
        conn.setlimit(sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH, 10)
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(False)
        conn.set_authorizer(self._authorize)
        conn.set_progress_handler(self._progress, 1000)

    def _cap_db_size(self) -> None:
        """``max_page_count`` on main and temp (a deserialized database starts without it)."""
        page = self.conn.execute("PRAGMA page_size").fetchone()[0]
        pages = max(self.max_db_bytes // page, 1)
        self.conn.execute(f"PRAGMA main.max_page_count = {pages}")
        self.conn.execute(f"PRAGMA temp.max_page_count = {pages}")

    # -- sandbox hooks -------------------------------------------------------------------------
    def _authorize(self, action: int, arg1: Any, arg2: Any, _db: Any, _trigger: Any) -> int:
        if self._trusted:  # our own snapshot/restore (serialize runs PRAGMA page_count)
            return sqlite3.SQLITE_OK
        if action in DENIED_ACTIONS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() not in READ_ONLY_PRAGMAS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        return int(self._guard.over())

    # -- execution -----------------------------------------------------------------------------
    def execute(self, sql: str) -> ExecResult:
        refusal = check_statement(sql)
        if refusal is not None:
            return ExecResult.failure(refusal, limit="policy")
        show = parse_show(sql)
        if show is not None:
            return self._show(show)
        try:
            translated = to_sqlite(sql.strip().rstrip(";"))
        except SQLSyntaxError as e:
            return ExecResult.failure(f"1064 (42000): You have an error in your SQL syntax: {e}")
        return self._run(translated, original=sql)

    def _run(self, sql: str, original: str, params: tuple[Any, ...] = ()) -> ExecResult:
        self._guard.start(self.time_limit_s)
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            rows, capped = [], False
            if cur.description is not None:
                rows, capped = fetch_capped(cur.fetchone, self.max_rows, self.max_result_bytes)
        except (sqlite3.Error, ValueError, OverflowError, MemoryError, LimitExceeded) as e:
            return self._failure(e, original)
        finally:
            self._guard.stop()
            cur.close()
        res = ExecResult.of_rows(rows, capped)
        if self._guard.hit is not None and not capped:  # e.g. REPEAT over the value cap
            res = ExecResult(text=res.text, error=False, rows=rows, limit=self._guard.hit)
        return res

    def _failure(self, err: BaseException, sql: str) -> ExecResult:
        if self._guard.hit is not None:  # raised inside one of our functions
            kind = self._guard.hit
            text = self._guard.message or LIMIT_MESSAGES[kind]
        else:
            text = mysql_error_text(err, sql)
            kind = limit_of(err)
        return ExecResult.failure(text, limit=kind)

    def _show(self, cmd: ShowCommand) -> ExecResult:
        if cmd.kind in ("tables", "full_tables"):
            sql = (
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%'"
            )
            res = self._run(sql + " ORDER BY name", "SHOW TABLES")
            rows = [r for r in res.rows or [] if cmd.like is None or _like(cmd.like, r[0])]
            if cmd.kind == "full_tables":
                rows = [(r[0], "BASE TABLE") for r in rows]
            return ExecResult(text=str(rows), error=False, rows=rows)
        if cmd.kind == "databases":
            rows = [(DB_NAME,)] if cmd.like is None or _like(cmd.like, DB_NAME) else []
            return ExecResult(text=str(rows), error=False, rows=rows)
        name = self._find_table(cmd.table)
        if name is None:
            return ExecResult.failure(f"1146 (42S02): Table '{DB_NAME}.{cmd.table}' doesn't exist")
        info = self.conn.execute("SELECT * FROM pragma_table_info(?)", (name,)).fetchall()
        if cmd.kind == "index":
            return ExecResult(text="[]", error=False, rows=[])
        if cmd.kind == "create_table":
            body = ",\n".join(f"  `{c[1]}` {(c[2] or 'text').lower()}" for c in info)
            rows = [(name, f"CREATE TABLE `{name}` (\n{body}\n)")]
            return ExecResult(text=str(rows), error=False, rows=rows)
        rows = []
        for _cid, col, ctype, notnull, default, pk in info:
            if cmd.like is not None and not _like(cmd.like, col):
                continue
            row = (col, (ctype or "").lower(), "NO" if notnull else "YES")
            row += ("PRI" if pk else "", default, "")
            if cmd.kind == "full_columns":
                row = (
                    *row[:2],
                    "utf8mb4_general_ci",
                    *row[2:],
                    "select,insert,update,references",
                    "",
                )
            rows.append(row)
        return ExecResult(text=str(rows), error=False, rows=rows)

    def _find_table(self, name: str) -> str | None:
        for (t,) in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table','view')"
        ):
            if fold(t) == fold(name):
                return t
        return None

    # -- scoring and snapshots ---------------------------------------------------------------
    def table_hash(self) -> str:
        cols = ", ".join(sqlite_ident(c) for c in self.table.columns)
        sql = f"SELECT {cols} FROM {sqlite_ident(self.table.name)}"
        self._guard.start(self.time_limit_s)
        try:
            rows = self.conn.execute(sql).fetchall()  # within max_db_bytes
        except (sqlite3.Error, MemoryError, LimitExceeded) as e:  # e.g. the agent dropped it
            return mysql_error_text(e, sql)
        finally:
            self._guard.stop()
        return mysql_table_hash(rows)

    def snapshot(self) -> bytes:
        self._trusted = True
        try:
            return self.conn.serialize()
        finally:
            self._trusted = False

    def restore(self, snap: bytes) -> None:
        self._trusted = True
        try:
            self.conn.deserialize(snap)
            self._cap_db_size()
        finally:
            self._trusted = False

    def close(self) -> None:
        self.conn.close()


LIMIT_MESSAGES: dict[LimitKind, str] = {
    "time": "3024 (HY000): Query execution was interrupted, maximum statement execution time "
    "exceeded",
    "memory": "1041 (HY000): Out of memory; the statement needed more than the sandbox's "
    "memory limit",
    "db_size": "1114 (HY000): The table is full (the database is at its size limit)",
    "length": "1301 (HY000): Result was larger than max_allowed_packet",
}


def limit_of(err: BaseException) -> LimitKind | None:
    """Which sandbox limit a SQLite error comes from, if any."""
    if isinstance(err, MemoryError):
        return "memory"
    msg = str(err)
    if msg == "interrupted":
        return "time"
    if msg.startswith("not authorized") or "prohibited" in msg:
        return "permission"
    if msg in ("string or blob too big", "out of memory"):
        return "length" if msg.startswith("string") else "memory"
    if msg == "database or disk is full":
        return "db_size"
    if msg.startswith(("too many columns", "LIKE or GLOB pattern too complex")):
        return "length"
    return None


_NO_COLUMN = re.compile(r"no such column: (.+)")
_NO_COLUMN_NAMED = re.compile(r"table \S+ has no column named (.+)")
_NO_TABLE = re.compile(r"no such table: (?:main\.)?(.+)")
_NEAR = re.compile(r'near "(.*)": syntax error', re.DOTALL)


def mysql_error_text(err: BaseException, sql: str) -> str:
    """Phrase the common SQLite errors the way MySQL reports them (the agent is told it talks
    to MySQL); anything else keeps SQLite's own message."""
    msg = str(err)
    kind = limit_of(err)
    if kind in LIMIT_MESSAGES:
        return LIMIT_MESSAGES[kind]
    if m := (_NO_COLUMN.fullmatch(msg) or _NO_COLUMN_NAMED.fullmatch(msg)):
        return f"1054 (42S22): Unknown column '{m.group(1)}' in 'field list'"
    if m := _NO_TABLE.fullmatch(msg):
        return f"1146 (42S02): Table '{DB_NAME}.{m.group(1)}' doesn't exist"
    if m := _NEAR.fullmatch(msg):
        pos = sql.find(m.group(1))
        near = sql[pos:] if pos >= 0 else m.group(1)
        return (
            "1064 (42000): You have an error in your SQL syntax; check the manual that "
            f"corresponds to your MySQL server version for the right syntax to use near "
            f"'{near[:80]}' at line 1"
        )
    if ("values for" in msg and "columns" in msg) or (
        "has" in msg and "values were supplied" in msg
    ):
        return "1136 (21S01): Column count doesn't match value count at row 1"
    if msg.startswith("not authorized") or "prohibited" in msg:
        return f"sandbox: {msg}"
    return msg


class SQLiteBackend:
    """Factory of sandboxed in-memory episode databases (the default backend)."""

    name = "sqlite"

    def __init__(
        self,
        *,
        time_limit_s: float = 3.0,
        max_rows: int = 1000,
        max_value_bytes: int = 1 << 20,
        max_result_bytes: int = 1 << 20,
        max_db_bytes: int = 16 << 20,
        max_statement_memory: int = 64 << 20,
        max_memory_bytes: int = 512 << 20,
    ) -> None:
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self.max_value_bytes = max_value_bytes
        self.max_result_bytes = max_result_bytes
        self.max_db_bytes = max_db_bytes
        self.max_statement_memory = max_statement_memory
        self.heap_limited = limit_sqlite_heap(max_memory_bytes)

    def open(self, table: TableSpec) -> SQLiteEpisode:
        return SQLiteEpisode(
            table,
            time_limit_s=self.time_limit_s,
            max_rows=self.max_rows,
            max_value_bytes=self.max_value_bytes,
            max_result_bytes=self.max_result_bytes,
            max_db_bytes=self.max_db_bytes,
            max_statement_memory=self.max_statement_memory,
        )

    def close(self) -> None:
        pass
