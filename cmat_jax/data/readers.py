"""JSONL readers: OpenAI `messages` form and ShareGPT / AgentInstruct `conversations` form.

Every problem is reported as a one-line DataError naming `path:line`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from cmat_jax.data.conversation import Conversation, Message
from cmat_jax.data.errors import DataError

Format = Literal["auto", "messages", "sharegpt"]

# Role spellings seen in the wild -> canonical role. Anything else is an error.
_MESSAGES_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "observation": "tool",
    "function": "tool",
    "tool": "tool",
}


@dataclass(frozen=True)
class ReadResult:
    conversations: list[Conversation]
    skipped: int  # conversations without a trained assistant turn (skip_untrainable=True)


def read_jsonl(
    path: str | Path, fmt: Format = "auto", *, skip_untrainable: bool = False
) -> ReadResult:
    """Read one JSONL file of conversations (blank lines are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    convs: list[Conversation] = []
    skipped = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            conv = parse_record(record, where, fmt)
            if conv.trained_turns == 0:
                if skip_untrainable:
                    skipped += 1
                    continue
                raise DataError(
                    f"{where}: conversation has no trained assistant turn "
                    "(set skip_untrainable to skip such lines)"
                )
            convs.append(conv)
    if not convs:
        raise DataError(f"{path}: no usable conversations in the file")
    return ReadResult(convs, skipped)


def parse_record(record: Any, where: str, fmt: Format = "auto") -> Conversation:
    """One JSON record -> Conversation; `where` is the `path:line` used in errors."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        if "messages" in record:
            fmt = "messages"
        elif "conversations" in record:
            fmt = "sharegpt"
        else:
            raise DataError(f"{where}: record has neither 'messages' nor 'conversations'")
    if fmt == "messages":
        messages = _parse_messages(record, where)
    elif fmt == "sharegpt":
        messages = _parse_sharegpt(record, where)
    else:
        raise DataError(f"{where}: unknown data format {fmt!r}")
    if not messages:
        raise DataError(f"{where}: conversation is empty")
    return Conversation(tuple(messages), where)


def _turns(record: dict, key: str, where: str) -> Iterator[tuple[str, dict]]:
    """`(where: key[i], turn)` for each turn of the list `record[key]` (each must be an object)."""
    turns = record.get(key)
    if not isinstance(turns, list):
        raise DataError(f"{where}: field '{key}' must be a list of turns")
    for i, turn in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} must be an object")
        yield at, turn


def _message(
    turn: dict, at: str, role_key: str, roles: dict[str, str], content_key: str
) -> Message:
    role = _role(turn, role_key, roles, at)
    content = _content(turn.get(content_key), f"{at}.{content_key}")
    return Message(role, content, _weight(turn, at))


def _parse_messages(record: dict, where: str) -> list[Message]:
    return [
        _message(turn, at, "role", _MESSAGES_ROLES, "content")
        for at, turn in _turns(record, "messages", where)
    ]


def _parse_sharegpt(record: dict, where: str) -> list[Message]:
    out = []
    system = record.get("system")
    if system is not None:
        out.append(Message("system", _content(system, f"{where}: system")))
    for at, turn in _turns(record, "conversations", where):
        message = _message(turn, at, "from", _SHAREGPT_ROLES, "value")
        if "loss" in turn:  # AgentInstruct: per-turn `loss: true|false`
            loss = turn["loss"]
            if not isinstance(loss, bool) and loss is not None:
                raise DataError(f"{at}.loss must be true, false or null, got {loss!r}")
            if loss is False:
                message = replace(message, weight=0.0)
        out.append(message)
    return out


def _role(turn: dict, key: str, table: dict[str, str], at: str) -> str:
    if key not in turn:
        raise DataError(f"{at} has no '{key}' field")
    raw = turn[key]
    role = table.get(raw.lower()) if isinstance(raw, str) else None
    if role is None:
        raise DataError(f"{at}.{key}: unknown role {raw!r} (expected one of {sorted(table)})")
    return role


def _content(value: Any, at: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": ...}, ...]
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in value
    ):
        return "".join(p["text"] for p in value)
    if value is None:
        raise DataError(f"{at} is missing")
    raise DataError(f"{at} must be a string (or a list of text parts), got {type(value).__name__}")


def _weight(turn: dict, at: str) -> float:
    w = turn.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise DataError(f"{at}.weight must be a finite number >= 0, got {w!r}")
    return float(w)
