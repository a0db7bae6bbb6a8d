"""DBBench on a real MariaDB server: the oracle scores 1.0 on the dev split, both backends
agree on every dev item's table hash, the synthetic expert's trajectories hold on MariaDB,
the per-episode sandbox (own user and database, time limit, no FILE) holds, the accounts and
the server are locked down (privileges, socket only, credentials never in argv), and a
counterfactual step copies the database on the server."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pymysql
import pytest

from cmat_jax.envs.base import counterfactual_step
from cmat_jax.envs.dbbench import DBBenchEnv, dbbench_metrics, load_tasks
from cmat_jax.envs.dbbench_synth import expert_episode, generate_tasks
from cmat_jax.envs.mysql_backend import RECOMMENDED_MAX_ALLOWED_PACKET, MySQLBackend, MySQLParams
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.evaluate import EvalConfig, evaluate
from tests.dbbench_data import DBBENCH_DEV
from tests.mariadb import mariadb_params  # noqa: F401  (session fixture)

pytestmark = pytest.mark.mysql
DEV = DBBENCH_DEV


def test_oracle_on_mariadb_via_evaluator(mariadb_params, tmp_path):  # noqa: F811
    cfg = EvalConfig(
        data=DEV,
        out=tmp_path / "eval",
        agent="oracle",
        backend="mysql",
        mysql_option_file=mariadb_params.option_file,
        progress=False,
    )
    res = evaluate(cfg)
    assert res["n"] == 60 and res["overall_cat_accuracy"] == 1.0
    assert res["INSERT_accuracy"] == 1.0 and res["UPDATE_accuracy"] == 1.0


def test_backends_agree_on_every_dev_table_hash(mariadb_params):  # noqa: F811
    mysql, sqlite = MySQLBackend(mariadb_params), SQLiteBackend()
    for task in load_tasks(DEV):
        a, b = mysql.open(task.table_spec()), sqlite.open(task.table_spec())
        try:
            if task.table_outcome == "missing":  # no table: the hash query fails on both
                assert not a.table_hash().startswith("[(") and not b.table_hash().startswith("[(")
                continue
            assert a.table_hash() == b.table_hash(), task.task_id
            if task.is_mutation:
                assert not a.execute(task.label[0]).error and not b.execute(task.label[0]).error
                assert a.table_hash() == b.table_hash() == task.answer_md5, task.task_id
        finally:
            a.close()
            b.close()
    mysql.close()


def test_synthetic_expert_on_mariadb(mariadb_params):  # noqa: F811
    backend = MySQLBackend(mariadb_params)
    env = DBBenchEnv(backend)
    outs = []
    # the default stream, then tasks in AgentBench's style (INSERTs in MySQL's SET form)
    for st in [*generate_tasks(30, seed=5), *generate_tasks(20, seed=6, wikisql_share=1.0)]:
        tr = expert_episode(st, env, seed=5)
        outs.append({"type": st.task.type, "correct": tr["reward"] == 1.0})
    env.close()
    backend.close()
    assert dbbench_metrics(outs)["overall_cat_accuracy"] == 1.0


def test_mariadb_sandbox(mariadb_params, tmp_path):  # noqa: F811
    outside = tmp_path / "outside"
    outside.mkdir()
    backend = MySQLBackend(mariadb_params, time_limit_s=1.0, max_rows=200)
    task = load_tasks(DEV)[0]
    env = DBBenchEnv(backend, max_rounds=100)
    env.reset(task)
    t = f"`{task.table_name}`"
    hostile = [
        "SELECT SLEEP(30)",
        f"SELECT COUNT(*) FROM {t} a, {t} b, {t} c, {t} d, {t} e",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
        f"SELECT * FROM {t} a, {t} b",
        f"SELECT * FROM {t} INTO OUTFILE '{outside}/out.txt'",
        f"SELECT * FROM {t} INTO DUMPFILE '/tmp/cmat_dump.txt'",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
        "SELECT * FROM mysql.user",
        "SET SESSION max_statement_time = 0",
        "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(30)",
        "USE mysql",
        "GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER",
        "CREATE FUNCTION f() RETURNS INT RETURN 1",
        f"CREATE TRIGGER tr BEFORE INSERT ON {t} FOR EACH ROW SET @x = 1",
        "SELECT 1; DROP DATABASE mysql",
        "DROP DATABASE mysql",
        "CREATE DATABASE escape_hatch",
    ]
    for sql in hostile:
        t0 = time.monotonic()
        r = env.step(f"Trying.\nAction: Operation\n```sql\n{sql}\n```")
        assert time.monotonic() - t0 < 1.0 + 1.5, sql
        assert not r.done
        assert r.info["error"] or r.info["rows_capped"] or "100001" in r.observation, sql
        ok = env.step(f"Next.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM {t}\n```")
        assert ok.observation == f"[({len(task.rows)},)]", (sql, ok.observation)
    t0 = time.monotonic()  # cut off by the time limit: returns 0 instead of running for hours
    r = env.step("Action: Operation\n```sql\nSELECT BENCHMARK(10000000000, MD5('x'))\n```")
    assert r.observation == "[(0,)]" and time.monotonic() - t0 < 2.5
    r = env.step("Action: Operation\n```sql\nSELECT load_file('/etc/passwd')\n```")
    assert r.observation == "[(None,)]"  # no FILE privilege: the file is not readable
    env.close()
    backend.close()
    assert list(outside.iterdir()) == [] and not Path("/tmp/cmat_dump.txt").exists()


def _option(params: MySQLParams, key: str) -> str:
    """A value of the test server's option file."""
    return Path(params.option_file).read_text().split(f"{key}=")[1].split()[0]


def test_mariadb_lockdown(mariadb_params):  # noqa: F811
    """What the agent's account can do, where the server listens, and where credentials live."""
    backend = MySQLBackend(mariadb_params)
    task = load_tasks(DEV)[0]
    db = backend.open(task.table_spec())
    with db.conn.cursor() as cur:  # the agent's own connection, below the statement policy
        cur.execute("SHOW GRANTS")
        grants = [g for (g,) in cur.fetchall()]
        cur.execute(
            "SELECT @@local_infile, @@skip_networking, @@max_statement_time, @@max_allowed_packet"
        )
        local_infile, skip_networking, statement_s, packet = cur.fetchone()
        cur.execute("SHOW DATABASES")
        visible = {d for (d,) in cur.fetchall()}
        with pytest.raises(pymysql.err.ProgrammingError, match="1064"):
            cur.execute("SELECT 1; SELECT 2")  # the protocol's multi-statements are off
    assert local_infile == 0 and skip_networking == 1 and statement_s == backend.time_limit_s
    assert packet == RECOMMENDED_MAX_ALLOWED_PACKET
    assert visible == {"information_schema", db.db_name}
    on_own_db = [g for g in grants if f"`{db.db_name}`.*" in g]
    assert len(on_own_db) == 1 and len(grants) == 2, grants
    assert grants[0].startswith("GRANT USAGE ON *.*")
    for power in ("FILE", "PROCESS", "SUPER", "GRANT OPTION", "ALL PRIVILEGES", "EXECUTE"):
        assert power not in " ".join(grants), (power, grants)
    # the administrator holds only what it needs, and its password is in a 0600 file
    with backend.admin().cursor() as cur:
        cur.execute("SHOW GRANTS")
        admin_grants = [g for (g,) in cur.fetchall()]
    assert len(admin_grants) == 2 and "GRANT CREATE USER ON *.*" in admin_grants[0]
    assert "ON `cmat_ep_%`.*" in admin_grants[1]
    assert Path(mariadb_params.option_file).stat().st_mode & 0o777 == 0o600
    password = _option(mariadb_params, "password")
    for pid in filter(str.isdigit, os.listdir("/proc")):  # no process shows it in its argv
        with contextlib.suppress(OSError):
            assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    db.close()
    backend.close()
    with pytest.raises(FileNotFoundError, match=r"no-such\.cnf"):
        MySQLBackend(MySQLParams(option_file="/nonexistent/no-such.cnf"))
    sock = _option(mariadb_params, "socket")
    with pytest.raises(ValueError, match="1045"):  # wrong password: a user error, not a crash
        MySQLBackend(MySQLParams(unix_socket=sock, password="wrong"))


def test_mariadb_counterfactual_restores_on_the_server(mariadb_params):  # noqa: F811
    """The Checker's counterfactual step copies the database on the server (no rows in this
    process) and leaves the episode exactly as it was, without leftover copies."""
    backend = MySQLBackend(mariadb_params)
    task = next(t for t in load_tasks(DEV) if t.is_mutation)
    env = DBBenchEnv(backend)
    env.reset(task)
    before = env._db.table_hash()
    t = env._db.table.name
    res = counterfactual_step(env, f"Try.\nAction: Operation\n```sql\nDELETE FROM `{t}`\n```")
    assert not res.info["error"]
    assert env._db.table_hash() == before
    with backend.admin().cursor() as cur:
        cur.execute("SHOW DATABASES LIKE 'cmat\\_ep\\_%\\_s%'")
        assert cur.fetchall() == ()
    ok = env.step(f"Next.\nAction: Operation\n```sql\nSELECT COUNT(*) FROM `{t}`\n```")
    assert ok.observation == f"[({len(task.rows)},)]"
    env.close()
    backend.close()
