"""A parsed conversation: messages in one canonical form, plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str
    weight: float = 1.0  # loss weight; only read on assistant messages (0 = not trained)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: str  # "path:line", used in every error about this conversation

    def template_messages(self, upto: int | None = None) -> list[dict[str, str]]:
        """The first `upto` messages as the dicts a chat template renders."""
        msgs = self.messages if upto is None else self.messages[:upto]
        return [{"role": m.role, "content": m.content} for m in msgs]

    @property
    def trained_turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "assistant" and m.weight > 0)
