"""MySQL surface syntax -> SQLite, for the embedded DBBench backend.

Agents write MySQL (the AgentBench DB task runs on MySQL). The SQLite backend rewrites what
changes outcomes and leaves the rest to SQLite:

- string literals: MySQL backslash escapes (``\\'``, ``\\n``, ...) are decoded, and double-quoted
  strings are strings (not identifiers) as in MySQL's default mode;
- backtick identifiers become SQLite double-quoted identifiers; ``#`` comments are dropped;
- a number compared with a column (``Year > 2000``) is compared as a number, as MySQL does for
  a TEXT column against a numeric literal (SQLite would compare text);
- ``CAST(x AS SIGNED|UNSIGNED)`` -> ``CAST(x AS INTEGER)``; ``<=>`` -> ``IS``;
- ``SHOW TABLES``, ``SHOW [FULL] COLUMNS|FIELDS FROM t``, ``DESCRIBE t`` / ``DESC t`` /
  ``EXPLAIN t``, ``SHOW CREATE TABLE t``, ``SHOW DATABASES`` are parsed into a
  :class:`ShowCommand` that the backend answers with MySQL-like rows.

Case- and accent-insensitive comparison, ``LIKE`` with ``\\`` escapes and MySQL functions
(``CONCAT``, ``MD5``, ...) live in the SQLite backend as a collation and Python functions.
"""

from __future__ import annotations

import dataclasses
import re

_ESCAPES = {
    "0": "\x00",
    "'": "'",
    '"': '"',
    "b": "\b",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "Z": "\x1a",
    "\\": "\\",
    # MySQL keeps the backslash before % and _ so LIKE can still see the escape.
    "%": "\\%",
    "_": "\\_",
}


class SQLSyntaxError(ValueError):
    """Unterminated literal or comment: reported to the agent like a MySQL syntax error."""


@dataclasses.dataclass(frozen=True)
class Token:
    kind: str  # ws | comment | str | ident | word | num | op | semi
    text: str  # the source text
    value: str = ""  # decoded string / identifier name


_WORD_RE = re.compile(r"[A-Za-z_$\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")
_NUM_RE = re.compile(r"0x[0-9A-Fa-f]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OPS = ("<=>", "<>", "!=", "<=", ">=", "||", "&&", ":=", "<<", ">>")


def _read_quoted(sql: str, i: int, quote: str, backslash: bool) -> tuple[str, int]:
    """Decode a quoted run starting at sql[i] == quote; return (value, index after it)."""
    out: list[str] = []
    j = i + 1
    n = len(sql)
    while j < n:
        c = sql[j]
        if backslash and c == "\\" and j + 1 < n:
            nxt = sql[j + 1]
            out.append(_ESCAPES.get(nxt, nxt))
            j += 2
            continue
        if c == quote:
            if j + 1 < n and sql[j + 1] == quote:  # doubled quote = one quote
                out.append(quote)
                j += 2
                continue
            return "".join(out), j + 1
        out.append(c)
        j += 1
    raise SQLSyntaxError(f"unterminated {quote} quote starting at character {i + 1}")


def tokenize(sql: str) -> list[Token]:
    tokens: list[Token] = []
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c.isspace():
            j = i
            while j < n and sql[j].isspace():
                j += 1
            tokens.append(Token("ws", sql[i:j]))
            i = j
        elif c == "#" or (sql.startswith("--", i) and (i + 2 >= n or sql[i + 2].isspace())):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            tokens.append(Token("comment", sql[i:j]))
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0:
                raise SQLSyntaxError(f"unterminated comment starting at character {i + 1}")
            tokens.append(Token("comment", sql[i : j + 2]))
            i = j + 2
        elif c in "'\"":
            value, j = _read_quoted(sql, i, c, backslash=True)
            tokens.append(Token("str", sql[i:j], value))
            i = j
        elif c == "`":
            value, j = _read_quoted(sql, i, "`", backslash=False)
            tokens.append(Token("ident", sql[i:j], value))
            i = j
        elif c == ";":
            tokens.append(Token("semi", c))
            i += 1
        elif m := _NUM_RE.match(sql, i):
            # a number glued to letters (e.g. 1st, 2abc) is a word in MySQL
            w = _WORD_RE.match(sql, m.end())
            if w and not m.group().lower().startswith("0x"):
                tokens.append(Token("word", sql[i : w.end()], sql[i : w.end()]))
                i = w.end()
            else:
                tokens.append(Token("num", m.group()))
                i = m.end()
        elif m := _WORD_RE.match(sql, i):
            tokens.append(Token("word", m.group(), m.group()))
            i = m.end()
        else:
            op = next((o for o in _OPS if sql.startswith(o, i)), c)
            tokens.append(Token("op", op))
            i += len(op)
    return tokens


def _significant(tokens: list[Token]) -> list[Token]:
    return [t for t in tokens if t.kind not in ("ws", "comment")]


def split_statements(sql: str) -> list[str]:
    """Split at top-level ``;``; statements that are empty or only comments are dropped."""
    parts: list[list[Token]] = [[]]
    for tok in tokenize(sql):
        if tok.kind == "semi":
            parts.append([])
        else:
            parts[-1].append(tok)
    return ["".join(t.text for t in p).strip() for p in parts if _significant(p)]


def first_keyword(sql: str) -> str:
    """Upper-cased first word of a statement, skipping comments and opening parentheses."""
    for tok in _significant(tokenize(sql)):
        if tok.kind == "op" and tok.text == "(":
            continue
        return tok.text.upper() if tok.kind == "word" else tok.text
    return ""


def sqlite_string(value: str) -> str:
    if "\x00" in value:  # SQLite's C API stops at NUL inside SQL text
        return f"CAST(X'{value.encode('utf-8').hex()}' AS TEXT)"
    return "'" + value.replace("'", "''") + "'"


def sqlite_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_COMPARISONS = {"=", "<", ">", "<=", ">=", "<>", "!="}


def _prev_sig(tokens: list[Token], i: int) -> Token | None:
    for j in range(i - 1, -1, -1):
        if tokens[j].kind not in ("ws", "comment"):
            return tokens[j]
    return None


def _next_sig(tokens: list[Token], i: int) -> Token | None:
    for j in range(i + 1, len(tokens)):
        if tokens[j].kind not in ("ws", "comment"):
            return tokens[j]
    return None


def to_sqlite(sql: str) -> str:
    """Rewrite one MySQL statement into SQLite syntax (see module docstring)."""
    tokens = tokenize(sql)
    out: list[str] = []
    for i, tok in enumerate(tokens):
        if tok.kind == "comment":
            out.append(" ")
        elif tok.kind == "str":
            out.append(sqlite_string(tok.value))
        elif tok.kind == "ident":
            out.append(sqlite_ident(tok.value))
        elif tok.kind == "op" and tok.text == "<=>":
            out.append(" IS ")
        elif tok.kind == "op" and tok.text == "&&":
            out.append(" AND ")
        elif tok.kind == "word" and tok.text.upper() in ("SIGNED", "UNSIGNED"):
            prev = _prev_sig(tokens, i)
            is_cast = prev is not None and prev.text.upper() == "AS"
            out.append("INTEGER" if is_cast else tok.text)
        elif tok.kind == "num":
            prev, nxt = _prev_sig(tokens, i), _next_sig(tokens, i)
            prev_op = prev is not None and (
                (prev.kind == "op" and prev.text in _COMPARISONS) or prev.text.upper() == "BETWEEN"
            )
            next_op = nxt is not None and nxt.kind == "op" and nxt.text in _COMPARISONS
            # NUMERIC affinity on the literal makes SQLite compare a TEXT column numerically.
            out.append(f"CAST({tok.text} AS NUMERIC)" if prev_op or next_op else tok.text)
        else:
            out.append(tok.text)
    return "".join(out).strip()


@dataclasses.dataclass(frozen=True)
class ShowCommand:
    """A MySQL introspection statement the backend answers itself."""

    kind: str  # tables | full_tables | columns | full_columns | create_table | databases | index
    table: str = ""
    like: str | None = None


def _name(tok: Token | None) -> str | None:
    if tok is None:
        return None
    if tok.kind in ("ident", "word"):
        return tok.value
    if tok.kind == "str":
        return tok.value
    return None


def parse_show(sql: str) -> ShowCommand | None:
    """Recognise SHOW / DESCRIBE forms; None for every other statement."""
    toks = _significant(tokenize(sql))
    if not toks or toks[0].kind != "word":
        return None
    words = [t.text.upper() if t.kind == "word" else "" for t in toks]
    head = words[0]

    def like_at(k: int) -> str | None:
        if k < len(toks) and words[k] == "LIKE" and k + 1 < len(toks) and toks[k + 1].kind == "str":
            return toks[k + 1].value
        return None

    if head in ("DESCRIBE", "DESC", "EXPLAIN") and len(toks) in (2, 3):
        if words[1] in ("SELECT", "INSERT", "UPDATE", "DELETE", "REPLACE", "WITH", "FORMAT"):
            return None
        table = _name(toks[1])
        if table is None:
            return None
        col = _name(toks[2]) if len(toks) == 3 else None
        return ShowCommand("columns", table, col)
    if head != "SHOW" or len(toks) < 2:
        return None
    k = 1
    full = words[k] == "FULL"
    if full:
        k += 1
    if k < len(toks) and words[k] == "TABLES":
        k += 1
        if k + 1 < len(toks) and words[k] in ("FROM", "IN"):
            k += 2
        return ShowCommand("full_tables" if full else "tables", like=like_at(k))
    if k < len(toks) and words[k] in ("COLUMNS", "FIELDS") and k + 2 <= len(toks) - 1:
        if words[k + 1] not in ("FROM", "IN"):
            return None
        table = _name(toks[k + 2]) or ""
        k += 3
        if k + 1 < len(toks) and words[k] in ("FROM", "IN"):
            k += 2
        return ShowCommand("full_columns" if full else "columns", table, like_at(k))
    if words[1:3] == ["CREATE", "TABLE"] and len(toks) >= 4:
        return ShowCommand("create_table", _name(toks[3]) or "")
    if words[1] in ("DATABASES", "SCHEMAS"):
        return ShowCommand("databases", like=like_at(2))
    if words[1] in ("INDEX", "INDEXES", "KEYS") and len(toks) >= 4:
        return ShowCommand("index", _name(toks[3]) or "")
    return None
