"""Synthetic OS interaction problems with their own checkers, and a scripted expert.

``generate_os_task(seed, index)`` draws one problem of a family (files, text processing, logs,
permissions, processes, users) as an AgentBench OS record: an ``init`` script that builds a
random situation, a description, and an evaluation (``check`` scripts, or a ``match`` string
computed from the situation). Names, sizes and contents are random, so problems are a pure
function of ``(seed, index)`` and never copies of the dev split.

:class:`OSExpert` solves them through the protocol (it looks around first, runs the solving
command, then answers what it printed or finishes); :func:`write_sft_jsonl` keeps its successful
episodes, run in the real sandbox, as chat ``messages`` for the SFT trainer.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmat_jax.envs.base import Message
from cmat_jax.envs.os_task import NEW_PROBLEM, OUTPUT_PREFIX, OSEnv, OSTask, parse_os_task

WORDS = ("alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "indigo",
         "juniper", "kepler", "lumen", "maple", "nectar", "onyx", "pylon", "quartz", "raven",
         "sierra", "tundra", "umber", "vortex", "willow", "xenon", "yonder", "zephyr")  # fmt: skip
EXTENSIONS = ("txt", "log", "csv", "md", "json", "py", "conf", "dat")
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")
INTEGER_MATCH = 'python3 -c "import sys; sys.exit(int(sys.argv[1]) != int(sys.argv[2]))" "$1" "$2"'


@dataclasses.dataclass(frozen=True)
class SynthOSTask:
    """A generated problem (AgentBench record) and the expert's solving command."""

    record: dict[str, Any]
    solve: str
    """Bash that solves it: its output is the answer (``answers``) or it does the job."""
    answers: bool
    explore: str = ""
    """A look-around command the expert may run first."""

    @property
    def task(self) -> OSTask:
        return parse_os_task(self.record, Path("."), "synthetic problem", self.record["id"])


def _name(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}_{rng.randrange(100, 1000)}"


def _count_record(desc: str, init: str, example: str, labels: list[str]) -> dict[str, Any]:
    return {
        "description": desc,
        "create": {"init": {"code": init}},
        "evaluation": {"check": [None, {"code": INTEGER_MATCH}], "example": {"code": example}},
        "labels": labels,
    }


def _files_by_extension(rng: random.Random) -> SynthOSTask:
    root = f"/srv/{_name(rng)}"
    ext = rng.choice(EXTENSIONS)
    lines = [f"mkdir -p {root}/a/b {root}/c"]
    for _ in range(rng.randrange(6, 20)):
        e = ext if rng.random() < 0.4 else rng.choice(EXTENSIONS)
        sub = rng.choice(("", "/a", "/a/b", "/c"))
        lines.append(f"echo {rng.choice(WORDS)} > {root}{sub}/{_name(rng)}.{e}")
    solve = f"find {root} -type f -name '*.{ext}' | wc -l"
    desc = rng.choice((
        f"How many files with the extension .{ext} are there under {root}, subdirectories included?",
        f"Count the .{ext} files in {root} and all of its subdirectories.",
    ))  # fmt: skip
    rec = _count_record(desc, "\n".join(lines), solve, ["file", "counting"])
    return SynthOSTask(rec, solve, True, f"ls -R {root} | head -40")


def _log_level_count(rng: random.Random) -> SynthOSTask:
    path = f"/var/log/{_name(rng)}.log"
    level = rng.choice(LEVELS)
    lines = [f"mkdir -p /var/log; : > {path}"]
    for i in range(rng.randrange(20, 60)):
        lv = rng.choice(LEVELS)
        lines.append(
            f"echo '2024-05-{1 + i % 28:02d} [{lv}] {rng.choice(WORDS)} {rng.randrange(1000)}' >> {path}"
        )
    solve = f"grep -c '\\[{level}\\]' {path}"
    desc = f"The log {path} has one entry per line with its level in brackets. How many {level} entries does it have?"
    return SynthOSTask(
        _count_record(desc, "\n".join(lines), solve, ["log", "file"]),
        solve,
        True,
        f"head -5 {path}",
    )


def _csv_column_sum(rng: random.Random) -> SynthOSTask:
    path = f"/home/{_name(rng)}.csv"
    rows = [(rng.choice(WORDS), rng.randrange(1, 500)) for _ in range(rng.randrange(5, 25))]
    body = "name,amount\n" + "".join(f"{n},{a}\n" for n, a in rows)
    init = f"printf '%s' '{body}' > {path}"
    solve = f"tail -n +2 {path} | awk -F, '{{s += $2}} END {{print s}}'"
    desc = f"{path} is a CSV file with a header line. What is the sum of its amount column?"
    rec = {
        "description": desc,
        "create": {"init": {"code": init}},
        "evaluation": {"match": str(sum(a for _, a in rows))},
        "labels": ["text", "counting"],
    }
    return SynthOSTask(rec, solve, True, f"head -3 {path}")


def _permissions(rng: random.Random) -> SynthOSTask:
    path = f"/opt/{_name(rng)}.sh"
    mode = rng.choice(("750", "700", "640", "755", "600", "744"))
    init = f"mkdir -p /opt; echo 'echo hi' > {path}; chmod 666 {path}"
    check = f'[ "$(stat -c %a {path})" = {mode} ]'
    desc = f"Set the permissions of {path} to exactly {mode} (in octal notation)."
    rec = {
        "description": desc,
        "create": {"init": {"code": init}},
        "evaluation": {"check": [{"code": check}]},
        "labels": ["permission", "file"],
    }
    return SynthOSTask(rec, f"chmod {mode} {path}", False, f"ls -l {path}")


def _kill_process(rng: random.Random) -> SynthOSTask:
    name = f"worker{rng.randrange(100, 1000)}"
    init = f"cp /usr/bin/sleep /usr/local/bin/{name}"
    check = f'[ -z "$(pgrep -x {name})" ] && pgrep -x keeper > /dev/null'
    rec = {
        "description": f"A process named {name} is running in the background. Stop it, "
        "without stopping any other process.",
        "create": {"init": {"code": init + "; cp /usr/bin/sleep /usr/local/bin/keeper"}},
        "start": f"{name} 3600 & keeper 3600 &",
        "evaluation": {"check": [{"code": check}]},
        "labels": ["process", "background"],
    }
    return SynthOSTask(rec, f"pkill -x {name}; sleep 0.2", False, f"ps -e | grep {name}")


def _users_with_shell(rng: random.Random) -> SynthOSTask:
    users = [_name(rng) for _ in range(rng.randrange(2, 6))]
    shells = [rng.choice(("/bin/bash", "/bin/sh", "/usr/sbin/nologin")) for _ in users]
    init = "\n".join(f"useradd -s {s} {u}" for u, s in zip(users, shells, strict=True))
    solve = "grep -c ':/bin/bash$' /etc/passwd"
    desc = (
        f"New accounts were added ({', '.join(users)}). How many user accounts on this system "
        "have /bin/bash as their login shell?"
    )
    return SynthOSTask(
        _count_record(desc, init, solve, ["user"]), solve, True, "tail -5 /etc/passwd"
    )


def _largest_file(rng: random.Random) -> SynthOSTask:
    root = f"/data/{_name(rng)}"
    sizes = rng.sample(range(10, 5000), rng.randrange(3, 8))
    names = [f"{_name(rng)}.bin" for _ in sizes]
    init = f"mkdir -p {root}\n" + "\n".join(
        f"head -c {s} /dev/zero > {root}/{n}" for n, s in zip(names, sizes, strict=True)
    )
    solve = f"ls -S {root} | head -1"
    rec = {
        "description": f"Which file in {root} is the largest? Answer with its name only.",
        "create": {"init": {"code": init}},
        "evaluation": {"match": names[sizes.index(max(sizes))]},
        "labels": ["file"],
    }
    return SynthOSTask(rec, solve, True, f"ls -l {root}")


def _write_file(rng: random.Random) -> SynthOSTask:
    path = f"/etc/{_name(rng)}/settings.conf"
    key, value = rng.choice(WORDS), rng.randrange(1, 10_000)
    check = f'[ "$(cat {path})" = "{key}={value}" ]'
    rec = {
        "description": f"Create the file {path} (and its directory) containing the single line "
        f"{key}={value}.",
        "evaluation": {"check": [{"code": check}]},
        "labels": ["file", "command"],
    }
    solve = f"mkdir -p {path.rsplit('/', 1)[0]} && echo '{key}={value}' > {path}"
    return SynthOSTask(rec, solve, False)


FAMILIES: dict[str, Callable[[random.Random], SynthOSTask]] = {
    "files_by_extension": _files_by_extension,
    "log_level_count": _log_level_count,
    "csv_column_sum": _csv_column_sum,
    "permissions": _permissions,
    "kill_process": _kill_process,
    "users_with_shell": _users_with_shell,
    "largest_file": _largest_file,
    "write_file": _write_file,
}


def generate_os_task(seed: int, index: int) -> SynthOSTask:
    """Problem ``index`` of stream ``seed`` (families cycle, so any 8 in a row cover all)."""
    rng = random.Random(f"os-synth/{seed}/{index}")
    family = list(FAMILIES)[index % len(FAMILIES)]
    st = FAMILIES[family](rng)
    st.record["id"] = f"synth-{seed}-{index:06d}"
    st.record["family"] = family
    return st


def generate_os_tasks(n: int, seed: int = 0) -> list[SynthOSTask]:
    return [generate_os_task(seed, i) for i in range(n)]


# -- the scripted expert -----------------------------------------------------------------------


def _bash(thought: str, cmd: str) -> str:
    return f"Think: {thought}\n\nAct: bash\n\n```bash\n{cmd}\n```"


def expert_plan(st: SynthOSTask, explore: bool) -> list[str]:
    """The expert's replies; "answer" stands for answering what the last command printed."""
    steps = (
        [_bash("Let me look at what is there first.", st.explore)] if explore and st.explore else []
    )
    steps.append(_bash("This command does it.", st.solve))
    steps.append("answer" if st.answers else "Think: The task is done.\n\nAct: finish")
    return steps


class OSExpert:
    """Scripted expert for synthetic problems (an :class:`~cmat_jax.envs.agents.Agent`); it
    looks around first in about half of the episodes."""

    def __init__(self, tasks: Sequence[SynthOSTask], seed: int = 0) -> None:
        self.plans: dict[str, list[str]] = {}
        for k, st in enumerate(tasks):
            key = NEW_PROBLEM + st.record["description"]
            plan = expert_plan(st, explore=random.Random(f"{seed}/{k}").random() < 0.5)
            if self.plans.setdefault(key, plan) != plan:
                raise ValueError(
                    f"two synthetic problems share a text: {key[len(NEW_PROBLEM) :][:80]!r}"
                )

    def act(self, batch: Sequence[Sequence[Message]]) -> list[str | None]:
        replies: list[str | None] = []
        for messages in batch:
            k = max(i for i, m in enumerate(messages) if m["content"].startswith(NEW_PROBLEM))
            plan = self.plans[messages[k]["content"]]
            turn = sum(1 for m in messages[k:] if m["role"] == "assistant")
            reply = plan[turn] if turn < len(plan) else ""
            if reply == "answer":
                out = messages[-1]["content"].removeprefix(OUTPUT_PREFIX).strip()
                reply = f"Think: The output is the answer.\n\nAct: answer({out})"
            replies.append(reply)
        return replies


def expert_episode(st: SynthOSTask, expert: OSExpert, env: OSEnv | None = None) -> dict[str, Any]:
    """Run the expert on one problem in a fresh sandbox; the episode's transcript."""
    env = env or OSEnv()
    try:
        env.reset(st.task)
        while not env.done:
            env.step(expert.act([env.messages])[0] or "")
        return env.transcript()
    finally:
        env.close()


def write_tasks_json(path: str | Path, n: int, seed: int = 0) -> int:
    """``n`` synthetic problems as an AgentBench OS problem file (every script inline)."""
    recs = [st.record for st in generate_os_tasks(n, seed)]
    Path(path).write_text(json.dumps(recs, indent=1) + "\n", encoding="utf-8")
    return len(recs)


def write_sft_jsonl(path: str | Path, n: int, seed: int = 0) -> int:
    """The expert's successful episodes on ``n`` problems as ``{"messages": ...}`` lines."""
    tasks = generate_os_tasks(n, seed)
    expert = OSExpert(tasks, seed)
    kept = 0
    with Path(path).open("w", encoding="utf-8") as f:
        for st in tasks:
            tr = expert_episode(st, expert)
            if tr["reward"] == 1.0:
                f.write(json.dumps({"messages": tr["messages"], "task_id": tr["task_id"]}) + "\n")
                kept += 1
    return kept
