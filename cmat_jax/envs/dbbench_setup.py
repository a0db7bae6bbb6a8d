"""How AgentBench's MySQL sets up an item's table, so that both our backends start the episode
from the same table it would.

AgentBench creates the table with ``CREATE TABLE `name` (`col` TEXT, ...)`` and fills it with
ONE multi-row ``INSERT ... VALUES (...), (...)`` whose values the MySQL connector sends as
literals. Three outcomes follow, and :func:`plan_table` predicts which:

- ``ok``: the table holds every row, each value as MySQL stores that literal in a TEXT column
  (:func:`mysql_text`: ``true`` -> ``'1'``, ``1e+20`` -> ``'1e20'``);
- ``empty``: the INSERT fails as a whole (a row with more or fewer values than columns), so
  the item runs on an empty table;
- ``missing``: MySQL refuses the CREATE TABLE (a name that is empty, ends in a space, is longer
  than 64 characters or holds a character MySQL does not allow, two column names equal up to
  case, no columns at all), or the connector cannot send a value (a nested list or object) and
  nothing runs, so the item runs with no table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

MAX_IDENTIFIER_CHARS = 64

TableOutcome = Literal["ok", "empty", "missing"]


@dataclasses.dataclass(frozen=True)
class TablePlan:
    outcome: TableOutcome
    rows: tuple[tuple[str | None, ...], ...]  # the rows as given, values as MySQL stores them
    error: str | None  # MySQL's error for the failed statement (None when ``ok``)


class _Unsendable(TypeError):
    """A value the MySQL connector has no literal for."""


def mysql_text(value: Any) -> str | None:
    """The text MySQL stores in a TEXT column for a JSON value sent as a literal."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):  # the connector sends NaN as NULL
            return None
        text = str(value)  # the literal the connector sends (DECIMAL unless it has an exponent)
        if "e" not in text:
            return text
        return _mysql_double_text(text)
    raise _Unsendable(type(value).__name__)


def _mysql_double_text(literal: str) -> str:
    """How MySQL prints a DOUBLE given as ``<mantissa>e<exp>`` (Python's shortest digits): plain
    decimals for exponents -15..15 (checked on MariaDB 10.11), else ``1.5e-20`` / ``1e20``."""
    mantissa, exp_text = literal.split("e")
    exp = int(exp_text)
    if -15 <= exp < 0:
        sign = "-" if mantissa.startswith("-") else ""
        digits = mantissa.lstrip("-").replace(".", "").rstrip("0") or "0"
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    return f"{mantissa}e{exp}"


def _name_error(name: str, what: Literal["table", "column"]) -> str | None:
    """MySQL's refusal of ``name`` as a table or column name, or None if it is accepted."""
    bad = (
        not name
        or name.endswith(" ")
        or "\x00" in name
        or any(ord(c) > 0xFFFF for c in name)  # only the Basic Multilingual Plane
    )
    if bad:
        return (
            f"1103 (42000): Incorrect table name '{name}'"
            if what == "table"
            else f"1166 (42000): Incorrect column name '{name}'"
        )
    if len(name) > MAX_IDENTIFIER_CHARS:
        if what == "table":
            return f"1103 (42000): Incorrect table name '{name}'"
        return f"1059 (42000): Identifier name '{name}' is too long"
    return None


def create_error(table_name: str, columns: Sequence[str]) -> str | None:
    """Why MySQL would refuse ``CREATE TABLE`` for this table, or None."""
    if not columns:
        return "1064 (42000): You have an error in your SQL syntax: a table needs a column"
    if err := _name_error(table_name, "table"):
        return err
    seen: set[str] = set()
    for col in columns:
        if err := _name_error(col, "column"):
            return err
        if col.lower() in seen:  # column names are case-insensitive in MySQL
            return f"1060 (42S21): Duplicate column name '{col}'"
        seen.add(col.lower())
    return None


def plan_table(table_name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> TablePlan:
    """Predict AgentBench's table setup for one item (see the module docstring)."""
    text_rows: list[tuple[str | None, ...]] = []
    unsendable = None
    for row in rows:
        cells = []
        for v in row:
            try:
                cells.append(mysql_text(v))
            except _Unsendable as e:
                unsendable = unsendable or f"Python '{e}' cannot be converted to a MySQL type"
                cells.append(None)
        text_rows.append(tuple(cells))
    if unsendable is not None:  # the connector fails before anything reaches the server
        return TablePlan("missing", tuple(text_rows), unsendable)
    if error := create_error(table_name, columns):
        return TablePlan("missing", tuple(text_rows), error)
    for k, row in enumerate(text_rows):
        if not row:  # AgentBench writes this row as ")": the statement does not parse
            return TablePlan(
                "empty", tuple(text_rows), "1064 (42000): You have an error in your SQL syntax"
            )
        if len(row) != len(columns):
            return TablePlan(
                "empty",
                tuple(text_rows),
                f"1136 (21S01): Column count doesn't match value count at row {k + 1}",
            )
    return TablePlan("ok", tuple(text_rows), None)
