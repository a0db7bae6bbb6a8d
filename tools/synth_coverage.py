"""How well the synthetic DB tasks cover AgentBench DB's task distribution.

Draws ``--n`` tasks from :mod:`cmat_jax.envs.dbbench_synth` and profiles them: question types,
the SQL constructs of the gold statements, table and column naming, cell contents, answer shapes,
the table line. With ``--reference`` (an AgentBench DB JSONL file, e.g. its dev split) the same
profile is computed for the reference and printed beside it, with the gap per feature and the
generated table names / questions that equal one of the reference's (which must be none).

    python tools/synth_coverage.py --reference data/dbbench/dev.jsonl --benchmark-share 1.0

The last line is one JSON object: ``type_tv`` (total-variation distance between the type
mixes), ``category_tv`` (SELECT / INSERT / UPDATE), ``feature_gap`` (mean absolute difference
of the share features), ``missing`` (constructs or traits the reference has and the synthetic
tasks lack) and ``overlap`` (table names / questions equal to the reference's).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cmat_jax.envs.dbbench import MUTATION_TYPES, QUERY_TYPES
from cmat_jax.envs.dbbench_synth import generate_tasks

TYPES = (*QUERY_TYPES, "INSERT", "UPDATE")
AGENTBENCH_TABLE_LINE = re.compile(
    r"^The name of this table is .*, and the headers of this table are "
)
PLACEHOLDERS = {"", "—", "–", "-", "N/A", "n/a"}

# SQL constructs looked for in gold statements (the reference's query SQL is WikiSQL-style text,
# not always runnable, but its constructs read the same).
CONSTRUCTS = {
    "WHERE": r"\bWHERE\b",
    "AND": r"\bAND\b",
    "OR": r"\bOR\b",
    "IN (...)": r"\bIN\s*\(",
    "LIKE": r"\bLIKE\b",
    "< / >": r"(?<![<>!])[<>](?![=>])",
    "<= / >=": r"[<>]=",
    "ORDER BY": r"\bORDER\s+BY\b",
    "LIMIT": r"\bLIMIT\b",
    "OFFSET": r"\bOFFSET\b",
    "GROUP BY": r"\bGROUP\s+BY\b",
    "COUNT": r"\bCOUNT\s*\(",
    "DISTINCT": r"\bDISTINCT\b",
    "SUM/AVG": r"\b(SUM|AVG)\s*\(",
    "MIN/MAX": r"\b(MIN|MAX)\s*\(",
    "subquery": r"\(\s*SELECT\b",
    "backticks": r"`",
}


_TEXT_OF = {"backticks": "sql"}  # quoting is seen in the raw SQL, the rest without literals


class CoverageInputError(ValueError):
    """The reference file is unreadable; the message names the file, line and field."""


def _name_traits(name: str) -> set[str]:
    traits = set()
    if " " in name:
        traits.add("space")
    if "_" in name:
        traits.add("underscore")
    if re.search(r"[^0-9A-Za-z _]", name):
        traits.add("punct")
    if name[:1].isdigit():
        traits.add("digit-led")
    if re.search(r"[^\x00-\x7f]", name):
        traits.add("non-ascii")
    if name == name.lower() and re.search(r"[a-z]", name):
        traits.add("lower")
    return traits


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?", text.strip()) is not None


def _item(
    typ: str,
    description: str,
    add_description: str,
    table_name: str,
    columns: list[str],
    rows: list[list[Any]],
    label: list[Any],
    sql: str,
) -> dict[str, Any]:
    """The features of one task, the same way for both sides."""
    cells = [str(v) for r in rows for v in r if v is not None]
    first = [str(r[0]) for r in rows if r]
    return {
        "type": typ,
        "description": description,
        "table_name": table_name,
        "rows": len(rows),
        "cols": len(columns),
        "table_traits": _name_traits(table_name),
        "column_traits": [_name_traits(c) for c in columns],
        "placeholder_cells": sum(c.strip() in PLACEHOLDERS for c in cells) / max(len(cells), 1),
        "non_ascii_cells": sum(bool(re.search(r"[^\x00-\x7f]", c)) for c in cells)
        / max(len(cells), 1),
        "formatted_numbers": sum(
            bool(re.fullmatch(r"\$?\d{1,3}(,\d{3})+(\.\d+)?", c)) for c in cells
        )
        / max(len(cells), 1),
        "first_col_repeats": len(set(first)) < len(first),
        "agentbench_table_line": bool(AGENTBENCH_TABLE_LINE.match(add_description)),
        "lowercase_question": description[:1].islower(),
        "label_len": len(label),
        "label_numeric": bool(label) and all(_is_number(str(v)) for v in label),
        "sql": sql,
        "code": _code(sql),
    }


def _code(sql: str) -> str:
    """``sql`` without its string literals and quoted names (a value "Rock and Roll" is no AND)."""
    return re.sub(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`|\[[^\]]*\]", " x ", sql)


def synthetic_items(n: int, seed: int, wikisql_share: float, benchmark_share: float) -> list[dict]:
    items = []
    for st in generate_tasks(n, seed, wikisql_share=wikisql_share, benchmark_share=benchmark_share):
        t = st.task
        items.append(
            _item(
                t.type,
                t.description,
                t.add_description,
                t.table_name,
                list(t.columns),
                [list(r) for r in t.rows],
                [] if t.is_mutation else list(t.label),
                st.gold_sql,
            )
        )
    return items


def _field(rec: dict, path: str, where: str) -> Any:
    cur: Any = rec
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            raise CoverageInputError(f"{where}: missing field '{path}'")
        cur = cur[key]
    return cur


def reference_items(path: Path) -> list[dict]:
    """Features of an AgentBench DB JSONL file (ragged rows are fine here: only shapes count)."""
    if not path.is_file():
        raise CoverageInputError(f"{path}: no such file")
    items = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise CoverageInputError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise CoverageInputError(f"{where}: a task record must be a JSON object")
        typ = _field(rec, "type", where)
        typ = typ[0] if isinstance(typ, list) and typ else typ
        if typ not in TYPES:
            raise CoverageInputError(f"{where}: unknown task 'type' {typ!r}")
        label = _field(rec, "label", where)
        if not isinstance(label, list):
            raise CoverageInputError(f"{where}: 'label' must be a list")
        columns = _field(rec, "table.table_info.columns", where)
        rows = _field(rec, "table.table_info.rows", where)
        if not isinstance(columns, list) or not isinstance(rows, list):
            raise CoverageInputError(f"{where}: 'table.table_info' needs lists of columns and rows")
        names = [c.get("name", "") if isinstance(c, dict) else "" for c in columns]
        mutation = typ in MUTATION_TYPES
        sql = str(label[0]) if mutation and label else str((rec.get("sql") or {}).get("query", ""))
        items.append(
            _item(
                typ,
                str(_field(rec, "description", where)),
                str(rec.get("add_description", "")),
                str(_field(rec, "table.table_name", where)),
                [str(n) for n in names],
                [r if isinstance(r, list) else [] for r in rows],
                [] if mutation else label,
                sql,
            )
        )
    return items


def _share(items: list[dict], pred) -> float:
    return sum(bool(pred(i)) for i in items) / max(len(items), 1)


def profile(items: list[dict]) -> dict[str, dict[str, float]]:
    """Feature groups -> feature -> value (shares in [0, 1] unless the name says otherwise)."""
    types = collections.Counter(i["type"] for i in items)
    queries = [i for i in items if i["type"] not in MUTATION_TYPES]
    inserts = [i for i in items if i["type"] == "INSERT"]
    updates = [i for i in items if i["type"] == "UPDATE"]
    cols = [t for i in items for t in i["column_traits"]]
    prof: dict[str, dict[str, float]] = {
        "type": {t: types[t] / max(len(items), 1) for t in TYPES},
        "category": {
            "SELECT": len(queries) / max(len(items), 1),
            "INSERT": len(inserts) / max(len(items), 1),
            "UPDATE": len(updates) / max(len(items), 1),
        },
    }
    for group, sel in (("query SQL", queries), ("INSERT SQL", inserts), ("UPDATE SQL", updates)):
        prof[group] = {
            k: _share(sel, lambda i, k=k, p=p: re.search(p, i[_TEXT_OF.get(k, "code")], re.I))
            for k, p in CONSTRUCTS.items()
        }
    prof["INSERT SQL"]["column list"] = _share(
        inserts, lambda i: re.match(r"INSERT\s+INTO\s+(`[^`]*`|\S+)\s*\(", i["sql"], re.I)
    )
    prof["UPDATE SQL"]["2+ columns set"] = _share(
        updates, lambda i: i["sql"].upper().split(" WHERE ")[0].count("=") >= 2
    )
    prof["table"] = {
        **{f"name {t}": _share(items, lambda i, t=t: t in i["table_traits"]) for t in _TRAITS},
        **{f"column {t}": _share(cols, lambda c, t=t: t in c) for t in _TRAITS},
        "first column repeats": _share(items, lambda i: i["first_col_repeats"]),
        "placeholder cells": statistics.fmean(i["placeholder_cells"] for i in items),
        "non-ascii cells": statistics.fmean(i["non_ascii_cells"] for i in items),
        "formatted numbers": statistics.fmean(i["formatted_numbers"] for i in items),
    }
    prof["size (not shares)"] = {
        "rows median": statistics.median(i["rows"] for i in items),
        "rows max": max(i["rows"] for i in items),
        "columns median": statistics.median(i["cols"] for i in items),
        "columns max": max(i["cols"] for i in items),
    }
    prof["prompt"] = {
        "AgentBench table line": _share(items, lambda i: i["agentbench_table_line"]),
        "lower-case question": _share(items, lambda i: i["lowercase_question"]),
    }
    prof["answer"] = {
        "several values": _share(queries, lambda i: i["label_len"] > 1),
        "numeric": _share(queries, lambda i: i["label_numeric"]),
    }
    return prof


_TRAITS = ("space", "underscore", "punct", "digit-led", "non-ascii", "lower")


def _tv(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def compare(synth: dict, ref: dict) -> dict[str, Any]:
    gaps, missing = [], []
    for group, feats in ref.items():
        if group == "size (not shares)":
            continue
        for k, v in feats.items():
            if k == "backticks":  # how the gold SQL quotes names is the expert's choice
                continue
            s = synth[group][k]
            gaps.append(abs(s - v))
            if v > 0 and s == 0:
                missing.append(f"{group}: {k}")
    return {
        "type_tv": round(_tv(synth["type"], ref["type"]), 4),
        "category_tv": round(_tv(synth["category"], ref["category"]), 4),
        "feature_gap": round(statistics.fmean(gaps), 4),
        "missing": missing,
    }


def overlap(synth_items: Iterable[dict], ref_items: list[dict]) -> dict[str, int]:
    names = {i["table_name"].strip().lower() for i in ref_items}
    questions = {i["description"].strip().lower() for i in ref_items}
    synth_items = list(synth_items)
    return {
        "table_names": sum(i["table_name"].strip().lower() in names for i in synth_items),
        "questions": sum(i["description"].strip().lower() in questions for i in synth_items),
    }


def _print_table(synth: dict, ref: dict | None) -> None:
    for group, feats in synth.items():
        print(f"\n[{group}]")
        for k, v in feats.items():
            line = f"  {k:<24} synth {v:8.3f}"
            if ref is not None:
                r = ref[group][k]
                line += f"   reference {r:8.3f}   gap {v - r:+8.3f}"
            print(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="synthetic tasks to draw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wikisql-share", type=float, default=0.0)
    ap.add_argument("--benchmark-share", type=float, default=0.0)
    ap.add_argument("--reference", type=Path, help="an AgentBench DB JSONL file")
    args = ap.parse_args(argv)
    for name in ("wikisql_share", "benchmark_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            print(f"--{name.replace('_', '-')} must be in [0, 1]", file=sys.stderr)
            return 2
    if args.n < 1:
        print("--n must be at least 1", file=sys.stderr)
        return 2
    try:
        ref_items = reference_items(args.reference) if args.reference else None
    except CoverageInputError as e:
        print(str(e), file=sys.stderr)
        return 2
    items = synthetic_items(args.n, args.seed, args.wikisql_share, args.benchmark_share)
    synth = profile(items)
    ref = profile(ref_items) if ref_items else None
    _print_table(synth, ref)
    summary: dict[str, Any] = {
        "n": args.n,
        "seed": args.seed,
        "wikisql_share": args.wikisql_share,
        "benchmark_share": args.benchmark_share,
        "types_generated": sorted(t for t, v in synth["type"].items() if v > 0),
    }
    if ref is not None and ref_items is not None:
        summary["reference"] = str(args.reference)
        summary.update(compare(synth, ref))
        summary["overlap"] = overlap(items, ref_items)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
