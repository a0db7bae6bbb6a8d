"""What every DBBench SQL backend provides, and the sandbox policy they share.

A backend makes one fresh database per episode (:meth:`SQLBackend.open`) holding the task's
table; the episode database executes one agent statement at a time and computes the AgentBench
table hash used to score INSERT/UPDATE tasks.

Shared policy (both backends): exactly one statement per action, and only statements whose
first keyword is in :data:`ALLOWED_FIRST_KEYWORDS`. Everything else (``SET``, ``LOAD``,
``ATTACH``, ``VACUUM``, ``GRANT``, transactions, ...) is refused with an error observation, as
are statements on databases, users, routines, triggers and events, and MySQL's executable
comments (``/*! ... */``, ``/*M! ... */``: the server runs their contents, which a policy that
reads them as comments would not see). The backends add engine-level limits on top
(authorizer or privileges, statement time, value / result / database size, memory); every
result says which limit stopped it (:data:`LimitKind`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

from cmat_jax.envs.mysql_dialect import SQLSyntaxError, first_keyword, split_statements, tokenize

# MySQL's default group_concat_max_len: AgentBench's answer_md5 values were computed under it.
GROUP_CONCAT_MAX_LEN = 1024

ALLOWED_FIRST_KEYWORDS = frozenset(
    {
        "SELECT", "WITH", "VALUES", "TABLE", "INSERT", "REPLACE", "UPDATE", "DELETE",
        "CREATE", "ALTER", "DROP", "RENAME", "TRUNCATE", "SHOW", "DESCRIBE", "DESC", "EXPLAIN",
        "PRAGMA",
    }
)  # fmt: skip
# Real statements that reach outside the task database or change the session/engine: refused.
REFUSED_FIRST_KEYWORDS = frozenset(
    {
        "SET", "LOAD", "ATTACH", "DETACH", "VACUUM", "GRANT", "REVOKE", "USE", "CALL", "DO",
        "HANDLER", "BEGIN", "START", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "LOCK",
        "UNLOCK", "FLUSH", "KILL", "SHUTDOWN", "INSTALL", "UNINSTALL", "RESET", "PURGE", "CHANGE",
        "ANALYZE", "OPTIMIZE", "REPAIR", "CHECK", "CHECKSUM", "REINDEX", "PREPARE", "EXECUTE",
        "DEALLOCATE", "XA", "BACKUP", "RESTORE", "IMPORT", "CACHE", "BINLOG", "SIGNAL", "HELP",
    }
)  # fmt: skip
# Objects outside the task's tables: CREATE / DROP / ALTER / RENAME of these are refused (the
# agent's own database, users, code that runs later or with other rights).
REFUSED_OBJECTS = frozenset(
    {
        "DATABASE", "SCHEMA", "USER", "ROLE", "SERVER", "EVENT", "PROCEDURE", "FUNCTION",
        "TRIGGER", "TABLESPACE", "LOGFILE", "PACKAGE", "DEFINER", "AGGREGATE",
    }
)  # fmt: skip
_OBJECT_MODIFIERS = frozenset({"OR", "REPLACE", "TEMPORARY", "TEMP", "IF", "NOT", "EXISTS"})

LimitKind = Literal[
    "policy", "permission", "time", "memory", "db_size", "length", "result", "recursion"
]
"""Which limit stopped a statement: ``policy`` refused before it ran; ``permission`` denied by
the engine (authorizer, privileges); ``time`` the statement time limit; ``memory`` the engine's
memory cap; ``db_size`` the database size cap; ``length`` a value or statement over the
length cap (MySQL-style NULL result on MariaDB); ``result`` rows or bytes of the result over
the cap (the first rows are returned); ``recursion`` a recursive CTE past the server's
iteration limit (MariaDB's ``max_recursive_iterations``, 1000 by default as MySQL 8's
``cte_max_recursion_depth`` under which AgentBench ran)."""

MAX_STATEMENT_CHARS = 16_384
"""Longest statement accepted (a model reply is far shorter; this bounds parsing work)."""
TEXT_LIMIT = 1 << 16
"""Characters of ``str(rows)`` built for an observation (the agent sees the first 800)."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One executed (or refused) statement.

    text: what the agent sees before truncation: ``str(list_of_row_tuples)`` (its first
        :data:`TEXT_LIMIT` characters) or the error text.
    error: the statement was refused or failed.
    rows: the fetched rows (None on error); capped at the backend's ``max_rows`` rows and
        ``max_result_bytes`` bytes.
    rows_capped: more rows existed than were fetched.
    limit: the limit that stopped (or cut) the statement, None when none did.
    """

    text: str
    error: bool
    rows: list[tuple[Any, ...]] | None = None
    rows_capped: bool = False
    limit: LimitKind | None = None

    @staticmethod
    def failure(text: str, limit: LimitKind | None = None) -> ExecResult:
        return ExecResult(text=text, error=True, limit=limit)

    @staticmethod
    def of_rows(rows: list[tuple[Any, ...]], capped: bool) -> ExecResult:
        return ExecResult(
            text=rows_text(rows),
            error=False,
            rows=rows,
            rows_capped=capped,
            limit="result" if capped else None,
        )


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """The task table as created in the episode database (names already made valid)."""

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str | None, ...], ...]


class EpisodeDB(Protocol):
    def execute(self, sql: str) -> ExecResult: ...

    def table_hash(self) -> str: ...

    def snapshot(self) -> Any: ...

    def restore(self, snap: Any) -> None: ...

    def close(self) -> None: ...


class SQLBackend(Protocol):
    name: str

    def open(self, table: TableSpec) -> EpisodeDB: ...

    def close(self) -> None: ...


def fetch_capped(
    fetchone: Callable[[], Sequence[Any] | None], max_rows: int, max_bytes: int
) -> tuple[list[tuple[Any, ...]], bool]:
    """Fetch rows one at a time until ``max_rows`` rows or ``max_bytes`` bytes (the row that
    crosses the byte budget is the last one kept): nothing past the caps is ever materialised.
    Returns the rows and whether more were left."""
    rows: list[tuple[Any, ...]] = []
    size = 0
    while True:
        row = fetchone()
        if row is None:
            return rows, False
        if len(rows) == max_rows:
            return rows, True
        rows.append(tuple(row))
        size += sum(len(v) if isinstance(v, str | bytes) else 16 for v in row)
        if size > max_bytes:
            return rows, fetchone() is not None


def rows_text(rows: Sequence[tuple[Any, ...]], max_chars: int = TEXT_LIMIT) -> str:
    """``str(rows)``, built only as far as its first ``max_chars`` characters (values longer
    than that are cut first, so a huge value is never copied into the text)."""

    def clip(v: Any) -> Any:
        return v[:max_chars] if isinstance(v, str | bytes) and len(v) > max_chars else v

    parts, n = [], 1
    for row in rows:
        parts.append(repr(tuple(clip(v) for v in row)))
        n += len(parts[-1]) + 2
        if n > max_chars:
            break
    return "[" + ", ".join(parts) + "]"


def check_statement(sql: str) -> str | None:
    """Return the refusal message for ``sql`` under the shared policy, or None if allowed."""
    if len(sql) > MAX_STATEMENT_CHARS:
        return (
            f"sandbox: statements are limited to {MAX_STATEMENT_CHARS} characters, got "
            f"{len(sql)}; nothing was executed"
        )
    try:
        statements = split_statements(sql)
        tokens = tokenize(sql)
    except SQLSyntaxError as e:
        return f"1064 (42000): You have an error in your SQL syntax: {e}"
    if any(t.kind == "comment" and t.text.startswith(("/*!", "/*M!", "/*m!")) for t in tokens):
        return "sandbox: executable comments (/*! ... */) are not allowed in this environment"
    if not statements:
        return "1065 (42000): Query was empty"
    if len(statements) > 1:
        return (
            f"sandbox: only one SQL statement per action is allowed, got {len(statements)}; "
            "nothing was executed"
        )
    kw = first_keyword(statements[0])
    if kw in REFUSED_FIRST_KEYWORDS:
        return f"sandbox: {kw} statements are not allowed in this environment"
    if kw in ("CREATE", "DROP", "ALTER", "RENAME") and (obj := _object_word(statements[0])):
        return f"sandbox: {kw} {obj} statements are not allowed in this environment"
    if kw not in ALLOWED_FIRST_KEYWORDS:
        return (
            "1064 (42000): You have an error in your SQL syntax; check the manual that "
            "corresponds to your MySQL server version for the right syntax to use near "
            f"'{statements[0][:80]}' at line 1"
        )
    return None


def _object_word(statement: str) -> str | None:
    """The refused object type a CREATE/DROP/ALTER/RENAME statement acts on, if any."""
    words = [t.text.upper() for t in tokenize(statement) if t.kind not in ("ws", "comment")][1:]
    for w in words[:6]:
        if w in REFUSED_OBJECTS:
            return w
        if w not in _OBJECT_MODIFIERS:
            return None
    return None


def mysql_table_hash(rows: Sequence[Sequence[Any]]) -> str:
    """AgentBench's INSERT/UPDATE score key, computed in Python from the table's rows:

    ``md5(group_concat(rowhash order by rowhash))`` over
    ``rowhash = substring(md5(concat_ws(',', cols...)), 1, 5)``, formatted the way the MySQL
    connector prints the fetched result (``[('<hex>',)]``; ``[(None,)]`` for an empty table).
    ``concat_ws`` skips NULLs; ``group_concat`` truncates at ``GROUP_CONCAT_MAX_LEN`` bytes.
    """
    if not rows:
        return "[(None,)]"
    hashes = sorted(
        hashlib.md5(",".join(_mysql_str(v) for v in row if v is not None).encode()).hexdigest()[:5]
        for row in rows
    )
    joined = ",".join(hashes)[:GROUP_CONCAT_MAX_LEN]
    return str([(hashlib.md5(joined.encode()).hexdigest(),)])


def _mysql_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # MySQL prints a double 5.0 as '5'
    return str(value)
