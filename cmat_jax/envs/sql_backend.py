"""What every DBBench SQL backend provides, and the sandbox policy they share.

A backend makes one fresh database per episode (:meth:`SQLBackend.open`) holding the task's
table; the episode database executes one agent statement at a time and computes the AgentBench
table hash used to score INSERT/UPDATE tasks.

Shared policy (both backends): exactly one statement per action, and only statements whose
first keyword is in :data:`ALLOWED_FIRST_KEYWORDS`. Everything else (``SET``, ``LOAD``,
``ATTACH``, ``VACUUM``, ``GRANT``, transactions, ...) is refused with an error observation. The
backends add engine-level limits on top (authorizer, privileges, statement time, row cap).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from cmat_jax.envs.mysql_dialect import SQLSyntaxError, first_keyword, split_statements

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


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """One executed (or refused) statement.

    text: what the agent sees before truncation: ``str(list_of_row_tuples)`` or the error text.
    error: the statement was refused or failed.
    rows: the fetched rows (None on error); capped at the backend's ``max_rows``.
    rows_capped: more rows existed than ``max_rows``.
    """

    text: str
    error: bool
    rows: list[tuple[Any, ...]] | None = None
    rows_capped: bool = False

    @staticmethod
    def failure(text: str) -> ExecResult:
        return ExecResult(text=text, error=True)


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


def check_statement(sql: str) -> str | None:
    """Return the refusal message for ``sql`` under the shared policy, or None if allowed."""
    try:
        statements = split_statements(sql)
    except SQLSyntaxError as e:
        return f"1064 (42000): You have an error in your SQL syntax: {e}"
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
    if kw not in ALLOWED_FIRST_KEYWORDS:
        return (
            "1064 (42000): You have an error in your SQL syntax; check the manual that "
            "corresponds to your MySQL server version for the right syntax to use near "
            f"'{statements[0][:80]}' at line 1"
        )
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


def safe_identifiers(names: Sequence[str], prefix: str = "column") -> tuple[str, ...]:
    """Make table/column names valid in both engines: MySQL rejects empty names, names ending
    in a space and names over 64 characters; duplicates get a numeric suffix."""
    out: list[str] = []
    seen: set[str] = set()
    for i, raw in enumerate(names):
        name = raw.rstrip()[:64].rstrip() or f"{prefix}_{i + 1}"
        base, k = name, 2
        while name.lower() in seen:
            name = f"{base[:60]}_{k}"
            k += 1
        seen.add(name.lower())
        out.append(name)
    return tuple(out)
