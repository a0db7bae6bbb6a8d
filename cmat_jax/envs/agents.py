"""The agent side of an episode, and the non-model agents used to check the environment.

An :class:`Agent` is called on a batch of message lists (one per live episode, OpenAI-style)
and returns one reply per list. A reply of ``None`` means the agent cannot continue that
episode (e.g. its context is full); the evaluator ends the episode with status
``agent_context_limit``.

- :class:`NullAgent` answers nothing (every episode fails: the scorer's floor).
- :class:`ReplayAgent` replays fixed assistant turns per task (keyed by the task's first user
  message): :func:`oracle_agent` replays the gold labels, the synthetic generator's scripted
  expert plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from cmat_jax.envs.base import Message
from cmat_jax.envs.dbbench import DBTask


@runtime_checkable
class Agent(Protocol):
    def act(self, batch: Sequence[Sequence[Message]]) -> list[str | None]: ...


class NullAgent:
    """Replies with an empty message: no action, no answer."""

    def act(self, batch: Sequence[Sequence[Message]]) -> list[str | None]:
        return ["" for _ in batch]


def task_key(messages: Sequence[Message]) -> str:
    """The content of the first user message: the task text an episode starts from."""
    for m in messages:
        if m.get("role") == "user":
            return m.get("content", "")
    raise ValueError("episode has no user message")


class ReplayAgent:
    """Replays a fixed list of assistant turns per task; turn k = number of assistant
    messages already in the episode."""

    def __init__(self, plans: Iterable[tuple[str, list[str]]]) -> None:
        self.plans: dict[str, list[str]] = {}
        for key, plan in plans:
            if key in self.plans and self.plans[key] != plan:
                raise ValueError(
                    "two tasks share the same task text but need different replies; "
                    f"a replay agent cannot tell them apart: {key[:80]!r}"
                )
            self.plans[key] = plan

    def act(self, batch: Sequence[Sequence[Message]]) -> list[str | None]:
        out: list[str | None] = []
        for messages in batch:
            plan = self.plans.get(task_key(messages))
            if plan is None:
                raise KeyError(f"no replay plan for task {task_key(messages)[:80]!r}")
            turn = sum(1 for m in messages if m.get("role") == "assistant")
            out.append(plan[turn] if turn < len(plan) else "")
        return out


def oracle_plan(task: DBTask) -> list[str]:
    """Gold replay: query items answer ``label``; INSERT/UPDATE/DELETE run the gold statement
    from ``label`` (when the item has one) then answer."""
    if task.is_mutation and task.label:
        sql = str(task.label[0]).replace("\n", " ").strip()
        return [
            f"I will run the statement the task asks for.\nAction: Operation\n```sql\n{sql}\n```",
            "The change is made.\nAction: Answer\nFinal Answer: []",
        ]
    if task.is_mutation:
        return ["The item gives no statement to run.\nAction: Answer\nFinal Answer: []"]
    answer = repr(list(task.label))  # a Python literal for any label values
    return [f"I know the answer.\nAction: Answer\nFinal Answer: {answer}"]


def oracle_agent(tasks: Iterable[DBTask]) -> ReplayAgent:
    return ReplayAgent((t.prompt, oracle_plan(t)) for t in tasks)
