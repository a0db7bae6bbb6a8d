"""MySQL surface syntax -> SQLite, for the embedded DBBench backend.

Agents write MySQL (the AgentBench DB task runs on MySQL). The SQLite backend rewrites what
changes outcomes and leaves the rest to SQLite:

- string literals: MySQL backslash escapes (``\\'``, ``\\n``, ...) are decoded, and double-quoted
  strings are strings (not identifiers) as in MySQL's default mode;
- identifiers: MySQL's unquoted form (letters, digits, ``_``, ``$`` and U+0080..U+FFFF, possibly
  starting with a digit, e.g. ``1987_results``, but not all digits) is one token; those SQLite
  cannot read bare (a leading digit or ``$``) and every backtick-quoted one are written with
  backticks, which SQLite reads as identifiers only (a double-quoted name that matches no column
  would silently become a string in SQLite, where MySQL reports an unknown column);
- ``#`` comments are dropped;
- table names compare exactly, as on AgentBench's Linux MySQL: :func:`miscased_table` finds a
  name that matches a table only up to case (the backend then answers MySQL's error 1146);
- a number compared with a column (``Year > 2000``) is compared as a number, as MySQL does for
  a TEXT column against a numeric literal (SQLite would compare text);
- ``CAST(x AS SIGNED|UNSIGNED)`` -> ``CAST(x AS INTEGER)``; ``<=>`` -> ``IS``;
- ``INSERT [INTO] t SET a = x, b = y`` (MySQL's assignment form) -> ``INSERT INTO t (a, b)
  VALUES (x, y)``;
- ``SHOW TABLES``, ``SHOW [FULL] COLUMNS|FIELDS FROM t``, ``DESCRIBE t`` / ``DESC t`` /
  ``EXPLAIN t``, ``SHOW CREATE TABLE t``, ``SHOW DATABASES`` are parsed into a
  :class:`ShowCommand` that the backend answers with MySQL-like rows.

Case- and accent-insensitive comparison, ``LIKE`` with ``\\`` escapes and MySQL functions
(``CONCAT``, ``MD5``, ...) live in the SQLite backend as a collation and Python functions.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable

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


# MySQL's unquoted identifier characters (ASCII letters, digits, _ and $, and U+0080..U+FFFF).
_IDENT_CHAR = r"0-9A-Za-z_$\u0080-\uffff"
# A word: optional leading digits, then at least one non-digit identifier character (an
# identifier may begin with a digit but may not be all digits; numbers are matched first).
_WORD = rf"[0-9]*[A-Za-z_$\u0080-\uffff][{_IDENT_CHAR}]*"
# Only ASCII whitespace separates tokens in MySQL (U+00A0 and friends are identifier characters).
_TOKEN_RE = re.compile(
    r"""(?P<ws>[ \t\n\r\f\v]+)
    |(?P<comment>\#[^\n]*|--(?=\s|$)[^\n]*|/\*[\s\S]*?\*/)
    |(?P<str>'(?:[^'\\]|\\[\s\S]|'')*'|"(?:[^"\\]|\\[\s\S]|"")*")
    |(?P<ident>`(?:[^`]|``)*`)
    |(?P<semi>;)
    |(?P<num>(?:0x[0-9A-Fa-f]+|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(?!["""
    + _IDENT_CHAR
    + r"""]))
    |(?P<word>"""
    + _WORD
    + r""")
    |(?P<op><=>|<>|!=|<=|>=|\|\||&&|:=|<<|>>|[\s\S])""",
    re.VERBOSE,
)
# one left-to-right pass: a backslash escape, or a doubled quote
_STRING_PART_RE = re.compile(r"\\([\s\S])|''|\"\"")


def _decode_string(body: str) -> str:
    return _STRING_PART_RE.sub(
        lambda m: _ESCAPES.get(m.group(1), m.group(1)) if m.group(1) else m.group()[0], body
    )


@functools.lru_cache(maxsize=4096)
def _tokenize(sql: str) -> tuple[Token, ...]:
    tokens: list[Token] = []
    for m in _TOKEN_RE.finditer(sql):
        kind, text = m.lastgroup or "op", m.group()
        if kind == "op" and text in "'\"`":
            raise SQLSyntaxError(f"unterminated {text} quote starting at character {m.start() + 1}")
        if kind == "op" and text == "/" and sql.startswith("/*", m.start()):
            raise SQLSyntaxError(f"unterminated comment starting at character {m.start() + 1}")
        if kind == "str":
            tokens.append(Token("str", text, _decode_string(text[1:-1])))
        elif kind == "ident":
            tokens.append(Token("ident", text, text[1:-1].replace("``", "`")))
        else:
            tokens.append(Token(kind, text, text if kind == "word" else ""))
    return tuple(tokens)


def tokenize(sql: str) -> list[Token]:
    """MySQL lexical tokens (strings decoded with MySQL's backslash escapes)."""
    return list(_tokenize(sql))


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
    """Any name as a SQLite identifier. Backticks, not double quotes: SQLite treats an unknown
    double-quoted name as a string literal, a backtick-quoted one is always an identifier."""
    return "`" + name.replace("`", "``") + "`"


# What SQLite reads as an identifier without quotes (it takes bytes >= 0x80 as letters, and `$`
# after the first character); MySQL words outside this (a leading digit or `$`) get quoted.
_SQLITE_BARE_RE = re.compile(r"[A-Za-z_\u0080-\uffff][0-9A-Za-z_$\u0080-\uffff]*")


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


_INSERT_MODIFIERS = {"IGNORE", "INTO", "LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY"}


def _insert_set_as_values(tokens: list[Token]) -> list[Token]:
    """``INSERT [INTO] t SET a = x, b = y [ON DUPLICATE KEY ...]`` in the VALUES form SQLite
    knows; any other statement (or a malformed assignment list, which SQLite then reports as a
    syntax error) comes back unchanged."""
    sig = [i for i, t in enumerate(tokens) if t.kind not in ("ws", "comment")]
    words = [tokens[i].text.upper() if tokens[i].kind == "word" else "" for i in sig]
    if not words or words[0] not in ("INSERT", "REPLACE"):
        return tokens
    k = 1
    while k < len(sig) and words[k] in _INSERT_MODIFIERS:
        k += 1
    name_at = sig[k] if k < len(sig) else len(tokens)
    into = [Token("op", "INTO ")] if "INTO" not in words[1:k] else []  # optional in MySQL
    k += 1  # the table name
    while k + 1 < len(sig) and tokens[sig[k]].text == ".":
        k += 2  # db.table
    if k >= len(sig) or words[k] != "SET":
        return tokens
    body = tokens[sig[k] + 1 :]
    parts: list[list[Token]] = [[]]  # the assignments, split at top-level commas
    tail: list[Token] = []
    depth = 0
    for j, tok in enumerate(body):
        if tok.kind == "op":
            depth += (tok.text == "(") - (tok.text == ")")
        if depth == 0 and tok.kind == "word" and tok.text.upper() == "ON":
            tail = body[j:]
            break
        if depth == 0 and tok.kind == "op" and tok.text == ",":
            parts.append([])
        else:
            parts[-1].append(tok)
    columns: list[Token] = []
    values: list[Token] = []
    for part in parts:
        sig_part = _significant(part)
        if len(sig_part) < 3 or sig_part[0].kind not in ("ident", "word"):
            return tokens
        if sig_part[1].text != "=":
            return tokens
        eq = part.index(sig_part[1])
        if columns:
            columns.append(Token("op", ", "))
            values.append(Token("op", ", "))
        columns.append(sig_part[0])
        values.extend(part[eq + 1 :])
    return [
        *tokens[:name_at],
        *into,
        *tokens[name_at : sig[k]],
        Token("op", "("),
        *columns,
        Token("op", ") VALUES ("),
        *values,
        Token("op", ") "),
        *tail,
    ]


def to_sqlite(sql: str) -> str:
    """Rewrite one MySQL statement into SQLite syntax (see module docstring)."""
    tokens = _insert_set_as_values(tokenize(sql))
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
        elif tok.kind == "word" and not _SQLITE_BARE_RE.fullmatch(tok.text):
            out.append(sqlite_ident(tok.text))  # e.g. 1987_results, $price
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


# Words after which a name is a table (``FROM t``, ``JOIN t``, ``INTO t``, ``UPDATE t``, ``TABLE
# t``, ``DESCRIBE t``); a comma continues a FROM / UPDATE list until a clause keyword.
_TABLE_BEFORE = frozenset(
    {"FROM", "JOIN", "INTO", "UPDATE", "TABLE", "DESCRIBE", "DESC", "EXPLAIN"}
)
_TABLE_LIST_END = frozenset(
    {
        "WHERE", "GROUP", "ORDER", "LIMIT", "HAVING", "ON", "USING", "SET", "UNION", "VALUES",
        "SELECT", "WINDOW", "INTERSECT", "EXCEPT", "FOR", "LOCK", "INTO", "NATURAL", "INNER",
        "LEFT", "RIGHT", "CROSS", "STRAIGHT_JOIN", "JOIN", "PARTITION", "OUTER",
    }
)  # fmt: skip


def miscased_table(sql: str, tables: Iterable[str]) -> str | None:
    """The first table name in ``sql`` that equals one of ``tables`` only up to letter case, or
    None. MySQL on Linux (AgentBench's server, ``lower_case_table_names=0``) compares table
    names exactly, so such a statement fails there (``Table ... doesn't exist``); SQLite would
    run it. Checked: names after FROM/JOIN/INTO/UPDATE/TABLE/DESCRIBE, names in a FROM or
    UPDATE list, and qualifiers (``t.col``) that are not aliases. ``CREATE`` is left alone
    (MySQL may create a table whose name differs from another only in case)."""
    exact = set(tables)
    folded = {t.lower() for t in exact}
    toks = _significant(tokenize(sql))
    if not toks or (toks[0].kind == "word" and toks[0].text.upper() == "CREATE"):
        return None
    aliases: set[str] = set()
    candidates: list[str] = []
    in_list, depth, last_was_table = False, 0, False
    for i, tok in enumerate(toks):
        upper = tok.text.upper() if tok.kind == "word" else ""
        is_name = tok.kind == "ident" or (tok.kind == "word" and upper not in _TABLE_BEFORE)
        prev = toks[i - 1] if i else None
        prev_upper = prev.text.upper() if prev is not None and prev.kind == "word" else ""
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if tok.kind == "op" and tok.text in "()":
            depth += 1 if tok.text == "(" else -1
            in_list = False
        if upper in _TABLE_LIST_END:
            in_list = False
        if (
            is_name
            and prev is not None
            and (
                prev_upper in _TABLE_BEFORE or (in_list and prev.kind == "op" and prev.text == ",")
            )
        ):
            if nxt is not None and nxt.kind == "op" and nxt.text == ".":
                continue  # db.table: the database part
            candidates.append(tok.value)
            in_list = prev_upper in ("FROM", "UPDATE") or in_list
            last_was_table = True
            continue
        if is_name and last_was_table and upper not in _TABLE_LIST_END:
            aliases.add(tok.value)  # FROM t alias / FROM t AS alias
        elif is_name and nxt is not None and nxt.kind == "op" and nxt.text == ".":
            candidates.append(tok.value)  # qualifier of t.col
        last_was_table = last_was_table and upper == "AS"
    for name in candidates:
        if name not in exact and name.lower() in folded and name not in aliases:
            return name
    return None


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
