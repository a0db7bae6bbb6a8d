"""Hostile SQL on both backends with their DEFAULT limits: every statement ends with the
limit (or the specific error) expected for it, within the statement time limit, with the
process's extra memory (and the MariaDB server's) under 1 GiB, and the next statement of the
same episode — and of a second episode open beside it — still works.

Each case names what should stop it on SQLite and on MariaDB: a :data:`LimitKind`
(``policy``, ``permission``, ``time``, ``memory``, ``db_size``, ``length``, ``result``,
``recursion``) or
``none`` with the exact error code / observation the engine gives (an unknown function, a
NULL from ``LOAD_FILE`` without the FILE privilege, ...). The last test per backend prints the
numbers: statements tried, contained, peak extra memory, longest statement.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cmat_jax.envs.dbbench import DBTask
from cmat_jax.envs.mysql_backend import MySQLBackend
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from tests.mariadb import mariadb_params, server_pid  # noqa: F401  (session fixture)

GIB = 1 << 30
TIME_SLACK_S = 2.0  # past the statement limit: scheduling on a loaded 2-core CI machine
PROBE = "SELECT COUNT(*) FROM Scorers"
N_ROWS = 24


@dataclasses.dataclass(frozen=True)
class Case:
    """One hostile statement and what stops it: ``kind`` per backend is a limit kind, or
    ``none`` (no limit: then ``text`` per backend is a prefix the observation must start
    with, e.g. the error code)."""

    id: str
    sql: str
    sqlite: str
    mysql: str | tuple[str, ...]
    sqlite_text: str | None = None
    mysql_text: str | None = None


T = "Scorers"
CROSS6 = f"{T} a, {T} b, {T} c, {T} d, {T} e, {T} f"
A60 = "a" * 60 + "!"
LIKE_BOMB = "%a" * 40 + "%b"
NO_SQLITE_FN = "no such function"
SYNTAX = "1064 (42000)"

CASES = [
    # -- file access ---------------------------------------------------------------------
    Case("attach", "ATTACH DATABASE '{out}/a.db' AS a", "policy", "policy"),
    Case("detach", "DETACH DATABASE main", "policy", "policy"),
    Case("vacuum_into", "VACUUM INTO '{out}/c.db'", "policy", "policy"),
    Case(
        "load_extension",
        "SELECT load_extension('{out}/evil.so')",
        "permission",
        "permission",
    ),
    Case(
        "writefile",
        "SELECT writefile('{out}/w.txt', 'x')",
        "none",
        "permission",
        sqlite_text=NO_SQLITE_FN,
    ),
    Case(
        "load_file",
        "SELECT LOAD_FILE('/etc/passwd')",
        "none",
        "none",
        sqlite_text=NO_SQLITE_FN,
        mysql_text="[(None,)]",
    ),
    Case(
        "union_load_file",
        f"SELECT Player FROM {T} UNION SELECT LOAD_FILE('/etc/passwd')",
        "none",
        "none",
        sqlite_text=NO_SQLITE_FN,
        mysql_text="[('player 0',)",
    ),
    Case(
        "into_outfile",
        f"SELECT * FROM {T} INTO OUTFILE '{{out}}/o.txt'",
        "none",
        "permission",
        sqlite_text=SYNTAX,
    ),
    Case(
        "into_dumpfile",
        f"SELECT Player FROM {T} INTO DUMPFILE '{{out}}/d.txt'",
        "none",
        "permission",
        sqlite_text=SYNTAX,
    ),
    Case("load_data", f"LOAD DATA INFILE '/etc/passwd' INTO TABLE {T}", "policy", "policy"),
    Case(
        "load_data_local",
        f"LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE {T}",
        "policy",
        "policy",
    ),
    Case(
        "pragma_tempdir",
        "PRAGMA temp_store_directory = '{out}'",
        "permission",
        "none",
        mysql_text=SYNTAX,
    ),
    Case(
        "pragma_vtab",
        "SELECT * FROM pragma_compile_options",
        "permission",
        "none",
        mysql_text="1146 (42S02)",
    ),
    Case(
        "connect_engine",
        "CREATE TABLE m (a TEXT) ENGINE=CONNECT TABLE_TYPE=DOS FILE_NAME='/etc/passwd'",
        "none",
        "none",
        sqlite_text=SYNTAX,
        mysql_text="1286 (HY000)",
    ),
    # -- time bombs ----------------------------------------------------------------------
    Case(
        "recursive_count",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
        "time",
        "recursion",
    ),
    Case(
        "recursive_rows",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
        "result",
        "result",
    ),
    # 24^7 rows: minutes of work on any machine (24^6 finished in 2.6 s on an idle one)
    Case("cross_join_count", f"SELECT COUNT(*) FROM {CROSS6}, {T} g", "time", "time"),
    Case("cross_join_rows", f"SELECT * FROM {T} a, {T} b, {T} c, {T} d", "result", "result"),
    Case(
        "cross_join_sort",
        f"SELECT a.Player FROM {T} a, {T} b, {T} c, {T} d, {T} e ORDER BY 1",
        "memory",
        "db_size",  # its internal temporary table: tmp_disk_table_size
    ),
    Case(
        "insert_cross_join",
        f"INSERT INTO {T} SELECT a.* FROM {CROSS6} "
        "WHERE a.Goals + b.Goals + c.Goals + d.Goals + e.Goals + f.Goals < 0",
        "time",
        "time",
    ),
    Case(
        "regexp_backtrack", f"SELECT '{A60}' REGEXP '^(a|a)*$'", "time", "none", mysql_text="[(0,)]"
    ),
    Case(
        "regexp_nested_plus",
        f"SELECT '{A60}' REGEXP '^(a+)+$'",
        "none",
        "none",
        sqlite_text="[(0,)]",
        mysql_text="[(0,)]",
    ),
    Case(
        "like_backtrack",
        f"SELECT REPEAT('a', 100000) LIKE '{LIKE_BOMB}'",
        "none",
        "length",
        sqlite_text="[(0,)]",
    ),
    Case(
        "instr_quadratic",
        "SELECT INSTR(REPEAT('a', 1000000), CONCAT(REPEAT('a', 500000), 'b'))",
        "none",
        "length",
        sqlite_text="[(0,)]",
    ),
    Case(
        "like_within_value_cap",
        f"SELECT COUNT(*) FROM {T} a, {T} b WHERE CONCAT(REPEAT('a', 8000), a.Goals) "
        "LIKE CONCAT('%', REPEAT('a', 4000), 'b%')",
        "none",
        "time",
        sqlite_text="[(0,)]",
    ),
    Case(
        "regexp_compile_bomb",  # compiling it would take 17 s and 2 GB
        "SELECT 'a' REGEXP '(?:(?:(?:a{50}){50}){50}){50}'",
        "length",
        "length",
    ),
    Case("regexp_long_pattern", "SELECT 'a' REGEXP REPEAT('x', 100000)", "length", "length"),
    Case("like_long_pattern", "SELECT 'a' LIKE REPEAT('a', 60000)", "length", "length"),
    Case("sleep", "SELECT SLEEP(30)", "none", "time", sqlite_text=NO_SQLITE_FN),
    Case(
        "benchmark",
        "SELECT BENCHMARK(10000000000, MD5('x'))",
        "none",
        "time",
        sqlite_text=NO_SQLITE_FN,
    ),
    Case("do_sleep", "DO SLEEP(30)", "policy", "policy"),
    # -- printf / zeroblob / replace / repeat blow-ups -----------------------------------
    Case(
        "printf_width",
        "SELECT printf('%.*c', 1000000000, 'x')",
        "permission",
        "permission",
    ),
    Case("zeroblob", "SELECT zeroblob(1000000000)", "length", "permission"),
    Case("randomblob", "SELECT randomblob(2000000000)", "length", "permission"),
    Case("repeat", "SELECT REPEAT('x', 1000000000)", "length", "length"),
    Case("repeat_nested", "SELECT LENGTH(REPEAT(REPEAT('x', 1000000), 1000))", "length", "length"),
    Case(
        "replace_blowup",
        "SELECT REPLACE(REPEAT('0', 800000), '0', REPEAT('0', 800000))",
        "length",
        "length",
    ),
    Case(
        "concat_blowup",
        "SELECT CONCAT(REPEAT('x', 900000), REPEAT('y', 900000))",
        "length",
        "length",
    ),
    Case(
        "group_concat_blobs",
        f"SELECT GROUP_CONCAT(REPEAT('x', 1000000)) FROM {T} a, {T} b",
        "length",
        "length",
    ),
    # -- memory bombs --------------------------------------------------------------------
    Case(
        "recursive_1mb_rows",
        "WITH RECURSIVE r(n, b) AS (SELECT 1, REPEAT('x', 1000000) UNION ALL "
        "SELECT n + 1, b FROM r) SELECT * FROM r",
        "result",
        "length",
    ),
    Case(
        "sort_1mb_keys",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 100000) "
        "SELECT n FROM r ORDER BY CONCAT(REPEAT('k', 1000000), n)",
        "memory",
        "result",
    ),
    Case(
        # within MariaDB's value cap: 24^5 rows go through an internal temporary table, which
        # the session's tmp_disk_table_size caps at the database size cap
        "sort_8k_keys",
        f"SELECT a.Player, b.Player FROM {T} a, {T} b, {T} c, {T} d, {T} e "
        "ORDER BY CONCAT(REPEAT(a.Player, 1000), b.Goals, c.Goals, d.Goals)",
        "memory",
        "db_size",
    ),
    Case(
        "ctas_1mb_rows",
        "CREATE TABLE big AS WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r "
        "WHERE n < 3000) SELECT REPEAT('x', 1000000) AS b FROM r",
        "db_size",
        "recursion",
    ),
    Case(
        "wide_rows",
        f"SELECT a.Player, REPEAT(a.Goals, 1000000) FROM {T} a, {T} b",
        "result",
        "length",
    ),
    # -- database size: a statement over the cap is undone, the table is as it was ---------
    # 24^3 rows of 8,000 bytes (110 MB; MariaDB writes it all within the time limit)
    Case(
        "insert_select_blobs",
        f"INSERT INTO {T} SELECT REPEAT('y', 8000), 1, 2 FROM {T} a, {T} b, {T} c",
        "memory",  # SQLite builds an INSERT ... SELECT from its own table in memory first
        "db_size",
    ),
    Case(
        "ctas_8k_rows",
        f"CREATE TABLE big8k AS SELECT REPEAT('x', 8000) AS b FROM {T} a, {T} b, {T} c",
        "db_size",
        "db_size",
    ),
    Case(
        "ctas_undone",
        "SELECT COUNT(*) FROM big8k",
        "none",
        "none",
        sqlite_text="1146 (42S02)",
        mysql_text="1146 (42S02)",
    ),
    Case(
        "ctas_small_rows",  # 24^3 short rows: within the cap, it stays
        f"CREATE TABLE u AS SELECT a.Player AS p FROM {T} a, {T} b, {T} c",
        "none",
        "none",
        sqlite_text="[]",
        mysql_text="[]",
    ),
    Case("update_blobs", "UPDATE u SET p = REPEAT('z', 8000)", "db_size", "db_size"),
    Case(
        "myisam_table",  # not transactional: undone through a snapshot
        "CREATE TABLE mi (b TEXT) ENGINE=MyISAM",
        "none",
        "none",
        sqlite_text=SYNTAX,
        mysql_text="[]",
    ),
    Case(
        "myisam_insert_blobs",
        f"INSERT INTO mi SELECT REPEAT('x', 8000) FROM {T} a, {T} b, {T} c",
        "none",
        "db_size",
        sqlite_text="1146 (42S02)",
    ),
    Case(
        "csv_engine",  # its size is not reported: refused
        "CREATE TABLE c (b TEXT NOT NULL) ENGINE=CSV",
        "none",
        "permission",
        sqlite_text=SYNTAX,
    ),
    # -- privilege changes ---------------------------------------------------------------
    Case("grant", "GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER", "policy", "policy"),
    Case("set_password", "SET PASSWORD = PASSWORD('x')", "policy", "policy"),
    Case(
        "set_time_limit",
        "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(30)",
        "policy",
        "policy",
    ),
    Case("create_user", "CREATE USER evil IDENTIFIED BY 'x'", "policy", "policy"),
    Case("alter_user", "ALTER USER CURRENT_USER() WITH MAX_STATEMENT_TIME 0", "policy", "policy"),
    Case("drop_database", "DROP DATABASE mysql", "policy", "policy"),
    Case("create_database", "CREATE DATABASE escape_hatch", "policy", "policy"),
    Case("use_mysql", "USE mysql", "policy", "policy"),
    Case(
        "read_mysql_user",
        "SELECT * FROM mysql.user",
        "none",
        "permission",
        sqlite_text="1146 (42S02)",
    ),
    Case("rename_out", f"RENAME TABLE {T} TO mysql.{T}", "none", "permission", sqlite_text=SYNTAX),
    Case("create_function", "CREATE FUNCTION f() RETURNS INT RETURN 1", "policy", "policy"),
    Case(
        "create_trigger",
        f"CREATE TRIGGER tr BEFORE INSERT ON {T} FOR EACH ROW SET @x = 1",
        "policy",
        "policy",
    ),
    Case("kill", "KILL 1", "policy", "policy"),
    Case("shutdown", "SHUTDOWN", "policy", "policy"),
    # -- several statements --------------------------------------------------------------
    Case("two_statements", f"SELECT 1; DROP TABLE {T}", "policy", "policy"),
    Case(
        "comment_hides_semicolon",
        "SELECT 1 /* ; */ ; ATTACH '{out}/e.db' AS e -- ;",
        "policy",
        "policy",
    ),
    Case(
        "string_hides_statement",
        f"SELECT 'a\\'; DROP TABLE {T}; --'",
        "none",
        "none",
        sqlite_text=f'[("a\'; DROP TABLE {T}; --",)]',
        mysql_text=f'[("a\'; DROP TABLE {T}; --",)]',
    ),
    Case("dash_dash_no_space", f"SELECT 1 --; DROP TABLE {T}", "policy", "policy"),
    Case("line_comment_newline", f"SELECT 1 -- x\n; DROP TABLE {T}", "policy", "policy"),
    Case(
        "hash_comment",
        f"SELECT 1 #; DROP TABLE {T}",
        "none",
        "none",
        sqlite_text="[(1,)]",
        mysql_text="[(1,)]",
    ),
    # -- comment tricks ------------------------------------------------------------------
    Case("executable_comment", f"SELECT /*!50000 1; DROP TABLE {T}; */ 2", "policy", "policy"),
    Case("executable_comment_whole", f"/*! DROP TABLE {T} */", "policy", "policy"),
    Case("mariadb_executable_comment", "SELECT 1 /*M!100000 , SLEEP(30) */", "policy", "policy"),
    Case("split_keyword", "SEL/**/ECT 1", "policy", "policy"),
    # -- encodings -----------------------------------------------------------------------
    Case("fullwidth_keyword", "ＡＴＴＡＣＨ DATABASE 'x' AS y", "policy", "policy"),
    Case(
        "fullwidth_semicolon",
        f"SELECT 1；DROP TABLE {T}",
        "none",
        "none",
        sqlite_text=SYNTAX,  # `1；DROP` is one MySQL identifier token, as on the server
        mysql_text=SYNTAX,
    ),
    Case(
        "dash_dash_nbsp",  # MySQL needs ASCII space after --; multi-statements are off anyway
        f"SELECT 1 --\u00a0; DROP TABLE {T}",
        "none",
        "none",
        sqlite_text="[(1,)]",
        mysql_text=SYNTAX,
    ),
    Case("dash_dash_control", f"SELECT 1 --\x01; DROP TABLE {T}", "policy", "policy"),
    Case("nbsp_after_semicolon", "SELECT 1;\u00a0ATTACH '{out}/n.db' AS n", "policy", "policy"),
    Case("binary_introducer", f"SELECT _binary 'x' ; DROP TABLE {T}", "policy", "policy"),
    Case("overlong", "SELECT '" + "x" * 200_000 + "'", "policy", "policy"),
]


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


class PeakRSS:
    """Peak resident memory of process ``pid`` during a block, above where it started: the
    kernel's high-water mark (VmHWM) reset through ``/proc/PID/clear_refs``, or, where that
    file cannot be written, samples every 2 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.extra_bytes = 0
        self._samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.base = _status_kib(self.pid)["VmRSS"]
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._samples.append(_status_kib(self.pid)["VmRSS"])

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            peak = _status_kib(self.pid)["VmHWM"]
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._samples, default=self.base)
        self.extra_bytes = max(peak - self.base, 0) * 1024


def scorers_task() -> DBTask:
    rows = tuple((f"player {i}", str(i), "club") for i in range(N_ROWS))
    return DBTask("s", "d", "", T, ("Player", "Goals", "Club"), rows, "other", ("1",))


@dataclasses.dataclass
class Episodes:
    name: str
    backend: SQLiteBackend | MySQLBackend
    time_limit_s: float
    server_pid: int | None
    out: Path
    first: Any = None  # the episode the hostile statements run in
    second: Any = None  # its neighbour in the batch
    hash0: str = ""  # the task table's hash before any statement
    stats: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def episodes(request, tmp_path_factory):
    """Two episodes of one backend with default limits: the hostile statements run in the
    first, the second checks that its neighbour in the batch is untouched."""
    if request.param == "sqlite":
        backend, pid = SQLiteBackend(), None
    else:
        backend = MySQLBackend(request.getfixturevalue("mariadb_params"))
        pid = server_pid()
    out = tmp_path_factory.mktemp(f"outside_{request.param}")
    task = scorers_task()
    first, second = backend.open(task.table_spec()), backend.open(task.table_spec())
    yield Episodes(
        request.param, backend, backend.time_limit_s, pid, out, first, second, first.table_hash()
    )
    first.close()
    second.close()
    backend.close()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_statement(episodes, case):
    sql = case.sql.replace("{out}", str(episodes.out))
    expected = case.sqlite if episodes.name == "sqlite" else case.mysql
    text = case.sqlite_text if episodes.name == "sqlite" else case.mysql_text
    pids = [os.getpid()] + ([episodes.server_pid] if episodes.server_pid else [])
    peaks = [PeakRSS(pid) for pid in pids]
    for p in peaks:
        p.__enter__()
    t0 = time.monotonic()
    res = episodes.first.execute(sql)
    elapsed = time.monotonic() - t0
    for p in peaks:
        p.__exit__()
    episodes.stats.append(
        {"case": case.id, "s": round(elapsed, 3), "client_mib": peaks[0].extra_bytes >> 20,
         "server_mib": peaks[1].extra_bytes >> 20 if len(peaks) > 1 else None}
    )  # fmt: skip
    kinds = expected if isinstance(expected, tuple) else (expected,)
    if kinds == ("none",):
        assert res.limit is None, (res.limit, res.text[:200])
        assert res.text.startswith(text), res.text[:200]
    else:
        assert res.limit in kinds, (res.limit, res.text[:200])
        if res.limit == "result":  # the first rows come back, the rest is cut
            assert res.rows_capped and not res.error and res.rows
    assert elapsed < episodes.time_limit_s + TIME_SLACK_S, f"{elapsed:.2f}s"
    for p in peaks:
        assert p.extra_bytes < GIB, f"{p.pid}: +{p.extra_bytes >> 20} MiB"
    # the episode goes on, and so does its neighbour
    assert episodes.first.execute(PROBE).text == f"[({N_ROWS},)]"
    assert episodes.second.execute(PROBE).text == f"[({N_ROWS},)]"
    episodes.stats[-1]["contained"] = True


def test_hostile_summary(episodes, capsys):
    """Runs after the cases: the task table is as it was, nothing was written outside, and the
    numbers are printed (statements tried, contained, peak memory, longest statement)."""
    assert episodes.first.table_hash() == episodes.hash0
    assert list(episodes.out.iterdir()) == []
    stats = episodes.stats
    assert len(stats) == len(CASES) >= 40
    longest = max(stats, key=lambda s: s["s"])
    summary = {
        "backend": episodes.name,
        "tried": len(stats),
        "contained": sum(bool(s.get("contained")) for s in stats),
        "peak_client_mib": max(s["client_mib"] for s in stats),
        "peak_server_mib": max((s["server_mib"] or 0) for s in stats),
        "longest_s": longest["s"],
        "longest_case": longest["case"],
        "time_limit_s": episodes.time_limit_s,
    }
    with capsys.disabled():
        print("\nhostile SQL:", json.dumps(summary))
    assert summary["contained"] == summary["tried"]


def test_database_size_caps_agree():
    """Both backends cap an episode's database at the same default size."""
    mysql = MySQLBackend.__init__.__kwdefaults__["max_db_bytes"]
    assert mysql == SQLiteBackend.__init__.__kwdefaults__["max_db_bytes"] == 16 << 20
