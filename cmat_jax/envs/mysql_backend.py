"""Faithful DBBench backend: a real MySQL-compatible server (MariaDB) via ``pymysql``.

Each episode gets its own database and its own user that holds privileges on that database
only (no FILE, PROCESS, SUPER or GRANT, no routines, triggers or events, no other schema), a
per-statement time limit (``max_statement_time``, set for the user and the session), a cap on
rows (``sql_select_limit``, and the client reads rows one at a time up to a row and a byte
cap) and on connections; recursive CTEs stop at the server's ``max_recursive_iterations``;
``LOCAL INFILE`` is off on the client and multi-statements in the protocol. The shared
statement policy (one statement, no ``SET``/``LOAD``/``USE``/..., no executable comments) runs
before anything reaches the server. Database and user are dropped when the episode closes.
The server's own settings matter too (see ``docs/sandbox.md``): ``max_allowed_packet`` at
:data:`RECOMMENDED_MAX_ALLOWED_PACKET`, no networking beyond loopback, ``local_infile`` off.

Database size cap (``max_db_bytes``, 16 MiB per episode as on SQLite), on any stock server: a
statement that may add data (``INSERT``, ``REPLACE``, ``UPDATE``, ``CREATE``, ``ALTER``,
``WITH``) runs inside a transaction when every table of the episode is InnoDB, else after a
server-side snapshot of the episode database; afterwards the administrator measures the
episode's tables (``ANALYZE TABLE`` refreshes InnoDB's page counts — a millisecond, it reads
segment headers, not rows — then ``information_schema.TABLES`` ``data_length +
index_length``) and over the cap rolls the statement back (``ROLLBACK`` or the snapshot),
answering ``1114 (HY000): The table is full``: the next statement sees the database as it was.
Tables of engines whose size the server does not report (CSV, ...) are undone the same way.
Internal temporary tables are capped per statement by the session's ``tmp_disk_table_size``
and ``max_heap_table_size`` (both ``max_db_bytes``).

What this does not bound: the bytes one statement writes *before* it ends and is measured —
at most the statement time limit times the server's write rate (a test server on this
project's CI machine, no fsync: ~70-90 MB/s, so ~250 MB in 3 s, rolled back at once). Those
pages stay allocated to the episode's tablespace file (reused by its next statements) until
the episode's database is dropped at close; with ``innodb_file_per_table`` off they stay in
the shared system tablespace, which never shrinks (cap it: ``innodb_data_file_path=...:max:``).
A server with row-based binary logging also logs the rows written and rolled back.

Administrator credentials never travel on a command line: they come from a MySQL option file
(``[client]`` group: ``user``, ``password``, ``socket`` or ``host``/``port``) or the
``CMAT_MYSQL_PASSWORD`` environment variable. The administrator needs only
``CREATE USER ON *.*`` and ``ALL PRIVILEGES ON `cmat_ep_%`.* WITH GRANT OPTION``
(:data:`ADMIN_GRANTS`); the default account name is ``cmat_admin``, never ``root``.

Observations mirror AgentBench (MySQL connector): ``str(list_of_row_tuples)``; errors as
``"<code> (<sqlstate>): <message>"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

import pymysql
import pymysql.cursors

from cmat_jax.envs.mysql_dialect import first_keyword
from cmat_jax.envs.sql_backend import (
    GROUP_CONCAT_MAX_LEN,
    ExecResult,
    LimitKind,
    TableSpec,
    check_statement,
    fetch_capped,
)
from cmat_jax.envs.sqlite_backend import LIMIT_MESSAGES

PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, CREATE VIEW, SHOW VIEW"
# Case- and accent-insensitive and NO PAD ('a' <> 'a '), like MySQL 8's default utf8mb4_0900_ai_ci
COLLATION = "utf8mb4_unicode_520_nopad_ci"
EPISODE_PREFIX = "cmat_ep_"
PASSWORD_ENV = "CMAT_MYSQL_PASSWORD"
DEFAULT_ADMIN = "cmat_admin"
ADMIN_GRANTS = (
    "GRANT CREATE USER ON *.* TO {user}",
    # unescaped: MariaDB 10.11 refuses GRANTs made through an escaped pattern (`cmat\\_ep\\_%`)
    "GRANT ALL PRIVILEGES ON `cmat_ep_%`.* TO {user} WITH GRANT OPTION",
)
"""What the administrator account needs (``{user}``: e.g. ``'cmat_admin'@'localhost'``)."""
# Server error codes -> the sandbox limit they come from.
_LIMIT_OF_CODE: dict[int, LimitKind] = {
    1969: "time", 3024: "time", 1317: "time", 1028: "time",
    1044: "permission", 1045: "permission", 1142: "permission", 1143: "permission",
    1227: "permission", 1370: "permission", 1290: "permission", 1148: "permission",
    1410: "permission", 1211: "permission", 1132: "permission", 1095: "permission",
    1114: "db_size", 1021: "db_size", 1030: "db_size",
    1038: "memory", 1041: "memory", 5: "memory", 1037: "memory",
    1931: "recursion",
    1153: "length", 1301: "length", 1139: "length", 1162: "length", 1118: "length", 1117: "length",
}  # fmt: skip
RECOMMENDED_MAX_ALLOWED_PACKET = 8 << 10
"""Server setting for agent SQL: MariaDB checks ``max_statement_time`` between rows, not inside
one call of a string function, and ``LIKE``/``INSTR``/``REPLACE`` are quadratic in their
arguments: values capped at 8 KiB keep one row's work under a second (16 KiB: up to 2 s).
A task row must fit in it too (the DBBench dev split's longest is 1,614 characters)."""
_WARNING_LIMITS: dict[int, LimitKind] = {
    1301: "length", 1969: "time", 3024: "time", 1317: "time", 1931: "recursion",
}  # fmt: skip
_SQLSTATE = {
    1044: "42000", 1045: "28000", 1049: "42000", 1054: "42S22", 1062: "23000", 1064: "42000",
    1136: "21S01", 1142: "42000", 1143: "42000", 1146: "42S02", 1227: "42000", 1969: "70100",
    1050: "42S01", 1051: "42S02", 1060: "42S21", 1065: "42000", 1109: "42S02", 1166: "42000",
    1370: "42000", 1153: "08S01",
}  # fmt: skip


# Statements that may add data to the episode's database: measured against max_db_bytes.
GROWING_KEYWORDS = frozenset({"INSERT", "REPLACE", "UPDATE", "CREATE", "ALTER", "WITH"})
DDL_KEYWORDS = frozenset({"CREATE", "ALTER"})  # commit implicitly: undone through a snapshot
# Engines whose information_schema.TABLES sizes are the data they hold (InnoDB after ANALYZE).
MEASURED_ENGINES = frozenset({"InnoDB", "Aria", "MyISAM", "MEMORY", "MRG_MyISAM"})


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def mysql_error_text(err: pymysql.MySQLError) -> str:
    if len(err.args) >= 2 and isinstance(err.args[0], int):
        code, msg = err.args[0], err.args[1]
        return f"{code} ({_SQLSTATE.get(code, 'HY000')}): {msg}"
    return str(err)


def limit_of(err: pymysql.MySQLError) -> LimitKind | None:
    code = err.args[0] if err.args and isinstance(err.args[0], int) else None
    return _LIMIT_OF_CODE.get(code) if code is not None else None


@dataclasses.dataclass(frozen=True)
class MySQLParams:
    """How to reach the server as the administrator (creates episode databases and users).

    ``option_file``: a MySQL option file whose ``[client]`` group gives any of ``user``,
    ``password``, ``socket``, ``host``, ``port`` (they override the fields here). Without a
    password there, ``password`` (for programs; never a command-line flag) or else the
    ``CMAT_MYSQL_PASSWORD`` environment variable is used."""

    option_file: str | None = None
    unix_socket: str | None = None
    host: str = "localhost"
    port: int = 3306
    user: str = DEFAULT_ADMIN
    password: str | None = dataclasses.field(default=None, repr=False)

    def connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "unix_socket": self.unix_socket,
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password
            if self.password is not None
            else os.environ.get(PASSWORD_ENV, ""),
        }
        if self.option_file is not None:
            if not Path(self.option_file).expanduser().is_file():
                raise FileNotFoundError(f"{self.option_file}: no such MySQL option file")
            args.update(read_default_file=str(Path(self.option_file).expanduser()))
            args.update(read_default_group="client")
        return args


class MySQLEpisode:
    def __init__(
        self,
        backend: MySQLBackend,
        table: TableSpec,
        *,
        time_limit_s: float,
        max_rows: int,
        max_result_bytes: int,
        max_db_bytes: int,
    ) -> None:
        self.backend = backend
        self.table = table
        self.max_rows = max_rows
        self.max_result_bytes = max_result_bytes
        self.max_db_bytes = max_db_bytes
        self.time_limit_s = time_limit_s
        self._shadows: set[str] = set()  # snapshot databases not yet restored
        self._transactional = True  # every table of the episode is InnoDB
        tag = secrets.token_hex(6)
        self.db_name, self.user = f"{EPISODE_PREFIX}{tag}", f"{EPISODE_PREFIX}{tag}"
        password = secrets.token_hex(16)
        admin = backend.admin()
        with admin.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {_q(self.db_name)} CHARACTER SET utf8mb4 COLLATE {COLLATION}"
            )
            cur.execute(
                "CREATE USER %s@'localhost' IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 3 "
                f"MAX_STATEMENT_TIME {time_limit_s}",
                (self.user, password),
            )
            cur.execute(
                f"GRANT {PRIVILEGES} ON {_q(self.db_name)}.* TO %s@'localhost'", (self.user,)
            )
        session = (
            f"SET SESSION max_statement_time = {time_limit_s}, sql_select_limit = {max_rows + 1}, "
            f"group_concat_max_len = {GROUP_CONCAT_MAX_LEN}, "
            f"tmp_disk_table_size = {max_db_bytes}, max_heap_table_size = {max_db_bytes}"
        )
        self._connect_args = {  # where the administrator's connection went
            "unix_socket": admin.unix_socket,
            "host": admin.host,
            "port": admin.port,
            "user": self.user,
            "password": password,
            "database": self.db_name,
            "charset": "utf8mb4",
            "autocommit": True,
            "local_infile": False,
            # a last resort: the server checks its time limit between rows, not inside one
            # function call (see RECOMMENDED_MAX_ALLOWED_PACKET)
            "read_timeout": int(time_limit_s) + 10,
            "cursorclass": backend.cursor_class(),
        }
        self._session = session
        self.conn = self._connect()
        self._create_table()
        self._measure()  # whether the server's default engine is transactional

    def _connect(self) -> pymysql.connections.Connection:
        return pymysql.connect(**self._connect_args, init_command=self._session)

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
            return ExecResult.failure(refusal, limit="policy")
        keyword = first_keyword(sql)
        if keyword not in GROWING_KEYWORDS:
            return self._execute(sql)
        return self._execute_capped(sql, in_transaction=self._transactional and (
            keyword not in DDL_KEYWORDS))  # fmt: skip

    def _execute_capped(self, sql: str, *, in_transaction: bool) -> ExecResult:
        """Run a statement that may add data, measure the episode's database and undo the
        statement when it ended over ``max_db_bytes`` or left a table of an unmeasured engine
        (see the module docstring)."""
        shadow = None
        if in_transaction:
            with self.conn.cursor() as cur:
                cur.execute("BEGIN")
        else:
            shadow = self.snapshot()
        undo = True
        try:
            res = self._execute(sql)
            size, unmeasured = self._measure()
            undo = size > self.max_db_bytes or bool(unmeasured)
        finally:
            if in_transaction:
                self._end_transaction(commit=not undo)
                if undo:
                    self._rebuild_innodb_tables()
            elif undo:
                self.restore(shadow)
            else:
                self._drop_shadow(shadow)
        if unmeasured:
            return ExecResult.failure(
                f"1286 (42000): Unknown storage engine '{unmeasured[0]}'", limit="permission"
            )
        if undo:
            return ExecResult.failure(LIMIT_MESSAGES["db_size"], limit="db_size")
        return res

    def _end_transaction(self, *, commit: bool) -> None:
        try:
            with self.conn.cursor() as cur:
                cur.execute("COMMIT" if commit else "ROLLBACK")
        except pymysql.MySQLError:  # the connection is gone: the server rolled it back
            self._reconnect()

    def _rebuild_innodb_tables(self) -> None:
        """A rolled-back statement leaves its pages reserved by the tables it grew (they
        would count against the cap from then on): rebuild the episode's InnoDB tables, which
        returns those pages (and, with innodb_file_per_table, the disk)."""
        with self.backend.admin().cursor() as cur:
            cur.execute(
                "SELECT table_name FROM information_schema.TABLES "
                "WHERE table_schema = %s AND engine = 'InnoDB'",
                (self.db_name,),
            )
            for (name,) in cur.fetchall():
                cur.execute(f"ALTER TABLE {_q(self.db_name)}.{_q(name)} FORCE")

    def _measure(self) -> tuple[int, list[str]]:
        """Bytes the episode's tables hold (data and indexes), and the engines of its tables
        whose size the server does not report; refreshes whether every table is InnoDB."""
        with self.backend.admin().cursor() as cur:
            cur.execute(
                "SELECT table_name, engine FROM information_schema.TABLES "
                "WHERE table_schema = %s AND engine IS NOT NULL",
                (self.db_name,),
            )
            tables = cur.fetchall()
            innodb = [name for name, engine in tables if engine == "InnoDB"]
            if innodb:  # InnoDB's sizes are its statistics: refresh them (page counts only)
                names = ", ".join(f"{_q(self.db_name)}.{_q(n)}" for n in innodb)
                cur.execute(f"ANALYZE LOCAL TABLE {names}")
                cur.fetchall()
            cur.execute(
                "SELECT COALESCE(SUM(data_length + index_length), 0) "
                "FROM information_schema.TABLES WHERE table_schema = %s",
                (self.db_name,),
            )
            size = int(cur.fetchone()[0])
        self._transactional = len(innodb) == len(tables)
        return size, sorted({e for _, e in tables if e not in MEASURED_ENGINES})

    def _execute(self, sql: str) -> ExecResult:
        # unbuffered: rows are read one at a time, never more than the caps
        cur = self.conn.cursor(pymysql.cursors.SSCursor)
        rows, capped, warned = [], False, False
        started = time.monotonic()
        try:
            cur.execute(sql)  # no args: "%" is not a placeholder
            if cur.description:
                rows, capped = fetch_capped(cur.fetchone, self.max_rows, self.max_result_bytes)
            warned = cur.warning_count > 0  # set once every row was read
        except pymysql.MySQLError as e:
            kind = limit_of(e)
            if not self.conn.open:  # lost, e.g. past read_timeout: the episode goes on
                cur.connection = None
                self._reconnect()
                kind = "time" if e.args and e.args[0] == 2013 else kind
            return ExecResult.failure(mysql_error_text(e), limit=kind)
        finally:
            if capped and len(rows) < self.max_rows:  # cut by bytes: the rest may be large
                self._abandon_result(cur)
            with contextlib.suppress(pymysql.MySQLError):
                cur.close()  # reads and drops what is left of the result
        res = ExecResult.of_rows(rows, capped)
        kind = self._warning_limit() if warned and not capped else None
        if kind is None and time.monotonic() - started >= self.time_limit_s:
            kind = "time"  # the server cut it short without an error (BENCHMARK returns 0)
        if kind is not None and not capped:
            res = ExecResult(text=res.text, error=False, rows=rows, limit=kind)
        return res

    def _abandon_result(self, cur: pymysql.cursors.SSCursor) -> None:
        """Stop a statement still sending rows without reading them (pymysql would read the
        rest on close), then go on with a fresh connection."""
        result = getattr(cur, "_result", None)
        if result is not None:
            result.unbuffered_active = False
        cur.connection = None
        self._reconnect()

    def _reconnect(self) -> None:
        """``KILL QUERY`` the statement of the current connection from a second connection of
        the same user, close it unread (the server's pending writes fail at once) and open a
        fresh one with the same session limits."""
        thread_id = self.conn.thread_id()
        with contextlib.suppress(pymysql.MySQLError):
            killer = pymysql.connect(**self._connect_args)
            try:
                with killer.cursor() as kc:
                    kc.execute(f"KILL QUERY {int(thread_id)}")
            finally:
                killer.close()
        with contextlib.suppress(pymysql.MySQLError, OSError):
            self.conn.close()
        self.conn = self._connect()

    def _warning_limit(self) -> LimitKind | None:
        """The limit behind the last statement's warnings, if any: the server returns NULL for
        a value over ``max_allowed_packet`` and 0 for a ``BENCHMARK`` cut by the time limit,
        with a warning instead of an error."""
        with self.conn.cursor() as cur:
            cur.execute("SHOW WARNINGS")
            for _level, code, _msg in cur.fetchall():
                if code in _WARNING_LIMITS:
                    return _WARNING_LIMITS[code]
        return None

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

    def snapshot(self) -> str:
        """Copy every base table into a shadow database on the server (the rows never pass
        through this process, whatever their size); :meth:`restore` brings them back once
        and drops the copy, :meth:`close` drops copies never restored."""
        shadow = f"{self.db_name}_s{secrets.token_hex(4)}"
        with self.backend.admin().cursor() as cur:
            cur.execute(f"CREATE DATABASE {_q(shadow)} CHARACTER SET utf8mb4 COLLATE {COLLATION}")
            self._shadows.add(shadow)
            _copy_tables(cur, self.db_name, shadow)
        return shadow

    def _drop_shadow(self, shadow: str) -> None:
        with self.backend.admin().cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {_q(shadow)}")
        self._shadows.discard(shadow)

    def restore(self, shadow: str) -> None:
        with self.backend.admin().cursor() as cur:
            cur.execute(f"SHOW FULL TABLES FROM {_q(self.db_name)}")
            for name, kind in cur.fetchall():
                what = "VIEW" if kind == "VIEW" else "TABLE"
                cur.execute(f"DROP {what} IF EXISTS {_q(self.db_name)}.{_q(name)}")
            _copy_tables(cur, shadow, self.db_name)
            cur.execute(f"DROP DATABASE IF EXISTS {_q(shadow)}")
        self._shadows.discard(shadow)

    def close(self) -> None:
        with contextlib.suppress(pymysql.MySQLError):
            self.conn.close()
        admin = self.backend.admin()
        with admin.cursor() as cur:
            for name in (self.db_name, *self._shadows):
                cur.execute(f"DROP DATABASE IF EXISTS {_q(name)}")
            cur.execute("DROP USER IF EXISTS %s@'localhost'", (self.user,))
        self._shadows.clear()


def _copy_tables(cur: pymysql.cursors.Cursor, src: str, dst: str) -> None:
    """Server-side copy of the base tables of database ``src`` into ``dst``."""
    cur.execute(f"SHOW FULL TABLES FROM {_q(src)} WHERE Table_type = 'BASE TABLE'")
    for name, _kind in cur.fetchall():
        cur.execute(f"CREATE TABLE {_q(dst)}.{_q(name)} LIKE {_q(src)}.{_q(name)}")
        cur.execute(f"INSERT INTO {_q(dst)}.{_q(name)} SELECT * FROM {_q(src)}.{_q(name)}")


class MySQLBackend:
    """Factory of per-episode databases on one MariaDB/MySQL server."""

    name = "mysql"

    def __init__(
        self,
        params: MySQLParams,
        *,
        time_limit_s: float = 3.0,
        max_rows: int = 1000,
        max_result_bytes: int = 1 << 20,
        max_db_bytes: int = 16 << 20,  # SQLiteBackend's default
    ) -> None:
        self.params = params
        self.time_limit_s = time_limit_s
        self.max_rows = max_rows
        self.max_result_bytes = max_result_bytes
        self.max_db_bytes = max_db_bytes
        self._admin: pymysql.connections.Connection | None = None
        self.max_allowed_packet: int | None = None
        try:  # bad credentials or a missing option file fail here, before any episode
            self.admin()
        except pymysql.err.OperationalError as e:
            raise ValueError(
                f"cannot reach the MariaDB server as its administrator: {mysql_error_text(e)}"
            ) from e

    def admin(self) -> pymysql.connections.Connection:
        if self._admin is None or not self._admin.open:
            self._admin = pymysql.connect(
                **self.params.connect_args(), charset="utf8mb4", autocommit=True
            )
            with self._admin.cursor() as cur:
                cur.execute("SELECT @@GLOBAL.max_allowed_packet")
                self.max_allowed_packet = int(cur.fetchone()[0])
            if self.max_allowed_packet > RECOMMENDED_MAX_ALLOWED_PACKET:
                warnings.warn(
                    f"MariaDB max_allowed_packet is {self.max_allowed_packet} bytes: string "
                    "functions (LIKE, INSTR, REPLACE) run unbounded inside one row past the "
                    "statement time limit; set it to "
                    f"{RECOMMENDED_MAX_ALLOWED_PACKET} for agent SQL",
                    stacklevel=2,
                )
            self._admin.cursorclass = self.cursor_class()
        return self._admin

    def cursor_class(self) -> type[pymysql.cursors.Cursor]:
        """Cursors whose ``executemany`` batches fit the server's packet size."""
        packet = self.max_allowed_packet or (1 << 20)
        return type("PacketCursor", (pymysql.cursors.Cursor,), {"max_stmt_length": packet // 2})

    def open(self, table: TableSpec) -> MySQLEpisode:
        return MySQLEpisode(
            self,
            table,
            time_limit_s=self.time_limit_s,
            max_rows=self.max_rows,
            max_result_bytes=self.max_result_bytes,
            max_db_bytes=self.max_db_bytes,
        )

    def close(self) -> None:
        if self._admin is not None and self._admin.open:
            self._admin.close()
        self._admin = None
