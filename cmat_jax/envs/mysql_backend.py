"""Faithful DBBench backend: a real MySQL-compatible server (MariaDB) via ``pymysql``.

Each episode gets its own database and its own user that holds privileges on that database
only (no FILE, no GRANT, no routines or triggers), a per-statement time limit
(``max_statement_time``, set for the user and the session), a cap on rows returned
(``sql_select_limit``) and on recursion; the shared statement policy (one statement, no
``SET``/``LOAD``/``USE``/...) runs before anything reaches the server. Database and user are
dropped when the episode closes.

Observations mirror AgentBench (MySQL connector): ``str(list_of_row_tuples)``; errors as
``"<code> (<sqlstate>): <message>"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from typing import Any

import pymysql

from cmat_jax.envs.sql_backend import (
    GROUP_CONCAT_MAX_LEN,
    ExecResult,
    TableSpec,
    check_statement,
)

PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, CREATE VIEW, SHOW VIEW"
# Case- and accent-insensitive and NO PAD ('a' <> 'a '), like MySQL 8's default utf8mb4_0900_ai_ci
COLLATION = "utf8mb4_unicode_520_nopad_ci"
_SQLSTATE = {
    1044: "42000", 1045: "28000", 1049: "42000", 1054: "42S22", 1062: "23000", 1064: "42000",
    1136: "21S01", 1142: "42000", 1143: "42000", 1146: "42S02", 1227: "42000", 1969: "70100",
    1050: "42S01", 1051: "42S02", 1060: "42S21", 1065: "42000", 1109: "42S02", 1166: "42000",
}  # fmt: skip


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def mysql_error_text(err: pymysql.MySQLError) -> str:
    if len(err.args) >= 2 and isinstance(err.args[0], int):
        code, msg = err.args[0], err.args[1]
        return f"{code} ({_SQLSTATE.get(code, 'HY000')}): {msg}"
    return str(err)


@dataclasses.dataclass(frozen=True)
class MySQLParams:
    """How to reach the server as an administrator (creates episode databases and users)."""

    unix_socket: str | None = None
    host: str = "localhost"
    port: int = 3306
    user: str = "root"
    password: str = ""


class MySQLEpisode:
    def __init__(
        self, backend: MySQLBackend, table: TableSpec, *, time_limit_s: float, max_rows: int
    ) -> None:
        self.backend = backend
        self.table = table
        self.max_rows = max_rows
        tag = secrets.token_hex(6)
        self.db_name, self.user = f"cmat_ep_{tag}", f"cmat_ep_{tag}"
        password = secrets.token_hex(16)
        admin = backend.admin()
        with admin.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {_q(self.db_name)} CHARACTER SET utf8mb4 COLLATE {COLLATION}"
            )
            cur.execute(
                f"CREATE USER %s@'localhost' IDENTIFIED BY %s WITH MAX_STATEMENT_TIME {time_limit_s}",
                (self.user, password),
            )
            cur.execute(
                f"GRANT {PRIVILEGES} ON {_q(self.db_name)}.* TO %s@'localhost'", (self.user,)
            )
        p = backend.params
        session = (
            f"SET SESSION max_statement_time = {time_limit_s}, sql_select_limit = {max_rows + 1}, "
            f"max_recursive_iterations = 100000, group_concat_max_len = {GROUP_CONCAT_MAX_LEN}"
        )
        self.conn = pymysql.connect(
            unix_socket=p.unix_socket,
            host=p.host,
            port=p.port,
            user=self.user,
            password=password,
            database=self.db_name,
            charset="utf8mb4",
            autocommit=True,
            local_infile=False,
            read_timeout=int(time_limit_s) + 30,
            init_command=session,
        )
        self._create_table()

    def _create_table(self) -> None:
        t = self.table
        cols = ", ".join(f"{_q(c)} TEXT" for c in t.columns)
        if not cols:  # no columns: the item's table could not be created (DBTask.table_spec)
            return
        with self.conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {_q(t.name)} ({cols})")
            if t.rows:
                marks = ", ".join(["%s"] * len(t.columns))
                cur.executemany(f"INSERT INTO {_q(t.name)} VALUES ({marks})", list(t.rows))

    def execute(self, sql: str) -> ExecResult:
        refusal = check_statement(sql)
        if refusal is not None:
            return ExecResult.failure(refusal)
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql)  # no args: "%" is not a placeholder
                rows = list(cur.fetchmany(self.max_rows + 1)) if cur.description else []
        except pymysql.MySQLError as e:
            return ExecResult.failure(mysql_error_text(e))
        capped = len(rows) > self.max_rows
        rows = [tuple(r) for r in rows[: self.max_rows]]
        return ExecResult(text=str(rows), error=False, rows=rows, rows_capped=capped)

    def table_hash(self) -> str:
        """AgentBench's hash query, run on the server itself."""
        cols = ",".join(_q(c) for c in self.table.columns)
        sql = (
            "select md5(group_concat(rowhash order by rowhash)) as hash from( SELECT "
            f"substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash FROM {_q(self.table.name)})"
            " as sub;"
        )
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql)
                return str(list(cur.fetchall()))
        except pymysql.MySQLError as e:
            return mysql_error_text(e)

    def snapshot(self) -> list[tuple[str, str, list[tuple[Any, ...]]]]:
        """Every table's CREATE statement and rows (read through the admin connection)."""
        admin = self.backend.admin()
        out = []
        with admin.cursor() as cur:
            cur.execute(f"SHOW FULL TABLES FROM {_q(self.db_name)} WHERE Table_type = 'BASE TABLE'")
            for name, _kind in cur.fetchall():
                cur.execute(f"SHOW CREATE TABLE {_q(self.db_name)}.{_q(name)}")
                create = cur.fetchall()[0][1]
                cur.execute(f"SELECT * FROM {_q(self.db_name)}.{_q(name)}")
                out.append((name, create, list(cur.fetchall())))
        return out

    def restore(self, snap: list[tuple[str, str, list[tuple[Any, ...]]]]) -> None:
        admin = self.backend.admin()
        with admin.cursor() as cur:
            cur.execute(f"USE {_q(self.db_name)}")
            cur.execute(f"SHOW FULL TABLES FROM {_q(self.db_name)}")
            for name, kind in cur.fetchall():
                what = "VIEW" if kind == "VIEW" else "TABLE"
                cur.execute(f"DROP {what} IF EXISTS {_q(name)}")
            for name, create, rows in snap:
                cur.execute(create)
                if rows:
                    marks = ", ".join(["%s"] * len(rows[0]))
                    cur.executemany(f"INSERT INTO {_q(name)} VALUES ({marks})", rows)

    def close(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):
            self.conn.close()
        admin = self.backend.admin()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {_q(self.db_name)}")
            cur.execute("DROP USER IF EXISTS %s@'localhost'", (self.user,))


class MySQLBackend:
    """Factory of per-episode databases on one MariaDB/MySQL server."""

    name = "mysql"

    def __init__(
        self, params: MySQLParams, *, time_limit_s: float = 3.0, max_rows: int = 1000
    ) -> None:
        self.params = params
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self._admin: pymysql.connections.Connection | None = None

    def admin(self) -> pymysql.connections.Connection:
        if self._admin is None or not self._admin.open:
            p = self.params
            self._admin = pymysql.connect(
                unix_socket=p.unix_socket,
                host=p.host,
                port=p.port,
                user=p.user,
                password=p.password,
                charset="utf8mb4",
                autocommit=True,
            )
        return self._admin

    def open(self, table: TableSpec) -> MySQLEpisode:
        return MySQLEpisode(self, table, time_limit_s=self.time_limit_s, max_rows=self.max_rows)

    def close(self) -> None:
        if self._admin is not None and self._admin.open:
            self._admin.close()
        self._admin = None
