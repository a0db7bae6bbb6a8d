"""The tasks the CMAT job and the evaluation CLI know, one `TaskSpec` each in `TASKS`.

A task is everything task-specific the job needs: its environment, the Assistant's prompt and the
Checker / Reflector wording (`cmat.roles.PROMPTS[family]`), a seeded synthetic task stream (a
pure function of `(seed, index)`, so a round's tasks are reproducible and a resumed run draws
the same ones), the scripted expert's episodes for agent tuning with the Checker's labelled
items, its problem-file loader for held-out / dev evaluation and its metrics. The rollout
engine, the roles and the evaluation loop are task-agnostic; adding a task is one entry here.

A job with several tasks (`--task db,os`) draws each stream index's task from a seeded mix of
the tasks (`--task-weights`, default even): `mixed_tasks`.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from cmat_jax.cmat import roles as R
from cmat_jax.envs.base import Env, Message, counterfactual_step

REPO = Path(__file__).resolve().parents[1]


class CheckerItem(NamedTuple):
    """A labelled proposal for the Checker: the turns before it (after the task message), the
    proposal, whether the environment judges it good, and what kind of item it is (agent
    tuning draws its bad items evenly over kinds, so an easy kind cannot crowd out the rest)."""

    history: list[Message]
    proposal: str
    good: bool
    kind: str  # "step" (an expert step), or a counterfactual: "premature", "wrong_answer", "repeat"


@dataclasses.dataclass(frozen=True)
class ExpertEpisode:
    """One successful scripted-expert episode as agent-tuning data.

    messages: the conversation; messages with `weight` 0 are context only (the OS task's
      one-shot example), the others' assistant turns are trained.
    task_text: the task message the roles see (the last user message before the first turn).
    checker_items: the Checker's labelled proposals in this episode's contexts.
    """

    task_id: str
    messages: list[dict[str, Any]]
    task_text: str
    checker_items: list[CheckerItem]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task: see the module docstring. `job` arguments are a `CMATJob` (only the fields a
    task reads: its synthetic-mix shares)."""

    name: str
    """Name on the command line (`--task db,os`)."""
    title: str
    """Name in reports."""
    family: str
    """The environment's family (`Env.family`, long-term memory's `task_family`)."""
    assistant_prompt: str
    """The Assistant's system prompt (the environment's action grammar)."""
    headline: str
    """The metric a dev evaluation reports first."""
    dev_default: Path
    """The dev split in a source checkout (a wheel install has none)."""
    dev_scripts: Path | None
    """The folder its script paths are relative to (None: the file's)."""
    synth: Callable[[Any, int, int], Any]
    """`(job, seed, index) -> item`: item `index` of the synthetic stream `seed` (its `.task`
    is the environment's task; the expert reads the rest)."""
    open_envs: Callable[[int], tuple[Callable[[], Env], Callable[[], None]]]
    """`max_rounds -> (make_env, close)`: fresh envs for episodes, and what frees their
    shared resources (the DB task's SQL backend)."""
    expert: Callable[[Sequence[Any], int], list[ExpertEpisode]]
    """`(synthetic items, seed) -> successful expert episodes` for agent tuning."""
    load: Callable[[Path, Path | None, int | None], list]
    """`(problem file, script dir, limit) -> tasks` (a dev or test split)."""
    metrics: Callable[[Iterable[dict[str, Any] | None]], dict[str, Any]]
    """Scores of the episodes' outputs (`env.output()`)."""
    oracle: Callable[[Sequence[Any]], Any]
    """A scripted agent replaying the gold answers (the scorer's ceiling)."""
    round_limit: int | None = None
    """The protocol's fixed round limit (None: the caller's `max_rounds`)."""

    def roles(self, **slots: str) -> R.RoleSet:
        return R.make_roles(self.family, assistant_prompt=self.assistant_prompt, **slots)


# -- the DB task (AgentBench DBBench) ----------------------------------------------------------


def _db_synth(job: Any, seed: int, index: int) -> Any:
    from cmat_jax.envs.dbbench_synth import generate_task

    return generate_task(
        seed,
        index,
        wikisql_share=job.synth_wikisql_share,
        benchmark_share=job.synth_benchmark_share,
    )


def _db_envs(max_rounds: int) -> tuple[Callable[[], Env], Callable[[], None]]:
    from cmat_jax.envs.dbbench import DBBenchEnv
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    backend = SQLiteBackend(time_limit_s=3.0)
    return (lambda: DBBenchEnv(backend, max_rounds=max_rounds)), backend.close


def _db_expert(items: Sequence[Any], seed: int) -> list[ExpertEpisode]:
    """The DB expert's episodes (some steps err on purpose and are fixed). Checker items: every
    expert step (good unless its execution errored), and three proposals an agent gets wrong
    that each look plausible: an answer at the first step, before looking at the table; a wrong
    final answer at the answering step; and, after a step that errored, the expert's next reply
    with the failed statement again in place of its fix (the agent that says it fixed the
    statement and sends it unchanged). Each is labelled by executing it on a copy of the
    episode: by the judge for answers (a mutation task's answer text is not judged, only its
    table, so its changed answer is good), by the SQL error for the repeat.

    In a share of the episodes (`REVISION_DEMO_SHARE`) one of these bad proposals is also
    written into the conversation as a rejected one, with the reviewer's reason for its kind
    (`roles.REJECT_REASONS`), before the expert's own reply: agent tuning then shows the
    Assistant how to revise after a rejection (the rejected proposal itself is not trained)."""
    from cmat_jax.envs.dbbench import DBBenchEnv, sql_block
    from cmat_jax.envs.dbbench_synth import expert_plan
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    env = DBBenchEnv(SQLiteBackend())
    out = []
    try:
        for st in items:
            env.reset(st.task)
            labelled: list[CheckerItem] = []
            history: list[Message] = []
            failed: str | None = None  # the SQL of the previous step, when it errored
            rejectable: list[tuple[int, CheckerItem]] = []  # (turn, bad counterfactual)
            for reply in expert_plan(st, seed):
                n_items = len(labelled)
                if not history:
                    res = counterfactual_step(env, PREMATURE_DB_ANSWER)
                    labelled.append(
                        CheckerItem([], PREMATURE_DB_ANSWER, res.reward >= 1.0, "premature")
                    )
                wrong = _wrong_db_answer(reply)
                if wrong is not None:
                    res = counterfactual_step(env, wrong)
                    labelled.append(
                        CheckerItem(list(history), wrong, res.reward >= 1.0, "wrong_answer")
                    )
                fix = sql_block(reply)
                if failed is not None and fix is not None and fix[0] != failed:
                    repeat = reply[: fix[1]] + failed + reply[fix[2] :]
                    res = counterfactual_step(env, repeat)
                    good = not res.info.get("error", False)
                    labelled.append(CheckerItem(list(history), repeat, good, "repeat"))
                rejectable += [(len(history), c) for c in labelled[n_items:] if not c.good]
                res = env.step(reply)
                error = bool(res.info.get("error", False))
                labelled.append(CheckerItem(list(history), reply, not error, "step"))
                failed = fix[0] if error and fix is not None else None
                history.append({"role": "assistant", "content": reply})
                if res.done:
                    break
                history.append({"role": "user", "content": res.observation})
            tr = env.transcript()
            if tr["reward"] != 1.0:
                continue
            msgs = with_revision_demo(tr["messages"], len(history), rejectable, seed, st.task)
            out.append(ExpertEpisode(st.task.task_id, msgs, st.task.prompt, labelled))
    finally:
        env.close()
    return out


REVISION_DEMO_SHARE = 0.3


def with_revision_demo(
    messages: list[dict[str, Any]],
    n_turns: int,
    rejectable: Sequence[tuple[int, CheckerItem]],
    seed: int,
    task: Any,
) -> list[dict[str, Any]]:
    """`messages` (a head, then `n_turns` turn messages) with, in a seeded share of episodes,
    one of the `rejectable` proposals inserted where it was made: as an untrained Assistant
    message and the reviewer's rejection, followed by the expert's own reply."""
    rng = random.Random(f"revision:{seed}:{task.task_id}")
    if not rejectable or rng.random() >= REVISION_DEMO_SHARE:
        return messages
    kind = rng.choice(sorted({c.kind for _, c in rejectable}))  # kinds evenly, as for the Checker
    turn, item = rng.choice([tc for tc in rejectable if tc[1].kind == kind])
    at = len(messages) - n_turns + turn
    demo = [
        {"role": "assistant", "content": item.proposal, "weight": 0.0},
        {"role": "user", "content": R.rejection_feedback(R.REJECT_REASONS[item.kind])},
    ]
    return [*messages[:at], *demo, *messages[at:]]


# The DB task's counterfactual Checker items (`_db_expert`): answering before any query, and a
# final answer whose values differ from the ones the queries returned.
PREMATURE_DB_ANSWER = (
    "The task looks simple enough to answer directly.\nAction: Answer\nFinal Answer: []"
)


def _wrong_db_answer(reply: str) -> str | None:
    """`reply` with each value of its final answer changed (numbers +1, text with a letter
    added; an empty answer gets one value); None when `reply` does not answer."""
    head, sep, answer = reply.partition("\nFinal Answer:")
    if not sep or "Action: Answer" not in head:
        return None
    try:
        values = json.loads(answer.strip())
    except ValueError:
        return None
    if not isinstance(values, list):
        return None
    bump = lambda v: v + 1 if isinstance(v, int | float) and not isinstance(v, bool) else f"{v}x"
    wrong = [bump(v) for v in values] or ["0"]
    return f"{head}{sep} {json.dumps(wrong, ensure_ascii=False)}"


def _db_load(path: Path, script_dir: Path | None, limit: int | None) -> list:
    from cmat_jax.envs.dbbench import load_tasks

    return load_tasks(path, limit=limit)


def _db_metrics(outputs: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    from cmat_jax.envs.dbbench import dbbench_metrics

    return dbbench_metrics(outputs)


def _db_oracle(tasks: Sequence[Any]) -> Any:
    from cmat_jax.envs.agents import oracle_agent

    return oracle_agent(tasks)


# -- the OS task (AgentBench OS interaction) ---------------------------------------------------


def _os_synth(job: Any, seed: int, index: int) -> Any:
    from cmat_jax.envs.os_synth import generate_os_task

    return generate_os_task(seed, index)


def _os_envs(max_rounds: int) -> tuple[Callable[[], Env], Callable[[], None]]:
    from cmat_jax.envs.os_sandbox import ensure_rootfs
    from cmat_jax.envs.os_task import OSEnv

    ensure_rootfs("default")
    return (lambda: OSEnv(max_rounds=max_rounds)), (lambda: None)


# A premature "finish" and a wrong answer: the bad proposals an OS expert episode is also
# labelled on, by executing them on a copy of the episode (the judge's verdict decides).
PREMATURE_FINISH = "Think: I think the task is already done.\n\nAct: finish"


def _wrong_answer(answer: str) -> str:
    a = answer.strip()
    wrong = str(int(a) + 1) if a.lstrip("-").isdigit() else (a + "x" if a else "0")
    return f"Think: The output is the answer.\n\nAct: answer({wrong})"


def _os_expert(items: Sequence[Any], seed: int) -> list[ExpertEpisode]:
    """The OS expert's episodes in the sandbox. Checker items: every expert step (good when the
    episode succeeds), and at the first step a premature finish, and at the answering step a
    wrong answer, each labelled by executing it on a copy of the episode (good iff the judge
    accepts it: in practice never). Revision demos as the DB expert's (`with_revision_demo`)."""
    from cmat_jax.envs.os_sandbox import ensure_rootfs
    from cmat_jax.envs.os_synth import OSExpert
    from cmat_jax.envs.os_task import OSEnv

    ensure_rootfs("default")
    expert = OSExpert(items, seed)
    out = []
    env = OSEnv()
    try:
        for st in items:
            task = st.task
            first = env.reset(task)
            labelled: list[CheckerItem] = []
            history: list[Message] = []
            rejectable: list[tuple[int, CheckerItem]] = []
            while not env.done:
                reply = expert.act([env.messages])[0] or ""
                n_items = len(labelled)
                if not history:
                    res = counterfactual_step(env, PREMATURE_FINISH)
                    labelled.append(
                        CheckerItem([], PREMATURE_FINISH, res.reward >= 1.0, "premature")
                    )
                if "Act: answer(" in reply:
                    wrong = _wrong_answer(reply.split("Act: answer(", 1)[1].rsplit(")", 1)[0])
                    res = counterfactual_step(env, wrong)
                    labelled.append(
                        CheckerItem(list(history), wrong, res.reward >= 1.0, "wrong_answer")
                    )
                rejectable += [(len(history), c) for c in labelled[n_items:] if not c.good]
                labelled.append(CheckerItem(list(history), reply, True, "step"))
                res = env.step(reply)
                history.append({"role": "assistant", "content": reply})
                if not res.done:
                    history.append({"role": "user", "content": res.observation})
            tr = env.transcript()
            if tr["reward"] != 1.0:
                continue
            n_head = len(first)
            msgs: list[dict[str, Any]] = [
                {**m, "weight": 0.0} if i < n_head and m["role"] == "assistant" else dict(m)
                for i, m in enumerate(tr["messages"])
            ]
            msgs = with_revision_demo(msgs, len(history), rejectable, seed, task)
            out.append(ExpertEpisode(task.task_id, msgs, first[-1]["content"], labelled))
    finally:
        env.close()
    return out


def _os_load(path: Path, script_dir: Path | None, limit: int | None) -> list:
    from cmat_jax.envs.os_sandbox import ensure_rootfs
    from cmat_jax.envs.os_task import load_os_tasks

    tasks = load_os_tasks(path, script_dir, limit=limit)
    for image in sorted({t.image for t in tasks}):
        ensure_rootfs(image)
    return tasks


def _os_metrics(outputs: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    from cmat_jax.envs.os_task import os_metrics

    return os_metrics(outputs)


def _os_oracle(tasks: Sequence[Any]) -> Any:
    from cmat_jax.envs.os_task import OSOracleAgent

    return OSOracleAgent(tasks)


def _db_prompt() -> str:
    from cmat_jax.envs.dbbench import SYSTEM_PROMPT

    return SYSTEM_PROMPT


def _os_prompt() -> str:
    from cmat_jax.envs.os_task import INSTRUCTIONS

    return INSTRUCTIONS


TASKS: dict[str, TaskSpec] = {
    "db": TaskSpec(
        name="db",
        title="AgentBench DB",
        family="dbbench",
        assistant_prompt=_db_prompt(),
        headline="overall_cat_accuracy",
        dev_default=REPO / "tests" / "data" / "agentbench_dbbench" / "dev.jsonl",
        dev_scripts=None,
        synth=_db_synth,
        open_envs=_db_envs,
        expert=_db_expert,
        load=_db_load,
        metrics=_db_metrics,
        oracle=_db_oracle,
    ),
    "os": TaskSpec(
        name="os",
        title="AgentBench OS",
        family="os",
        assistant_prompt=_os_prompt(),
        headline="accuracy",
        dev_default=REPO / "tests" / "data" / "agentbench_os" / "dev.json",
        dev_scripts=REPO / "tests" / "data" / "agentbench_os" / "scripts" / "dev",
        synth=_os_synth,
        open_envs=_os_envs,
        expert=_os_expert,
        load=_os_load,
        metrics=_os_metrics,
        oracle=_os_oracle,
        round_limit=8,
    ),
}


def task_spec(name: str) -> TaskSpec:
    """The task named `name` (its CLI name or its environment family)."""
    for spec in TASKS.values():
        if name in (spec.name, spec.family):
            return spec
    raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")


def parse_task_list(text: str) -> tuple[str, ...]:
    """`"db,os"` -> ("db", "os"): known names, each once."""
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise ValueError("--task: no task given (known: " + ", ".join(TASKS) + ")")
    out = []
    for n in names:
        try:
            spec = task_spec(n)
        except ValueError as e:
            raise ValueError(f"--task: {e}") from None
        if spec.name in out:
            raise ValueError(f"--task: {n!r} given twice")
        out.append(spec.name)
    return tuple(out)


def task_of_index(names: Sequence[str], weights: Sequence[float], seed: int, index: int) -> str:
    """Which task stream item `index` of a mixed job comes from: a seeded draw by `weights`
    (one task: that task), a pure function of `(seed, index)`."""
    if len(names) == 1:
        return names[0]
    w = list(weights) or [1.0] * len(names)
    u = random.Random(f"cmat-task-mix/{seed}/{index}").random() * sum(w)
    acc = 0.0
    for name, x in zip(names, w, strict=True):
        acc += x
        if u < acc:
            return name
    return names[-1]


def mixed_tasks(job: Any, n: int, seed: int, start: int = 0) -> list[tuple[str, Any]]:
    """Items `start .. start+n-1` of the job's task stream `seed` as `(task name, task)`: each
    index's task drawn by `task_of_index`, then item `index` of that task's synthetic stream."""
    names = parse_task_list(job.task)
    out = []
    for i in range(start, start + n):
        spec = TASKS[task_of_index(names, job.task_weights, seed, i)]
        out.append((spec.name, spec.synth(job, seed, i)))
    return out


def by_task(items: Sequence[tuple[str, Any]]) -> dict[str, list]:
    """`(name, task)` pairs grouped by task name, in stream order within each task."""
    out: dict[str, list] = {}
    for name, task in items:
        out.setdefault(name, []).append(task)
    return out


def stratified_sample(
    items: Sequence[Any], n: int, seed: int, stratum: Callable[[Any], str]
) -> list[Any]:
    """`n` of `items` drawn at random (seed `seed`) in proportion to their strata, in file order.

    A dev subset for quick comparisons: the first N items of a split are not a sample of it
    (AgentBench DB's first 30 dev items hold no UPDATE). Each stratum gets its floor share of
    `n` and the largest remainders the rest (ties to the larger stratum, then by name), so every
    stratum with a share >= 1 is represented; `n >= len(items)` returns them all.
    """
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    if n >= len(items):
        return list(items)
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(stratum(item), []).append(i)
    names = sorted(groups)
    quota = {s: n * len(groups[s]) / len(items) for s in names}
    take = {s: int(quota[s]) for s in names}
    by_remainder = sorted(names, key=lambda s: (-(quota[s] - take[s]), -len(groups[s]), s))
    for s in by_remainder[: n - sum(take.values())]:
        take[s] += 1
    rng = random.Random(seed)
    chosen = [i for s in names for i in rng.sample(groups[s], take[s])]
    return [items[i] for i in sorted(chosen)]
