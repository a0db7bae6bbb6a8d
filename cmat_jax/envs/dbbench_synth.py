"""Synthetic DBBench tasks with gold answers, and a scripted expert that solves them.

``generate_task(seed, index)`` draws a random table from one of many invented domains (every
column TEXT, as in AgentBench) and a natural-language task of one DBBench type (INSERT, UPDATE,
other, counting, comparison, ranking, aggregation-SUM/MIN/MAX/AVG) with varied phrasings. Gold
answers come from executing the gold SQL on the sandboxed SQLite backend: the label list for
query types, ``answer_md5`` (the AgentBench table hash after the statement) for INSERT/UPDATE.
Everything is a pure function of ``(seed, index)``.

The scripted expert writes a correct trajectory in the action grammar: sometimes it looks up the
schema first, sometimes it makes a deliberate mistake (a wrong column name, a missing backtick
quote, a wrong table name), reads the error and recovers; after a change it sometimes checks the
row. :func:`write_sft_jsonl` runs those trajectories through :class:`DBBenchEnv` (so every
observation is real) and writes OpenAI ``messages`` JSONL for the SFT trainer;
:func:`write_tasks_jsonl` writes task records in the AgentBench JSONL schema.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import random
import re
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cmat_jax.envs.dbbench import QUERY_TYPES, DBBenchEnv, DBTask
from cmat_jax.envs.dbbench_synth_domains import (
    DOMAINS,
    EXTRA_COLUMNS,
    LEAD_HEADERS,
    NAME_HEADS,
    NAME_TOPICS,
    TABLE_QUALIFIERS,
    TOWNS,
    Column,
    Domain,
    header_style,
    person,
    person_intl,
    with_blanks,
    year_columns,
)
from cmat_jax.envs.sql_backend import ExecResult
from cmat_jax.envs.sqlite_backend import SQLiteBackend

TASK_TYPES = ("INSERT", "UPDATE", *QUERY_TYPES)
# One in five tasks changes the table, one in five is a plain lookup; the rest spread over the
# query types (AgentBench's DB split is roughly balanced between mutations and queries).
_TYPE_WEIGHTS = (4, 4, 4, 2, 2, 2, 1, 1, 1, 1)
# Share of tables named from words unrelated to their domain (see _general_table_name).
GENERAL_NAME_SHARE = 0.4
_BACKEND = SQLiteBackend(time_limit_s=10.0)


class SynthError(RuntimeError):
    """A draw could not produce a valid task (retried with the next sub-seed)."""


@dataclasses.dataclass(frozen=True)
class SynthTask:
    """A generated task plus what the scripted expert needs to solve it."""

    task: DBTask
    gold_sql: str
    key_column: str
    key_value: str | None  # the row a lookup/UPDATE/INSERT is about (for checks)
    # a statement a careful agent tries first and then corrects (an exact match for a name the
    # question gives only in part, which finds no row)
    first_try: str | None = None

    def to_record(self) -> dict[str, Any]:
        rec = self.task.to_record()
        rec["sql"] = {"query": self.gold_sql}
        rec["source"] = "cmat_jax.dbbench_synth"
        return rec


# -- helpers ---------------------------------------------------------------------------------


def q(name: str) -> str:
    """Backtick-quote an identifier for the agent's MySQL."""
    return "`" + name.replace("`", "``") + "`"


def lit(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _table_name(rng: random.Random, domain: Domain) -> str:
    if rng.random() < GENERAL_NAME_SHARE:
        base = _general_table_name(rng)
    else:
        base = rng.choice(domain.tables) + rng.choice(TABLE_QUALIFIERS)
    style = rng.random()
    if style < 0.5:
        return base
    words = re.sub(r"[^0-9A-Za-z ]", "", base).split()
    if style < 0.7:
        return "_".join(w.lower() for w in words)
    if style < 0.85:
        return "_".join(words)
    return "".join(w[:1].upper() + w[1:] for w in words)


def _general_table_name(rng: random.Random) -> str:
    """A table name from words unrelated to the table's domain ("Rugby Fixtures 1998-99",
    "Lighthouse Keepers of Varnholm"): it can only be written by copying it from the task."""
    topic, head = rng.choice(NAME_TOPICS), rng.choice(NAME_HEADS)
    year = rng.randint(1950, 2023)
    pattern = rng.randrange(5)
    if pattern == 0:
        return f"{topic} {head}"
    if pattern == 1:
        return f"{topic} {head} " + rng.choice(
            (f"{year}", f"({year})", f"{year}–{(year + 1) % 100:02d}")
        )
    if pattern == 2:
        return f"{head} of {rng.choice(TOWNS)}"
    if pattern == 3:
        return f"{topic} {head} in {rng.choice(TOWNS)}"
    return f"{rng.choice(TOWNS)} {topic} {head}"


def _unique_values(rng: random.Random, col: Column, n: int) -> list[str]:
    seen: list[str] = []
    tries = 0
    while len(seen) < n:
        v = col.make(rng)
        tries += 1
        if v in seen:
            if tries > 40 * n:
                v = f"{v} {len(seen) + 2}"
            else:
                continue
        seen.append(v)
    return seen


@dataclasses.dataclass
class _Table:
    name: str
    entity: str
    headers: list[str]
    roles: list[str]
    makers: list[Column]
    rows: list[list[str]]
    key: int = 0  # the column whose values are unique per row

    @property
    def key_header(self) -> str:
        return self.headers[self.key]

    def cols(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]

    def column(self, i: int) -> list[str]:
        return [r[i] for r in self.rows]


def _draw_table(rng: random.Random) -> _Table:
    domain = rng.choice(DOMAINS)
    key = [c for c in domain.columns if c.role == "key"]
    others = [c for c in domain.columns if c.role != "key"]
    nums = [c for c in others if c.role == "num"]
    cats = [c for c in others if c.role == "cat"]
    chosen = {id(rng.choice(nums)), id(rng.choice(cats))}
    extra = [c for c in others if id(c) not in chosen]
    rng.shuffle(extra)
    chosen |= {id(c) for c in extra[: rng.randint(1, len(extra))]}
    cols = key + [c for c in others if id(c) in chosen]
    n_rows = rng.randint(8, 26)
    values = [
        _unique_values(rng, c, n_rows) if c.role == "key" else [c.make(rng) for _ in range(n_rows)]
        for c in cols
    ]
    return _Table(
        name=_table_name(rng, domain),
        entity=domain.entity,
        headers=[rng.choice(c.names) for c in cols],
        roles=[c.role for c in cols],
        makers=cols,
        rows=[list(r) for r in zip(*values, strict=True)],
    )


def _run(table: _Table, sql: str) -> tuple[ExecResult, Any]:
    """Execute gold SQL on a fresh sandboxed copy of the table; return (result, episode db)."""
    spec_task = _db_task(table, "other", "", "", (), None, "x")
    db = _BACKEND.open(spec_task.table_spec())
    res = db.execute(sql)
    if res.error:
        db.close()
        raise SynthError(f"gold SQL failed: {res.text} :: {sql}")
    return res, db


def _table_hash(table: _Table) -> str:
    """AgentBench's hash of the table as drawn (before any change)."""
    db = _BACKEND.open(_db_task(table, "other", "", "", (), None, "x").table_spec())
    try:
        return db.table_hash()
    finally:
        db.close()


def _db_task(
    table: _Table,
    typ: str,
    desc: str,
    add: str,
    label: tuple[Any, ...],
    md5: str | None,
    task_id: str,
) -> DBTask:
    return DBTask(
        task_id=task_id,
        description=desc,
        add_description=add,
        table_name=table.name,
        columns=tuple(table.headers),
        rows=tuple(tuple(r) for r in table.rows),
        type=typ,
        label=label,
        answer_md5=md5,
    )


def _add_description(rng: random.Random, table: _Table) -> str:
    cols = ", ".join(table.headers)
    return rng.choice(
        (
            f"The table is called {table.name} and its columns are {cols}.",
            f"Table name: {table.name}. Column headers: {cols}.",
            f"You are working on the table {table.name}, whose headers are {cols}.",
            f"Use the table {table.name}; it has the columns {cols}.",
        )
    )


def _fmt(v: Any) -> str:
    return str(v)


def _num(v: str) -> float:
    return float(v)


# -- task builders: each returns (description, gold_sql, key_value) ---------------------------


def _pick_unique_row(rng: random.Random, t: _Table) -> int:
    return rng.randrange(len(t.rows))


def _other(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    k = 0
    a = rng.choice([i for i in range(1, len(t.headers))])
    r = _pick_unique_row(rng, t)
    K, A, v = t.headers[k], t.headers[a], t.rows[r][k]
    desc = rng.choice(
        (
            f"What is the {A} for the {K} {v}?",
            f"Tell me the {A} recorded for {v}.",
            f"Look up {v} and report its {A}.",
            f"Which {A} belongs to the entry whose {K} is '{v}'?",
            f"Find the value of {A} where {K} equals {v}.",
            f"For {v}, what does the {A} column say?",
        )
    )
    return desc, f"SELECT {q(A)} FROM {q(t.name)} WHERE {q(K)} = {lit(v)}", v


def _counting(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    if rng.random() < 0.65:
        c = rng.choice(t.cols("cat"))
        C, v = t.headers[c], rng.choice(t.column(c))
        desc = rng.choice(
            (
                f"How many {t.entity} have {C} equal to {v}?",
                f"Count the {t.entity} whose {C} is {v}.",
                f"What is the number of rows with {C} '{v}'?",
                f"How many entries list {v} as their {C}?",
            )
        )
        return desc, f"SELECT COUNT(*) FROM {q(t.name)} WHERE {q(C)} = {lit(v)}", None
    n = rng.choice(t.cols("num"))
    N, x = t.headers[n], rng.choice(t.column(n))
    above = rng.random() < 0.5
    op, word = (">", rng.choice(("above", "greater than", "more than"))) if above else (
        "<", rng.choice(("below", "less than", "under")))  # fmt: skip
    desc = rng.choice(
        (
            f"How many {t.entity} have a {N} {word} {x}?",
            f"Count the rows whose {N} is {word} {x}.",
        )
    )
    return desc, f"SELECT COUNT(*) FROM {q(t.name)} WHERE {q(N)} {op} {x}", None


def _comparison(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    n = rng.choice(t.cols("num"))
    N = t.headers[n]
    K = t.headers[0]
    vals = sorted(_num(v) for v in t.column(n))
    greater = rng.random() < 0.5
    # a threshold that keeps between 1 and ~5 rows
    idx = rng.randint(max(len(vals) - 6, 0), len(vals) - 2) if greater else rng.randint(1, 5)
    x = t.column(n)[[_num(v) for v in t.column(n)].index(vals[idx])]
    op = ">" if greater else "<"
    word = rng.choice(("greater than", "higher than", "above")) if greater else rng.choice(
        ("less than", "lower than", "below"))  # fmt: skip
    where = f"{q(N)} {op} {x}"
    extra = ""
    if rng.random() < 0.3:
        c = rng.choice(t.cols("cat"))
        v = rng.choice(t.column(c))
        where += f" AND {q(t.headers[c])} = {lit(v)}"
        extra = f" and a {t.headers[c]} of {v}"
    desc = rng.choice(
        (
            f"Which {K} values have a {N} {word} {x}{extra}?",
            f"List every {K} whose {N} is {word} {x}{extra}.",
            f"Give the {K} of all {t.entity} with {N} {word} {x}{extra}.",
        )
    )
    return desc, f"SELECT {q(K)} FROM {q(t.name)} WHERE {where}", None


def _ranking(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    n = rng.choice(t.cols("num"))
    N, K = t.headers[n], t.headers[0]
    high = rng.random() < 0.5
    order = "DESC" if high else "ASC"
    word = rng.choice(("highest", "largest", "greatest")) if high else rng.choice(
        ("lowest", "smallest", "least"))  # fmt: skip
    desc = rng.choice(
        (
            f"Which {K} has the {word} {N}?",
            f"Name the {K} with the {word} {N}.",
            f"Among all {t.entity}, which one has the {word} {N}? Give its {K}.",
        )
    )
    sql = f"SELECT {q(K)} FROM {q(t.name)} ORDER BY {q(N)} + 0 {order} LIMIT 1"
    vals = sorted((_num(v) for v in t.column(n)), reverse=high)
    if len(vals) > 1 and vals[0] == vals[1]:
        raise SynthError("tie at the top")
    return desc, sql, None


def _aggregation(kind: str):
    def build(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
        n = rng.choice(t.cols("num"))
        N = t.headers[n]
        where, cond = "", ""
        if rng.random() < 0.6:
            c = rng.choice(t.cols("cat"))
            v = rng.choice(t.column(c))
            where = f" WHERE {q(t.headers[c])} = {lit(v)}"
            cond = rng.choice((f" for {t.entity} whose {t.headers[c]} is {v}",
                               f" among rows with {t.headers[c]} {v}"))  # fmt: skip
        words = {
            "SUM": ("total", "sum of the", "combined"),
            "AVG": ("average", "mean"),
            "MIN": ("smallest", "minimum", "lowest"),
            "MAX": ("largest", "maximum", "highest"),
        }[kind]
        w = rng.choice(words)
        desc = rng.choice((f"What is the {w} {N}{cond}?", f"Compute the {w} {N}{cond}."))
        if kind == "SUM":
            expr = f"SUM({q(N)})"
        elif kind == "AVG":
            expr = f"ROUND(AVG({q(N)}), 2)"
            desc = desc.rstrip("?.") + ", rounded to two decimals?"
        else:
            expr = f"{kind}({q(N)} + 0)"
        return desc, f"SELECT {expr} FROM {q(t.name)}{where}", None

    return build


def _insert(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    existing = set(t.column(0))
    key = next(v for v in (t.makers[0].make(rng) for _ in range(200)) if v not in existing)
    values = [key] + [c.make(rng) for c in t.makers[1:]]
    cols = list(range(len(t.headers)))
    if rng.random() < 0.2 and len(cols) > 3:  # leave one non-key column empty (NULL)
        cols.pop(rng.randrange(1, len(cols)))
    pairs = [(t.headers[i], values[i]) for i in cols]
    listing = ", ".join(f"{h} {v}" for h, v in pairs[1:])
    desc = rng.choice(
        (
            f"Add a new row to {t.name} for {key}: {listing}.",
            f"Insert {key} into the {t.name} table with "
            + ", ".join(f"{h} set to '{v}'" for h, v in pairs[1:])
            + ".",
            f"Record a new entry with {pairs[0][0]} {key}; its values are {listing}.",
            f"Please store this new record in {t.name}: "
            + "; ".join(f"{h} = {v}" for h, v in pairs)
            + ".",
        )
    )
    sql = (
        f"INSERT INTO {q(t.name)} ({', '.join(q(h) for h, _ in pairs)}) "
        f"VALUES ({', '.join(lit(v) for _, v in pairs)})"
    )
    return desc, sql, key


def _update(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    a = rng.randrange(1, len(t.headers))
    A = t.headers[a]
    if rng.random() < 0.25 and t.cols("cat"):
        c = rng.choice(t.cols("cat"))
        C, v = t.headers[c], rng.choice(t.column(c))
        new = t.makers[a].make(rng)
        if all(r[a] == new for r in t.rows if r[c] == v):
            raise SynthError("update changes nothing")
        desc = rng.choice(
            (
                f"Set the {A} to {new} for every row whose {C} is {v}.",
                f"For all {t.entity} with {C} {v}, change {A} to '{new}'.",
            )
        )
        return desc, f"UPDATE {q(t.name)} SET {q(A)} = {lit(new)} WHERE {q(C)} = {lit(v)}", None
    r = rng.randrange(len(t.rows))
    K, key = t.headers[0], t.rows[r][0]
    new = next(v for v in (t.makers[a].make(rng) for _ in range(50)) if v != t.rows[r][a])
    desc = rng.choice(
        (
            f"Change the {A} of {key} to {new}.",
            f"Update the {t.name} table so that {key} has {A} '{new}'.",
            f"The {A} for {K} {key} is now {new}; update the table.",
            f"Correct the record of {key}: its {A} should be {new}.",
        )
    )
    return desc, f"UPDATE {q(t.name)} SET {q(A)} = {lit(new)} WHERE {q(K)} = {lit(key)}", key


def _wikisql_lookup(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    """A question in the phrasing of WikiSQL (most of AgentBench DB's query items): one
    column asked for under one to three conditions, "What is the A when the C is v?", "Which A
    has a C of v, and a N smaller than x?"; values sometimes lower-cased, as WikiSQL's
    questions often are (the table comparison is case-insensitive, like MySQL's)."""
    a = rng.randrange(len(t.headers))
    A = t.headers[a]
    eq_cols = [i for i in range(len(t.headers)) if i != a and t.roles[i] in ("key", "cat")]
    num_cols = [i for i in t.cols("num") if i != a]
    if not eq_cols:
        raise SynthError("no column to filter on")
    conds: list[tuple[str, str, str]] = []  # (sql, phrase with 'a', phrase with 'the')
    c = rng.choice(eq_cols)
    r = rng.randrange(len(t.rows))
    v = t.rows[r][c]
    shown = v.lower() if rng.random() < 0.35 else v
    C = t.headers[c]
    conds.append((f"{q(C)} = {lit(shown)}", f"a {C} of {shown}", f"the {C} is {shown}"))
    if num_cols and rng.random() < 0.55:
        n = rng.choice(num_cols)
        N, x = t.headers[n], t.rows[r][n]
        up = rng.random() < 0.5
        shift = 1 if up else -1  # a bound the chosen row satisfies
        bound = str(int(_num(x)) - shift) if "." not in x else str(round(_num(x) - shift, 2))
        word = rng.choice(("smaller than", "less than", "lower than")) if not up else rng.choice(
            ("larger than", "greater than", "bigger than", "more than"))  # fmt: skip
        op = ">" if up else "<"
        conds.append(
            (f"{q(N)} {op} {bound}", f"a {N} {word} {bound}", f"the {N} is {word} {bound}")
        )
    others = [i for i in eq_cols if i != c]
    if others and rng.random() < 0.3:
        c2 = rng.choice(others)
        C2, v2 = t.headers[c2], t.rows[r][c2]
        conds.append((f"{q(C2)} = {lit(v2)}", f"a {C2} of {v2}", f"the {C2} is {v2}"))
    rng.shuffle(conds)
    with_a = ", and ".join(p for _, p, _ in conds)
    with_the = " and ".join(p for _, _, p in conds)
    bare = with_a[2:]  # "C of v, and a N smaller than x"
    desc = rng.choice(
        (
            f"What is the {A} when {with_the}?",
            f"Which {A} has {with_a}?",
            f"What {A} has {with_a}?",
            f"Name the {A} for {bare}.",
            f"{bare[0].upper()}{bare[1:]} has what {A}?",
            f"Tell me the {A} for {with_the}.",
        )
    )
    where = " AND ".join(sql for sql, _, _ in conds)
    return desc, f"SELECT {q(A)} FROM {q(t.name)} WHERE {where}", None


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _quoter(rng: random.Random) -> Callable[[str], str]:
    """Values shown in quotes or bare, one draw per task (AgentBench's items do both)."""
    quoted = rng.random() < 0.5
    return lambda v: f"'{v}'" if quoted else v


def _wikisql_insert(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    """An INSERT told the way AgentBench's DB items tell it: every value named beside its
    column ("with the values of wins 9, draws 2"), the columns and values as two lists
    ("..., which are '33', 'USC', respectively"), or a statement of fact with no verb of
    inserting at all ("K, with A x and B y, is a new entry in T."). The gold SQL is MySQL's
    assignment form ``INSERT INTO t SET a = x, ...``: each value beside its column, which a
    small model copies more reliably than two parallel lists."""
    existing = set(t.column(0))
    key = next(v for v in (t.makers[0].make(rng) for _ in range(200)) if v not in existing)
    values = [key] + [c.make(rng) for c in t.makers[1:]]
    cols = list(range(len(t.headers)))
    if rng.random() < 0.15 and len(cols) > 3:  # leave one non-key column empty (NULL)
        cols.pop(rng.randrange(1, len(cols)))
    pairs = [(t.headers[i], values[i]) for i in cols]
    rest = pairs[1:]
    K = pairs[0][0]
    v_ = _quoter(rng)
    desc = rng.choice(
        (
            f"Insert a new record into the '{t.name}' table with the values of "
            + _and_list([f"{h.lower()} {v_(v)}" for h, v in pairs])
            + ".",
            f"Insert into the '{t.name}' table the values for "
            + _and_list([h for h, _ in pairs])
            + ", which are "
            + _and_list([f"'{v}'" for _, v in pairs])
            + ", respectively.",
            f"Insert into table '{t.name}'. "
            + "The value "
            + _and_list([f"for column '{h}' is '{v}'" for h, v in pairs])
            + ".",
            f"Insert {v_(key)} into '{t.name}' with values "
            + _and_list([f"'{v}' for '{h}'" for h, v in rest])
            + ".",
            f"{key}, with "
            + _and_list([f"{h} {v}" for h, v in rest])
            + f", is a new entry in the {t.name} table.",
            f"The {t.name} table gets a new row for {K} {key}: "
            + _and_list([f"{h} is {v_(v)}" for h, v in rest])
            + ".",
            f"Record that {key} has "
            + _and_list([f"a {h} of {v}" for h, v in rest])
            + f" in {t.name}.",
        )
    )
    sql = f"INSERT INTO {q(t.name)} SET " + ", ".join(f"{q(h)} = {lit(v)}" for h, v in pairs)
    return desc, sql, key


def _wikisql_update(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    """An UPDATE of one to three columns of one row, phrased like AgentBench's DB items ("set
    the Affiliation as 'Red Sox' and Manager as 'Bill Belichick'", "has been updated with an E
    Score of 7.400 and a total of 22.950")."""
    r = rng.randrange(len(t.rows))
    K, key = t.headers[0], t.rows[r][0]
    n_set = min(rng.choice((1, 2, 2, 3, 3)), len(t.headers) - 1)
    targets = sorted(rng.sample(range(1, len(t.headers)), n_set))
    pairs: list[tuple[str, str]] = []
    for a in targets:
        new = next(v for v in (t.makers[a].make(rng) for _ in range(50)) if v != t.rows[r][a])
        pairs.append((t.headers[a], new))
    v_ = _quoter(rng)
    desc = rng.choice(
        (
            f"Update the {t.name} table by setting "
            + _and_list([f"the {h} to {v_(v)}" for h, v in pairs])
            + f" where the {K} is {v_(key)}.",
            f"For the {K} {key}, update the {t.name} table to set "
            + _and_list([f"{h} as {v_(v)}" for h, v in pairs])
            + ".",
            f"In the '{t.name}' table, change "
            + _and_list([f"the '{h}' value to '{v}'" for h, v in pairs])
            + f" for the entry with '{K}' equal to '{key}'.",
            f"The {t.name} record for {key} has been updated with "
            + _and_list([f"a {h} of {v}" for h, v in pairs])
            + ".",
            f"Update the {t.name} so that {key} has "
            + _and_list([f"{v_(v)} as its {h}" for h, v in pairs])
            + ".",
            "Set " + _and_list([f"{h} to {v_(v)}" for h, v in pairs]) + f" for {key}.",
        )
    )
    where = f"{q(K)} = {lit(key)}"
    others = [i for i in range(1, len(t.headers)) if i not in targets and t.roles[i] != "text"]
    if others and rng.random() < 0.3:  # a second condition on the same row ("...and the year")
        c = rng.choice(others)
        C, v = t.headers[c], t.rows[r][c]
        where += f" AND {q(C)} = {lit(v)}"
        desc = desc.rstrip(".") + rng.choice((f", where the {C} is {v}.", f" (its {C} is {v})."))
    sets = ", ".join(f"{q(h)} = {lit(v)}" for h, v in pairs)
    return desc, f"UPDATE {q(t.name)} SET {sets} WHERE {where}", key


# -- benchmark-shaped tasks ------------------------------------------------------------------
# AgentBench DB's own mix (its data files and paper): one third INSERT, one third UPDATE, one
# third questions over WikiSQL / WikiTableQuestions tables, most asked WikiSQL-style ("What is
# the A when the C is v?") under one to three conditions, the rest in lower-case
# WikiTableQuestions style; answers are one value or a list of values. The builders below cover
# each question type with the SQL it needs (conditions joined by AND / OR / IN, comparisons on
# numbers stored as TEXT, ORDER BY ... LIMIT / OFFSET, COUNT(DISTINCT), GROUP BY, scalar
# subqueries), on tables drawn by `_draw_bench_table`.

BENCH_TYPE_WEIGHTS = {
    "INSERT": 23,
    "UPDATE": 23,
    "other": 5,
    "comparison": 4,
    "counting": 3,
    "ranking": 3,
    "aggregation-SUM": 2,
    "aggregation-MIN": 2,
    "aggregation-MAX": 2,
    "aggregation-AVG": 2,
}


def agentbench_add_description(name: str, headers: list[str] | tuple[str, ...]) -> str:
    """The table line every AgentBench DB item carries (its fixed wording)."""
    return (
        f"The name of this table is {name}, and the headers of this table are {','.join(headers)}."
    )


def _bench_table_name(rng: random.Random, domain: Domain) -> str:
    """Like `_table_name`, plus names that begin with a year ("1987 Rugby Results",
    "2004_chess_winners"): MySQL takes those unquoted, so agents meet them in the benchmark."""
    name = _table_name(rng, domain)
    if rng.random() < 0.05:
        year = str(rng.randint(1950, 2023))
        sep = "_" if "_" in name else " "
        name = year + sep + (name.lower() if sep == "_" else name)
    return name


def _draw_bench_table(rng: random.Random) -> _Table:
    domain = rng.choice(DOMAINS)
    key_col = next(c for c in domain.columns if c.role == "key")
    others = [c for c in domain.columns if c.role != "key"]
    must = [rng.choice([c for c in others if c.role == "num"])]
    must.append(rng.choice([c for c in others if c.role == "cat"]))
    rest = [c for c in others if c not in must]
    rng.shuffle(rest)
    body = must + rest[: rng.randint(0, len(rest))]
    extras = rng.sample(EXTRA_COLUMNS, rng.choice((0, 1, 1, 2, 2, 3)))
    if rng.random() < 0.12:
        extras += year_columns(rng)
    rng.shuffle(body)
    cols = [key_col, *body]
    lead = [c for c in extras if c.names[0] in LEAD_HEADERS]
    tail = [c for c in extras if c not in lead]
    cols = (lead + cols if rng.random() < 0.7 else cols + lead) + tail
    style = header_style(rng)
    headers, seen, kept = [], set(), []
    for c in cols:
        h = style(rng.choice(c.names))
        if h.lower() in seen:  # an extra column named like a domain column
            continue
        seen.add(h.lower())
        headers.append(h)
        kept.append(c)
    blank = rng.choice((0.0, 0.0, 0.05, 0.12))
    makers = [
        dataclasses.replace(
            c,
            make=with_blanks(person_intl if c.make is person else c.make, blank)
            if c.role == "text"
            else (person_intl if c.make is person else c.make),
        )
        for c in kept
    ]
    u = rng.random()
    n_rows = (
        rng.randint(12, 30) if u < 0.7 else rng.randint(31, 45) if u < 0.93 else rng.randint(46, 70)
    )
    values = [
        _unique_values(rng, c, n_rows) if c.role == "key" else [c.make(rng) for _ in range(n_rows)]
        for c in makers
    ]
    return _Table(
        name=_bench_table_name(rng, domain),
        entity=domain.entity,
        headers=headers,
        roles=[c.role for c in makers],
        makers=makers,
        rows=[list(r) for r in zip(*values, strict=True)],
        key=kept.index(key_col),
    )


@dataclasses.dataclass(frozen=True)
class _Cond:
    """One WHERE condition and two ways of saying it: "a Club of Falkirk" / "the Club is
    Falkirk"."""

    sql: str
    a: str
    the: str


def _filled(value: str) -> bool:
    return value.strip() not in PLACEHOLDER_CELLS


PLACEHOLDER_CELLS = {"", "—", "–", "-", "N/A", "n/a"}


def _shown(rng: random.Random, value: str) -> str:
    """The value as the question writes it: one time in three lower-cased, as WikiSQL's
    questions often are (MySQL compares case-insensitively)."""
    return value.lower() if rng.random() < 0.3 else value


def _eq_cond(rng: random.Random, t: _Table, c: int, value: str) -> _Cond:
    C, v = t.headers[c], _shown(rng, value)
    return _Cond(f"{q(C)} = {lit(v)}", f"a {C} of {v}", f"the {C} is {v}")


def _num_cond(rng: random.Random, t: _Table, n: int, value: str) -> _Cond:
    """A comparison that ``value`` (a cell of column ``n``) satisfies."""
    N, x = t.headers[n], _num(value)
    places = len(value.split(".")[1]) if "." in value else 0
    kind = rng.choices(("gt", "lt", "ge", "le"), weights=(7, 7, 3, 3))[0]
    step = 1 if places == 0 else 10**-places * rng.randint(1, 9)
    bound_v = x - step if kind == "gt" else x + step if kind == "lt" else x
    bound = f"{bound_v:.{places}f}"
    word, op = {
        "gt": (rng.choice(("larger than", "greater than", "more than", "over", "above")), ">"),
        "lt": (rng.choice(("smaller than", "less than", "fewer than", "under", "below")), "<"),
        "ge": (rng.choice(("at least", "no less than")), ">="),
        "le": (rng.choice(("at most", "no more than")), "<="),
    }[kind]
    return _Cond(f"{q(N)} {op} {bound}", f"a {N} {word} {bound}", f"the {N} is {word} {bound}")


def _like_cond(rng: random.Random, t: _Table, r: int, avoid: set[int]) -> _Cond:
    """A ``LIKE '%word%'`` condition on a word of a name in row ``r``."""
    cols = [i for i, role in enumerate(t.roles) if role in ("key", "text") and i not in avoid]
    words = [(i, w) for i in cols for w in re.findall(r"[A-Za-z]{4,}", t.rows[r][i])]
    if not words:
        raise SynthError("no word to match")
    i, w = rng.choice(words)
    C = t.headers[i]
    return _Cond(
        f"{q(C)} LIKE {lit('%' + w + '%')}",
        f"a {C} containing '{w}'",
        f"the {C} contains '{w}'",
    )


def _eq_columns(t: _Table, avoid: set[int]) -> list[int]:
    return [i for i, r in enumerate(t.roles) if r in ("key", "cat", "fmt") and i not in avoid]


def _num_columns(t: _Table, avoid: set[int]) -> list[int]:
    return [i for i, r in enumerate(t.roles) if r == "num" and i not in avoid]


def _row_conds(
    rng: random.Random, t: _Table, r: int, avoid: set[int], n_max: int = 3, numeric: bool = False
) -> list[_Cond]:
    """One to ``n_max`` conditions that row ``r`` meets: an equality first (or a comparison when
    ``numeric``), then maybe a comparison and another equality."""
    eq = [i for i in _eq_columns(t, avoid) if _filled(t.rows[r][i])]
    nums = [i for i in _num_columns(t, avoid) if _filled(t.rows[r][i])]
    conds: list[_Cond] = []
    used: set[int] = set()
    if numeric:
        if not nums:
            raise SynthError("no numeric column to compare")
        n = rng.choice(nums)
        conds.append(_num_cond(rng, t, n, t.rows[r][n]))
        used.add(n)
        if eq and rng.random() < 0.7:
            c = rng.choice(eq)
            conds.append(_eq_cond(rng, t, c, t.rows[r][c]))
            used.add(c)
    else:
        if not eq:
            raise SynthError("no column to filter on")
        c = rng.choice(eq)
        conds.append(_eq_cond(rng, t, c, t.rows[r][c]))
        used.add(c)
    while len(conds) < n_max and rng.random() < 0.4:
        pool = [i for i in eq + nums if i not in used]
        if not pool:
            break
        i = rng.choice(pool)
        used.add(i)
        make = _num_cond if i in nums else _eq_cond
        conds.append(make(rng, t, i, t.rows[r][i]))
    rng.shuffle(conds)
    return conds


def _where(conds: list[_Cond]) -> str:
    return " WHERE " + " AND ".join(c.sql for c in conds) if conds else ""


def _with_a(conds: list[_Cond]) -> str:
    return _and_list([c.a for c in conds])


def _with_the(conds: list[_Cond]) -> str:
    return _and_list([c.the for c in conds])


def _bare(conds: list[_Cond]) -> str:
    """ "Club of Falkirk and a Wins above 2" (the first "a " dropped)."""
    return _with_a(conds)[2:]


def _lower_q(text: str) -> str:
    """WikiTableQuestions style: all lower case."""
    return text[:1].lower() + text[1:]


def _fold(text: str) -> str:
    """Lower case without accents: how MySQL's default collation compares."""
    return "".join(
        c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c)
    )


def _partial_name(rng: random.Random, t: _Table, r: int, avoid: int) -> tuple[int, str]:
    """A word of a name in row ``r`` that no other row's name contains ("Castellan" for "Amara
    Castellan"): the way questions often name a row."""
    cols = [i for i, role in enumerate(t.roles) if role in ("key", "text") and i != avoid]
    for i in rng.sample(cols, len(cols)):
        words = [w for w in re.findall(r"[A-Za-z]{4,}", t.rows[r][i]) if w != t.rows[r][i]]
        rng.shuffle(words)
        for w in words:
            if sum(_fold(w) in _fold(row[i]) for row in t.rows) == 1:
                return i, w
    raise SynthError("no distinctive part of a name")


def _bench_partial_lookup(rng: random.Random, t: _Table, r: int, a: int) -> tuple:
    """A question that names its row by part of a value; the gold SQL matches it with LIKE
    and a careful agent's first, exact try finds nothing."""
    i, w = _partial_name(rng, t, r, a)
    A, T, C = t.headers[a], q(t.name), q(t.headers[i])
    desc = rng.choice(
        (
            f"What is the {A} of {w}?",
            _lower_q(f"What {A} does {w} have?"),
            f"Tell me the {A} for {w}.",
            f"{w} has what {A}?",
            _lower_q(f"Which {A} goes with {w}?"),
        )
    )
    gold = f"SELECT {q(A)} FROM {T} WHERE {C} LIKE {lit('%' + w + '%')}"
    return desc, gold, None, {"first_try": f"SELECT {q(A)} FROM {T} WHERE {C} = {lit(w)}"}


def _bench_other(rng: random.Random, t: _Table) -> tuple:
    r = rng.randrange(len(t.rows))
    a = rng.randrange(len(t.headers))
    A = t.headers[a]
    if rng.random() < 0.15:
        return _bench_partial_lookup(rng, t, r, a)
    conds = _row_conds(rng, t, r, {a})
    if rng.random() < 0.2:
        conds = [_like_cond(rng, t, r, {a})]
    distinct = rng.random() < 0.15
    sel = f"DISTINCT {q(A)}" if distinct else q(A)
    desc = rng.choice(
        (
            f"What is the {A} when {_with_the(conds)}?",
            f"Which {A} has {_with_a(conds)}?",
            f"Name the {A} for {_bare(conds)}.",
            f"{_bare(conds)[:1].upper()}{_bare(conds)[1:]} has what {A}?",
            f"Tell me the {A} for {_with_the(conds)}.",
            _lower_q(f"What {A} is listed when {_with_the(conds)}?"),
            _lower_q(f"Give the {A} of the entry with {_with_a(conds)}."),
            f"What are the {A} values for rows where {_with_the(conds)}?",
        )
    )
    if distinct:
        desc = rng.choice(
            (
                f"List the different {A} values among rows where {_with_the(conds)}.",
                _lower_q(f"What distinct {A} appear when {_with_the(conds)}?"),
            )
        )
    return desc, f"SELECT {sel} FROM {q(t.name)}{_where(conds)}", None


def _bench_counting(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    r = rng.randrange(len(t.rows))
    E, T = t.entity, q(t.name)
    mode = rng.random()
    if mode < 0.2:  # COUNT(DISTINCT c) over the table or a subset
        c = rng.choice([i for i in _eq_columns(t, {t.key}) if t.roles[i] == "cat"])
        C = t.headers[c]
        conds = _row_conds(rng, t, r, {c}, n_max=1) if rng.random() < 0.4 else []
        cond = f" when {_with_the(conds)}" if conds else ""
        desc = rng.choice(
            (
                f"How many different {C} values are there{cond}?",
                _lower_q(f"How many distinct {C} appear in the table{cond}?"),
                f"Count the unique {C} entries{cond}.",
            )
        )
        return desc, f"SELECT COUNT(DISTINCT {q(C)}) FROM {T}{_where(conds)}", None
    if mode < 0.35:  # two values of one column: IN / OR
        c = rng.choice([i for i in _eq_columns(t, set()) if t.roles[i] == "cat"])
        C = t.headers[c]
        vals = sorted({v for v in t.column(c) if _filled(v)})
        if len(vals) < 2:
            raise SynthError("one value only")
        v1, v2 = rng.sample(vals, 2)
        sql_cond = (
            f"{q(C)} IN ({lit(v1)}, {lit(v2)})"
            if rng.random() < 0.5
            else f"{q(C)} = {lit(v1)} OR {q(C)} = {lit(v2)}"
        )
        desc = rng.choice(
            (
                f"How many {E} have a {C} of either {v1} or {v2}?",
                _lower_q(f"How many rows list {v1} or {v2} as the {C}?"),
                f"What is the number of {E} whose {C} is {v1} or {v2}?",
            )
        )
        return desc, f"SELECT COUNT(*) FROM {T} WHERE {sql_cond}", None
    conds = _row_conds(rng, t, r, {t.key}, numeric=rng.random() < 0.4)
    if rng.random() < 0.2:
        conds = [_like_cond(rng, t, r, set())]
    a = rng.choice([i for i in range(len(t.headers)) if i != t.key] + [t.key])
    A = t.headers[a]
    target = rng.choice(("COUNT(*)", f"COUNT({q(A)})"))
    desc = rng.choice(
        (
            f"How many {A} have {_with_a(conds)}?",
            f"What is the total number of {A} when {_with_the(conds)}?",
            f"How many {E} are there where {_with_the(conds)}?",
            _lower_q(f"How many entries have {_with_a(conds)}?"),
            f"Count the rows with {_with_a(conds)}.",
            f"What is the count of {E} with {_with_a(conds)}?",
        )
    )
    return desc, f"SELECT {target} FROM {T}{_where(conds)}", None


def _ranked(t: _Table, n: int, rows: list[int]) -> list[float]:
    return sorted((_num(t.rows[i][n]) for i in rows), reverse=True)


def _no_tie(vals: list[float], k: int) -> bool:
    """The first ``k`` of ``vals`` (sorted) are told apart from each other and the rest."""
    return len(vals) > k and len(set(vals[: k + 1])) == k + 1


def _bench_comparison(rng: random.Random, t: _Table) -> tuple:
    E, T, K = t.entity, q(t.name), t.key_header
    nums = _num_columns(t, set())
    mode = rng.random()
    if mode < 0.5:  # WikiSQL: a column under a comparison (and an equality)
        r = rng.randrange(len(t.rows))
        a = rng.randrange(len(t.headers))
        A = t.headers[a]
        conds = _row_conds(rng, t, r, {a}, numeric=True)
        desc = rng.choice(
            (
                f"What is the {A} when {_with_the(conds)}?",
                f"Which {A} has {_with_a(conds)}?",
                f"Name the {A} with {_with_a(conds)}.",
                _lower_q(f"What {A} has {_with_a(conds)}?"),
                f"Tell me the {A} that has {_with_a(conds)}.",
            )
        )
        return desc, f"SELECT {q(A)} FROM {T}{_where(conds)}", None
    n = rng.choice(nums)
    N = t.headers[n]
    if mode < 0.75:  # every key above / below a threshold
        r = rng.randrange(len(t.rows))
        cond = _num_cond(rng, t, n, t.rows[r][n])
        desc = rng.choice(
            (
                f"Which {K} values have {cond.a}?",
                _lower_q(f"Which {E} had {cond.a}?"),
                f"List every {K} where {cond.the}.",
                f"Give the {K} of all {E} with {cond.a}.",
            )
        )
        return desc, f"SELECT {q(K)} FROM {T} WHERE {cond.sql}", None
    i, j = rng.sample(range(len(t.rows)), 2)
    k1, k2 = t.rows[i][t.key], t.rows[j][t.key]
    x1, x2 = _num(t.rows[i][n]), _num(t.rows[j][n])
    if x1 == x2:
        raise SynthError("equal values")
    if mode < 0.88:  # which of two has more
        more = rng.random() < 0.5
        word = rng.choice(("more", "a higher", "a larger")) if more else rng.choice(
            ("less", "a lower", "a smaller"))  # fmt: skip
        desc = rng.choice(
            (
                f"Which has {word} {N}, {k1} or {k2}?",
                _lower_q(f"Who had {word} {N}: {k1} or {k2}?"),
                f"Between {k1} and {k2}, which {K} has {word} {N}?",
            )
        )
        order = "DESC" if more else "ASC"
        sql = (
            f"SELECT {q(K)} FROM {T} WHERE {q(K)} IN ({lit(k1)}, {lit(k2)}) "
            f"ORDER BY {q(N)} + 0 {order} LIMIT 1"
        )
        return desc, sql, None
    # higher or lower: the answer is a word the query's rows imply
    desc = rng.choice(
        (
            f"Was the {N} of {k1} higher or lower than that of {k2}?",
            _lower_q(f"Is {k1}'s {N} higher or lower than {k2}'s?"),
        )
    )
    sql = f"SELECT {q(K)}, {q(N)} FROM {T} WHERE {q(K)} IN ({lit(k1)}, {lit(k2)})"
    return desc, sql, None, {"label": ("higher" if x1 > x2 else "lower",)}


def _bench_ranking(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    E, T, K = t.entity, q(t.name), t.key_header
    n = rng.choice(_num_columns(t, set()))
    N = t.headers[n]
    high = rng.random() < 0.5
    order = "DESC" if high else "ASC"
    word = rng.choice(("highest", "largest", "greatest", "most")) if high else rng.choice(
        ("lowest", "smallest", "least", "fewest"))  # fmt: skip
    mode = rng.random()
    rows = list(range(len(t.rows)))
    if mode < 0.3:  # the top key, perhaps within a subset
        conds: list[_Cond] = []
        if rng.random() < 0.5:
            r = rng.randrange(len(t.rows))
            c = rng.choice([i for i in _eq_columns(t, {t.key}) if t.roles[i] == "cat"])
            if not _filled(t.rows[r][c]):
                raise SynthError("a placeholder to filter on")
            conds = [_eq_cond(rng, t, c, t.rows[r][c])]
            v = t.rows[r][c].lower()
            rows = [i for i in rows if t.rows[i][c].lower() == v]
        vals = _ranked(t, n, rows)
        if not high:
            vals = vals[::-1]
        if len(vals) > 1 and vals[0] == vals[1]:
            raise SynthError("tie at the top")
        scope = f" among rows where {_with_the(conds)}" if conds else ""
        desc = rng.choice(
            (
                f"Which {K} has the {word} {N}{scope}?",
                _lower_q(f"Which {E} had the {word} {N}{scope}?"),
                f"Name the {K} with the {word} {N}{scope}.",
                f"Who is ranked first by {N} ({word} first){scope}? Give the {K}.",
            )
        )
        sql = f"SELECT {q(K)} FROM {T}{_where(conds)} ORDER BY {q(N)} + 0 {order} LIMIT 1"
        return desc, sql, None
    if mode < 0.5:  # WikiSQL "Name the least N when C is v": the extreme value itself
        r = rng.randrange(len(t.rows))
        conds = _row_conds(rng, t, r, {n}, n_max=2)
        desc = rng.choice(
            (
                f"Name the {word} {N} when {_with_the(conds)}.",
                f"What is the {word} {N} with {_with_a(conds)}?",
                _lower_q(f"What was the {word} {N} for {_bare(conds)}?"),
            )
        )
        sql = f"SELECT {q(N)} FROM {T}{_where(conds)} ORDER BY {q(N)} + 0 {order} LIMIT 1"
        return desc, sql, None
    vals = _ranked(t, n, rows)
    if not high:
        vals = vals[::-1]
    if mode < 0.65:  # top k
        k = rng.choice((2, 3, 3, 5))
        if not _no_tie(vals, k):
            raise SynthError("tie inside the top k")
        desc = rng.choice(
            (
                f"List the {k} {K} values with the {word} {N}.",
                _lower_q(f"What are the top {k} {E} by {N} ({word} first)? Give their {K}."),
                f"Which {k} {E} have the {word} {N}?",
            )
        )
        return desc, f"SELECT {q(K)} FROM {T} ORDER BY {q(N)} + 0 {order} LIMIT {k}", None
    if mode < 0.74:  # the n-th place
        if not _no_tie(vals, 2):
            raise SynthError("tie near the top")
        place = rng.choice(("second", "2nd"))
        desc = rng.choice(
            (
                f"Which {K} has the {place} {word} {N}?",
                _lower_q(f"Who came {place} by {N}, counting the {word} first? Give the {K}."),
            )
        )
        sql = f"SELECT {q(K)} FROM {T} ORDER BY {q(N)} + 0 {order} LIMIT 1 OFFSET 1"
        return desc, sql, None
    if mode < 0.84:  # all that share the top value (ties welcome)
        agg = "MAX" if high else "MIN"
        desc = rng.choice(
            (
                f"Which {K} values share the {word} {N}? List all of them.",
                _lower_q(f"Which {E} had the {word} {N}? Include every tie."),
            )
        )
        sql = f"SELECT {q(K)} FROM {T} WHERE {q(N)} + 0 = (SELECT {agg}({q(N)} + 0) FROM {T})"
        return desc, sql, None
    # the most / least frequent category
    c = rng.choice([i for i in _eq_columns(t, {t.key}) if t.roles[i] == "cat"])
    C = t.headers[c]
    counts = collections.Counter(v.lower() for v in t.column(c) if _filled(v))
    ranked = sorted(counts.values(), reverse=high)
    if len(ranked) < 2 or ranked[0] == ranked[1]:
        raise SynthError("tie in counts")
    often = "most" if high else "fewest"
    desc = rng.choice(
        (
            f"Which {C} appears in the {often} rows?",
            _lower_q(f"Which {C} has the {often} {E}?"),
        )
    )
    sql = (
        f"SELECT {q(C)} FROM {T} WHERE {q(C)} NOT IN ('', '—', '–', '-', 'N/A') "
        f"GROUP BY {q(C)} ORDER BY COUNT(*) {order} LIMIT 1"
    )
    return desc, sql, None


_AGG_WORDS = {
    "SUM": ("total", "sum of the", "combined", "overall"),
    "AVG": ("average", "mean", "avg."),
    "MIN": ("lowest", "smallest", "minimum", "least", "fewest"),
    "MAX": ("highest", "largest", "maximum", "most", "greatest"),
}


def _bench_aggregation(kind: str) -> Callable[[random.Random, _Table], tuple]:
    def build(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
        T = q(t.name)
        n = rng.choice(_num_columns(t, set()))
        N = t.headers[n]
        expr = f"{kind}({q(N)} + 0)" if kind in ("MIN", "MAX") else f"{kind}({q(N)})"
        w = rng.choice(_AGG_WORDS[kind])
        mode = rng.random()
        if mode < 0.2:  # a few named rows
            ks = rng.sample(t.column(t.key), rng.randint(2, 3))
            K = t.key_header
            names = _and_list(ks)
            desc = rng.choice(
                (
                    f"What is the {w} {N} of {names}?",
                    _lower_q(f"What was the {w} {N} for {names}?"),
                )
            )
            where = f" WHERE {q(K)} IN ({', '.join(lit(k) for k in ks)})"
            return desc, f"SELECT {expr} FROM {T}{where}", None
        conds: list[_Cond] = []
        if mode < 0.85:
            conds = _row_conds(rng, t, rng.randrange(len(t.rows)), {n, t.key}, n_max=2)
        if conds:
            desc = rng.choice(
                (
                    f"What is the {w} {N} when {_with_the(conds)}?",
                    f"What is the {w} {N} that has {_with_a(conds)}?",
                    f"Name the {w} {N} for {_bare(conds)}.",
                    _lower_q(f"What was the {w} {N} with {_with_a(conds)}?"),
                    f"Give the {w} {N} among {t.entity} where {_with_the(conds)}.",
                )
            )
        else:
            desc = rng.choice(
                (
                    f"What is the {w} {N} of all {t.entity}?",
                    _lower_q(f"What is the {w} {N} in the table?"),
                    f"Compute the {w} {N} over every row.",
                )
            )
        return desc, f"SELECT {expr} FROM {T}{_where(conds)}", None

    return build


def _new_key(rng: random.Random, t: _Table) -> str:
    existing = {v.lower() for v in t.column(t.key)}
    for _ in range(200):
        v = t.makers[t.key].make(rng)
        if v.lower() not in existing:
            return v
    raise SynthError("no new key")


def _bench_insert(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    key = _new_key(rng, t)
    cols = list(range(len(t.headers)))
    values = {i: key if i == t.key else t.makers[i].make(rng) for i in cols}
    if rng.random() < 0.15 and len(cols) > 3:  # one column left out (NULL)
        cols.remove(rng.choice([i for i in cols if i != t.key]))
    cols = [i for i in cols if values[i] != "" or i == t.key]
    pairs = [(t.headers[i], values[i]) for i in cols]
    rest = [(h, v) for h, v in pairs if h != t.key_header]
    K, v_ = t.key_header, _quoter(rng)
    desc = rng.choice(
        (
            f"Insert a new row into the {t.name} table: "
            + _and_list([f"{h} is {v_(v)}" for h, v in pairs])
            + ".",
            f"Add an entry for {key} to {t.name} with "
            + _and_list([f"{h} {v_(v)}" for h, v in rest])
            + ".",
            f"The {t.name} table needs a new record where "
            + _and_list([f"the {h} is {v_(v)}" for h, v in pairs])
            + ".",
            f"In the table {t.name}, insert the values ("
            + ", ".join(f"'{v}'" for _, v in pairs)
            + ") for the columns ("
            + ", ".join(h for h, _ in pairs)
            + ").",
            f"On the {t.name} table, add {key} with "
            + _and_list([f"a {h} of {v}" for h, v in rest])
            + ".",
            f"A new {K} {v_(key)} should be recorded in {t.name}: "
            + "; ".join(f"{h}: {v}" for h, v in rest)
            + ".",
            f"{key} has joined the {t.name} table, with "
            + _and_list([f"{v_(v)} as {h}" for h, v in rest])
            + "; add the row.",
        )
    )
    names = ", ".join(q(h) for h, _ in pairs)
    if rng.random() < 0.75:
        sql = f"INSERT INTO {q(t.name)} ({names}) VALUES ({', '.join(lit(v) for _, v in pairs)})"
    else:
        sql = f"INSERT INTO {q(t.name)} SET " + ", ".join(f"{q(h)} = {lit(v)}" for h, v in pairs)
    return desc, sql, key


def _bench_update(rng: random.Random, t: _Table) -> tuple[str, str, str | None]:
    T, K = q(t.name), t.key_header
    r = rng.randrange(len(t.rows))
    key = t.rows[r][t.key]
    n_set = min(rng.choice((1, 1, 1, 1, 1, 2, 2, 3, 4, 5)), len(t.headers) - 1)
    targets = sorted(rng.sample([i for i in range(len(t.headers)) if i != t.key], n_set))
    pairs = []
    for a in targets:
        new = next(
            (
                v
                for v in (t.makers[a].make(rng) for _ in range(50))
                if v != t.rows[r][a] and _filled(v)
            ),
            None,
        )
        if new is None:
            raise SynthError("no new value")
        pairs.append((t.headers[a], new))
    sets = ", ".join(f"{q(h)} = {lit(v)}" for h, v in pairs)
    v_ = _quoter(rng)
    changes = _and_list([f"the {h} to {v_(v)}" for h, v in pairs])
    mode = rng.random()
    if mode < 0.12:  # two rows named by key
        j = rng.choice([i for i in range(len(t.rows)) if i != r])
        key2 = t.rows[j][t.key]
        desc = rng.choice(
            (
                f"In {t.name}, set {changes} for both {key} and {key2}.",
                f"Update the {t.name} table: {key} and {key2} should have "
                + _and_list([f"{h} {v_(v)}" for h, v in pairs])
                + ".",
            )
        )
        where = f"{q(K)} = {lit(key)} OR {q(K)} = {lit(key2)}"
        return desc, f"UPDATE {T} SET {sets} WHERE {where}", None
    if mode < 0.24:  # every row of a category, or above a threshold
        cat_cols = [i for i in _eq_columns(t, set(targets) | {t.key}) if t.roles[i] == "cat"]
        num_cols = _num_columns(t, set(targets))
        cat_cols = [i for i in cat_cols if _filled(t.rows[r][i])]
        if cat_cols and (rng.random() < 0.6 or not num_cols):
            c = rng.choice(cat_cols)
            cond = _eq_cond(rng, t, c, t.rows[r][c])
        elif num_cols:
            n = rng.choice(num_cols)
            cond = _num_cond(rng, t, n, t.rows[r][n])
        else:
            raise SynthError("no column to select rows by")
        desc = rng.choice(
            (
                f"For every row where {cond.the}, change {changes}.",
                f"Update {t.name} so that all {t.entity} with {cond.a} have "
                + _and_list([f"{h} {v_(v)}" for h, v in pairs])
                + ".",
            )
        )
        return desc, f"UPDATE {T} SET {sets} WHERE {cond.sql}", None
    conds = [_Cond(f"{q(K)} = {lit(key)}", f"a {K} of {key}", f"the {K} is {key}")]
    if mode < 0.35:  # a second condition naming the same row
        conds += _row_conds(rng, t, r, set(targets) | {t.key}, n_max=1)
    desc = rng.choice(
        (
            f"Change {changes} where {_with_the(conds)}.",
            f"Update the {t.name} table by setting {changes} for the row with {_with_a(conds)}.",
            f"On the {t.name} table, {key}'s "
            + _and_list([f"{h} should now be {v_(v)}" for h, v in pairs])
            + ".",
            f"In {t.name}, the entry whose {K} is {key} has a new "
            + _and_list([f"{h}: {v}" for h, v in pairs])
            + ".",
            f"Alter the record of {key} in {t.name}: set "
            + _and_list([f"{h} = {v_(v)}" for h, v in pairs])
            + ".",
            "Set " + _and_list([f"{h} to {v_(v)}" for h, v in pairs]) + f" for {key}.",
            f"The {t.name} row for {_bare(conds)} now has "
            + _and_list([f"a {h} of {v}" for h, v in pairs])
            + "; update it.",
        )
    )
    return desc, f"UPDATE {T} SET {sets}{_where(conds)}", key


_BENCH_BUILDERS = {
    "other": _bench_other,
    "counting": _bench_counting,
    "comparison": _bench_comparison,
    "ranking": _bench_ranking,
    "aggregation-SUM": _bench_aggregation("SUM"),
    "aggregation-MIN": _bench_aggregation("MIN"),
    "aggregation-MAX": _bench_aggregation("MAX"),
    "aggregation-AVG": _bench_aggregation("AVG"),
    "INSERT": _bench_insert,
    "UPDATE": _bench_update,
}


_WIKISQL_BUILDERS = {
    "other": _wikisql_lookup,
    "comparison": _wikisql_lookup,
    "INSERT": _wikisql_insert,
    "UPDATE": _wikisql_update,
}

_BUILDERS = {
    "other": _other,
    "counting": _counting,
    "comparison": _comparison,
    "ranking": _ranking,
    "aggregation-SUM": _aggregation("SUM"),
    "aggregation-MIN": _aggregation("MIN"),
    "aggregation-MAX": _aggregation("MAX"),
    "aggregation-AVG": _aggregation("AVG"),
    "INSERT": _insert,
    "UPDATE": _update,
}


def generate_task(
    seed: int,
    index: int,
    task_type: str | None = None,
    wikisql_share: float = 0.0,
    benchmark_share: float = 0.0,
) -> SynthTask:
    """The ``index``-th task of stream ``seed`` (deterministic).

    ``benchmark_share``: the chance that the task is drawn in the shape of AgentBench's DB
    split as a whole (`_draw_bench_table`, `_BENCH_BUILDERS`, `BENCH_TYPE_WEIGHTS`, AgentBench's
    table line): a third INSERT, a third UPDATE, the rest every question type with the SQL it
    needs. Otherwise ``wikisql_share`` is the chance that an `other`, `comparison`, INSERT or
    UPDATE task is drawn in the style of AgentBench's WikiSQL items (`_WIKISQL_BUILDERS`). Both
    0 draw exactly the tasks of earlier versions; the choice between the styles is drawn apart
    from the task, so raising ``benchmark_share`` leaves the other tasks as they were."""
    for name, share in (("wikisql_share", wikisql_share), ("benchmark_share", benchmark_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {share!r}")
    bench = random.Random(f"dbbench-synth-style:{seed}:{index}").random() < benchmark_share
    for attempt in range(50):
        if bench:
            rng = random.Random(f"dbbench-synth-bench:{seed}:{index}:{attempt}")
            typ = (
                task_type
                or rng.choices(list(BENCH_TYPE_WEIGHTS), weights=list(BENCH_TYPE_WEIGHTS.values()))[
                    0
                ]
            )
            table = _draw_bench_table(rng)
            build = _BENCH_BUILDERS[typ]
        else:
            rng = random.Random(f"dbbench-synth:{seed}:{index}:{attempt}")
            typ = task_type or rng.choices(TASK_TYPES, weights=_TYPE_WEIGHTS)[0]
            table = _draw_table(rng)
            build = _BUILDERS[typ]
            if wikisql_share > 0 and typ in _WIKISQL_BUILDERS and rng.random() < wikisql_share:
                build = _WIKISQL_BUILDERS[typ]
        try:
            desc, sql, key_value, *more = build(rng, table)
            extra = more[0] if more else {}
            if bench:
                add = (
                    agentbench_add_description(table.name, table.headers)
                    if rng.random() < 0.9
                    else _add_description(rng, table)
                )
            else:
                add = _add_description(rng, table)
            task = _checked_task(table, typ, desc, add, sql, extra, f"synth-{seed}-{index}", bench)
        except SynthError:
            continue
        return SynthTask(
            task=task,
            gold_sql=sql,
            key_column=table.key_header,
            key_value=key_value,
            first_try=extra.get("first_try"),
        )
    raise SynthError(f"no valid task for seed={seed} index={index}")


def _checked_task(
    table: _Table,
    typ: str,
    desc: str,
    add: str,
    sql: str,
    extra: dict[str, Any],
    tid: str,
    bench: bool,
) -> DBTask:
    """Run the gold SQL; the task with its gold answer, or SynthError when the draw is unfit
    (an empty or ambiguous answer, a change that changes nothing, a first try that finds rows).
    ``extra``: ``label`` (an answer the rows only imply), ``first_try`` (see SynthTask)."""
    if extra.get("first_try"):
        tried, db = _run(table, extra["first_try"])
        db.close()
        if tried.rows:
            raise SynthError("the first try already finds the row")
    res, db = _run(table, sql)
    try:
        if typ in ("INSERT", "UPDATE"):
            md5 = db.table_hash()
            if bench and md5 == _table_hash(table):
                raise SynthError("the change changes nothing")
            return _db_task(table, typ, desc, add, (sql,), md5, tid)
        rows = res.rows or []
        if not rows or any(r[0] is None for r in rows):
            raise SynthError("empty answer")
        if typ == "other" and len(rows) != 1 and not bench:
            raise SynthError("ambiguous lookup")
        if len(rows) > (8 if bench else 6) and (bench or typ != "other"):
            raise SynthError("too many rows")
        if bench and any(not _filled(str(r[0])) for r in rows):
            raise SynthError("a placeholder as the answer")
        label = extra.get("label") or tuple(_fmt(r[0]) for r in rows)
        return _db_task(table, typ, desc, add, label, None, tid)
    finally:
        db.close()


def generate_tasks(
    n: int, seed: int = 0, start: int = 0, wikisql_share: float = 0.0, benchmark_share: float = 0.0
) -> Iterator[SynthTask]:
    for i in range(start, start + n):
        yield generate_task(seed, i, wikisql_share=wikisql_share, benchmark_share=benchmark_share)


# -- the scripted expert ---------------------------------------------------------------------


def _op(thought: str, sql: str) -> str:
    return f"{thought}\nAction: Operation\n```sql\n{sql}\n```"


def _answer(thought: str, values: list[Any]) -> str:
    return f"{thought}\nAction: Answer\nFinal Answer: {json.dumps(values, ensure_ascii=False)}"


def _wrong_column(headers: tuple[str, ...], name: str) -> str | None:
    cand = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    if cand and cand.lower() not in {h.lower() for h in headers}:
        return cand
    return None


def expert_plan(st: SynthTask, seed: int = 0) -> list[str]:
    """The scripted expert's assistant messages for ``st`` (deterministic per task and seed)."""
    t = st.task
    rng = random.Random(f"expert:{seed}:{t.task_id}")
    tq = q(t.table_name)
    msgs: list[str] = []
    intro = {
        "INSERT": "The task asks me to add one row to the table.",
        "UPDATE": "The task asks me to change existing values in the table.",
    }.get(t.type, "The task is a question that I can answer with a SELECT query.")
    if rng.random() < 0.3:
        look = rng.choice(
            (f"DESCRIBE {tq}", f"SHOW COLUMNS FROM {tq}", f"SELECT * FROM {tq} LIMIT 3")
        )
        msgs.append(_op(f"{intro} First I will look at the table to see its columns.", look))
        intro = "Now I know the layout of the table."
    if rng.random() < 0.15:
        bad = _mistake(rng, st)
        if bad is not None and _fails(st.task, bad[0]):
            sql_bad, recovery = bad
            msgs.append(_op(f"{intro} I will write the query directly.", sql_bad))
            if rng.random() < 0.5:
                msgs.append(_op(f"{recovery} Let me check the column names.", f"DESCRIBE {tq}"))
                intro = "Now I have the exact column names, so I can fix the statement."
            else:
                intro = recovery + " I will fix the statement."
    if st.first_try is not None and rng.random() < 0.7:
        look_up = "I will look the name up exactly as the question writes it."
        msgs.append(_op(f"{intro} {look_up}", st.first_try))
        intro = (
            "No row has exactly that name, so it must be part of a longer one; "
            "I will match it with LIKE."
        )
    if t.is_mutation:
        msgs.append(_op(f"{intro} This statement makes the change.", st.gold_sql))
        if st.key_value is not None and rng.random() < 0.3:
            check = f"SELECT * FROM {tq} WHERE {q(st.key_column)} = {lit(st.key_value)}"
            msgs.append(_op("The statement ran. I will check the row to be sure.", check))
        done = rng.choice(
            (
                "The table has been updated as requested.",
                "The change is done, so I can finish.",
                "The row is in the state the task describes.",
            )
        )
        msgs.append(_answer(done, []))
    else:
        msgs.append(_op(f"{intro} This query selects what the question asks for.", st.gold_sql))
        values = list(t.label)
        done = rng.choice(
            (
                "The query returned the answer.",
                "The output gives me the answer to the question.",
                "That result answers the question.",
            )
        )
        msgs.append(_answer(done, values))
    return msgs


def _fails(task: DBTask, sql: str) -> bool:
    """Whether ``sql`` is an error on a fresh copy of the task's table: the expert only makes
    mistakes whose error it then reads (an unquoted name can also parse as something else)."""
    db = _BACKEND.open(task.table_spec())
    try:
        return db.execute(sql).error
    finally:
        db.close()


def _mistake(rng: random.Random, st: SynthTask) -> tuple[str, str] | None:
    """A plausible failing statement and the thought that explains the error."""
    t = st.task
    kind = rng.choice(("column", "table", "quotes"))
    sql = st.gold_sql
    if kind == "table":
        wrong = re.sub(r"[^0-9a-z]+", "_", t.table_name.lower()).strip("_") + "_data"
        return sql.replace(q(t.table_name), q(wrong), 1), (
            f"The table {wrong} does not exist; the table is named {t.table_name}."
        )
    used = [h for h in t.columns if q(h) in sql]
    if kind == "quotes":
        spaced = [h for h in used if re.search(r"[^0-9A-Za-z_$\u0080-\uffff]", h)]
        spaced = [h for h in spaced if h != t.table_name]
        if spaced:
            h = spaced[0]
            why = "contains spaces" if " " in h else "contains punctuation"
            return sql.replace(q(h), h), (
                f"The name {h} {why}, so it has to be quoted with backticks."
            )
    for h in used:
        wrong = _wrong_column(t.columns, h)
        if wrong and wrong != h:
            return sql.replace(q(h), q(wrong)), (
                f"There is no column called {wrong}; the column is named {h}."
            )
    return None


# -- writers ---------------------------------------------------------------------------------


def expert_episode(st: SynthTask, env: DBBenchEnv, seed: int = 0) -> dict[str, Any]:
    """Run the expert's plan through ``env``; returns the env transcript."""
    env.reset(st.task)
    for msg in expert_plan(st, seed):
        if env.step(msg).done:
            break
    return env.transcript()


def write_sft_jsonl(path: str | Path, n: int, seed: int = 0, benchmark_share: float = 0.0) -> int:
    """Write ``n`` expert trajectories as ``{"messages": [...]}`` lines; returns the count.

    Messages: system, user (task), then assistant / user (observation) turns ending with the
    assistant's final answer. Only successful episodes are written (all of them, by design)."""
    env = DBBenchEnv(SQLiteBackend())
    written = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for st in generate_tasks(n, seed, benchmark_share=benchmark_share):
            tr = expert_episode(st, env, seed)
            if tr["reward"] != 1.0:
                raise SynthError(f"scripted expert failed task {st.task.task_id}: {tr['status']}")
            rec = {"messages": tr["messages"], "source": "dbbench_synth", "type": st.task.type}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            written += 1
    env.close()
    return written


def write_tasks_jsonl(path: str | Path, n: int, seed: int = 0, benchmark_share: float = 0.0) -> int:
    """Write ``n`` task records in the AgentBench DBBench JSONL schema."""
    with Path(path).open("w", encoding="utf-8") as f:
        for st in generate_tasks(n, seed, benchmark_share=benchmark_share):
            f.write(json.dumps(st.to_record(), ensure_ascii=False) + "\n")
    return n
