"""The AgentBench OS interaction task as a CMAT environment.

Protocol (AgentBench's ``os_interaction`` task, kept identical):

- The first user message gives the instructions and starts a one-shot example episode (three
  agent turns, two observations); the next user message is "Now, I will start a new problem in
  a new OS. My problem is:\\n\\n" + the description. There is no system message.
- The action is read from the *last* ``Act:`` line that parses: ``bash`` (every
  ```` ```bash\\n...\\n``` ```` block of the reply, joined by blank lines, runs), ``finish``, or
  ``answer(X)`` (X = the text of that line between its first ``(`` and its last ``)``). No
  ``Act:`` line ends the episode as a validation failure, an unknown action as an invalid one.
- Commands run in one persistent interactive bash (``bash --login`` on a terminal) of the
  sandbox. Observation: "The output of the OS:\\n\\n" + output, or "The output of the OS is
  empty."; output over 800 characters is cut to its first 780 + "\\n[truncated because the
  output is too long]".
- At most 8 agent turns; a bash action on the 8th ends the episode (``task_limit_reached``).
- Before the first turn the ``init`` scripts run as independent processes and the ``start``
  command runs in the agent's shell (its output is not shown).
- Scoring: ``match`` compares the answer (stripped, for the plain-string form) with the answer
  string, or searches a regex in it; ``check`` runs each script in a fresh process of the same
  sandbox with the arguments: the answer (``str``: "None" after ``finish``), then the outputs of
  the earlier scripts; a ``null`` script is the ``example`` script; all must exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cmat_jax.envs.base import EnvError, EpisodeState, Message, StepResult, register_family
from cmat_jax.envs.os_sandbox import IMAGES, Limits, Sandbox, SandboxError
from cmat_jax.textfile import read_text

ROUND_LIMIT = 8
OUTPUT_LIMIT = 800
OUTPUT_KEEP = 780
TRUNCATION_NOTE = "\n[truncated because the output is too long]"
OUTPUT_PREFIX = "The output of the OS:\n\n"
EMPTY_OUTPUT = "The output of the OS is empty."
LANGUAGES = ("bash", "python", "c", "c++")

INSTRUCTIONS = (
    "You are an assistant that will act like a person, I will play the role of linux(ubuntu) "
    "operating system. Your goal is to implement the operations required by me or answer to "
    "the question proposed by me. For each of your turn, you should first think what you "
    'should do, and then take exact one of the three actions: "bash", "finish" or "answer". \n'
    "\n"
    "1. If you think you should execute some bash code, take bash action, and you should "
    "print like this:\n"
    "\n"
    "Think: put your thought here.\n"
    "\n"
    "Act: bash\n"
    "\n"
    "```bash\n"
    "# put your bash code here\n"
    "```\n"
    "\n"
    "2. If you think you have finished the task, take finish action, and you should print like "
    "this:\n"
    "\n"
    "Think: put your thought here.\n"
    "\n"
    "Act: finish\n"
    "\n"
    "3. If you think you have got the answer to the question, take answer action, and you "
    "should print like this:\n"
    "\n"
    "Think: put your thought here.\n"
    "\n"
    "Act: answer(Your answer to the question should be put in this pair of parentheses)\n"
    "\n"
    "If the output is too long, I will truncate it. The truncated output is not complete. You "
    "have to deal with the truncating problem by yourself. Attention, your bash code should "
    "not contain any input operation. Once again, you should take only exact one of the three "
    "actions in each turn.\n\n"
)
ONE_SHOT: tuple[Message, ...] = (
    {"role": "user", "content": 'tell me how many files are in the directory "/etc"?'},
    {
        "role": "assistant",
        "content": "Think: To count the files in /etc, I need to print all the files in it.\n\n"
        "Act: bash\n\n```bash\nls /etc\n```",
    },
    {
        "role": "user",
        "content": "The output of the OS:\ncpi cron.hourly fuse.conf iproute2 lvm "
        "networkd-dispatcher protocols selinux tmpfiles.d [truncated because the output is too "
        "long]",
    },
    {
        "role": "assistant",
        "content": "Think: The output has been truncated because it is too long, so I need to "
        "count files by script directly.\n\nAct: bash\n\n```bash\nls -1 /etc | wc -l\n```",
    },
    {"role": "user", "content": "The output of the OS:\n220"},
    {"role": "assistant", "content": "Think: Now I get the answer, it is 220.\n\nAct: answer(220)"},
)
NEW_PROBLEM = "Now, I will start a new problem in a new OS. My problem is:\n\n"

_THINK_RE = re.compile(r"Think:\s*(.+)")
_ACT_RE = re.compile(r"Act:\s*(.+)")
_BASH_RE = re.compile(r"```bash\n(.*?)\n```", re.DOTALL)


class OSDataError(ValueError):
    """A problem file is malformed; the message names the file, the record and the field."""


@dataclasses.dataclass(frozen=True)
class Script:
    language: str
    code: str


@dataclasses.dataclass(frozen=True)
class OSTask:
    """One AgentBench OS problem (the JSON schema of ``data/os_interaction``)."""

    task_id: str
    description: str
    image: str = "default"
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict[str, Any] | None = None
    """``{"answer": str, "strip": bool}`` or ``{"regex": str}``."""
    check: tuple[Script | None, ...] | None = None
    example: Script | None = None
    labels: tuple[str, ...] = ()


# -- loading -----------------------------------------------------------------------------------


def _script(obj: Any, script_dir: Path, where: str) -> Script | None:
    if obj is None:
        return None
    if isinstance(obj, str):
        return Script("bash", obj)
    if not isinstance(obj, dict):
        raise OSDataError(f"{where}: a script must be a string, an object or null")
    language = obj.get("language", "bash")
    if language not in LANGUAGES:
        raise OSDataError(f"{where}.language: unsupported {language!r} (known: {LANGUAGES})")
    if "file" in obj:
        path = script_dir / str(obj["file"])
        try:
            return Script(language, read_text(path, OSDataError))
        except OSError as e:
            raise OSDataError(f"{where}.file: cannot read {path} ({e.strerror})") from None
    if "code" in obj and isinstance(obj["code"], str):
        return Script(language, obj["code"])
    raise OSDataError(f"{where}: a script object needs 'file' or a string 'code'")


def _image(create: dict[str, Any], where: str) -> str:
    name = create.get("image", "default")
    if not isinstance(name, str):
        raise OSDataError(f"{where}.create.image: must be a string")
    name = name.rsplit("/", 1)[-1]  # AgentBench names images "<registry>/<name>"
    if name not in IMAGES:
        raise OSDataError(
            f"{where}.create.image: unknown image {name!r} (known: {', '.join(IMAGES)})"
        )
    return name


def parse_os_task(rec: Any, script_dir: Path, where: str, default_id: str) -> OSTask:
    """Validate one problem record the way AgentBench's ``_load_configs`` reads it."""
    if not isinstance(rec, dict):
        raise OSDataError(f"{where}: a problem must be a JSON object")
    desc = rec.get("description")
    if not isinstance(desc, str):
        raise OSDataError(f"{where}.description: missing or not a string")
    image, init = "default", ()
    create = rec.get("create")
    if isinstance(create, dict):  # AgentBench reads no image or init from any other form
        image = _image(create, where)
        raw = create.get("init")
        if raw is not None or "init" in create:
            items = raw if isinstance(raw, list) else [raw]
            scripts = [_script(s, script_dir, f"{where}.create.init") for s in items]
            init = tuple(s for s in scripts if s is not None)
    start = _script(rec["start"], script_dir, f"{where}.start") if "start" in rec else None
    ev = rec.get("evaluation")
    if not isinstance(ev, dict):
        raise OSDataError(f"{where}.evaluation: missing or not an object")
    match = check = example = None
    if "match" in ev:
        m = ev["match"]
        if isinstance(m, str):
            match = {"answer": m, "strip": True}
        elif isinstance(m, dict) and isinstance(m.get("answer", m.get("regex")), str):
            match = dict(m)
            if "regex" in match and "answer" not in match:
                try:
                    re.compile(match["regex"])
                except re.error as e:
                    raise OSDataError(f"{where}.evaluation.match.regex: {e}") from None
        else:
            raise OSDataError(f"{where}.evaluation.match: a string or {{'answer'|'regex': str}}")
    elif "check" in ev:
        items = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
        check = tuple(_script(s, script_dir, f"{where}.evaluation.check") for s in items)
        if "example" in ev:
            example = _script(ev["example"], script_dir, f"{where}.evaluation.example")
        if any(s is None for s in check) and example is None:
            raise OSDataError(f"{where}.evaluation.example: a null check script needs an example")
    else:
        raise OSDataError(f"{where}.evaluation: needs 'match' or 'check'")
    labels = rec.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise OSDataError(f"{where}.labels: must be a list of strings")
    return OSTask(
        task_id=str(rec.get("id", default_id)),
        description=desc,
        image=image,
        init=init,
        start=start,
        match=match,
        check=check,
        example=example,
        labels=tuple(labels),
    )


def load_os_tasks(
    path: str | Path, script_dir: str | Path | None = None, limit: int | None = None
) -> list[OSTask]:
    """Read an AgentBench OS problem file (a JSON list or object, or JSONL). ``file`` scripts
    are relative to ``script_dir`` (default: the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise OSDataError(f"{path}: no such file")
    sdir = Path(script_dir) if script_dir is not None else path.parent
    if not sdir.is_dir():
        raise OSDataError(f"{sdir}: script directory not found")
    text = read_text(path, OSDataError)
    records: list[tuple[Any, str]] = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as e:
                    raise OSDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OSDataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        data = [data] if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise OSDataError(f"{path}: expected a JSON list of problems")
        records = [(rec, f"{path}: problem {k}") for k, rec in enumerate(data)]
    tasks = [
        parse_os_task(rec, sdir, where, f"{path.stem}-{k:05d}")
        for k, (rec, where) in enumerate(records)
    ]
    return tasks[:limit] if limit is not None else tasks


# -- the protocol --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str | None  # "bash", "commit" or None (nothing parsed)
    content: str | None  # the joined bash blocks, the answer (None for finish)
    thought: str
    has_act_line: bool


def parse_action(raw: str) -> Action:
    """AgentBench's ``extract_action``: the last ``Act:`` line that parses wins."""
    thought = "\n".join(_THINK_RE.findall(raw))
    acts = _ACT_RE.findall(raw)
    for act in reversed(acts):
        low = act.lower()
        if low.startswith("bash"):
            return Action("bash", "\n\n".join(_BASH_RE.findall(raw)), thought, True)
        if low.startswith("finish"):
            return Action("commit", None, thought, True)
        if low.startswith("answer"):
            body = act[6:].strip()
            left, right = body.find("("), body.rfind(")")
            if left == -1 or right == -1:
                continue
            return Action("commit", body[left + 1 : right], thought, True)
    return Action(None, None, thought, bool(acts))


def format_observation(output: str) -> str:
    if len(output) > OUTPUT_LIMIT:
        output = output[:OUTPUT_KEEP] + TRUNCATION_NOTE
    return OUTPUT_PREFIX + output if output else EMPTY_OUTPUT


def first_messages(description: str) -> list[Message]:
    msgs = [dict(m) for m in ONE_SHOT]
    msgs[0]["content"] = INSTRUCTIONS + "Now, my problem is:\n\n" + msgs[0]["content"]
    msgs.append({"role": "user", "content": NEW_PROBLEM + description})
    return msgs


def script_argv(script: Script, params: Sequence[str]) -> list[str]:
    """How AgentBench's ``execute_independent`` runs a script with its arguments."""
    if script.language == "bash":
        return ["bash", "-c", script.code, *(["--", *params] if params else [])]
    if script.language == "python":
        return ["python3", "-c", script.code, *params]
    compiler = "g++" if script.language == "c++" else "gcc"
    build = f"echo {json.dumps(json.dumps(script.code))} > /tmp/main.cpp && {compiler} -o /tmp/a.out /tmp/main.cpp"
    return ["bash", "-c", build + ' && exec /tmp/a.out "$@"', "--", *params]


def judge(task: OSTask, answer: str | None, sandbox: Sandbox) -> bool:
    """AgentBench's scoring of a committed answer (None after ``finish``)."""
    if task.match is not None:
        if answer is None:
            return False
        if task.match.get("strip"):
            answer = answer.strip()
        if "answer" in task.match:
            return answer == task.match["answer"]
        return re.search(task.match["regex"], answer) is not None
    assert task.check is not None
    params = [str(answer)]
    for script in task.check:
        script = script if script is not None else task.example
        assert script is not None
        code, out = sandbox.run(script_argv(script, params))
        if code != 0:
            return False
        params.append(out)
    return True


def os_metrics(outputs: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Accuracy over problems (AgentBench's ``acc``) and per label (a problem counts once for
    each of its labels)."""
    outs = [o for o in outputs if o]
    per: dict[str, list[bool]] = {}
    for o in outs:
        for label in o["labels"] or ["(none)"]:
            per.setdefault(label, []).append(bool(o["correct"]))
    return {
        "accuracy": sum(bool(o["correct"]) for o in outs) / len(outs) if outs else 0.0,
        "passed": sum(bool(o["correct"]) for o in outs),
        "label_accuracy": {k: sum(v) / len(v) for k, v in sorted(per.items())},
        "label_counts": {k: len(v) for k, v in sorted(per.items())},
    }


# -- the environment ---------------------------------------------------------------------------


@dataclasses.dataclass
class _State(EpisodeState):
    answer: str | None = None  # None after `finish`
    commands: list[str] = dataclasses.field(default_factory=list)


class OSEnv:
    """One AgentBench OS episode at a time, in a fresh :class:`Sandbox` per episode."""

    family = "os"

    def __init__(self, *, limits: Limits | None = None, max_rounds: int = ROUND_LIMIT) -> None:
        self.limits = limits or Limits()
        self.max_rounds = max_rounds
        self.task: OSTask | None = None
        self.sandbox: Sandbox | None = None
        self._s = _State(messages=[], steps=[], commands=[])

    def _prepare(self, task: OSTask) -> None:
        """A fresh sandbox with the task's init scripts run and its start command started."""
        if self.sandbox is not None:
            self.sandbox.close()
        self.sandbox = Sandbox(task.image, self.limits)
        for script in task.init:
            self.sandbox.run(script_argv(script, []))
        if task.start is not None:
            self.sandbox.shell(task.start.code)

    def reset(self, task: OSTask) -> list[Message]:
        self.task = task
        self._prepare(task)
        first = first_messages(task.description)
        self._s = _State(messages=[dict(m) for m in first], steps=[], commands=[])
        return first

    @property
    def done(self) -> bool:
        return self._s.done

    @property
    def messages(self) -> list[Message]:
        return [dict(m) for m in self._s.messages]

    def step(self, agent_text: str) -> StepResult:
        if self.task is None or self.sandbox is None:
            raise EnvError("step() before reset()")
        if self._s.done:
            raise EnvError("step() after the episode ended")
        if not isinstance(agent_text, str):
            raise EnvError(f"agent output must be a string, got {type(agent_text).__name__}")
        s = self._s
        s.messages.append({"role": "assistant", "content": agent_text})
        s.rounds += 1
        action = parse_action(agent_text)
        if action.kind is None:
            status = "agent_invalid_action" if action.has_act_line else "agent_validation_failed"
            return self._finish(status, None, error=True, action=None)
        if action.kind == "commit":
            return self._finish("completed", action.content, error=False, action="commit")
        cmd = action.content or ""
        try:
            output = self.sandbox.shell(cmd) if cmd else ""
        except SandboxError:  # the agent broke its sandbox (e.g. got PID 1 killed): a failure
            return self._finish("sandbox_failed", None, error=True, action="bash")
        s.commands.append(cmd)
        obs = format_observation(output)
        info = {"error": False, "action": "bash", "command": cmd, "status": "running"}
        s.steps.append({**info, "observation": obs})
        s.messages.append({"role": "user", "content": obs})
        if s.rounds >= self.max_rounds:
            return self._finish("task_limit_reached", None, error=False, action="bash", obs=obs)
        return StepResult(observation=obs, done=False, reward=0.0, info=info)

    def finish(self, status: str = "agent_context_limit") -> StepResult:
        """End the episode from outside (e.g. the agent ran out of context) as a failure."""
        if self._s.done:
            raise EnvError("finish() after the episode ended")
        return self._finish(status, None, error=True, action=None)

    def _finish(
        self, status: str, answer: str | None, *, error: bool, action: str | None, obs: str = ""
    ) -> StepResult:
        task, s = self.task, self._s
        assert task is not None and self.sandbox is not None
        try:
            correct = status == "completed" and judge(task, answer, self.sandbox)
        except SandboxError:
            status, correct = "sandbox_failed", False
        s.done, s.status, s.answer, s.reward = True, status, answer, float(correct)
        info = {"error": error, "action": action, "status": status, "answer": answer}
        info.update(labels=list(task.labels), correct=correct)
        s.steps.append(dict(info))
        return StepResult(observation=obs, done=True, reward=s.reward, info=info)

    def snapshot(self) -> _State:
        """The episode so far; :meth:`restore` rebuilds the sandbox by replaying its commands
        (a shell cannot be copied), so time-dependent state may differ."""
        if self.task is None:
            raise EnvError("snapshot() before reset()")
        s = self._s
        return dataclasses.replace(
            s,
            messages=[dict(m) for m in s.messages],
            steps=[dict(x) for x in s.steps],
            commands=list(s.commands),
        )

    def restore(self, snap: _State) -> None:
        if self.task is None:
            raise EnvError("restore() before reset()")
        self._prepare(self.task)
        assert self.sandbox is not None
        for cmd in snap.commands:
            self.sandbox.shell(cmd)
        self._s = dataclasses.replace(
            snap,
            messages=[dict(m) for m in snap.messages],
            steps=[dict(x) for x in snap.steps],
            commands=list(snap.commands),
        )

    def output(self) -> dict[str, Any] | None:
        """The scorer's record for this episode (None until it ends)."""
        if not self._s.done or self.task is None:
            return None
        return {
            "labels": list(self.task.labels),
            "answer": self._s.answer,
            "correct": self._s.reward == 1.0,
        }

    def transcript(self) -> dict[str, Any]:
        task, s = self.task, self._s
        return {
            "family": self.family,
            "task_id": task.task_id if task else None,
            "labels": list(task.labels) if task else [],
            **s.transcript(),
        }

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()
            self.sandbox = None


register_family("os", OSEnv)


# -- reference agents --------------------------------------------------------------------------


def oracle_plan(task: OSTask) -> list[str] | None:
    """What the oracle does: answer the ``match`` string; for ``check``, run the example script
    in the shell, then answer its output (when a check compares with the example) or finish.
    None when the task has neither (a regex match)."""
    if task.match is not None:
        if "answer" not in task.match:
            return None
        return [f"Think: I know the answer.\n\nAct: answer({task.match['answer']})"]
    if task.example is None:
        return None
    code = task.example.code
    if task.example.language == "python":
        code = f"python3 - <<'CMAT_ORACLE_EOF'\n{code}\nCMAT_ORACLE_EOF"
    run = f"Think: I run the reference solution.\n\nAct: bash\n\n```bash\n{code.strip()}\n```"
    last = "answer" if any(s is None for s in task.check or ()) else "finish"
    return [run, last]


class OSOracleAgent:
    """Replays :func:`oracle_plan` per episode. Episodes are told apart by their problem text;
    problems sharing a text take their plans in task order (episodes start in that order)."""

    def __init__(self, tasks: Iterable[OSTask]) -> None:
        self.queues: dict[str, list[list[str] | None]] = {}
        for t in tasks:
            self.queues.setdefault(NEW_PROBLEM + t.description, []).append(oracle_plan(t))
        self.plans: dict[int, list[str] | None] = {}  # id(first message list) -> plan

    def act(self, batch: Sequence[Sequence[Message]]) -> list[str | None]:
        return [self._reply(list(m)) for m in batch]

    def _reply(self, messages: list[Message]) -> str:
        k = max(i for i, m in enumerate(messages) if m["content"].startswith(NEW_PROBLEM))
        turn = sum(1 for m in messages[k:] if m["role"] == "assistant")
        plan = self._plan(messages, k, turn)
        if plan is None or turn >= len(plan):
            return ""
        if plan[turn] == "answer":
            out = messages[-1]["content"].removeprefix(OUTPUT_PREFIX)
            return f"Think: The reference solution printed it.\n\nAct: answer({out.strip()})"
        if plan[turn] == "finish":
            return "Think: Done.\n\nAct: finish"
        return plan[turn]

    def _plan(self, messages: list[Message], k: int, turn: int) -> list[str] | None:
        key = messages[k]["content"]
        if turn == 0:
            queue = self.queues.get(key)
            if not queue:
                raise KeyError(f"no oracle plan for problem {key[len(NEW_PROBLEM) :][:80]!r}")
            plan = queue.pop(0)
            if plan is not None and len(plan) > 1:  # recognise the episode at its next turn
                self.plans[hash((key, plan[0]))] = plan
            return plan
        first = messages[k + 1]["content"]
        return self.plans.get(hash((key, first)))
