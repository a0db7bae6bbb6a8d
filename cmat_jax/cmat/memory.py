"""Short-term memory (the episode's messages under a token budget) and long-term memory
(a persistent SQLite store of past episodes and reflections, retrieved by BM25).

docs/method.md §3. STM is what the Assistant sees of the current episode; LTM carries lessons
across episodes: written the moment an episode ends, read at the start of the next.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

Message = dict[str, str]
TokenCounter = Callable[[str], int]

# --- short-term memory ------------------------------------------------------------------


@dataclasses.dataclass
class StmTurn:
    """One exchange: the Assistant's action and what came back (observation or rejection)."""

    action: str
    feedback: str
    kind: Literal["observation", "rejection"] = "observation"


class ShortTermMemory:
    """The episode's messages, fitted to a token budget.

    `head` is the fixed start of the prompt (system message, then the task message, as
    `roles.assistant_messages(role, task, (), ltm)` builds it); turns are appended as the episode
    runs. `messages()` returns head + turns within `budget_tokens`, reducing in this order until
    it fits:
      1. shorten old observations (oldest first) to `short_obs_chars` characters,
      2. drop old turn pairs (oldest first), with a note in the task message saying how many,
      3. the same two steps on the `keep_recent` protected turns, except the newest.
    The head and the newest turn are never cut; if they alone exceed the budget the result is
    over budget (`fits()` tells). Counts are `count_tokens(content) + message_overhead` per
    message (the overhead stands in for the chat template's role markers).
    """

    def __init__(
        self,
        head: Sequence[Message],
        count_tokens: TokenCounter,
        budget_tokens: int,
        *,
        keep_recent: int = 2,
        short_obs_chars: int = 160,
        message_overhead: int = 4,
    ) -> None:
        if len(head) < 1:
            raise ValueError("ShortTermMemory: head needs at least the task message")
        if budget_tokens < 1 or keep_recent < 1:
            raise ValueError(
                f"ShortTermMemory: budget_tokens ({budget_tokens}) and keep_recent ({keep_recent}) must be >= 1"
            )
        self.head = [dict(m) for m in head]
        self.turns: list[StmTurn] = []
        self.budget_tokens = budget_tokens
        self.keep_recent = keep_recent
        self.short_obs_chars = short_obs_chars
        self.message_overhead = message_overhead
        self._count = count_tokens
        self._cache: dict[str, int] = {}

    # building
    def add_step(self, action: str, observation: str) -> None:
        self.turns.append(StmTurn(action, observation, "observation"))

    def add_rejection(self, action: str, feedback: str) -> None:
        self.turns.append(StmTurn(action, feedback, "rejection"))

    # counting
    def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = int(self._count(text)) + self.message_overhead
        return n

    def token_count(self, messages: Sequence[Message]) -> int:
        return sum(self.count(m["content"]) for m in messages)

    def _shorten(self, text: str) -> str:
        if len(text) <= self.short_obs_chars:
            return text
        return f"{text[: self.short_obs_chars]} ... [{len(text) - self.short_obs_chars} characters cut]"

    def _fit(self) -> tuple[list[StmTurn], int]:
        """Turns that fit the budget and how many old turns were dropped."""
        turns = [dataclasses.replace(t) for t in self.turns]
        alive = [True] * len(turns)
        cost = [self.count(t.action) + self.count(t.feedback) for t in turns]
        head_cost = self.token_count(self.head)
        # The omission note costs a few tokens; reserve them once anything is dropped.
        note_cost = self._count(self._note(len(turns))) if turns else 0
        dropped = 0

        def total() -> int:
            return (
                head_cost
                + sum(c for c, a in zip(cost, alive, strict=True) if a)
                + (note_cost if dropped else 0)
            )

        n = len(turns)
        protected_from = max(0, n - self.keep_recent)
        phases = [range(0, protected_from), range(protected_from, n - 1)]
        for idx in phases:
            for i in idx:
                if total() <= self.budget_tokens:
                    break
                if turns[i].kind == "observation":
                    turns[i].feedback = self._shorten(turns[i].feedback)
                    cost[i] = self.count(turns[i].action) + self.count(turns[i].feedback)
            for i in idx:
                if total() <= self.budget_tokens:
                    break
                alive[i] = False
                dropped += 1
        # Last resort before the prompt no longer fits: shorten the newest observation too.
        if n and total() > self.budget_tokens and turns[-1].kind == "observation":
            turns[-1].feedback = self._shorten(turns[-1].feedback)
        return [t for t, a in zip(turns, alive, strict=True) if a], dropped

    @staticmethod
    def _note(dropped: int) -> str:
        return f"\n\n(Note: {dropped} earlier steps are not shown, to save space.)"

    def turn_messages(self) -> list[Message]:
        """The fitted turns alone (assistant action, user feedback, ...)."""
        return self._messages_of(self._fit()[0])

    @staticmethod
    def _messages_of(turns: Sequence[StmTurn]) -> list[Message]:
        out: list[Message] = []
        for t in turns:
            out.append({"role": "assistant", "content": t.action})
            out.append({"role": "user", "content": t.feedback})
        return out

    def messages(self) -> list[Message]:
        """The Assistant's prompt: head (+ omission note) + fitted turns."""
        turns, dropped = self._fit()
        head = [dict(m) for m in self.head]
        if dropped:
            head[-1]["content"] += self._note(dropped)
        return head + self._messages_of(turns)

    def fits(self) -> bool:
        return self.token_count(self.messages()) <= self.budget_tokens

    def summary(self, max_chars: int = 600) -> str:
        """A compact trajectory summary for long-term memory: actions and short feedback."""
        parts = []
        for i, t in enumerate(self.turns, 1):
            tag = "rejected" if t.kind == "rejection" else "->"
            parts.append(f"{i}. {_compact_action(t.action)} {tag} {_compact(t.feedback, 80)}")
        text = " | ".join(parts)
        return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


_CODE_BLOCK = re.compile(r"```(?:sql|bash)?\s*(.*?)```", re.S | re.I)
_FINAL = re.compile(r"final answer\s*:\s*(.*)|\bAct:\s*answer\((.*)\)", re.I)
_FINISH = re.compile(r"\bAct:\s*finish", re.I)


def _compact(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _compact_action(action: str) -> str:
    """The executable part of a proposal: its SQL / bash block or its answer (DB's "Final
    Answer:", OS's "Act: answer(...)" or "Act: finish"), else its text."""
    m = _CODE_BLOCK.search(action)
    if m:
        return _compact(m.group(1), 160)
    m = _FINAL.search(action)
    if m:
        return "answer " + _compact(m.group(1) if m.group(1) is not None else m.group(2), 120)
    if _FINISH.search(action):
        return "finish"
    return _compact(action, 160)


# --- long-term memory -------------------------------------------------------------------


@dataclasses.dataclass
class MemoryRecord:
    """One finished episode, as stored in long-term memory."""

    task_family: str
    task_id: str
    task_text: str
    trajectory_summary: str
    reflection: str
    reward: float
    split: str = "train"
    created_at: float | None = None  # set on write when None
    id: int | None = None  # set on write


@dataclasses.dataclass(frozen=True)
class ReadPolicy:
    """Which records retrieval may read.

    readable_splits: splits whose records may be injected (similar tasks and same-task).
    reflexion: also read the *same task's* records from any split — the Reflexion retry
      protocol, where attempt n+1 on an evaluation item sees the reflections of attempts 1..n.
      Similar-task retrieval still reads `readable_splits` only, so evaluation items never
      leak into each other.
    Training reads training memory; plain evaluation reads training memory but nothing written
    on evaluation items; only a run that reports reflexion retries as such sets `reflexion`.
    """

    readable_splits: tuple[str, ...] = ("train",)
    reflexion: bool = False

    @classmethod
    def training(cls) -> ReadPolicy:
        return cls(("train",), reflexion=False)

    @classmethod
    def evaluation(cls, reflexion: bool = False) -> ReadPolicy:
        return cls(("train",), reflexion=reflexion)


@dataclasses.dataclass(frozen=True)
class Retrieved:
    record: MemoryRecord
    source: Literal["same_task", "similar"]
    score: float
    snippet: str
    tokens: int


_WORD = re.compile(r"[a-z0-9]+")


def bm25_tokenize(text: str) -> list[str]:
    """Lowercase alphanumeric words; snake_case and punctuation split into parts."""
    return _WORD.findall(text.lower())


def bm25_scores(
    query: Sequence[str], docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75
) -> np.ndarray:
    """Okapi BM25 of each tokenized doc for a tokenized query, shape [len(docs)].

    idf(q) = ln(1 + (N - df + 0.5) / (df + 0.5)) (never negative); each distinct query term
    counts once; score = sum_q idf(q) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)).
    """
    n_docs = len(docs)
    if n_docs == 0:
        return np.zeros(0)
    lengths = np.array([len(d) for d in docs], dtype=np.float64)
    avgdl = max(float(lengths.mean()), 1e-9)
    counts = [Counter(d) for d in docs]
    terms = list(dict.fromkeys(query))
    scores = np.zeros(n_docs)
    norm = k1 * (1.0 - b + b * lengths / avgdl)
    for q in terms:
        tf = np.array([c.get(q, 0) for c in counts], dtype=np.float64)
        df = float((tf > 0).sum())
        if df == 0:
            continue
        idf = math.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
        scores += idf * tf * (k1 + 1.0) / (tf + norm)
    return scores


_SCHEMA_VERSION = "1"


class _SchemaError(ValueError):
    """An SQLite file whose tables are not this long-term memory's."""


_COLUMNS = (
    "id",
    "task_family",
    "task_id",
    "task_text",
    "trajectory_summary",
    "reflection",
    "reward",
    "created_at",
    "split",
)


class LongTermMemory:
    """Persistent experience store: one SQLite file (e.g. `<run_dir>/ltm.sqlite`).

    Similarity is BM25 over task text, not the base model's mean-pooled hidden states:
    BM25 is cheap (no model forward per record or query), deterministic (same store, same
    retrieval — reproducible runs and tests), independent of the weights being tuned (hidden
    states drift as LoRA updates them, so stored embeddings go stale) and works before any
    tuning. For the DB tasks the useful overlap is lexical anyway: table and column names,
    operation words (insert, update, average, count), which BM25 weights by rarity.

    Safe for one writing process with any number of readers: WAL journal, every write a
    transaction, a lock around the connection so threads of the writer can share it.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        except sqlite3.Error as e:
            raise ValueError(f"{self.path}: cannot open the long-term memory ({e})") from e
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._init_schema()
        except _SchemaError:
            self._conn.close()
            raise
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise ValueError(f"{self.path}: not a usable long-term-memory SQLite file ({e})") from e

    def _init_schema(self) -> None:
        with self._conn:
            self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._conn.execute(
                """CREATE TABLE IF NOT EXISTS records (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    task_family TEXT NOT NULL,
                    task_id TEXT NOT NULL,
                    task_text TEXT NOT NULL,
                    trajectory_summary TEXT NOT NULL,
                    reflection TEXT NOT NULL,
                    reward REAL NOT NULL,
                    created_at REAL NOT NULL,
                    split TEXT NOT NULL)"""
            )
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (_SCHEMA_VERSION,),
            )
        (version,) = self._conn.execute(
            "SELECT value FROM meta WHERE key = 'schema_version'"
        ).fetchone()
        cols = tuple(r[1] for r in self._conn.execute("PRAGMA table_info(records)"))
        if version != _SCHEMA_VERSION or cols != _COLUMNS:
            raise _SchemaError(
                f"{self.path}: long-term memory schema version {version} with columns {cols}; "
                f"expected version {_SCHEMA_VERSION} with {_COLUMNS}"
            )
        with self._conn:
            self._conn.execute(
                "CREATE INDEX IF NOT EXISTS records_family_task ON records (task_family, task_id)"
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> LongTermMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # writing
    def add(self, record: MemoryRecord) -> MemoryRecord:
        """Store one finished episode; returns it with `id` and `created_at` filled."""
        for name in ("task_family", "task_id", "split"):
            if not getattr(record, name):
                raise ValueError(f"MemoryRecord.{name} must be a non-empty string")
        if not 0.0 <= record.reward <= 1.0:
            raise ValueError(f"MemoryRecord.reward must be in [0, 1], got {record.reward!r}")
        created = self._clock() if record.created_at is None else float(record.created_at)
        with self._lock, self._conn:
            cur = self._conn.execute(
                "INSERT INTO records (task_family, task_id, task_text, trajectory_summary, "
                "reflection, reward, created_at, split) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.task_family,
                    record.task_id,
                    record.task_text,
                    record.trajectory_summary,
                    record.reflection,
                    float(record.reward),
                    created,
                    record.split,
                ),
            )
        return dataclasses.replace(record, id=cur.lastrowid, created_at=created)

    def truncate(self, keep: int) -> None:
        """Keep the first `keep` records (by id) and drop the rest: a crashed run resumed from a
        checkpoint taken at `keep` records rewrites the later ones, with the same ids."""
        with self._lock, self._conn:
            row = self._conn.execute(
                "SELECT id FROM records ORDER BY id LIMIT 1 OFFSET ?", (max(keep - 1, 0),)
            ).fetchone()
            last_id = row[0] if keep and row else 0
            if keep and not row:
                return  # fewer than `keep` records: nothing was written after
            self._conn.execute("DELETE FROM records WHERE id > ?", (last_id,))
            self._conn.execute(
                "UPDATE sqlite_sequence SET seq = ? WHERE name = 'records'", (last_id,)
            )

    # reading
    def _select(self, where: str, args: Sequence[object]) -> list[MemoryRecord]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM records WHERE {where} ORDER BY created_at DESC, id DESC"
        with self._lock:
            rows = self._conn.execute(sql, tuple(args)).fetchall()
        return [MemoryRecord(**dict(zip(_COLUMNS, row, strict=True))) for row in rows]

    def records(self, task_family: str | None = None) -> list[MemoryRecord]:
        """All records (of one family), newest first."""
        if task_family is None:
            return self._select("1", ())
        return self._select("task_family = ?", (task_family,))

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def retrieve(
        self,
        task_family: str,
        task_id: str,
        task_text: str,
        *,
        k: int,
        token_budget: int,
        count_tokens: TokenCounter,
        policy: ReadPolicy = ReadPolicy(),
        solutions: bool = True,
        similar: bool = True,
    ) -> list[Retrieved]:
        """Records to inject at the start of an episode, in order.

        1. The same task's earlier reflections, newest first (Reflexion retry).
        2. (`similar`) Other tasks of the same family by BM25 of their task text against
           `task_text`, best first; one record per task (its best reward, then newest), zero
           scores left out.
        At most `k` records; a snippet that would push the total past `token_budget` tokens is
        skipped (later, shorter ones may still fit), and so is a lesson already injected.
        """
        if k <= 0 or token_budget <= 0:
            return []
        readable = tuple(policy.readable_splits)
        marks = ", ".join("?" * len(readable)) or "NULL"
        split_clause = "1" if policy.reflexion else f"split IN ({marks})"
        split_args: tuple[str, ...] = () if policy.reflexion else readable
        same = self._select(
            f"task_family = ? AND task_id = ? AND reflection != '' AND {split_clause}",
            (task_family, task_id, *split_args),
        )
        candidates: list[tuple[MemoryRecord, Literal["same_task", "similar"], float]] = [
            (r, "same_task", math.inf) for r in same
        ]

        others = (
            self._select(
                f"task_family = ? AND task_id != ? AND split IN ({marks})",
                (task_family, task_id, *readable),
            )
            if similar
            else []
        )
        best: dict[str, MemoryRecord] = {}
        for r in others:  # newest first, so ">" keeps the newest among equal rewards
            if r.task_id not in best or r.reward > best[r.task_id].reward:
                best[r.task_id] = r
        docs = list(best.values())
        if docs:
            scores = bm25_scores(
                bm25_tokenize(task_text), [bm25_tokenize(r.task_text) for r in docs]
            )
            order = sorted(range(len(docs)), key=lambda i: -scores[i])  # stable: newest on ties
            candidates += [(docs[i], "similar", float(scores[i])) for i in order if scores[i] > 0]

        out: list[Retrieved] = []
        used = 0
        lessons: set[str] = set()
        for record, source, score in candidates:
            if len(out) >= k:
                break
            snippet = format_snippet(record, source, solutions)
            lesson = " ".join(record.reflection.split()).lower()
            if not snippet or (lesson and lesson in lessons):
                continue  # nothing to say, or a lesson already injected (a Reflector repeats)
            n = int(count_tokens(snippet))
            if used + n > token_budget:
                continue
            used += n
            lessons.add(lesson)
            out.append(Retrieved(record, source, score, snippet, n))
        return out


def format_snippet(
    record: MemoryRecord, source: Literal["same_task", "similar"], solutions: bool = True
) -> str:
    """The text injected for one record: a lesson, or (`solutions`) how a similar task was
    solved; "" when there is nothing to inject."""
    if source == "same_task":
        return f"Your earlier attempt at this task failed: {record.reflection.strip()}"
    if record.reflection.strip():
        # Not quoted: the other task's table and column names get copied into this one's SQL.
        return f"On a similar task: {record.reflection.strip()}"
    task = _compact(record.task_text, 120)
    if record.reward < 1.0 or not solutions:
        return ""  # a failed attempt without a lesson teaches nothing: not injected
    return f"A similar task ({task}) was solved with: {record.trajectory_summary.strip()}"
