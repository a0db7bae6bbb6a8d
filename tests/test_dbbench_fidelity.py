"""Fidelity to AgentBench's DB task, on both backends (SQLite, and MariaDB via the private
server of tests/mariadb.py): the dev split loads and the oracle / null agents score as they
must; items whose table AgentBench's MySQL cannot fill (ragged rows) or create (names MySQL
refuses) run as they run there; every identifier MySQL accepts unquoted works; answers, NULLs,
numeric strings and the table hash are compared and formatted as AgentBench does.

The items here are small, written for the tests, in AgentBench's JSONL schema."""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path
from typing import Any

import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmat_jax.envs.agents import NullAgent, oracle_agent
from cmat_jax.envs.dbbench import (
    DBBenchDataWarning,
    DBTask,
    answer_correct,
    dbbench_metrics,
    load_tasks,
)
from cmat_jax.envs.dbbench_setup import mysql_text
from cmat_jax.envs.mysql_backend import MySQLBackend
from cmat_jax.envs.mysql_dialect import to_sqlite, tokenize
from cmat_jax.envs.sql_backend import SQLBackend, mysql_table_hash
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.evaluate import run_episodes
from tests.dbbench_data import DBBENCH_DEV
from tests.mariadb import mariadb_params  # noqa: F401  (session fixture, used by `backend`)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend(request) -> SQLBackend:
    if request.param == "sqlite":
        b: SQLBackend = SQLiteBackend()
    else:
        b = MySQLBackend(request.getfixturevalue("mariadb_params"))
    yield b
    b.close()


def record(
    typ: str,
    table: Any,
    columns: list[Any],
    rows: list[list[Any]],
    *,
    label: list[Any] | None = None,
    answer_md5: str | None = None,
    item_id: str = "item",
) -> dict[str, Any]:
    """One item in AgentBench's JSONL schema."""
    rec: dict[str, Any] = {
        "description": f"Task {item_id} on the table {table}.",
        "add_description": f"The name of this table is {table}, and the headers of this "
        f"table are {','.join(map(str, columns))}.",
        "label": label if label is not None else [],
        "type": [typ],
        "table": {
            "table_name": table,
            "table_info": {"columns": [{"name": c, "type": "TEXT"} for c in columns], "rows": rows},
        },
        "id": item_id,
    }
    if answer_md5 is not None:
        rec["answer_md5"] = answer_md5
    return rec


def write_items(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def episodes(tasks: list[DBTask], agent, backend: SQLBackend) -> dict[str, dict[str, Any]]:
    return {tr["task_id"]: tr for tr in run_episodes(tasks, agent, backend, batch_size=4)}


def sql_rows(backend: SQLBackend, task: DBTask, sql: str) -> str:
    db = backend.open(task.table_spec())
    try:
        return db.execute(sql).text
    finally:
        db.close()


# -- the dev split (in the repository), both backends ---------------------------------------


def test_dev_split_loads_oracle_passes_null_fails(backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tasks = load_tasks(DBBENCH_DEV)
    assert len(tasks) == 60
    # item 5 names a column '' : MySQL refuses the CREATE TABLE, so it runs with no table
    outcomes = collections.Counter(t.table_outcome for t in tasks)
    assert outcomes == {"ok": 59, "missing": 1}
    ours = [str(w.message) for w in caught if w.category is DBBenchDataWarning]
    assert len(ours) == 1 and "dev.jsonl:6: item 'dev-5' (counting" in ours[0]
    trs = episodes(tasks, oracle_agent(tasks), backend)
    m = dbbench_metrics(tr["output"] for tr in trs.values())
    print(f"{backend.name} oracle: {json.dumps(m)}")
    assert m["overall_cat_accuracy"] >= 0.98
    # every oracle failure is an item whose table AgentBench could not set up
    failed = {k for k, tr in trs.items() if tr["reward"] != 1.0}
    assert failed <= {t.task_id for t in tasks if t.table_outcome != "ok" and t.is_mutation}
    trs = episodes(tasks, NullAgent(), backend)
    m = dbbench_metrics(tr["output"] for tr in trs.values())
    print(f"{backend.name} null: {json.dumps(m)}")
    assert m["overall_cat_accuracy"] == 0.0 and len(trs) == 60
    assert {tr["status"] for tr in trs.values()} == {"agent_validation_failed"}


# -- ragged rows: the one INSERT fails, the item runs on an empty table ----------------------

COLUMNS = ["Player", "Goals", "Club"]
FULL_ROWS = [["Ann", "12", "Herons"], ["Bo", "7", "Otters"], ["Cy", "3", None]]
RAGGED_ROWS = [["Ann", "12", "Herons"], ["Bo", "7"], ["Cy", "3", None]]
NEW_ROW = ("Di", "5", "Otters")
INSERT_SQL = "INSERT INTO `Scorers` (`Player`, `Goals`, `Club`) VALUES ('Di', '5', 'Otters')"


def test_ragged_row_runs_on_an_empty_table(backend, tmp_path):
    full_md5 = mysql_table_hash([*map(tuple, FULL_ROWS), NEW_ROW])  # what the author expected
    empty_md5 = mysql_table_hash([NEW_ROW])  # what AgentBench's MySQL produces
    path = write_items(
        tmp_path / "ragged.jsonl",
        [
            record("counting", "Scorers", COLUMNS, RAGGED_ROWS, label=["3"], item_id="q"),
            record("INSERT", "Scorers", COLUMNS, RAGGED_ROWS, label=[INSERT_SQL],
                   answer_md5=full_md5, item_id="ins-full"),
            record("INSERT", "Scorers", COLUMNS, RAGGED_ROWS, label=[INSERT_SQL],
                   answer_md5=empty_md5, item_id="ins-empty"),
            record("other", "Scorers", COLUMNS, FULL_ROWS, label=["12"], item_id="fine"),
        ],
    )  # fmt: skip
    with pytest.warns(DBBenchDataWarning) as caught:
        tasks = load_tasks(path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and all("ragged.jsonl:" in m for m in messages)
    assert "item 'q' (counting, table 'Scorers')" in messages[0]
    assert "Column count doesn't match value count at row 2" in messages[0]
    assert "runs with an empty table" in messages[0]
    by_id = {t.task_id: t for t in tasks}
    assert by_id["q"].table_outcome == "empty" and by_id["fine"].table_outcome == "ok"
    assert by_id["q"].rows[1] == ("Bo", "7")  # the file's rows are kept as given
    assert sql_rows(backend, by_id["q"], "SELECT COUNT(*) FROM Scorers") == "[(0,)]"
    assert sql_rows(backend, by_id["fine"], "SELECT COUNT(*) FROM Scorers") == "[(3,)]"
    trs = episodes(tasks, oracle_agent(tasks), backend)
    # scored as on AgentBench: the query item by its label; the INSERT by the hash of the table
    # it really changed (one row), so only the item whose answer_md5 expects that passes
    assert {k: tr["reward"] for k, tr in trs.items()} == {
        "q": 1.0, "ins-full": 0.0, "ins-empty": 1.0, "fine": 1.0,
    }  # fmt: skip
    assert trs["ins-full"]["answer"] == trs["ins-empty"]["answer"] == empty_md5
    assert trs["q"]["table_outcome"] == "empty"


def test_row_shapes_agentbench_cannot_insert(tmp_path):
    cases = {
        "longer": ([["a", "b", "c", "d"]], "empty", "at row 1"),
        "empty-row": ([["a", "b", "c"], []], "empty", "1064 (42000)"),
        "nested": ([["a", ["b"], "c"]], "missing", "Python 'list' cannot be converted"),
    }
    for item_id, (rows, outcome, error) in cases.items():
        path = write_items(
            tmp_path / f"{item_id}.jsonl",
            [record("other", "T", COLUMNS, rows, label=["x"], item_id=item_id)],
        )
        with pytest.warns(DBBenchDataWarning, match=f"item '{item_id}'"):
            (task,) = load_tasks(path)
        assert task.table_outcome == outcome and error in (task.table_error or ""), item_id
    bad = record("other", "T", COLUMNS, [["a", "b", "c"], "abc"], label=["x"])
    with pytest.raises(
        ValueError, match=r"bad.jsonl:1: 'table.table_info.rows\[1\]' must be a list"
    ):
        load_tasks(write_items(tmp_path / "bad.jsonl", [bad]))  # AgentBench cannot run it either


# -- names MySQL refuses: CREATE TABLE fails, the item runs with no table --------------------


@pytest.mark.parametrize(
    ("table", "columns", "error"),
    [
        ("T", ["", "b"], "1166 (42000): Incorrect column name ''"),
        ("T", ["a ", "b"], "1166 (42000): Incorrect column name 'a '"),
        ("T", ["Goals", "goals"], "1060 (42S21): Duplicate column name 'goals'"),
        ("T", ["g" * 65], "1059 (42000): Identifier name"),
        ("T ", ["a"], "1103 (42000): Incorrect table name 'T '"),
        ("t" * 65, ["a"], "1103 (42000): Incorrect table name"),
        ("T", ["emoji \U0001f600"], "1166 (42000): Incorrect column name"),
        ("T", [], "1064 (42000)"),
    ],
)  # fmt: skip
def test_names_mysql_refuses_mean_no_table(backend, tmp_path, table, columns, error):
    rows = [["1"] * len(columns)]
    md5 = mysql_table_hash([("1",) * len(columns)])  # unreachable: there is no table
    path = write_items(
        tmp_path / "names.jsonl",
        [
            record("other", table, columns, rows, label=["1"], item_id="q"),
            record("UPDATE", table, columns, rows, label=[f"UPDATE `{table}` SET a = '1'"],
                   answer_md5=md5, item_id="u"),
        ],
    )  # fmt: skip
    with pytest.warns(DBBenchDataWarning, match="runs with no table"):
        tasks = load_tasks(path)
    assert all(t.table_outcome == "missing" and error in (t.table_error or "") for t in tasks)
    assert sql_rows(backend, tasks[0], "SHOW TABLES") == "[]"
    assert sql_rows(backend, tasks[0], "SELECT * FROM `T`").startswith("1146 (42S02)")
    trs = episodes(tasks, oracle_agent(tasks), backend)
    assert trs["q"]["reward"] == 1.0 and trs["u"]["reward"] == 0.0


def test_names_mysql_accepts_are_kept_as_given(backend, tmp_path):
    """Leading spaces, 64 characters, names equal only up to accents: valid in MySQL, kept."""
    columns = [" Lead", "c" * 64, "é", "e", "a.b/c\\d"]
    path = write_items(
        tmp_path / "ok.jsonl", [record("other", "x" * 64, columns, [["1"] * 5], label=["1"])]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (task,) = load_tasks(path)
    assert task.table_outcome == "ok"
    sql = f"SELECT `{'c' * 64}`, `é`, `e`, `a.b/c\\d` FROM `{'x' * 64}`"
    assert sql_rows(backend, task, sql) == "[('1', '1', '1', '1')]"
    # names that are not JSON strings are written with str(), as AgentBench's f-strings do
    rec = record("other", 1987, [2019, None, 1.5], [["a", "b", "c"]], label=["a"])
    (task,) = load_tasks(write_items(tmp_path / "numbers.jsonl", [rec]))
    assert (task.table_name, task.columns) == ("1987", ("2019", "None", "1.5"))
    assert sql_rows(backend, task, "SELECT `2019`, `1.5` FROM `1987`") == "[('a', 'c')]"


# -- identifiers MySQL accepts unquoted ------------------------------------------------------

IDENT_COLUMNS = ["1st_place", "$prize", "Größe", "2nd", "Ω9"]
IDENT_ROWS = [["Ann", "10", "1.80", "Bo", "x"], ["Cy", "4", "1.65", "Di", "y"]]


def test_unquoted_mysql_identifiers_oracle_passes(backend, tmp_path):
    table = "1987_results"
    insert = "INSERT INTO 1987_results (1st_place, $prize, Größe, 2nd, Ω9) VALUES ('Ed', '7', '1.90', 'Fay', 'z')"
    update = "UPDATE 1987_results SET $prize = '11' WHERE 1st_place = 'Ann' AND Ω9 = 'x'"
    after_insert = [*map(tuple, IDENT_ROWS), ("Ed", "7", "1.90", "Fay", "z")]
    after_update = [("Ann", "11", "1.80", "Bo", "x"), tuple(IDENT_ROWS[1])]
    path = write_items(
        tmp_path / "idents.jsonl",
        [
            record("INSERT", table, IDENT_COLUMNS, IDENT_ROWS, label=[insert],
                   answer_md5=mysql_table_hash(after_insert), item_id="ins"),
            record("UPDATE", table, IDENT_COLUMNS, IDENT_ROWS, label=[update],
                   answer_md5=mysql_table_hash(after_update), item_id="upd"),
            record("other", table, IDENT_COLUMNS, IDENT_ROWS, label=["Di"], item_id="q"),
        ],
    )  # fmt: skip
    tasks = load_tasks(path)
    trs = episodes(tasks, oracle_agent(tasks), backend)
    assert {k: tr["reward"] for k, tr in trs.items()} == {"ins": 1.0, "upd": 1.0, "q": 1.0}
    q = tasks[2]
    sql = "SELECT 2nd, Größe FROM 1987_results WHERE $prize > 5 AND 1987_results.1st_place = 'ann'"
    assert sql_rows(backend, q, sql) == "[('Bo', '1.80')]"
    # an unknown name is an error on both engines (SQLite must not read it as a string)
    for unknown in ("SELECT `nope` FROM 1987_results", "SELECT 3rd FROM 1987_results"):
        assert sql_rows(backend, q, unknown).startswith("1054 (42S22): Unknown column"), unknown


# MySQL's unquoted identifier characters: ASCII letters, digits, _, $ and U+0080..U+FFFF (here
# without surrogates). A leading _, $ or non-ASCII character after optional digits keeps the
# name from being a keyword or a number.
_EXTENDED = "\u0080-\ud7ff\ue000-\uffff"
mysql_identifiers = st.from_regex(
    rf"\A[0-9]{{0,3}}[_$\u00c0-\u024f{_EXTENDED}][0-9A-Za-z_${_EXTENDED}]{{0,12}}\Z"
)


@settings(max_examples=150, deadline=None)
@given(table=mysql_identifiers, column=mysql_identifiers)
def test_every_unquoted_mysql_identifier_works_on_sqlite(table, column):
    """The class, not the example: any name MySQL reads unquoted is one identifier token and
    SQLite runs statements that use it bare."""
    assert [t.kind for t in tokenize(f"{table}.{column}")] == ["word", "op", "word"]
    task = DBTask("h", "d", "", table, (column, "Other"), (("v", "w"),), "other", ("v",))
    db = SQLiteBackend().open(task.table_spec())
    try:
        assert db.execute(f"INSERT INTO {table} ({column}, Other) VALUES ('u', 'x')").error is False
        res = db.execute(f"SELECT {table}.{column} FROM {table} WHERE {column} <> 'u'")
        assert res.text == "[('v',)]", (to_sqlite(f"SELECT {column} FROM {table}"), res.text)
        assert db.execute(f"UPDATE {table} SET {column} = 'z' WHERE Other = 'x'").error is False
        assert db.execute(f"SELECT COUNT(*) FROM {table} WHERE {column} = 'z'").text == "[(1,)]"
    finally:
        db.close()


# -- values, answers, NULLs, numeric strings, hash -------------------------------------------


def test_json_values_stored_as_mysql_stores_them():
    """AgentBench sends row values through the MySQL connector as literals into TEXT columns."""
    cases = {True: "1", False: "0", 7: "7", -3: "-3", 2.5: "2.5", 100.0: "100.0",
             1e20: "1e20", 1.5e-07: "0.00000015", -2.5e-20: "-2.5e-20", 0.1 + 0.2: "0.30000000000000004", None: None,
             float("nan"): None,
             "  spaced ": "  spaced "}  # fmt: skip
    assert {k: mysql_text(k) for k in cases} == cases


@pytest.mark.mysql
def test_json_values_match_the_server(mariadb_params):  # noqa: F811
    """The server stores the literals AgentBench's connector writes (bool -> 1/0, int and float
    -> str(value)) as :func:`mysql_text` predicts."""
    values = [
        True,
        False,
        7,
        -3,
        2.5,
        100.0,
        1e20,
        1.5e-07,
        1e16,
        0.1 + 0.2,
        12345678901234567890,
        -2.5e-8,
        1e-15,
        1.2345678e-16,
        1.2345678901234567e-10,
        1.5e17,
    ]
    literals = ", ".join(
        f"({k}, {int(v) if isinstance(v, bool) else v})" for k, v in enumerate(values)
    )
    conn = pymysql.connect(**mariadb_params.connect_args(), autocommit=True)  # the admin
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS cmat_ep_values")
            cur.execute("CREATE TABLE IF NOT EXISTS cmat_ep_values.v (k INT, x TEXT)")
            cur.execute(f"INSERT INTO cmat_ep_values.v VALUES {literals}")  # one INSERT, as there
            cur.execute("SELECT x FROM cmat_ep_values.v ORDER BY k")
            stored = [r[0] for r in cur.fetchall()]
            cur.execute("DROP DATABASE cmat_ep_values")
    finally:
        conn.close()
    assert stored == [mysql_text(v) for v in values]


def test_answers_compared_as_agentbench_compares_them():
    """AgentBench: ``list(eval(answer))`` (else ``[answer]``); one value each -> float equality
    when both parse, else exact string equality; otherwise set equality."""
    assert answer_correct(' ["7.00"]', ["7"]) and answer_correct("[7]", ["7.0"])
    assert answer_correct('["1e3"]', ["1000"])  # numeric strings compare as floats
    assert not answer_correct('["1,000"]', ["1000"])  # float('1,000') fails -> strings
    assert not answer_correct('["Otters "]', ["Otters"])  # no whitespace trimming
    assert not answer_correct('["otters"]', ["Otters"])  # case-sensitive
    assert not answer_correct('["None"]', ["none"]) and not answer_correct("[None]", ["none"])
    assert answer_correct("[None]", [None])  # a JSON null label equals a Python None answer
    assert answer_correct('["a", "a", "b"]', ["b", "a"])  # several values: sets
    assert not answer_correct("[1, 2]", ["1", "2"])  # sets keep types
    assert not answer_correct('["nan"]', ["nan"])  # float('nan') != float('nan')
    assert answer_correct("  ['x']", ["x"]) and answer_correct("x", ["x"])  # spaces; no list


def test_observations_and_hash_agree_across_backends(backend):
    """The observation text AgentBench's connector prints, and the table hash after a change."""
    task = DBTask("o", "d", "", "Scorers", tuple(COLUMNS), tuple(map(tuple, FULL_ROWS)),
                  "UPDATE", ("",), "")  # fmt: skip
    db = backend.open(task.table_spec())
    try:
        expected = {
            "SELECT COUNT(*) FROM Scorers": "[(3,)]",
            "SELECT SUM(Goals) FROM Scorers": "[(22.0,)]",  # TEXT summed as doubles
            "SELECT MAX(Goals) FROM Scorers": "[('7',)]",  # TEXT compared as text
            "SELECT Club FROM Scorers WHERE Player = 'CY'": "[(None,)]",  # NULL, ci compare
            "SELECT Player FROM Scorers WHERE Goals > 5 ORDER BY Goals + 0": "[('Bo',), ('Ann',)]",
            "SELECT Player FROM Scorers WHERE Goals = 12.0": "[('Ann',)]",  # numeric compare
            "SELECT Player FROM Scorers WHERE Goals = '12.0'": "[]",  # string compare
            "SELECT Player FROM Scorers WHERE Club = 'herons '": "[]",  # NO PAD, as MySQL 8
            "SELECT Player FROM Scorers WHERE Club = 'ÓTTERS'": "[('Bo',)]",  # ai, ci
            "UPDATE Scorers SET Club = NULL WHERE Player = 'Ann'": "[]",
        }
        assert {sql: db.execute(sql).text for sql in expected} == expected
        rows = [("Ann", "12", None), ("Bo", "7", "Otters"), ("Cy", "3", None)]
        assert db.table_hash() == mysql_table_hash(rows)  # concat_ws skips NULLs
        db.execute("DELETE FROM Scorers")
        assert db.table_hash() == "[(None,)]"  # md5(NULL) of an empty table
    finally:
        db.close()


def test_table_names_are_case_sensitive_as_on_agentbench_mysql(backend):
    """AgentBench's MySQL runs on Linux (``lower_case_table_names=0``): a table name must match
    exactly, while column names and aliases match in any case."""
    task = DBTask("c", "d", "", "Scorers", tuple(COLUMNS), tuple(map(tuple, FULL_ROWS)),
                  "other", ("3",))  # fmt: skip
    db = backend.open(task.table_spec())
    try:
        for sql in (
            "SELECT COUNT(*) FROM scorers",
            "SELECT * FROM Scorers a, SCORERS b",
            "UPDATE scorers SET Goals = '0'",
            "INSERT INTO scorers (Player) VALUES ('x')",
            "DELETE FROM `scorers`",
            "SELECT Player FROM Scorers WHERE Goals IN (SELECT Goals FROM scorers)",
        ):
            assert db.execute(sql).text.startswith("1146 (42S02): Table"), sql
        assert db.execute("SELECT scorers.goals FROM Scorers").error  # a qualifier, too
        ok = [
            "SELECT COUNT(*) FROM Scorers",
            "SELECT scorers.GOALS FROM Scorers scorers WHERE scorers.player = 'Ann'",
            "SELECT s.goals FROM Scorers AS s WHERE s.PLAYER = 'Ann'",
            "SELECT COUNT(*) AS scorers FROM Scorers",
        ]
        assert [db.execute(sql).text for sql in ok] == [
            "[(3,)]",
            "[('12',)]",
            "[('12',)]",
            "[(3,)]",
        ]
        assert db.table_hash() == mysql_table_hash([tuple(r) for r in FULL_ROWS])  # unchanged
    finally:
        db.close()


def test_unknown_type_is_a_query_counted_in_select(tmp_path):
    """AgentBench runs any ``type``: not INSERT/DELETE/UPDATE -> compared with ``label`` and
    counted in SELECT_accuracy only; a mutation item needs no ``label`` (only ``answer_md5``)."""
    no_label = record(
        "DELETE",
        "Scorers",
        COLUMNS,
        FULL_ROWS,
        item_id="n",
        answer_md5=mysql_table_hash([tuple(r) for r in FULL_ROWS]),
    )
    del no_label["label"]
    path = write_items(tmp_path / "types.jsonl", [
        record("JOIN", "Scorers", COLUMNS, FULL_ROWS, label=["Ann"], item_id="j"),
        record("DELETE", "Scorers", COLUMNS, FULL_ROWS, label=["DELETE FROM Scorers"],
               answer_md5="[(None,)]", item_id="d"),
        no_label,
    ])  # fmt: skip
    with pytest.warns(DBBenchDataWarning, match="unknown task 'type' 'JOIN'"):
        tasks = load_tasks(path)
    assert tasks[2].label == ()
    trs = episodes(tasks, oracle_agent(tasks), SQLiteBackend())
    m = dbbench_metrics(tr["output"] for tr in trs.values())
    assert {k: tr["reward"] for k, tr in trs.items()} == {"j": 1.0, "d": 1.0, "n": 1.0}
    assert m["SELECT_accuracy"] == 1.0
    assert m["overall_cat_accuracy"] == pytest.approx(1 / 3)  # no INSERT / UPDATE items
