"""The one reader of users' text and JSON files (data, configs, tokenizer and template files):
errors name the file and the line, which Python's own messages do not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_text(path: Path, error: type[Exception]) -> str:
    """The file's UTF-8 text. Bytes that are not UTF-8 raise `error` (the caller's one-line
    error type) naming the file, the line and the byte offset."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        bad = raw[e.start : e.start + 1]
        raise error(f"{path}:{line}: not UTF-8 text (byte {bad!r} at offset {e.start})") from None


def read_json(path: Path, error: type[Exception]) -> Any:
    """The file's JSON value; a file that is not UTF-8 JSON raises `error` naming the file and
    line. A missing file raises FileNotFoundError (callers word that case themselves)."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
