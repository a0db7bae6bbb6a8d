"""DBBench env on the SQLite backend: scorer fidelity on the AgentBench dev split, the action
grammar, observation format, limits, snapshots, bad input, and the MySQL emulation."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from cmat_jax.envs.base import EnvError, counterfactual_step, make_env
from cmat_jax.envs.dbbench import (
    MAX_ROUNDS,
    DBBenchDataError,
    DBBenchEnv,
    DBTask,
    answer_correct,
    dbbench_metrics,
    load_tasks,
    parse_answer_list,
)
from cmat_jax.envs.sql_backend import mysql_table_hash
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from tests.dbbench_data import DBBENCH_DEV

DEV = DBBENCH_DEV


@pytest.fixture(scope="module")
def dev_tasks() -> list[DBTask]:
    return load_tasks(DEV)


def small_task(typ: str = "other", label=("7",), md5: str | None = None) -> DBTask:
    return DBTask(
        task_id="t0",
        description="How many goals did Zoë Ramírez score?",
        add_description="Table: Scorers.",
        table_name="Scorers",
        columns=("Player", "Goals", "Club Name"),
        rows=(
            ("Zoë Ramírez", "7", "Otters"),
            ("Ann O'Neil", "12", "Herons"),
            ("Li Wei", "3", None),
        ),
        type=typ,
        label=tuple(label),
        answer_md5=md5,
    )


def op(sql: str) -> str:
    return f"Let me query.\nAction: Operation\n```sql\n{sql}\n```"


# -- scorer definitions (the dev split and the fidelity checks: test_dbbench_fidelity.py) -------


def test_metrics_follow_agentbench_definitions():
    outs = [
        {"type": "other", "correct": True},
        {"type": "counting", "correct": False},
        {"type": "INSERT", "correct": True},
        {"type": "INSERT", "correct": False},
        None,  # an episode that produced nothing is skipped
    ]
    m = dbbench_metrics(outs)
    assert m["SELECT_accuracy"] == 0.5 and m["other_accuracy"] == 1.0
    assert m["INSERT_accuracy"] == 0.5 and m["UPDATE_accuracy"] == 0.0  # missing type -> 0
    assert m["overall_cat_accuracy"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_answer_comparison_matches_agentbench():
    assert answer_correct(' ["7"]', ["7.0"])  # one value each: float comparison
    assert answer_correct("[7]", ["7"])
    assert not answer_correct('["seven"]', ["7"])
    assert answer_correct('["b", "a"]', ["a", "b"])  # several: sets
    assert not answer_correct('["a"]', ["a", "b"])
    assert answer_correct(" 7", ["7"])  # not a list -> [answer], then float comparison
    assert parse_answer_list(' "ab"') == ["a", "b"]  # a string literal becomes its characters
    assert parse_answer_list(" __import__('os')") == [" __import__('os')"]  # never evaluated
    assert not answer_correct("[None]", ["none"])  # TypeError in float() -> string comparison
    assert not answer_correct("[[1], [2]]", ["1", "2"])  # unhashable -> no match


def test_table_hash_format():
    assert mysql_table_hash([]) == "[(None,)]"
    # concat_ws skips NULL; row hashes (first 5 hex chars) sorted and joined with ','
    r1, r2 = hashlib.md5(b"a,b").hexdigest()[:5], hashlib.md5(b"c").hexdigest()[:5]
    joined = ",".join(sorted([r1, r2])).encode()
    expected = f"[('{hashlib.md5(joined).hexdigest()}',)]"
    assert mysql_table_hash([("c", None, None), ("a", None, "b")]) == expected


# -- grammar, observations, limits ------------------------------------------------------------


def test_grammar_first_fence_only_and_observation_format():
    env = DBBenchEnv(SQLiteBackend())
    first = env.reset(small_task())
    assert [m["role"] for m in first] == ["system", "user"]
    assert first[1]["content"] == "How many goals did Zoë Ramírez score?\nTable: Scorers."
    two = (
        op("SELECT Goals FROM Scorers WHERE Player = 'Li Wei'")
        + "\n```sql\nDROP TABLE Scorers\n```"
    )
    r = env.step(two)
    assert r.observation == "[('3',)]" and not r.done and r.info["error"] is False
    r = env.step(op("SELECT COUNT(*)\nFROM Scorers"))  # newlines inside the block -> spaces
    assert r.observation == "[(3,)]"
    r = env.step(op("SELECT nope FROM Scorers"))
    assert r.info["error"] is True and r.observation.startswith("1054 (42S22): Unknown column")
    r = env.step("Done.\nAction: Answer\nFinal Answer: ['7']")
    assert r.done and r.reward == 1.0 and r.info["status"] == "completed"
    tr = env.transcript()
    assert json.loads(json.dumps(tr)) == tr
    assert [m["role"] for m in tr["messages"]] == ["system", "user"] + ["assistant", "user"] * 3 + [
        "assistant"
    ]
    with pytest.raises(EnvError):
        env.step("again")


def test_protocol_failures_end_the_episode():
    env = DBBenchEnv(SQLiteBackend())
    env.reset(small_task())
    r = env.step("Action: Operation\nSELECT 1")  # no ```sql block
    assert r.done and r.info["status"] == "agent_validation_failed" and r.reward == 0.0
    env.reset(small_task())
    r = env.step("I think the answer is 7.")  # no action, no answer
    assert r.done and r.info["status"] == "agent_validation_failed" and r.info["error"]
    env.reset(small_task())
    r = env.step("Final Answer: ['7']")  # AgentBench needs a newline before Final Answer
    assert r.done and r.reward == 0.0
    env.reset(small_task())
    r = env.step("Action: Answer\nFinal Answer: 7")  # not a list: [answer], compared as float
    assert r.done and r.reward == 1.0
    env.reset(small_task())
    r = env.step("Action: Answer\nFinal Answer: {'7': 1}, oops")  # unparseable -> [text]
    assert r.done and r.reward == 0.0


def test_observation_truncated_at_800_chars():
    rows = tuple((f"name-{i:04d}", str(i), "x" * 30) for i in range(200))
    task = DBTask("t", "d", "", "Big", ("A", "B", "C"), rows, "other", ("1",))
    env = DBBenchEnv(SQLiteBackend())
    env.reset(task)
    r = env.step(op("SELECT * FROM Big"))
    assert len(r.observation) == 800 + len("[TRUNCATED]") and r.observation.endswith("[TRUNCATED]")


def test_round_limit_then_one_last_answer():
    env = DBBenchEnv(SQLiteBackend())
    env.reset(small_task())
    for _ in range(MAX_ROUNDS):
        assert not env.step(op("SELECT 1")).done
    r = env.step("Action: Answer\nFinal Answer: ['7']")  # the reply after the 15th op counts
    assert r.done and r.reward == 1.0
    env.reset(small_task())
    for _ in range(MAX_ROUNDS):
        env.step(op("SELECT 1"))
    r = env.step(op("SELECT 1"))
    assert r.done and r.info["status"] == "task_limit_reached"


def test_mutation_scored_by_table_hash_even_without_answer(dev_tasks):
    task = next(t for t in dev_tasks if t.type == "UPDATE")
    env = make_env("dbbench", backend=SQLiteBackend())
    env.reset(task)
    env.step(op(task.label[0]))
    r = env.step("no action here")
    assert r.done and r.info["status"] == "agent_validation_failed" and r.reward == 1.0


def test_snapshot_restore_counterfactual():
    env = DBBenchEnv(SQLiteBackend())
    env.reset(small_task("UPDATE", label=("x",), md5="[('0',)]"))
    r = counterfactual_step(env, op("DELETE FROM Scorers"))
    assert r.info["error"] is False
    assert env.step(op("SELECT COUNT(*) FROM Scorers")).observation == "[(3,)]"
    assert len(env.messages) == 4  # the counterfactual turn left no trace
    snap = env.snapshot()
    env.step(op("UPDATE Scorers SET Goals = '0'"))
    env.restore(snap)
    assert env.step(op("SELECT SUM(Goals) FROM Scorers")).observation == "[(22.0,)]"


# -- MySQL emulation on SQLite ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT Goals FROM Scorers WHERE Player = 'zoe ramirez'", "[('7',)]"),  # ci + ai
        ("SELECT Goals FROM Scorers WHERE Player LIKE 'ZO%'", "[('7',)]"),
        ("SELECT Goals FROM Scorers WHERE Player = 'Ann O\\'Neil'", "[('12',)]"),  # \' escape
        ('SELECT Goals FROM Scorers WHERE Player = "Li Wei"', "[('3',)]"),  # "..." is a string
        ("SELECT Player FROM Scorers WHERE Goals > 5 ORDER BY Goals + 0", "[('Zoë Ramírez',), (\"Ann O'Neil\",)]"),
        ("SELECT `Club Name` FROM `Scorers` WHERE `Goals` = 3", "[(None,)]"),
        ("SELECT CONCAT(Player, '/', Goals) FROM Scorers WHERE Goals = 12", '[("Ann O\'Neil/12",)]'),
        ("SHOW TABLES", "[('Scorers',)]"),
        ("DESCRIBE Scorers", "[('Player', 'text', 'YES', '', None, ''), ('Goals', 'text', 'YES', '', None, ''), ('Club Name', 'text', 'YES', '', None, '')]"),
        ("SHOW COLUMNS FROM `Scorers` LIKE 'Goal%'", "[('Goals', 'text', 'YES', '', None, '')]"),
        ("SELECT 'a\\\\b', 'tab\\there' # trailing comment", "[('a\\\\b', 'tab\\there')]"),
        ("DESC nothere", "1146 (42S02): Table 'dbbench.nothere' doesn't exist"),
        ("SELECT CAST('7.9' AS SIGNED)", "[(7,)]"),
    ],
)  # fmt: skip
def test_mysql_emulation(sql, expected):
    db = SQLiteBackend().open(small_task().table_spec())
    assert db.execute(sql).text == expected
    db.close()


def test_insert_set_form_is_the_values_form():
    """MySQL's ``INSERT INTO t SET a = x, ...`` changes the table exactly as the VALUES form
    (same AgentBench table hash); a malformed assignment list is a MySQL-style syntax error."""
    hashes = []
    for sql in (
        "INSERT INTO `Scorers` (`Player`, `Goals`) VALUES ('Mo \\'Ali\\'', 4)",
        "INSERT INTO `Scorers` SET `Player` = 'Mo \\'Ali\\'', `Goals` = 4",
        "insert Scorers set Goals = CONCAT('4', ''), Player = \"Mo 'Ali'\"",
    ):
        db = SQLiteBackend().open(small_task().table_spec())
        assert not db.execute(sql).error, sql
        assert db.execute("SELECT `Club Name` FROM Scorers WHERE Goals = 4").text == "[(None,)]"
        hashes.append(db.table_hash())
        db.close()
    assert hashes[0] == hashes[1] == hashes[2]
    db = SQLiteBackend().open(small_task().table_spec())
    assert db.execute("INSERT INTO Scorers SET Goals").text.startswith("1064 (42000)")
    assert db.execute("INSERT INTO Scorers SET Nope = 1").text.startswith("1054 (42S22)")
    db.close()


# -- bad input ---------------------------------------------------------------------------------


def test_malformed_records_name_the_line(tmp_path):
    good = json.dumps(small_task().to_record())
    bad_rows = json.loads(good)  # a ragged row is not malformed: see test_dbbench_fidelity.py
    bad_rows["table"]["table_info"]["rows"][1] = "only one"
    cases = {
        "not json": "invalid JSON",
        json.dumps({"description": "x"}): "missing field 'table.table_name'",
        json.dumps(bad_rows): "rows[1]' must be a list",
        json.dumps({**json.loads(good), "label": "7"}): "'label' must be a list",
        json.dumps({**json.loads(good), "type": ["INSERT"]}): "need a string 'answer_md5'",
        json.dumps({**json.loads(good), "type": [7]}): "'type' must be a string",
    }
    for line, message in cases.items():
        path = tmp_path / "tasks.jsonl"
        path.write_text(good + "\n\n" + line + "\n")
        with pytest.raises(DBBenchDataError, match=rf"tasks.jsonl:3: .*{re.escape(message)}"):
            load_tasks(path)
    path.write_text(good + "\n")
    assert load_tasks(path)[0] == small_task()
    with pytest.raises(DBBenchDataError, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")
