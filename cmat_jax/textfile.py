"""The one reader of users' text files (data, tokenizer and template files): decoding errors
name the file and the line, which Python's own message does not."""

from __future__ import annotations

from pathlib import Path


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
