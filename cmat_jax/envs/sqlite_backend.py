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
``INSTR``, ``REPEAT``, ``FORMAT``, ``REGEXP``, ``DATABASE()``, ...): see
:mod:`cmat_jax.envs.sqlite_functions` (the limits outside SQLite's own checks are in
:mod:`cmat_jax.envs.sqlite_guard`). Syntax is rewritten by :mod:`cmat_jax.envs.mysql_dialect`.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from cmat_jax.envs.mysql_dialect import (
    ShowCommand,
    SQLSyntaxError,
    miscased_table,
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
from cmat_jax.envs.sqlite_functions import COLLATION, DB_NAME, MySQLFunctions, fold, like_ci
from cmat_jax.envs.sqlite_guard import LimitExceeded, StatementGuard, limit_sqlite_heap

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
        MySQLFunctions(self._guard).register(conn)
        conn.execute("PRAGMA temp_store = MEMORY")
        cols = ", ".join(f"{sqlite_ident(c)} TEXT COLLATE {COLLATION}" for c in table.columns)
        if cols:  # no columns: the item's table could not be created (DBTask.table_spec)
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
            rows = [r for r in res.rows or [] if cmd.like is None or like_ci(cmd.like, r[0])]
            if cmd.kind == "full_tables":
                rows = [(r[0], "BASE TABLE") for r in rows]
            return ExecResult(text=str(rows), error=False, rows=rows)
        if cmd.kind == "databases":
            rows = [(DB_NAME,)] if cmd.like is None or like_ci(cmd.like, DB_NAME) else []
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
            if cmd.like is not None and not like_ci(cmd.like, col):
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
