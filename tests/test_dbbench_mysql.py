"""DBBench on a real MariaDB server: the oracle scores 1.0 on the dev split, both backends
agree on every dev item's table hash, the synthetic expert's trajectories hold on MariaDB,
and the per-episode sandbox (own user and database, time limit, no FILE) holds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cmat_jax.envs.dbbench import DBBenchEnv, dbbench_metrics, load_tasks
from cmat_jax.envs.dbbench_synth import expert_episode, generate_tasks
from cmat_jax.envs.mysql_backend import MySQLBackend
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.evaluate import EvalConfig, evaluate
from tests.mariadb import mariadb_params  # noqa: F401  (session fixture)

pytestmark = pytest.mark.mysql
DEV = Path(__file__).resolve().parents[2] / "shared/data/agentbench_dbbench/dev.jsonl"


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
