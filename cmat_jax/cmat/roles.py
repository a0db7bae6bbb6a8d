"""CMAT roles: User, Assistant, Checker, Reflector (docs/method.md §2).

A role is a system prompt plus the LoRA adapter slot it generates with; all roles share one
frozen base model. This module owns the prompts (in the project's own words), the chat-message
builders for each role, and the Checker's verdict: its grammar, a tolerant parser and the
single next token that decides it.

Checker prompt design: the Checker's answer is forced to start with `CHECKER_PREFIX`
("Verdict:"); the rollout engine appends it after the chat template's generation prompt. The
next token is then the first token of " accept" or of " reject", so one forward pass gives
`p_accept = softmax(logit_accept, logit_reject)[0]` — the Checker's value estimate of the
proposal — and sampling continues to get the reason after " reject:".
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

Message = dict[str, str]

CHECKER_PREFIX = "Verdict:"
ACCEPT_WORD = " accept"
REJECT_WORD = " reject"
# What an unparseable Checker output counts as. Accept: the environment then executes the
# proposal and its feedback labels it, while a default reject would spend a revision on an
# empty reason the Assistant cannot act on.
DEFAULT_VERDICT_ACCEPT = True
NO_REASON = "no reason given"

ROLE_NAMES = ("user", "assistant", "checker", "reflector")

# The reason a reviewer gives for each kind of bad proposal the experts label
# (`cmat_jax.tasks.CheckerItem.kind`): agent tuning trains the Checker to write it after
# "reject:" and the Assistant to revise after reading it (docs/method.md §4).
REJECT_REASONS = {
    "premature": "it gives the answer before any step has looked at the data",
    "wrong_answer": "the answer does not match what the steps so far returned",
    "repeat": "it sends again, unchanged, the action that just failed",
    "step": "it will fail with an error; check the names and the syntax against the task",
}


class TokenizerLike(Protocol):
    """What the Checker helpers need of `cmat_jax.tokenizer.Tokenizer`."""

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[Message], *, add_generation_prompt: bool = ..., tokenize: bool = ...
    ) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Role:
    """A role: its name, its system prompt and the LoRA adapter slot it generates with."""

    name: str
    system_prompt: str
    adapter_slot: str


@dataclasses.dataclass(frozen=True)
class RoleSet:
    user: Role
    assistant: Role
    checker: Role
    reflector: Role

    def slots(self) -> tuple[str, ...]:
        """Distinct adapter slots in use, in role order ("none" = the frozen base)."""
        seen: list[str] = []
        for role in (self.user, self.assistant, self.checker, self.reflector):
            if role.adapter_slot not in seen:
                seen.append(role.adapter_slot)
        return tuple(seen)


# --- prompts (DB task family: AgentBench DBBench action grammar) -------------------------

_DB_ASSISTANT = """You are an SQL programmer who works through a database task step by step.
Each of your replies has two parts: first a short line of reasoning, then exactly one action.

To run SQL, write the line
Action: Operation
followed by one SQL statement, on one line, in a ```sql fenced block, for example
Action: Operation
```sql
SELECT name FROM people WHERE age > 30;
```
The statement is executed and you will see its raw result (a list of rows) or the error.
Run one statement per reply; only the first sql block is executed.

When you have the answer, write
Action: Answer
Final Answer: ["value 1", "value 2"]
The final answer is a Python list of the values asked for. For a task that changes the table
(INSERT or UPDATE), run the statement first and then answer with Final Answer: [].
Check column names before using them; if a statement fails, read the error and fix it."""

_DB_CHECKER = """You review the next action an SQL programmer wants to take on a database
task, before it is executed. Judge whether the action is correct and moves the task forward:
valid syntax and format, the right table and column names, the right conditions, and for a
final answer, values that the results so far support.
Reply with one line: "Verdict: accept", or "Verdict: reject: " followed by a short reason
the programmer can act on."""

_DB_REFLECTOR = """You are an SQL programmer looking back at a database task you did not
solve. Read the task, your steps and the feedback, find the mistake that cost you the task,
and write a short lesson (one to three sentences) that would help on the next attempt at this
or a similar task. Name the concrete error, such as a wrong column name or a missing
condition, and what to do instead."""

_DB_USER = """You hand out database tasks. State the task in full, with the table it is about
and what the answer should look like."""

_OS_CHECKER = """You review the next action an agent wants to take at a Linux bash prompt, before
it is executed. Judge whether the action is correct and moves the task forward: the reply
ends with one "Act:" line (bash with a ```bash block, finish, or answer(...)), the commands
do what the task asks on the right files, users or processes, and an answer or finish comes
only once the outputs so far support it.
Reply with one line: "Verdict: accept", or "Verdict: reject: " followed by a short reason
the agent can act on."""

_OS_REFLECTOR = """You are an agent looking back at a Linux task you did not solve at a bash
prompt. Read the task, your commands and their outputs, find the mistake that cost you the
task, and write a short lesson (one to three sentences) that would help on the next attempt
at this or a similar task. Name the concrete error, such as a wrong path, a command that
counted the wrong thing or an answer given too early, and what to do instead."""

_OS_USER = """You hand out Linux tasks. State the task in full: what to find out or change on
the system, and what the answer should look like."""

_GENERIC_CHECKER = """You review the next action an agent wants to take, before it is executed.
Judge whether the action is valid in the environment's format and moves the task forward.
Reply with one line: "Verdict: accept", or "Verdict: reject: " followed by a short reason
the agent can act on."""

_GENERIC_REFLECTOR = """You are an agent looking back at a task you did not solve. Find the
mistake that cost you the task and write a short lesson (one to three sentences) that would
help on the next attempt at this or a similar task."""

_GENERIC_USER = """You hand out tasks. State the task in full."""

PROMPTS: dict[str, dict[str, str]] = {
    "dbbench": {
        "user": _DB_USER,
        "assistant": _DB_ASSISTANT,
        "checker": _DB_CHECKER,
        "reflector": _DB_REFLECTOR,
    },
    # The OS task's Assistant prompt is the environment's own (AgentBench sends the
    # instructions in the first user message, with no system message): pass assistant_prompt.
    "os": {
        "user": _OS_USER,
        "assistant": "",
        "checker": _OS_CHECKER,
        "reflector": _OS_REFLECTOR,
    },
}


def make_roles(
    task_family: str = "dbbench",
    *,
    assistant_prompt: str | None = None,
    user_slot: str = "none",
    assistant_slot: str = "assistant",
    checker_slot: str = "checker",
    reflector_slot: str = "assistant",
) -> RoleSet:
    """The four roles of a task family with their adapter slots.

    Sharing a slot is a setting: by default the Reflector is the Assistant in reflect mode
    (same slot) and the User is the frozen base (slot "none"); pass `checker_slot="assistant"`
    to run the Checker on the Assistant's adapter. Families without built-in prompts need
    `assistant_prompt` (the environment's action grammar) and get generic Checker/Reflector
    prompts.
    """
    prompts = PROMPTS.get(task_family)
    if prompts is None:
        if assistant_prompt is None:
            raise ValueError(
                f"make_roles: no built-in prompts for task family {task_family!r} "
                f"(known: {sorted(PROMPTS)}); pass assistant_prompt"
            )
        prompts = {
            "user": _GENERIC_USER,
            "assistant": assistant_prompt,
            "checker": _GENERIC_CHECKER,
            "reflector": _GENERIC_REFLECTOR,
        }
    elif assistant_prompt is not None:
        prompts = {**prompts, "assistant": assistant_prompt}
    elif not prompts["assistant"]:
        raise ValueError(
            f"make_roles: task family {task_family!r} takes its Assistant prompt from its "
            "environment's instructions; pass assistant_prompt"
        )
    for name, slot in (
        ("user_slot", user_slot),
        ("assistant_slot", assistant_slot),
        ("checker_slot", checker_slot),
        ("reflector_slot", reflector_slot),
    ):
        if not slot or not isinstance(slot, str):
            raise ValueError(f"make_roles: {name} must be a non-empty string, got {slot!r}")
    if assistant_slot == "none":
        raise ValueError("make_roles: assistant_slot cannot be 'none' (the frozen reference)")
    return RoleSet(
        user=Role("user", prompts["user"], user_slot),
        assistant=Role("assistant", prompts["assistant"], assistant_slot),
        checker=Role("checker", prompts["checker"], checker_slot),
        reflector=Role("reflector", prompts["reflector"], reflector_slot),
    )


# --- message builders -------------------------------------------------------------------


def format_experience(snippets: Sequence[str]) -> str:
    """Long-term-memory snippets as one block ("" when there are none)."""
    lines = [s.strip() for s in snippets if s and s.strip()]
    if not lines:
        return ""
    body = "\n".join(f"- {s}" for s in lines)
    return f"Lessons from earlier attempts (use them if they apply):\n{body}"


def user_message(task_text: str, ltm_snippets: Sequence[str] = ()) -> str:
    """The User's first message: any long-term-memory lessons, then the task. The task (with its
    table) comes last, right before the reply, as in the agent-tuning data: lessons placed after
    it pulled a 135M model's SQL onto their wording (measured: error rate 0.05 -> 0.77)."""
    experience = format_experience(ltm_snippets)
    task = task_text.strip()
    return f"{experience}\n\n{task}" if experience else task


def assistant_messages(
    role: Role, task_text: str, history: Sequence[Message] = (), ltm_snippets: Sequence[str] = ()
) -> list[Message]:
    """Assistant prompt: system, the task (+ LTM lessons), then the STM turns.

    `history` alternates assistant proposals and user-side feedback (observations or Checker
    rejections), as `ShortTermMemory.turn_messages()` returns it.
    """
    return [
        {"role": "system", "content": role.system_prompt},
        {"role": "user", "content": user_message(task_text, ltm_snippets)},
        *history,
    ]


def assistant_head(
    role: Role, first_messages: Sequence[Message], ltm_snippets: Sequence[str] = ()
) -> list[Message]:
    """The Assistant's prompt at an episode's start, from the environment's first messages: a
    system message becomes the role's system prompt, the task (the last user message) gets any
    long-term-memory lessons (`user_message`), and any example turns before it (the OS task's
    one-shot episode) stay as they are. For the DB task (system + task) this is
    `assistant_messages(role, task, (), ltm_snippets)`."""
    msgs = [dict(m) for m in first_messages]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    msgs[last]["content"] = user_message(msgs[last]["content"], ltm_snippets)
    if msgs[0]["role"] == "system":
        msgs[0]["content"] = role.system_prompt
    return msgs


def render_history(history: Sequence[Message]) -> str:
    """STM turns as plain text, for roles that read the trajectory rather than continue it."""
    if not history:
        return "(no steps yet)"
    parts = []
    for m in history:
        who = "Programmer" if m["role"] == "assistant" else "Feedback"
        parts.append(f"[{who}]\n{m['content'].strip()}")
    return "\n\n".join(parts)


def checker_messages(
    role: Role, task_text: str, history: Sequence[Message], proposal: str
) -> list[Message]:
    """Checker prompt: the task, the trajectory so far and the proposed next action.

    The engine renders it with the generation prompt and appends `CHECKER_PREFIX`
    (`checker_prompt_text` does both).
    """
    content = (
        f"Task:\n{task_text.strip()}\n\n"
        f"Steps so far:\n{render_history(history)}\n\n"
        f"Proposed next action:\n{proposal.strip()}\n\n"
        "Is this action correct? Answer with the verdict."
    )
    return [
        {"role": "system", "content": role.system_prompt},
        {"role": "user", "content": content},
    ]


def checker_prompt_text(tokenizer: TokenizerLike, messages: list[Message]) -> str:
    """The Checker's prompt string, ending in `CHECKER_PREFIX` so the next token decides."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{text}{CHECKER_PREFIX}"


def fit_history(
    encode_prompt: Callable[[Sequence[Message]], list[int]],
    history: Sequence[Message],
    limit: int,
) -> list[int]:
    """Token ids of `encode_prompt(history)` within `limit`: the oldest (action, feedback)
    pairs are dropped first, so the system prompt and the task always survive. Only a prompt
    too long even without history is cut, keeping its end (the question asked)."""
    history = list(history)
    while True:
        ids = encode_prompt(history)
        if len(ids) <= limit:
            return ids
        if not history:
            return ids[-limit:]
        history = history[2:]


def rejection_feedback(reason: str) -> str:
    """The user-side STM message after a rejection: the Assistant revises in its next reply."""
    return f"A reviewer rejected this action: {reason.strip() or NO_REASON}. Revise it and reply again."


def reflector_messages(
    role: Role, task_text: str, history: Sequence[Message], reward: float, outcome: str = ""
) -> list[Message]:
    """Reflector prompt: task, trajectory and the environment's verdict on the episode."""
    result = (
        f"The task was not solved (reward {reward:.2f})." if reward < 1 else "The task was solved."
    )
    if outcome.strip():
        result += f" Final feedback: {outcome.strip()}"
    content = (
        f"Task:\n{task_text.strip()}\n\n"
        f"Your steps:\n{render_history(history)}\n\n"
        f"Result: {result}\n\n"
        "Write the lesson for your next attempt."
    )
    return [
        {"role": "system", "content": role.system_prompt},
        {"role": "user", "content": content},
    ]


_LESSON_LABEL = re.compile(r"^\s*(?:\*\*)?(?:lesson|reflection)s?(?:\*\*)?\s*[:\-]\s*", re.I)


_ACTION_START = re.compile(r"Action:|```|Final Answer:|\bAct:")


def clean_reflection(text: str, max_chars: int = 400) -> str:
    """A generated reflection made storable: label dropped, anything from an action onwards cut
    (an agent-tuned Reflector tends to answer with an action; injected into another task's
    prompt, its SQL on another table is copied and fails), whitespace collapsed, length cut."""
    text = _LESSON_LABEL.sub("", text.strip())
    m = _ACTION_START.search(text)
    if m:
        text = text[: m.start()]
    text = " ".join(text.split())
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind(" ")] if " " in cut else cut
    return text


# --- verdict grammar --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckerVerdict:
    accept: bool
    reason: str = ""
    parsed: bool = True  # False: no verdict word found, the default was applied


def format_verdict(accept: bool, reason: str = "") -> str:
    """The Checker's target text after `CHECKER_PREFIX` (" accept" / " reject: reason")."""
    if accept:
        return ACCEPT_WORD
    return f"{REJECT_WORD}: {' '.join(reason.split()) or NO_REASON}"


_VERDICT_WORD = re.compile(
    r"\b(accept(?:s|ed|able)?|approved?|reject(?:s|ed)?|refused?|unacceptable)\b", re.I
)
_NEGATION = re.compile(r"\b(?:not|don't|do not|cannot|can't|never)\s+$", re.I)
_REASON_LEAD = re.compile(
    r"^(?:\s+(?:this|it|that)(?:\s+(?:action|proposal|query|statement))?(?=\s*[:;,.\-–—]))?"
    r"[\s:;,.\-–—*)\]]*(?:because\s+|reason\s*:\s*)?",
    re.I,
)


def parse_verdict(text: str) -> CheckerVerdict:
    """Parse Checker output; tolerant of case, markup, the "Verdict:" prefix and extra text.

    The first verdict word decides (accept/accepted/approve vs reject/rejected/refuse/
    unacceptable); a negation right before it ("not accept") flips it. The reason is the rest of
    the line after a rejection word. No verdict word: `DEFAULT_VERDICT_ACCEPT` (accept), `parsed=False`.
    """
    m = _VERDICT_WORD.search(text)
    if m is None:
        return CheckerVerdict(accept=DEFAULT_VERDICT_ACCEPT, reason="", parsed=False)
    word = m.group(1).lower()
    positive = word.startswith(("accept", "approv"))
    if _NEGATION.search(text[: m.start()]):
        positive = not positive
    if positive:
        return CheckerVerdict(accept=True)
    rest = text[m.end() :]
    rest = _REASON_LEAD.sub("", rest)
    # A weak Checker repeats itself ("reject: reject: reject: ..."): verdict words are no reason.
    while (lead := _VERDICT_WORD.match(rest.lstrip())) is not None:
        rest = _REASON_LEAD.sub("", rest.lstrip()[lead.end() :])
    lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
    reason = lines[0].strip(" *") if lines else ""
    words = re.findall(r"\w+", _VERDICT_WORD.sub("", reason).lower())
    if all("accept".startswith(w) or "reject".startswith(w) for w in words):  # cut-off repeats
        reason = ""
    return CheckerVerdict(accept=False, reason=reason or NO_REASON)


def verdict_token_ids(tokenizer: TokenizerLike) -> tuple[int, int]:
    """(accept_id, reject_id): the token right after `CHECKER_PREFIX` that starts each verdict.

    Found by encoding the prefix alone and followed by each word, so tokenizers that merge a
    leading space into the word (BPE "Ġaccept", sentencepiece "▁accept") are handled the same.
    """
    base = tokenizer.encode(CHECKER_PREFIX, add_bos=False)
    ids = []
    for word in (ACCEPT_WORD, REJECT_WORD):
        full = tokenizer.encode(CHECKER_PREFIX + word, add_bos=False)
        if len(full) <= len(base) or full[: len(base)] != base:
            raise ValueError(
                f"verdict_token_ids: tokenizer encodes {CHECKER_PREFIX!r} differently before "
                f"{word!r} ({base} vs {full}); cannot find the verdict token"
            )
        ids.append(int(full[len(base)]))
    if ids[0] == ids[1]:
        raise ValueError(
            f"verdict_token_ids: {ACCEPT_WORD!r} and {REJECT_WORD!r} start with the same token "
            f"id {ids[0]}; the verdict cannot be read from one token with this tokenizer"
        )
    return ids[0], ids[1]


def p_accept(logits_V: Any, ids: tuple[int, int]) -> Any:
    """P(accept) = softmax over the two verdict-token logits; `logits_V` is [..., V] (or any
    last axis that holds both words' logits or log-probs: only their difference counts).

    Works on numpy and jax arrays alike (also under jit): sigmoid of the logit difference,
    written with tanh so it never overflows.
    """
    accept_id, reject_id = ids
    diff = logits_V[..., accept_id] - logits_V[..., reject_id]
    if isinstance(logits_V, np.ndarray):
        return 0.5 * (1.0 + np.tanh(0.5 * diff.astype(np.float64)))
    import jax.numpy as jnp  # only when given a jax array

    return 0.5 * (1.0 + jnp.tanh(0.5 * diff.astype(jnp.float32)))


def role_by_name(roles: RoleSet, name: str) -> Role:
    if name not in ROLE_NAMES:
        raise ValueError(f"unknown role {name!r}; roles are {ROLE_NAMES}")
    return getattr(roles, name)


def slot_index(roles: RoleSet, slots: Mapping[str, int], name: str) -> int:
    """The adapter index of a role, given the model's slot-name -> index table."""
    slot = role_by_name(roles, name).adapter_slot
    if slot not in slots:
        raise ValueError(f"role {name!r} uses adapter slot {slot!r}, not among {sorted(slots)}")
    return slots[slot]
