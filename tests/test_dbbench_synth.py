"""Synthetic DBBench tasks: volume, determinism, gold answers, the scripted expert through the
env, the SFT / task JSONL writers, and the benchmark-shaped stream's coverage of AgentBench DB's
question types, SQL and table shapes. (No generated name or question equal to an AgentBench
item's: checked against the real files by tools/synth_coverage.py, which tests cannot read.)"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest

from cmat_jax.envs.dbbench import DBBenchEnv, load_tasks
from cmat_jax.envs.dbbench_synth import (
    BENCH_TYPE_WEIGHTS,
    TASK_TYPES,
    agentbench_add_description,
    expert_episode,
    generate_task,
    generate_tasks,
    write_sft_jsonl,
    write_tasks_jsonl,
)
from cmat_jax.envs.dbbench_synth_domains import DOMAINS
from cmat_jax.envs.mysql_backend import MySQLBackend
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from tests.mariadb import mariadb_params  # noqa: F401  (session fixture)


def _fingerprint(task) -> str:
    blob = json.dumps([task.description, task.table_name, task.columns, task.rows, task.type])
    return hashlib.sha1(blob.encode()).hexdigest()


def test_ten_thousand_distinct_tasks():
    seen: set[str] = set()
    descriptions: set[str] = set()
    types: collections.Counter[str] = collections.Counter()
    for st in generate_tasks(10_000, seed=0):
        t = st.task
        seen.add(_fingerprint(t))
        descriptions.add(t.description)
        types[t.type] += 1
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
    env = DBBenchEnv(SQLiteBackend())
    phrased = multi = lowered = 0
    tasks = list(generate_tasks(300, seed=5, wikisql_share=1.0))
    for st in tasks:
        t = st.task
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


# -- the benchmark-shaped stream -------------------------------------------------------------


def _bench(n: int, seed: int, **kw):
    return list(generate_tasks(n, seed=seed, benchmark_share=1.0, **kw))


def _code(sql: str) -> str:
    """SQL without literals and quoted names, so a value "Rock and Roll" is not an AND."""
    return re.sub(r"'(?:[^'\\]|\\.|'')*'|`[^`]*`", "x", sql)


def test_benchmark_share_covers_agentbench_types_constructs_and_tables():
    tasks = _bench(1500, seed=2)
    types = collections.Counter(st.task.type for st in tasks)
    assert set(types) == set(TASK_TYPES) == set(BENCH_TYPE_WEIGHTS)
    for cat in ("INSERT", "UPDATE"):  # AgentBench: a third each, the questions the rest
        assert 0.28 < types[cat] / len(tasks) < 0.40
    assert min(types.values()) > 25

    def share(sel, pattern):
        return sum(bool(re.search(pattern, _code(st.gold_sql))) for st in sel) / len(sel)

    queries = [st for st in tasks if not st.task.is_mutation]
    for pattern in (
        r" AND ", r" OR | IN \(", r" LIKE ", r"ORDER BY .* \+ 0 (ASC|DESC) LIMIT \d+$",
        r"OFFSET 1", r"GROUP BY", r"COUNT\(DISTINCT", r"\(SELECT (MAX|MIN)\(", r"[<>]= ",
        r"(?<![<>])[<>] ", r"\b(MIN|MAX)\(x \+ 0\)", r"\b(SUM|AVG)\(x\)",
    ):  # fmt: skip
        assert share(queries, pattern) > 0.005, pattern
    assert share(queries, r" AND ") > 0.15  # WikiSQL questions under several conditions
    inserts = [st for st in tasks if st.task.type == "INSERT"]
    updates = [st for st in tasks if st.task.type == "UPDATE"]
    assert 0.6 < share(inserts, r"^INSERT INTO x \(") < 0.9 and share(inserts, r" SET ") > 0.1
    assert share(updates, r"SET x = x, x = x, x = x") > 0.05 and share(updates, r" OR ") > 0.05
    assert share(updates, r"WHERE x = x AND ") > 0.03
    answers = [st.task.label for st in queries]
    assert 0.05 < sum(len(a) > 1 for a in answers) / len(answers) < 0.3  # lists, not only one
    assert {"higher", "lower"} <= {a[0] for a in answers}  # answers the rows only imply
    # tables: names MySQL needs quoted, values as people write them, repeats and gaps
    names = [st.task.table_name for st in tasks]
    headers = [h for st in tasks for h in st.task.columns]
    cells = [c for st in tasks for row in st.task.rows for c in row]
    assert any(re.match(r"\d{4}[ _]", n) for n in names)
    assert any(h.isdigit() for h in headers) and any(re.search(r"[.%#()/]", h) for h in headers)
    assert any(re.search(r"[^\x00-\x7f]", h) for h in headers)
    assert 0.005 < sum(c in ("", "—", "–", "-", "N/A", "n/a") for c in cells) / len(cells) < 0.05
    assert any(re.fullmatch(r"\$?\d{1,3}(,\d{3})+", c) for c in cells)
    assert any(re.search(r"[^\x00-\x7f]", c) for c in cells)
    rows = sorted(len(st.task.rows) for st in tasks)
    assert rows[0] >= 12 and rows[len(rows) // 2] >= 20 and rows[-1] > 45
    assert max(len(st.task.columns) for st in tasks) >= 10
    repeats = sum(len({r[0] for r in st.task.rows}) < len(st.task.rows) for st in tasks)
    assert repeats > 0.1 * len(tasks)  # a year or rank first, not always a key
    line = sum(
        st.task.add_description == agentbench_add_description(st.task.table_name, st.task.columns)
        for st in tasks
    )
    assert 0.8 < line / len(tasks) < 0.97  # AgentBench's own table line, mostly
    lowered = sum(st.task.description[:1].islower() for st in queries)
    assert lowered > 0.04 * len(queries)  # WikiTableQuestions' lower-case style
    assert len({st.task.description for st in tasks}) == len(tasks)


@pytest.mark.parametrize("task_type", TASK_TYPES)
def test_scripted_expert_solves_benchmark_shaped_tasks(task_type):
    env = DBBenchEnv(SQLiteBackend())
    tasks = [generate_task(4, i, task_type=task_type, benchmark_share=1.0) for i in range(150)]
    recovered, partial = 0, []
    for st in tasks:
        t = st.task
        assert t.type == task_type
        tr = expert_episode(st, env, seed=4)
        assert tr["reward"] == 1.0 and tr["status"] == "completed", (t.description, st.gold_sql)
        errors = [s for s in tr["steps"][:-1] if s.get("error")]
        recovered += bool(errors)
        for s in errors:  # every mistake the expert makes is one the database rejects
            assert s["observation"] and not s["observation"].startswith("[(")
        if not t.is_mutation and t.label not in (("higher",), ("lower",)):
            db = SQLiteBackend().open(t.table_spec())  # the label is what the gold SQL returns
            assert tuple(str(r[0]) for r in db.execute(st.gold_sql).rows) == t.label
            db.close()
        if st.first_try is not None:  # a name given in part: "=" finds nothing, LIKE does
            sqls = [s.get("sql") for s in tr["steps"]]
            assert " LIKE '%" in st.gold_sql and st.first_try not in sqls[sqls.index(st.gold_sql) :]
            partial.append(st.first_try in sqls)
    env.close()
    assert recovered > 3
    if task_type == "other":
        assert 5 < len(partial) < 50 and 0.4 < sum(partial) / len(partial) < 0.95


def test_benchmark_share_is_deterministic_and_leaves_other_tasks_alone():
    a = generate_task(9, 31, benchmark_share=1.0)
    assert a == generate_task(9, 31, benchmark_share=1.0)
    assert a != generate_task(10, 31, benchmark_share=1.0)
    assert generate_task(9, 31) == generate_task(9, 31, benchmark_share=0.0)
    mixed = list(generate_tasks(200, seed=9, wikisql_share=0.5, benchmark_share=0.5))
    plain = list(generate_tasks(200, seed=9, wikisql_share=0.5))
    same = sum(m == p for m, p in zip(mixed, plain, strict=True))
    assert 60 < same < 140  # the other half is drawn exactly as before
    with pytest.raises(ValueError, match="benchmark_share must be in"):
        generate_task(9, 31, benchmark_share=-0.1)


def _coverage_tool():
    path = Path(__file__).resolve().parents[1] / "tools/synth_coverage.py"
    spec = importlib.util.spec_from_file_location("synth_coverage", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_coverage_tool_compares_and_finds_overlap(tmp_path, capsys):
    tool = _coverage_tool()
    ref = tmp_path / "ref.jsonl"
    write_tasks_jsonl(ref, 40, seed=6, benchmark_share=1.0)
    assert (
        tool.main(["--n", "60", "--seed", "6", "--benchmark-share", "1", "--reference", str(ref)])
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["overlap"]["questions"] == 40  # the same stream: every item found again
    assert summary["category_tv"] < 0.2 and summary["missing"] == []
    assert tool.main(["--n", "60", "--seed", "7", "--reference", str(ref)]) == 0
    other = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert other["overlap"]["questions"] == 0 and other["feature_gap"] > summary["feature_gap"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(ref.read_text().splitlines()[0] + "\n{not json\n")
    assert tool.main(["--n", "5", "--reference", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}:2" in err[0]


@pytest.mark.mysql
def test_benchmark_shaped_tasks_hold_on_mariadb(mariadb_params):  # noqa: F811
    """The gold answers and table hashes come from SQLite; AgentBench runs MySQL. Every
    question type's SQL (numbers stored as TEXT, LIKE, GROUP BY, subqueries, accented names)
    must give the same outcome there."""
    env = DBBenchEnv(MySQLBackend(mariadb_params))
    for task_type in TASK_TYPES:
        for i in range(6):
            st = generate_task(13, i, task_type=task_type, benchmark_share=1.0)
            tr = expert_episode(st, env, seed=13)
            assert tr["reward"] == 1.0, (st.task.description, st.gold_sql, tr["steps"])
    env.close()


def test_db_expert_checker_items_are_labelled_by_the_judge():
    """The DB expert's Checker items: each expert step (bad iff it errs), an answer before any
    query, a wrong final answer and, after a step that errored, the failed statement sent again
    in place of the fix, labelled on a snapshot of the episode. Replaying each item's history in
    a fresh episode and executing the proposal there gives the same label."""
    from cmat_jax.cmat import roles as R
    from cmat_jax.envs.dbbench import sql_block
    from cmat_jax.tasks import PREMATURE_DB_ANSWER, TASKS

    items = list(generate_tasks(60, seed=5, wikisql_share=0.5))
    episodes = TASKS["db"].expert(items, 5)
    assert len(episodes) == len(items)
    by_id = {st.task.task_id: st.task for st in items}
    kinds = collections.Counter()
    env = DBBenchEnv(SQLiteBackend())
    try:
        for ep in episodes:
            task = by_id[ep.task_id]
            assert ep.checker_items[0] == ([], PREMATURE_DB_ANSWER, False, "premature")
            experts = [
                m["content"] for m in ep.messages if m["role"] == "assistant" and m.get("weight", 1)
            ]
            # A revision demo: a bad item as an untrained reply, the reviewer's reason for its
            # kind, then the expert's own (trained) reply.
            bad = {(it.proposal, it.kind) for it in ep.checker_items if not it.good}
            for i, m in enumerate(ep.messages):
                if m["role"] == "user" and m["content"].startswith("A reviewer rejected"):
                    rejected = ep.messages[i - 1]
                    assert rejected["weight"] == 0.0
                    (kind,) = [k for p, k in bad if p == rejected["content"]]
                    assert m["content"] == R.rejection_feedback(R.REJECT_REASONS[kind])
                    assert ep.messages[i + 1]["content"] in experts
                    kinds["demo", kind] += 1
            for history, proposal, good, kind in ep.checker_items:
                env.reset(task)
                for m in history:
                    if m["role"] == "assistant":
                        env.step(m["content"])
                res = env.step(proposal)
                error = res.info.get("error", False)
                if kind == "step":
                    assert proposal in experts and good == (not error)
                elif kind == "repeat":
                    # the reply after an error, its statement swapped back to the failed one
                    failed = sql_block(history[-2]["content"])[0]
                    assert sql_block(proposal)[0] == failed and proposal not in experts
                    assert good == (not error)
                else:
                    assert kind in ("premature", "wrong_answer"), kind
                    assert res.done and good == (res.reward >= 1.0)
                    # A wrong answer fails a question; a mutation's answer text is not judged.
                    if kind == "wrong_answer":
                        assert good == (task.type in ("INSERT", "UPDATE")), (task.type, proposal)
                kinds[kind, good] += 1
    finally:
        env.close()
    assert kinds["premature", False] == len(items)
    assert kinds["wrong_answer", False] >= 6 and kinds["step", True] >= 2 * len(items)
    # the expert errs on purpose in some episodes; resending the failed statement errs again
    assert kinds["step", False] >= 2 and kinds["repeat", False] == kinds["step", False]
    assert sum(n for (k, _), n in kinds.items() if k == "demo") >= len(items) // 6
