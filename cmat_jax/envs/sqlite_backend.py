"""Embedded DBBench backend: one in-memory SQLite database per episode, sandboxed, speaking
enough MySQL that scoring comes out as on MySQL.

Sandbox (model SQL touches only its own in-memory database):
- the shared statement policy (:func:`check_statement`: one statement, allowed keywords);
- an authorizer that denies ATTACH/DETACH, every PRAGMA outside a read-only allow-list and
  the ``load_extension`` / ``fts3_tokenizer`` functions; attached-database limit 0; extension
  loading off; temp storage in memory (no spill files);
- a wall-clock limit per statement (progress handler), a cap on fetched rows and on the size
  of any string/blob value (``SQLITE_LIMIT_LENGTH``).

MySQL emulation: text columns use a case- and accent-insensitive collation, ``LIKE`` follows
it (with ``\\`` as the default escape), ``LOWER``/``UPPER`` are Unicode-aware, and common MySQL
functions exist (``CONCAT``, ``CONCAT_WS``, ``MD5``, ``LEFT``, ``RIGHT``, ``IF``, ``LOCATE``,
``REGEXP``, ``DATABASE()``, ...). Syntax is rewritten by :mod:`cmat_jax.envs.mysql_dialect`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sqlite3
import time
import unicodedata
from typing import Any

from cmat_jax.envs.mysql_dialect import (
    ShowCommand,
    SQLSyntaxError,
    miscased_table,
    parse_show,
    sqlite_ident,
    to_sqlite,
)
from cmat_jax.envs.sql_backend import ExecResult, TableSpec, check_statement, mysql_table_hash

COLLATION = "MYSQL_CI"
DB_NAME = "dbbench"  # what DATABASE() reports
READ_ONLY_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})


@functools.lru_cache(maxsize=65536)
def fold(text: str) -> str:
    """Case- and accent-insensitive comparison key (like MySQL's ``*_ai_ci`` collations)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _collate(a: str, b: str) -> int:
    fa, fb = fold(a), fold(b)
    return (fa > fb) - (fa < fb)


@functools.lru_cache(maxsize=4096)
def _like_regex(pattern: str, escape: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == escape and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _like(pattern: Any, value: Any, escape: Any = "\\") -> int | None:
    if pattern is None or value is None or escape is None:
        return None
    rx = _like_regex(fold(str(pattern)), str(escape)[:1] or "\\")
    return int(rx.fullmatch(fold(str(value))) is not None)


def _regexp(pattern: Any, value: Any) -> int | None:
    if pattern is None or value is None:
        return None
    try:
        return int(re.search(str(pattern), str(value), re.IGNORECASE) is not None)
    except re.error as e:
        raise ValueError(f"invalid regular expression: {e}") from e


def _concat(*args: Any) -> str | None:
    if any(a is None for a in args):
        return None
    return "".join(_text(a) for a in args)


def _concat_ws(sep: Any, *args: Any) -> str | None:
    if sep is None:
        return None
    return _text(sep).join(_text(a) for a in args if a is not None)


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


def _register_mysql_functions(conn: sqlite3.Connection) -> None:
    det = {"deterministic": True}
    conn.create_collation(COLLATION, _collate)
    conn.create_function("like", 2, _like, **det)
    conn.create_function("like", 3, _like, **det)
    conn.create_function("regexp", 2, _regexp, **det)
    conn.create_aggregate("sum", 1, _MySQLSum)
    conn.create_function("lower", 1, lambda s: None if s is None else _text(s).lower(), **det)
    conn.create_function("upper", 1, lambda s: None if s is None else _text(s).upper(), **det)
    conn.create_function("lcase", 1, lambda s: None if s is None else _text(s).lower(), **det)
    conn.create_function("ucase", 1, lambda s: None if s is None else _text(s).upper(), **det)
    conn.create_function("concat", -1, _concat, **det)
    conn.create_function("concat_ws", -1, _concat_ws, **det)
    conn.create_function(
        "md5", 1, lambda s: None if s is None else hashlib.md5(_text(s).encode()).hexdigest(), **det
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
    conn.create_function("char_length", 1, lambda s: None if s is None else len(_text(s)), **det)
    conn.create_function("database", 0, lambda: DB_NAME, **det)


class SQLiteEpisode:
    """One episode's in-memory database."""

    def __init__(
        self, table: TableSpec, *, time_limit_s: float, max_rows: int, max_value_bytes: int
    ) -> None:
        self.table = table
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self._deadline = float("inf")
        self._trusted = False
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        self.conn = conn
        _register_mysql_functions(conn)
        conn.execute("PRAGMA temp_store = MEMORY")
        cols = ", ".join(f"{sqlite_ident(c)} TEXT COLLATE {COLLATION}" for c in table.columns)
        if cols:  # no columns: the item's table could not be created (DBTask.table_spec)
            conn.execute(f"CREATE TABLE {sqlite_ident(table.name)} ({cols})")
        if table.rows:
            marks = ", ".join("?" for _ in table.columns)
            conn.executemany(f"INSERT INTO {sqlite_ident(table.name)} VALUES ({marks})", table.rows)
        # Lock down only after our own setup statements ran.
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
        if hasattr(conn, "enable_load_extension"):
            conn.enable_load_extension(False)
        conn.set_authorizer(self._authorize)
        conn.set_progress_handler(self._progress, 2000)

    # -- sandbox hooks -------------------------------------------------------------------------
    def _authorize(self, action: int, arg1: Any, arg2: Any, _db: Any, _trigger: Any) -> int:
        if self._trusted:  # our own snapshot/restore (serialize runs PRAGMA page_count)
            return sqlite3.SQLITE_OK
        if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_PRAGMA and str(arg1).lower() not in READ_ONLY_PRAGMAS:
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_FUNCTION and str(arg2).lower() in DENIED_FUNCTIONS:
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def _progress(self) -> int:
        return int(time.monotonic() > self._deadline)

    # -- execution -----------------------------------------------------------------------------
    def execute(self, sql: str) -> ExecResult:
        refusal = check_statement(sql)
        if refusal is not None:
            return ExecResult.failure(refusal)
        tables = [t for (t,) in self.conn.execute("SELECT name FROM sqlite_master")]
        if (miscased := miscased_table(sql, tables)) is not None:  # MySQL: case-sensitive
            return ExecResult.failure(f"1146 (42S02): Table '{DB_NAME}.{miscased}' doesn't exist")
        show = parse_show(sql)
        if show is not None:
            return self._show(show)
        try:
            translated = to_sqlite(sql.strip().rstrip(";"))
        except SQLSyntaxError as e:
            return ExecResult.failure(f"1064 (42000): You have an error in your SQL syntax: {e}")
        return self._run(translated, original=sql)

    def _run(self, sql: str, original: str, params: tuple[Any, ...] = ()) -> ExecResult:
        self._deadline = time.monotonic() + self.time_limit_s
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            rows = cur.fetchmany(self.max_rows + 1) if cur.description is not None else []
        except (sqlite3.Error, ValueError, OverflowError, MemoryError) as e:
            return ExecResult.failure(mysql_error_text(e, original))
        finally:
            self._deadline = float("inf")
            cur.close()
        capped = len(rows) > self.max_rows
        rows = [tuple(r) for r in rows[: self.max_rows]]
        return ExecResult(text=str(rows), error=False, rows=rows, rows_capped=capped)

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
        self._deadline = time.monotonic() + self.time_limit_s
        try:
            rows = self.conn.execute(sql).fetchall()
        except sqlite3.Error as e:  # the agent dropped or altered the table
            return mysql_error_text(e, sql)
        finally:
            self._deadline = float("inf")
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
        finally:
            self._trusted = False

    def close(self) -> None:
        self.conn.close()


_NO_COLUMN = re.compile(r"no such column: (.+)")
_NO_COLUMN_NAMED = re.compile(r"table \S+ has no column named (.+)")
_NO_TABLE = re.compile(r"no such table: (?:main\.)?(.+)")
_NEAR = re.compile(r'near "(.*)": syntax error', re.DOTALL)


def mysql_error_text(err: BaseException, sql: str) -> str:
    """Phrase the common SQLite errors the way MySQL reports them (the agent is told it talks
    to MySQL); anything else keeps SQLite's own message."""
    msg = str(err)
    if msg == "interrupted":
        return (
            "3024 (HY000): Query execution was interrupted, maximum statement execution time "
            "exceeded"
        )
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
        self, *, time_limit_s: float = 3.0, max_rows: int = 1000, max_value_bytes: int = 1 << 20
    ) -> None:
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self.max_value_bytes = max_value_bytes

    def open(self, table: TableSpec) -> SQLiteEpisode:
        return SQLiteEpisode(
            table,
            time_limit_s=self.time_limit_s,
            max_rows=self.max_rows,
            max_value_bytes=self.max_value_bytes,
        )

    def close(self) -> None:
        pass
