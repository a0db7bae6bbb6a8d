"""Synthetic DBBench tasks: volume, determinism, no overlap with AgentBench's dev split, gold
answers, the scripted expert through the env, and the SFT / task JSONL writers."""

from __future__ import annotations

import collections
import hashlib
import json
import re

from cmat_jax.envs.dbbench import DBBenchEnv, load_tasks
from cmat_jax.envs.dbbench_synth import (
    TASK_TYPES,
    expert_episode,
    generate_task,
    generate_tasks,
    write_sft_jsonl,
    write_tasks_jsonl,
)
from cmat_jax.envs.dbbench_synth_domains import DOMAINS
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from tests.dbbench_data import DBBENCH_DEV

DEV = DBBENCH_DEV


def _fingerprint(task) -> str:
    blob = json.dumps([task.description, task.table_name, task.columns, task.rows, task.type])
    return hashlib.sha1(blob.encode()).hexdigest()


def test_ten_thousand_distinct_tasks_no_dev_overlap():
    dev = load_tasks(DEV)
    dev_names = {t.table_name.lower() for t in dev}
    dev_texts = {t.description.strip().lower() for t in dev}
    seen: set[str] = set()
    descriptions: set[str] = set()
    types: collections.Counter[str] = collections.Counter()
    for st in generate_tasks(10_000, seed=0):
        t = st.task
        seen.add(_fingerprint(t))
        descriptions.add(t.description)
        types[t.type] += 1
        assert t.table_name.lower() not in dev_names, t.table_name
        assert t.description.strip().lower() not in dev_texts, t.description
        assert all(r is not None for row in t.rows for r in row)  # stored as TEXT values
    assert len(seen) == 10_000
    assert len(descriptions) > 5_000  # phrasings and values vary, not just the tables
    assert set(types) == set(TASK_TYPES) and min(types.values()) > 300


def test_deterministic_by_seed_and_gold_answers():
    a, b = generate_task(7, 123), generate_task(7, 123)
    assert a == b and generate_task(8, 123) != a
    st = generate_task(0, 5, task_type="counting")
    db = SQLiteBackend().open(st.task.table_spec())
    # the label is what the gold SQL returns
    assert db.execute(st.gold_sql).rows[0][0] == int(st.task.label[0])
    db.close()
    ins = generate_task(0, 6, task_type="INSERT")
    assert ins.task.answer_md5.startswith("[('") and ins.task.label == (ins.gold_sql,)


def test_scripted_expert_solves_500_tasks_with_lookups_and_recoveries():
    env = DBBenchEnv(SQLiteBackend())
    rewards, lookups, recovered = [], 0, 0
    for st in generate_tasks(500, seed=11):
        tr = expert_episode(st, env, seed=11)
        rewards.append(tr["reward"])
        sqls = [s.get("sql", "") for s in tr["steps"]]
        lookups += any(s.startswith(("DESCRIBE", "SHOW", "SELECT * FROM")) for s in sqls)
        recovered += any(s.get("error") for s in tr["steps"][:-1])
        assert tr["status"] == "completed"
    env.close()
    assert sum(rewards) == 500
    assert lookups > 100 and recovered > 25


def test_writers(tmp_path):
    sft = tmp_path / "sft.jsonl"
    assert write_sft_jsonl(sft, 20, seed=3) == 20
    lines = [json.loads(x) for x in sft.read_text().splitlines()]
    for rec in lines:
        roles = [m["role"] for m in rec["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert roles[2:] == ["assistant", "user"] * ((len(roles) - 3) // 2) + ["assistant"]
        assert "Action: Answer\nFinal Answer:" in rec["messages"][-1]["content"]
    tasks_path = tmp_path / "tasks.jsonl"
    write_tasks_jsonl(tasks_path, 30, seed=3)
    tasks = load_tasks(tasks_path)  # the same schema the dev split uses
    assert [t.task_id for t in tasks] == [f"synth-3-{i}" for i in range(30)]
    assert tasks[4] == generate_task(3, 4).task


def test_wikisql_phrasing_share():
    """`wikisql_share` asks lookups / comparisons the way WikiSQL does, under one to three
    conditions (values sometimes lower-cased), and INSERTs / UPDATEs the way AgentBench's DB
    items do (several columns, facts to record); gold answers stay what the gold SQL returns
    and the scripted expert still solves every task."""
    import re

    import pytest

    dev_texts = {t.description.strip().lower() for t in load_tasks(DEV)}
    env = DBBenchEnv(SQLiteBackend())
    phrased = multi = lowered = 0
    tasks = list(generate_tasks(300, seed=5, wikisql_share=1.0))
    for st in tasks:
        t = st.task
        assert t.description.strip().lower() not in dev_texts
        assert expert_episode(st, env, seed=5)["reward"] == 1.0, t.description
        if t.type not in ("other", "comparison"):
            continue
        where = st.gold_sql.split(" WHERE ", 1)[1]
        n_conds = where.count(" AND ") + 1
        phrased += bool(
            re.search(r" has what |^(What|Which) .+ has a |when the |Name the ", t.description)
        )
        multi += n_conds > 1
        for value in re.findall(r"= '([^']*)'", where):
            assert value in t.description  # every condition's value is in the question
            lowered += value not in {cell for row in t.rows for cell in row}  # lower-cased
        db = SQLiteBackend().open(t.table_spec())
        assert tuple(str(r[0]) for r in db.execute(st.gold_sql).rows) == t.label
        db.close()
    env.close()
    n = sum(st.task.type in ("other", "comparison") for st in tasks)
    assert n > 60 and phrased > 0.8 * n and multi > 0.3 * n and lowered > 5
    # mutations in the same style: several columns per UPDATE, INSERTs in MySQL's SET form
    mutations = [st for st in tasks if st.task.is_mutation]
    multi_set = sum(st.gold_sql.count("` = '") > 2 for st in mutations if st.task.type == "UPDATE")
    n_update = sum(st.task.type == "UPDATE" for st in mutations)
    assert n_update > 30 and multi_set > 0.4 * n_update
    for st in mutations:
        if st.task.type == "INSERT":
            assert " SET `" in st.gold_sql
        for value in re.findall(r"= '([^']*)'", st.gold_sql):
            assert value in st.task.description  # every value to write is in the task
    # the default stream is unchanged by the option
    assert generate_task(5, 17) == generate_task(5, 17, wikisql_share=0.0)
    with pytest.raises(ValueError, match="wikisql_share must be in"):
        generate_task(5, 17, wikisql_share=1.5)


def test_many_tables_are_named_apart_from_their_domain():
    # The dev tables' names are all new to the model; it has to learn to copy a name it has
    # never seen, not to recall one of the domains' few dozen.
    def norm(name: str) -> str:
        return re.sub(r"[^0-9a-z]", "", name.lower())

    domain_names = {norm(n) for d in DOMAINS for n in d.tables}
    names = [st.task.table_name for st in generate_tasks(2_000, seed=1)]
    general = [n for n in names if not any(norm(n).startswith(d) for d in domain_names)]
    assert 0.3 < len(general) / len(names) < 0.5
    assert len(set(general)) > 0.9 * len(general)  # hardly any name repeats
    styles = {("_" in n, " " in n) for n in general}
    assert styles == {(True, False), (False, True), (False, False)}  # snake, spaced, Camel
