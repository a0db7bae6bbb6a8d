"""The environment protocol every CMAT task plugs into.

An episode is a list of OpenAI-style messages (``{"role": ..., "content": ...}``). ``reset``
returns the first messages (system instructions + the task), then the caller alternates
``step(agent_text)`` calls, appending the agent text as an ``assistant`` message and the returned
observation as a ``user`` message, until ``done``. Many env instances live at once (one per
episode), so an env holds only its own episode state and never blocks on the others.

``snapshot()`` / ``restore(snap)`` let the CMAT loop execute a rejected proposal on a copy of the
state ("what would have happened") and roll back: see :func:`counterfactual_step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What one agent action produced.

    observation: text shown to the agent next ("" when the episode ended without one).
    done: the episode is over (answer given, invalid action, or round limit).
    reward: task success in [0, 1]; only meaningful when ``done`` (0.0 before).
    info: JSON-serialisable details. Always has ``error`` (bool): the action failed to parse or
        its execution raised -- CMAT's execution feedback e_t. Envs add their own keys
        (``action``, ``status``, ``sql``, ...).
    """

    observation: str
    done: bool
    reward: float
    info: dict[str, Any]


@dataclasses.dataclass
class EpisodeState:
    """The part of an episode's state every env keeps: the messages so far, one dict per step,
    and the outcome. Envs subclass it with their own fields."""

    messages: list[Message]
    steps: list[dict[str, Any]]
    rounds: int = 0
    done: bool = False
    status: str = "running"
    answer: str | None = ""
    reward: float = 0.0

    def transcript(self) -> dict[str, Any]:
        """The JSON-ready record of these fields (an env's `transcript` adds the task's)."""
        return {
            "messages": [dict(m) for m in self.messages],
            "steps": [dict(x) for x in self.steps],
            "rounds": self.rounds,
            "done": self.done,
            "status": self.status,
            "answer": self.answer,
            "reward": self.reward,
        }


@runtime_checkable
class Env(Protocol):
    """One episode of one task family at a time."""

    family: str  # task family name, e.g. "dbbench"

    def reset(self, task: Any) -> list[Message]: ...

    def step(self, agent_text: str) -> StepResult: ...

    def snapshot(self) -> Any: ...

    def restore(self, snap: Any) -> None: ...

    def transcript(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class EnvError(Exception):
    """Raised for misuse of an env (step before reset, step after done) and bad task data."""


_FAMILIES: dict[str, Callable[..., Env]] = {}


def register_family(name: str, factory: Callable[..., Env]) -> None:
    """Make ``make_env(name, **kw)`` build envs of a task family."""
    _FAMILIES[name] = factory


def make_env(name: str, **kwargs: Any) -> Env:
    if name not in _FAMILIES:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ValueError(f"unknown task family {name!r} (known: {known})")
    return _FAMILIES[name](**kwargs)


def families() -> list[str]:
    return sorted(_FAMILIES)


def counterfactual_step(env: Env, agent_text: str) -> StepResult:
    """Execute ``agent_text`` on a copy of the env state and return its outcome, leaving the
    env exactly as it was (used to label proposals the Checker rejected)."""
    snap = env.snapshot()
    try:
        return env.step(agent_text)
    finally:
        env.restore(snap)
