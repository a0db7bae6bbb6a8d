"""MySQL functions and comparisons for the SQLite backend, each bounded in time and size.

The collation ``MYSQL_CI`` and ``LIKE`` are case- and accent-insensitive like MySQL's
``*_ai_ci`` collations; ``LIKE`` runs on a matcher without backtracking, ``REGEXP`` on the
``regex`` engine with a timeout (wall-bounded, see :meth:`MySQLFunctions.bounded`) after a
check of the pattern's size; ``INSTR``/``REPLACE``/``TRIM`` replace SQLite's versions, which
are quadratic in their arguments' length; functions that build strings check the result's
size first. Every check reports to the statement's :class:`StatementGuard`.
"""

from __future__ import annotations

import concurrent.futures
import decimal
import functools
import hashlib
import re
import sqlite3
import unicodedata
from collections.abc import Callable
from typing import Any, TypeVar

import regex

from cmat_jax.envs.sqlite_guard import StatementGuard

COLLATION = "MYSQL_CI"
DB_NAME = "dbbench"  # what DATABASE() reports
_FOLD_CACHE_CHARS = 256  # only short strings are cached (a cache of 1 MB values is a bomb)
# A match that needs more CPU than this reruns on a worker thread whose wall time is bounded
# (the regex engine's own timeout counts CPU time, which a loaded machine stretches).
INLINE_MATCH_S = 0.02
_MATCH_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="cmat-match")
_T = TypeVar("_T")


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


def like_ci(pattern: Any, value: Any, escape: Any = "\\") -> int | None:
    """MySQL ``LIKE`` under the case- and accent-insensitive collation (no time limit: for
    the backend's own SHOW ... LIKE; the agent's statements use :class:`MySQLFunctions`)."""
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


class MySQLFunctions:
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
