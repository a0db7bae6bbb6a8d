"""Sandbox of the SQLite backend: hostile statements are refused or cut off within the time
limit, the episode goes on, the task table survives, and no file appears anywhere; the
bounded-time LIKE and the MySQL functions that replace SQLite's quadratic ones give the right
answers; a counterfactual restore keeps the size cap. (tests/test_hostile_sql.py runs the
hostile statements on both backends with the default limits.)"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from cmat_jax.envs.dbbench import DBBenchEnv, DBTask
from cmat_jax.envs.sql_backend import check_statement
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.envs.sqlite_functions import like_match

LIMIT_S = 0.3


def hostile_statements(p: Path) -> list[str]:
    """SQL an agent might write to escape its database or hog the machine (``p``: a dir the
    statements try to write into)."""
    return [
        f"ATTACH DATABASE '{p}/a.db' AS a",
        f"attach '{p}/b.db' as b",
        "DETACH DATABASE main",
        f"VACUUM INTO '{p}/c.db'",
        "VACUUM",
        f"SELECT load_extension('{p}/evil.so')",
        "SELECT load_extension('libc.so.6', 'system')",
        "SELECT fts3_tokenizer('simple')",
        f"SELECT writefile('{p}/w.txt', 'x')",
        "SELECT load_file('/etc/passwd')",
        "PRAGMA journal_mode = WAL",
        "PRAGMA writable_schema = ON",
        f"PRAGMA temp_store_directory = '{p}'",
        "PRAGMA main.locking_mode = EXCLUSIVE",
        "PRAGMA mmap_size = 268435456",
        "PRAGMA cache_size = -1000000",
        "PRAGMA query_only = OFF",
        "SELECT * FROM pragma_compile_options",
        f"SELECT 1; ATTACH '{p}/d.db' AS d",
        "SELECT 1; SELECT 2",
        "DROP TABLE Scorers; SELECT 1",
        f"SELECT 1 /* ; */ ; ATTACH '{p}/e.db' AS e -- ;",
        f"SELECT 'a\\'; ATTACH \\'{p}/f.db\\' AS f; --'; DROP TABLE Scorers",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT COUNT(*) FROM r",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
        "SELECT COUNT(*) FROM Scorers a, Scorers b, Scorers c, Scorers d, Scorers e, Scorers f",
        "SELECT * FROM Scorers a, Scorers b, Scorers c, Scorers d",
        "INSERT INTO Scorers SELECT a.* FROM Scorers a, Scorers b, Scorers c, Scorers d, Scorers e",
        "SELECT randomblob(2000000000)",
        "SELECT zeroblob(1000000000)",
        "SELECT replace(hex(zeroblob(400000)), '0', hex(zeroblob(400000)))",
        "SET max_statement_time = 0",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE Scorers",
        f"SELECT * FROM Scorers INTO OUTFILE '{p}/out.txt'",
        "USE mysql",
        "GRANT ALL PRIVILEGES ON *.* TO 'agent'@'%'",
        "BEGIN IMMEDIATE",
    ]


def scorers_task(n_rows: int = 24) -> DBTask:
    rows = tuple((f"player {i}", str(i), "club") for i in range(n_rows))
    return DBTask("s", "d", "", "Scorers", ("Player", "Goals", "Club"), rows, "other", ("1",))


def _listing(d: Path) -> set[str]:
    return set(os.listdir(d)) if d.is_dir() else set()


def test_hostile_statements_refused_or_cut_off(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    watched = [Path("/tmp"), Path.home(), Path(__file__).parent]
    before = {d: _listing(d) for d in watched}
    statements = hostile_statements(outside)
    assert len(statements) >= 25

    env = DBBenchEnv(SQLiteBackend(time_limit_s=LIMIT_S, max_rows=500), max_rounds=1000)
    env.reset(scorers_task())
    for sql in statements:
        t0 = time.monotonic()
        r = env.step(f"Trying.\nAction: Operation\n```sql\n{sql}\n```")
        elapsed = time.monotonic() - t0
        assert not r.done, sql
        assert r.info["error"] or r.info["rows_capped"], f"not stopped: {sql}"
        assert elapsed < LIMIT_S + 1.0, f"{sql} took {elapsed:.2f}s"
        assert "root:" not in r.observation
        # the episode goes on: a normal statement still works
        ok = env.step("Next.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM Scorers\n```")
        assert ok.observation == "[(24,)]", (sql, ok.observation)
    assert env.step("Action: Answer\nFinal Answer: ['1']").reward == 1.0
    env.close()

    assert _listing(outside) == set() and _listing(work) == set()
    for d in watched:
        new = _listing(d) - before[d]
        assert not [f for f in new if f.endswith((".db", ".txt", ".so"))], (d, new)


@pytest.mark.parametrize(
    ("sql", "refused"),
    [
        ("SELECT 1", False),
        ("  select 1 ;  ", False),
        ("SELECT ';' AS semi", False),
        ("SELECT 1; -- just a comment", False),
        ("(SELECT 1)", False),
        ("SELECT 1;;SELECT 2", True),
        ("", True),
        ("SET @a = 1", True),
        ("START TRANSACTION", True),
    ],
)
def test_statement_policy(sql, refused):
    assert (check_statement(sql) is not None) == refused


def test_time_limit_and_row_cap_are_configurable():
    db = SQLiteBackend(time_limit_s=0.1, max_rows=5).open(scorers_task(10).table_spec())
    res = db.execute("SELECT * FROM Scorers")
    assert res.rows_capped and len(res.rows) == 5
    t0 = time.monotonic()
    res = db.execute(
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n+1 FROM r) SELECT MAX(n) FROM r"
    )
    assert res.error and "interrupted" in res.text and time.monotonic() - t0 < 1.0
    db.close()


def _like_reference(pattern: str, value: str) -> bool:
    rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.DOTALL) is not None


def test_like_matcher_agrees_with_a_regex_reference():
    """The backtracking-free LIKE gives the same answers as a regex translation."""
    rng = random.Random(0)
    for _ in range(3000):
        pattern = "".join(rng.choice("ab%_") for _ in range(rng.randrange(0, 8)))
        value = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 10)))
        assert like_match(pattern, value) == _like_reference(pattern, value), (pattern, value)
    assert like_match("50\\%%", "50%off") and not like_match("50\\%%", "50 off")


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT INSTR('Foobar', 'BAR')", "[(4,)]"),  # MySQL: the collation's case rules
        ("SELECT REPLACE('a-b-c', '-', '+')", "[('a+b+c',)]"),
        ("SELECT TRIM('xxhixx', 'x'), LTRIM('xxhi', 'x'), RTRIM('hixx', 'x')", "[('hi', 'hi', 'hi')]"),
        ("SELECT FORMAT(12332.1235, 2), FORMAT(2.5, 0), FORMAT(-1234.5, 1)", "[('12,332.12', '3', '-1,234.5')]"),
        ("SELECT REPEAT('ab', 3), REPEAT('ab', 0)", "[('ababab', '')]"),
    ],
)  # fmt: skip
def test_mysql_functions_without_blowups(sql, expected):
    db = SQLiteBackend().open(scorers_task(2).table_spec())
    assert db.execute(sql).text == expected
    db.close()


def test_snapshot_restore_keeps_the_size_cap():
    """A counterfactual restore (deserialize) does not lift the database size cap."""
    db = SQLiteBackend(max_db_bytes=1 << 20).open(scorers_task().table_spec())
    grow = "INSERT INTO Scorers SELECT REPEAT('x', 2000), Goals, Club FROM Scorers"
    res = None
    for _ in range(20):
        res = db.execute(grow)
        if res.error:
            break
    assert res is not None and res.limit == "db_size", res
    snap = db.snapshot()
    assert len(snap) <= 1 << 20
    db.execute("DELETE FROM Scorers")
    db.restore(snap)
    assert db.execute(grow).limit == "db_size"
    db.close()
