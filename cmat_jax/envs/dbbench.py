"""The AgentBench DB task (DBBench) as a CMAT environment.

Protocol (docs/method.md §7, kept identical to AgentBench's ``dbbench`` task):

- The agent answers every turn with either ``Action: Operation`` and one SQL statement in a
  fenced ```` ```sql ```` block (only the first block runs; newlines in it become spaces), or
  ``Action: Answer`` and a line ``Final Answer: [...]`` (a Python-literal list).
- Parsing uses AgentBench's patterns: the action is ``Action: (.*?)\\n``; an Operation without a
  ```` ```sql\\n...\\n``` ```` block ends the episode (validation failure); anything that is not an
  Operation ends it and ``\\nFinal Answer:(.*)`` is looked for (missing ->
  ``agent_validation_failed``, AgentBench's status, or ``task_limit_reached`` after the last
  round).
- Observations are ``str(list_of_row_tuples)`` or the error text, cut at 800 characters with
  ``[TRUNCATED]`` appended. At most 15 operations; the reply after the 15th may still answer.
- Scoring: INSERT/UPDATE/DELETE by the table hash (see :func:`mysql_table_hash`) against
  ``answer_md5``, whatever the agent answered; query types by :func:`answer_correct`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cmat_jax.envs.base import EnvError, EpisodeState, Message, StepResult, register_family
from cmat_jax.envs.dbbench_setup import TableOutcome, plan_table
from cmat_jax.envs.sql_backend import SQLBackend, TableSpec
from cmat_jax.textfile import read_text

MAX_ROUNDS = 15
OBSERVATION_LIMIT = 800
TRUNCATION_MARK = "[TRUNCATED]"
MUTATION_TYPES = ("INSERT", "DELETE", "UPDATE")
QUERY_TYPES = (
    "other",
    "counting",
    "comparison",
    "ranking",
    "aggregation-SUM",
    "aggregation-MIN",
    "aggregation-MAX",
    "aggregation-AVG",
)
METRIC_TYPES = (*QUERY_TYPES, "SELECT", "INSERT", "UPDATE")

_ACTION_RE = re.compile(r"Action: (.*?)\n")
_SQL_RE = re.compile(r"```sql\n([\s\S]*?)\n```")
_ANSWER_RE = re.compile(r"\nFinal Answer:(.*)")

SYSTEM_PROMPT = """You complete tasks on a MySQL table. Each reply is one short line of reasoning, \
then exactly one action.

To run SQL:
Action: Operation
```sql
SELECT * FROM `table name` WHERE `column` = 'value';
```
One statement, on one line; I reply with the result rows or the error message.

To finish:
Action: Answer
Final Answer: ["value 1", "value 2"]
The list must match the correct answer exactly. After changing the table, any list finishes.

Any other reply fails the task. At most 15 operations."""


class DBBenchDataError(ValueError):
    """A task record is malformed; the message names the file and line."""


class DBBenchDataWarning(UserWarning):
    """An item AgentBench runs, but not on the table its file describes (see dbbench_setup)."""


@dataclasses.dataclass(frozen=True)
class DBTask:
    """One DBBench item (the JSONL schema of AgentBench's ``data/dbbench``)."""

    task_id: str
    description: str
    add_description: str
    table_name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str | None, ...], ...]
    type: str
    label: tuple[Any, ...]
    answer_md5: str | None = None
    table_outcome: TableOutcome = "ok"
    """How AgentBench's MySQL sets the table up: ``ok`` (every row), ``empty`` (the one INSERT
    failed: a ragged row) or ``missing`` (CREATE TABLE failed: a name MySQL refuses)."""
    table_error: str | None = None
    """MySQL's error for the failed setup statement (None when ``ok``)."""

    @property
    def is_mutation(self) -> bool:
        return self.type in MUTATION_TYPES

    @property
    def gold(self) -> Any:
        """What the scorer compares with: ``answer_md5`` for mutations, else the label list."""
        return self.answer_md5 if self.is_mutation else list(self.label)

    @property
    def prompt(self) -> str:
        return self.description + "\n" + self.add_description

    def table_spec(self) -> TableSpec:
        """The table the episode starts from; a backend creates no table for a spec without
        columns (the ``missing`` outcome)."""
        if self.table_outcome == "missing":
            return TableSpec(name=self.table_name, columns=(), rows=())
        rows = self.rows if self.table_outcome == "ok" else ()
        return TableSpec(name=self.table_name, columns=self.columns, rows=rows)

    def to_record(self) -> dict[str, Any]:
        """Back to the AgentBench JSONL schema (what :func:`parse_task` reads)."""
        rec: dict[str, Any] = {
            "description": self.description,
            "add_description": self.add_description,
            "label": list(self.label),
            "type": [self.type],
            "table": {
                "table_name": self.table_name,
                "table_info": {
                    "columns": [{"name": c, "type": "TEXT"} for c in self.columns],
                    "rows": [list(r) for r in self.rows],
                },
            },
            "id": self.task_id,
        }
        if self.answer_md5 is not None:
            rec["answer_md5"] = self.answer_md5
        return rec


def _field(rec: Any, path: str, where: str) -> Any:
    cur = rec
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise DBBenchDataError(f"{where}: missing field '{path}'")
        cur = cur[key]
    return cur


def parse_task(rec: Any, where: str, default_id: str) -> DBTask:
    """Validate one decoded JSONL record; errors name ``where`` (``file:line``) and the field."""
    if not isinstance(rec, dict):
        raise DBBenchDataError(f"{where}: a task record must be a JSON object")
    desc = _field(rec, "description", where)
    add = rec.get("add_description", "")
    name = _field(rec, "table.table_name", where)
    cols = _field(rec, "table.table_info.columns", where)
    rows = _field(rec, "table.table_info.rows", where)
    typ = _field(rec, "type", where)
    if not isinstance(desc, str) or not isinstance(add, str):
        raise DBBenchDataError(f"{where}: 'description' and 'add_description' must be strings")
    name = name if isinstance(name, str) else str(name)  # AgentBench formats names with str()
    if isinstance(typ, list) and len(typ) >= 1:
        typ = typ[0]
    if not isinstance(typ, str):
        raise DBBenchDataError(f"{where}: 'type' must be a string or a list of strings")
    if typ not in (*QUERY_TYPES, *MUTATION_TYPES):
        warnings.warn(
            f"{where}: unknown task 'type' {typ!r}: scored as a query item by its 'label' and "
            "counted only in SELECT_accuracy, as AgentBench does",
            DBBenchDataWarning,
            stacklevel=2,
        )
    # AgentBench reads 'label' only for query types (mutations are scored by 'answer_md5').
    label = rec.get("label", []) if typ in MUTATION_TYPES else _field(rec, "label", where)
    if not isinstance(cols, list):
        raise DBBenchDataError(f"{where}: 'table.table_info.columns' must be a list")
    names = []
    for k, c in enumerate(cols):
        if not isinstance(c, dict) or "name" not in c:
            raise DBBenchDataError(f"{where}: missing field 'table.table_info.columns[{k}].name'")
        names.append(c["name"] if isinstance(c["name"], str) else str(c["name"]))
    if not isinstance(rows, list):
        raise DBBenchDataError(f"{where}: 'table.table_info.rows' must be a list")
    for k, r in enumerate(rows):
        if not isinstance(r, list):
            raise DBBenchDataError(f"{where}: 'table.table_info.rows[{k}]' must be a list")
    if not isinstance(label, list):
        raise DBBenchDataError(f"{where}: 'label' must be a list")
    md5 = rec.get("answer_md5")
    if typ in MUTATION_TYPES and not isinstance(md5, str):
        raise DBBenchDataError(f"{where}: {typ} tasks need a string 'answer_md5'")
    task_id = str(rec.get("id", default_id))
    plan = plan_table(name, names, rows)
    if plan.outcome != "ok":
        state = "an empty table" if plan.outcome == "empty" else "no table"
        warnings.warn(
            f"{where}: item {task_id!r} ({typ}, table {name!r}): AgentBench's MySQL fails to "
            f"set its table up ({plan.error}); the item runs "
            f"with {state}, as there",
            DBBenchDataWarning,
            stacklevel=2,
        )
    return DBTask(
        task_id=task_id,
        description=desc,
        add_description=add,
        table_name=name,
        columns=tuple(names),
        rows=plan.rows,
        type=typ,
        label=tuple(label),
        answer_md5=md5 if typ in MUTATION_TYPES else None,
        table_outcome=plan.outcome,
        table_error=plan.error,
    )


def load_tasks(path: str | Path, limit: int | None = None) -> list[DBTask]:
    """Read AgentBench DBBench JSONL (or a JSON list); blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DBBenchDataError(f"{path}: no such file")
    text = read_text(path, DBBenchDataError)
    tasks: list[DBTask] = []
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DBBenchDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if not isinstance(records, list):
            raise DBBenchDataError(f"{path}: expected a JSON list of task records")
        for k, rec in enumerate(records):
            tasks.append(parse_task(rec, f"{path}: record {k}", f"{path.stem}-{k}"))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DBBenchDataError(f"{where}: invalid JSON ({e.msg})") from e
            tasks.append(parse_task(rec, where, f"{path.stem}-{len(tasks)}"))
    return tasks[:limit] if limit is not None else tasks


# -- scoring ---------------------------------------------------------------------------------


def sql_block(agent_text: str) -> tuple[str, int, int] | None:
    """The statement of a reply's first ```sql block and its span in the text (what the
    environment executes for an `Action: Operation`); None without one."""
    block = _SQL_RE.search(agent_text)
    return None if block is None else (block.group(1), block.start(1), block.end(1))


def parse_answer_list(answer: str) -> list[Any]:
    """AgentBench's ``list(eval(answer))`` with a fallback to ``[answer]``, done safely: only
    Python literals are evaluated (``ast.literal_eval``), never code. A literal that is not a
    list is turned into one the same way (a string becomes its characters, a number -> [answer])."""
    try:
        value = ast.literal_eval(answer.strip(" \t"))
        return list(value)
    except Exception:
        return [answer]


def answer_correct(answer: str, label: Sequence[Any]) -> bool:
    """AgentBench's query-type comparison: one value each -> equal as floats when both parse,
    else as strings; otherwise -> equal as sets (unhashable items never match)."""
    ans = parse_answer_list(answer)
    cor = list(label)
    if len(ans) == 1 and len(cor) == 1:
        try:
            return float(ans[0]) == float(cor[0])
        except (ValueError, OverflowError, TypeError):
            return ans[0] == cor[0]
    try:
        return set(ans) == set(cor)
    except TypeError:
        return False


def score_output(typ: str, answer: str, gold: Any) -> bool:
    if typ in MUTATION_TYPES:
        return answer == gold
    return answer_correct(answer, gold)


def dbbench_metrics(outputs: Iterable[dict[str, Any] | None]) -> dict[str, float]:
    """Per-type accuracies, ``SELECT_accuracy`` (every non-INSERT/UPDATE item) and
    ``overall_cat_accuracy`` = mean of the SELECT, INSERT and UPDATE accuracies, computed as
    AgentBench's ``calculate_overall`` does. Each output: ``{"type", "correct"}``; None entries
    (episodes that produced nothing) are skipped; a type with no items scores 0."""
    outs = [o for o in outputs if o]
    ret: dict[str, float] = {}
    for typ in METRIC_TYPES:
        sel = [
            o
            for o in outs
            if o["type"] == typ or (typ == "SELECT" and o["type"] not in ("INSERT", "UPDATE"))
        ]
        ret[f"{typ}_accuracy"] = sum(bool(o["correct"]) for o in sel) / len(sel) if sel else 0.0
    ret["overall_cat_accuracy"] = (
        ret["SELECT_accuracy"] + ret["INSERT_accuracy"] + ret["UPDATE_accuracy"]
    ) / 3
    return ret


def truncate_observation(text: str) -> str:
    if len(text) > OBSERVATION_LIMIT:
        return text[:OBSERVATION_LIMIT] + TRUNCATION_MARK
    return text


# -- the environment -------------------------------------------------------------------------


class DBBenchEnv:
    """One DBBench episode at a time on a fresh database from ``backend``."""

    family = "dbbench"

    def __init__(
        self,
        backend: SQLBackend | None = None,
        *,
        max_rounds: int = MAX_ROUNDS,
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        if backend is None:
            from cmat_jax.envs.sqlite_backend import SQLiteBackend

            backend = SQLiteBackend()
        self.backend = backend
        self.max_rounds = max_rounds
        self.system_prompt = system_prompt
        self.task: DBTask | None = None
        self._db: Any = None
        self._s = EpisodeState(messages=[], steps=[])

    # -- protocol --------------------------------------------------------------------------
    def reset(self, task: DBTask) -> list[Message]:
        if self._db is not None:
            self._db.close()
        self.task = task
        self._db = self.backend.open(task.table_spec())
        first = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task.prompt},
        ]
        self._s = EpisodeState(messages=[dict(m) for m in first], steps=[])
        return first

    @property
    def done(self) -> bool:
        return self._s.done

    def step(self, agent_text: str) -> StepResult:
        if self.task is None or self._db is None:
            raise EnvError("step() before reset()")
        if self._s.done:
            raise EnvError("step() after the episode ended")
        if not isinstance(agent_text, str):
            raise EnvError(f"agent output must be a string, got {type(agent_text).__name__}")
        s = self._s
        s.messages.append({"role": "assistant", "content": agent_text})
        action = _ACTION_RE.search(agent_text)
        if action and action.group(1) == "Operation" and s.rounds < self.max_rounds:
            block = sql_block(agent_text)
            if not block:
                return self._finish("agent_validation_failed", "", error=True, action="Operation")
            sql = block[0].strip().replace("\n", " ")
            res = self._db.execute(sql)
            obs = truncate_observation(res.text)
            s.rounds += 1
            info = {"error": res.error, "action": "Operation", "sql": sql, "status": "running"}
            info["rows_capped"] = res.rows_capped
            info["limit"] = res.limit  # which sandbox limit stopped the statement, if any
            s.steps.append({**info, "observation": obs})
            s.messages.append({"role": "user", "content": obs})
            return StepResult(observation=obs, done=False, reward=0.0, info=info)
        found = _ANSWER_RE.search(agent_text)
        answer = found.group(1) if found else ""
        if found:
            status = "completed"
        elif s.rounds >= self.max_rounds:
            status = "task_limit_reached"
        else:
            status = "agent_validation_failed"  # AgentBench's status for a missing answer
        return self._finish(status, answer, error=not found, action="Answer" if found else None)

    def finish(self, status: str = "agent_context_limit") -> StepResult:
        """End the episode from outside (e.g. the agent ran out of context) and score it."""
        if self._s.done:
            raise EnvError("finish() after the episode ended")
        return self._finish(status, "", error=True, action=None)

    def _finish(self, status: str, answer: str, *, error: bool, action: str | None) -> StepResult:
        task, s = self.task, self._s
        assert task is not None and self._db is not None
        if task.is_mutation:
            answer = self._db.table_hash()
        correct = score_output(task.type, answer, task.gold)
        s.done, s.status, s.answer, s.reward = True, status, answer, float(correct)
        info = {"error": error, "action": action, "status": status, "answer": answer}
        info.update(type=task.type, correct=correct)
        s.steps.append(dict(info))
        return StepResult(observation="", done=True, reward=s.reward, info=info)

    def snapshot(self) -> tuple[Any, EpisodeState]:
        if self._db is None:
            raise EnvError("snapshot() before reset()")
        s = self._s
        copy = dataclasses.replace(
            s, messages=[dict(m) for m in s.messages], steps=[dict(x) for x in s.steps]
        )
        return self._db.snapshot(), copy

    def restore(self, snap: tuple[Any, EpisodeState]) -> None:
        if self._db is None:
            raise EnvError("restore() before reset()")
        db_snap, state = snap
        self._db.restore(db_snap)
        self._s = dataclasses.replace(
            state, messages=[dict(m) for m in state.messages], steps=[dict(x) for x in state.steps]
        )

    @property
    def messages(self) -> list[Message]:
        return [dict(m) for m in self._s.messages]

    def output(self) -> dict[str, Any] | None:
        """The scorer's record for this episode (None until it ends)."""
        if not self._s.done or self.task is None:
            return None
        return {"type": self.task.type, "answer": self._s.answer, "correct": self._s.reward == 1.0}

    def transcript(self) -> dict[str, Any]:
        task, s = self.task, self._s
        return {
            "family": self.family,
            "task_id": task.task_id if task else None,
            "type": task.type if task else None,
            "table_outcome": task.table_outcome if task else None,
            **s.transcript(),
        }

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


register_family("dbbench", DBBenchEnv)
