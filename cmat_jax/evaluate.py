"""Evaluate an agent on an AgentBench task: ``python -m cmat_jax.evaluate --model M --data FILE --out DIR``.

``--task db`` (default): an AgentBench DB JSONL file; ``--task os``: an OS interaction problem
file (``--script-dir``: where its scripts are), each episode in a fresh sandbox, the round
limit fixed at the protocol's 8. Each task's environment, loader, oracle and metrics come from
:mod:`cmat_jax.tasks`; everything below is the same for every task.

One protocol serves this CLI and the CMAT job's evaluations (:func:`evaluate_agent`): greedy
episodes through the CMAT ``RolloutEngine`` with the Assistant's slot, optionally the Checker
verifying every proposal before it runs (accept iff p_accept >= 0.5, a rejection asks for up to
``max_revisions`` revisions), long-term memory read from a copy of a run's memory (policy
``evaluation``: nothing written on test items is read), and with ``reflexion_trials > 1``
unsolved items retried with the Reflector's lessons on their earlier attempts (reported
separately, pass@N). Up to ``live_episodes`` episodes advance together, their generation calls
taking ``max_batch`` rows each.

Writes ``DIR/results.json`` (``overall_cat_accuracy``, every per-type accuracy,
``success_rate``, ``n``, engine counters, the settings, throughput) and ``DIR/episodes.jsonl``
(one line per episode and attempt: the task, every proposal with its verdict and observation,
the conversation, the scored output) — the format of the CMAT job's ``eval/*/episodes.jsonl``.

``--model`` is a training run directory (the base named in its config.json plus the adapters
of its newest complete checkpoint, or ``--step``; the Assistant on ``--slot``, default the slot
the run trained; the Checker on the run's ``checker`` slot when it has one), a preset, an HF
directory or a GGUF file (see :mod:`cmat_jax.run_loader`). Protocol settings left unset take a
CMAT run's own evaluation settings (``eval_max_rounds``, ``eval_max_new_tokens``, ...), else
the defaults below, so evaluating a run directory repeats the job's own evaluation.

Agents besides ``model``: ``oracle`` (replays the gold labels: the scorer's ceiling) and
``null`` (answers nothing: its floor), stepped by :func:`run_episodes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from cmat_jax.cli import (
    AttentionImpl,
    Dtype,
    NonNegInt,
    PosFloat,
    PosInt,
    Range,
    UsageError,
    parse,
    run_cli,
)
from cmat_jax.envs.agents import Agent, NullAgent
from cmat_jax.envs.dbbench import DBBenchEnv, DBTask, dbbench_metrics
from cmat_jax.envs.sql_backend import SQLBackend
from cmat_jax.eval_journal import RESUMABLE_SETTINGS, EvalJournal, check_output_dir

__all__ = [
    "EvalConfig",
    "EvalProtocol",
    "eval_roles",
    "evaluate",
    "evaluate_agent",
    "main",
    "run_episodes",
]


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
    """How an evaluation runs (the CLI and the CMAT job alike)."""

    checker: bool = False
    """Let the Checker verify each proposal before it runs."""
    reflexion_trials: int = 1
    """Attempts per item; > 1 adds a separately reported reflexion (pass@N) number."""
    max_rounds: int = 15
    """Environment round limit of an episode (AgentBench's protocol: 15)."""
    max_new_tokens: int = 512
    """Token cap of one reply (proposal, Checker reason or reflection)."""
    reason_max_new_tokens: int = 0
    """Token cap of a Checker's rejection reason (0 = max_new_tokens)."""
    max_context: int = 2048
    """Prompt + reply tokens per generation; longer episodes continue from short-term memory."""
    max_revisions: int = 2
    """Assistant revisions after Checker rejections in one round."""
    max_batch: int = 16
    """Rows per generation / verdict call."""
    min_batch: int = 1
    """Generation / verdict calls are padded to at least this many rows."""
    live_episodes: int | None = None
    """Episodes advanced together (None = 4 x max_batch)."""
    reuse_prefix: bool = True
    """Reuse the keys/values of prompt prefixes earlier generation calls computed."""
    ltm_k: int = 3
    """Long-term-memory records injected into a prompt (when a memory is read)."""
    ltm_token_budget: int = 256
    ltm_solutions: bool = True
    ltm_similar: bool = True

    def __post_init__(self) -> None:
        for name in ("reflexion_trials", "max_rounds", "max_new_tokens", "max_context",
                     "max_batch", "min_batch", "ltm_token_budget"):  # fmt: skip
            if getattr(self, name) < 1:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in ("reason_max_new_tokens", "max_revisions", "ltm_k"):
            if getattr(self, name) < 0:
                raise UsageError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.live_episodes is not None and self.live_episodes < 1:
            raise UsageError(f"--live-episodes must be >= 1, got {self.live_episodes}")
        if self.max_context <= self.max_new_tokens:
            raise UsageError(
                f"--max-context ({self.max_context}) must exceed --max-new-tokens "
                f"({self.max_new_tokens})"
            )

    @classmethod
    def from_run_config(cls, run_cfg: Mapping[str, Any], **overrides: Any) -> EvalProtocol:
        """The protocol a CMAT job evaluates with, from its config (a run's config.json or
        ``dataclasses.asdict(job)``); fields it lacks keep the defaults; ``overrides`` win."""
        kw = {
            ours: run_cfg[theirs] for theirs, ours in RUN_EVAL_FIELDS.items() if theirs in run_cfg
        }
        return cls(**{**kw, **overrides})


# CMAT run config field -> protocol field (a run records how its job evaluated).
RUN_EVAL_FIELDS = {
    "eval_max_rounds": "max_rounds",
    "eval_max_new_tokens": "max_new_tokens",
    "eval_max_context": "max_context",
    "reason_max_new_tokens": "reason_max_new_tokens",
    "max_revisions": "max_revisions",
    "max_batch": "max_batch",
    "min_batch": "min_batch",
    "reflexion_trials": "reflexion_trials",
    "ltm_k": "ltm_k",
    "ltm_token_budget": "ltm_token_budget",
    "ltm_solutions": "ltm_solutions",
    "ltm_similar": "ltm_similar",
}


def eval_roles(
    assistant_slot: str = "none",
    checker_slot: str = "none",
    reflector_slot: str | None = None,
    task: str = "db",
) -> Any:
    """A task's roles (`cmat_jax.tasks`, default DB) on the given adapter slots ("none" = the
    frozen base; the Reflector defaults to the Assistant's slot)."""
    from cmat_jax.tasks import task_spec

    reflector = reflector_slot or assistant_slot
    roles = task_spec(task).roles(checker_slot=checker_slot, reflector_slot=reflector)
    # make_roles guards training against an untrainable Assistant; evaluating the frozen base
    # (zero-shot) is exactly the Assistant on slot "none".
    return dataclasses.replace(
        roles, assistant=dataclasses.replace(roles.assistant, adapter_slot=assistant_slot)
    )


# -- the one evaluation ----------------------------------------------------------------------


def _copy_sqlite(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def evaluate_agent(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[DBTask],
    protocol: EvalProtocol,
    *,
    roles: Any,
    backend: SQLBackend | None = None,
    ltm_path: Path | None = None,
    episodes_path: Path | None = None,
    on_done: Callable[[int], None] | None = None,
    mesh: Any = None,
    journal: EvalJournal | None = None,
    env_factory: Callable[[], Any] | None = None,
    metrics: Callable[[Any], dict[str, Any]] = dbbench_metrics,
) -> dict[str, Any]:
    """Greedy evaluation of ``model`` (its adapters on the slots ``roles`` name) on ``tasks``.

    ``ltm_path``: a run's long-term memory, read through a private copy (never changed);
    ``backend``: the SQL backend (default SQLite, 3 s per statement); ``episodes_path``: where
    every episode's line goes (all attempts); ``mesh``: generate on it (see RolloutEngine);
    ``journal``: every finished chunk of episodes is journaled there and chunks it already
    holds are taken from it instead of run (the long-term memory lives beside it), so an
    interrupted evaluation resumes to the same results (see :mod:`cmat_jax.eval_journal`).
    ``env_factory`` builds another task's environments (``cmat_jax.tasks``; default: the DB
    task's on ``backend``) and ``metrics`` scores their outputs.
    Returns the results dict of :func:`score`, with
    the engine counters of the first attempt under ``engine``.
    """
    import jax

    from cmat_jax.cmat.config import CMATConfig
    from cmat_jax.cmat.feedback import EpisodeRecord
    from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
    from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine, summarize

    if not tasks:
        raise UsageError("evaluation: no tasks to evaluate")
    own_backend = backend is None and env_factory is None
    if own_backend:
        from cmat_jax.envs.sqlite_backend import SQLiteBackend

        backend = SQLiteBackend(time_limit_s=3.0)
    p = protocol
    reflexion = p.reflexion_trials > 1
    live = p.live_episodes or 4 * p.max_batch
    work = Path(tempfile.mkdtemp(prefix="cmat_eval_"))
    ltm = None
    if (ltm_path is not None and Path(ltm_path).is_file()) or reflexion:
        ltm_file = work / "ltm.sqlite" if journal is None else journal.ltm_path
        kept = journal.last_ltm_records() if journal is not None else None
        if kept is None or not ltm_file.is_file():
            ltm_file.unlink(missing_ok=True)
            if ltm_path is not None and Path(ltm_path).is_file():
                _copy_sqlite(Path(ltm_path), ltm_file)
        ltm = LongTermMemory(ltm_file)
        if kept is not None:  # resumed: drop what the interrupted chunk wrote
            ltm.truncate(kept)
    memory = dict(
        ltm_k=p.ltm_k if ltm is not None else 0,
        ltm_token_budget=p.ltm_token_budget,
        ltm_solutions=p.ltm_solutions,
        ltm_similar=p.ltm_similar,
    )
    trials: list[list[dict[str, Any]]] = []
    counters: dict[str, Any] = {}
    records: list[Any] = []
    envs: list[Any] = []  # the engine's envs of the current chunk, in task order

    new_env = env_factory or (lambda: DBBenchEnv(backend, max_rounds=p.max_rounds))

    def make_env() -> Any:
        envs.append(new_env())
        return envs[-1]

    t0 = time.perf_counter()
    cmat_cfg = None
    try:
        todo = list(tasks)
        for trial in range(p.reflexion_trials):
            cmat_cfg = CMATConfig(
                group_size=1,
                use_checker=p.checker,
                max_revisions=p.max_revisions,
                use_reflection=reflexion and trial + 1 < p.reflexion_trials,
                **memory,
            )
            engine = RolloutEngine(
                model,
                tokenizer,
                make_env,
                roles=roles,
                cmat_cfg=cmat_cfg,
                rollout_cfg=RolloutConfig(
                    temperature=0.0,
                    checker_sample=False,
                    max_new_tokens=p.max_new_tokens,
                    reason_max_new_tokens=p.reason_max_new_tokens,
                    max_context=p.max_context,
                    max_batch=p.max_batch,
                    min_batch=p.min_batch,
                    counterfactual=False,
                    ltm_split="eval" if reflexion else "",
                    reuse_prefix=p.reuse_prefix,
                ),
                ltm=ltm,
                read_policy=ReadPolicy.evaluation(reflexion=trial > 0),
                mesh=mesh,
            )
            lines: list[dict[str, Any]] = []
            for lo in range(0, len(todo), live):
                part = todo[lo : lo + live]
                chunk = journal.done(trial, lo) if journal is not None else None
                if chunk is None:
                    envs.clear()
                    # The chunk's key depends on (trial, chunk) only: a resumed run draws the same.
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), trial), lo)
                    res = engine.run(part, group_size=1, train=False, key=key)
                    chunk = {
                        "lines": [
                            episode_line(task, env.transcript(), out, trial, rec, refl)
                            for task, env, rec, out, refl in zip(
                                part, envs, res.episodes, res.outputs, res.reflections, strict=True
                            )
                        ],
                        "records": [rec.to_dict() for rec in res.episodes],
                        "counters": {k: v for k, v in res.stats.items() if k in _COUNTERS},
                    }
                    if journal is not None:
                        n_ltm = len(ltm) if ltm is not None else None
                        chunk = journal.record(trial, lo, chunk, n_ltm)
                if trial == 0:
                    records += [EpisodeRecord.from_dict(r) for r in chunk["records"]]
                    for k, v in chunk["counters"].items():
                        counters[k] = counters.get(k, 0) + v
                lines += chunk["lines"]
                if on_done is not None:
                    on_done(len(part))
            trials.append(lines)
            todo = [t for t, line in zip(todo, lines, strict=True) if not _solved(line)]
            if not todo:
                break
    finally:
        if ltm is not None:
            ltm.close()
        shutil.rmtree(work, ignore_errors=True)
        if own_backend:
            backend.close()
    results = score(tasks, trials, p.reflexion_trials, metrics)
    results["engine"] = {**counters, **summarize(records, cmat_cfg)}
    results["eval_wall_s"] = round(time.perf_counter() - t0, 3)
    if episodes_path is not None:
        write_episodes(episodes_path, trials)
    return results


# Engine counters summed over the chunks of the first attempt.
_COUNTERS = ("generate_calls", "generated_tokens", "verdict_calls", "env_steps",
             "reused_prompt_tokens", "prefilled_prompt_tokens", "context_rebuilds")  # fmt: skip


def episode_line(
    task: DBTask,
    transcript: dict[str, Any],
    output: dict[str, Any] | None,
    trial: int,
    record: Any = None,
    reflection: str = "",
) -> dict[str, Any]:
    """One line of episodes.jsonl: the attempt, the task, the environment's transcript (the
    conversation, steps, status, reward), the scored output and, for a model agent, every
    proposal with its verdict and observation (``turns``) and the reflection."""
    line: dict[str, Any] = {
        "trial": trial + 1,
        "description": task.description,
        **({"table_name": task.table_name} if hasattr(task, "table_name") else {}),  # DB tasks
        **transcript,
        "output": output,
        "turns": [dataclasses.asdict(t) for t in record.turns] if record is not None else [],
    }
    if reflection:
        line["reflection"] = reflection
    return line


def _solved(line: dict[str, Any]) -> bool:
    return bool((line.get("output") or {}).get("correct"))


def score(
    tasks: Sequence[Any],
    trials: Sequence[Sequence[dict[str, Any]]],
    reflexion_trials: int,
    metrics: Callable[[Any], dict[str, Any]] = dbbench_metrics,
) -> dict[str, Any]:
    """The headline numbers of the first attempt (the task's ``metrics``: for DB AgentBench's
    per-type accuracies and ``overall_cat_accuracy``; ``success_rate``), the status counts, and
    with reflexion the pass@N numbers over all attempts."""
    first = {line["task_id"]: line for line in trials[0]} if trials else {}
    firsts = [first.get(t.task_id) for t in tasks]
    results: dict[str, Any] = dict(metrics((x or {}).get("output") for x in firsts))
    results["success_rate"] = sum(x is not None and _solved(x) for x in firsts) / max(len(tasks), 1)
    results["n"] = len(tasks)
    results["episodes"] = sum(len(t) for t in trials)
    results["status_counts"] = _counts(x["status"] for x in firsts if x is not None)
    if reflexion_trials > 1:
        best = dict(first)
        for lines in trials[1:]:
            for line in lines:
                if _solved(line):
                    best[line["task_id"]] = line
        finals = [best.get(t.task_id) for t in tasks]
        results["reflexion"] = {
            "label": f"pass@{reflexion_trials}",
            "note": f"pass@{reflexion_trials}: item counts as solved if any of "
            f"{reflexion_trials} attempts succeeded (later attempts see reflections)",
            "trials": reflexion_trials,
            "success_rate": sum(x is not None and _solved(x) for x in finals) / max(len(tasks), 1),
            **metrics((x or {}).get("output") for x in finals),
        }
    return results


def write_episodes(path: Path, trials: Sequence[Sequence[dict[str, Any]]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for lines in trials:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def _make_backend(cfg: EvalConfig) -> SQLBackend:
    if cfg.backend == "mysql":
        from cmat_jax.envs.mysql_backend import MySQLBackend, MySQLParams

        params = MySQLParams(
            option_file=cfg.mysql_option_file,
            unix_socket=cfg.mysql_socket,
            host=cfg.mysql_host,
            port=cfg.mysql_port,
            user=cfg.mysql_user,
        )
        return MySQLBackend(params, time_limit_s=cfg.statement_time_limit_s)
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    return SQLiteBackend(time_limit_s=cfg.statement_time_limit_s)


# -- scripted agents (oracle, null, custom Agent objects) ------------------------------------


def run_episodes(
    tasks: Sequence[DBTask],
    agent: Agent,
    backend: SQLBackend,
    *,
    batch_size: int = 16,
    max_rounds: int = 15,
    trial: int = 0,
    notes: dict[str, str] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    make_env: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run one episode per task of an ``Agent`` with up to ``batch_size`` live at once; returns
    the episodes' lines (:func:`episode_line`) in task order. ``make_env`` builds another
    task family's environment (default: the DB task's on ``backend``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    queue = list(range(len(tasks)))[::-1]
    live: list[tuple[int, DBBenchEnv]] = []

    def start(i: int) -> tuple[int, DBBenchEnv]:
        env = make_env() if make_env is not None else DBBenchEnv(backend, max_rounds=max_rounds)
        note = (notes or {}).get(tasks[i].task_id)
        if note:
            env.system_prompt += "\n\nNotes from your earlier attempts at this task:\n" + note
        env.reset(tasks[i])
        return i, env

    def finish(i: int, env: DBBenchEnv) -> None:
        line = episode_line(tasks[i], env.transcript(), env.output(), trial)
        env.close()
        results[i] = line
        if on_done is not None:
            on_done(line)

    try:
        while queue or live:
            while queue and len(live) < batch_size:
                live.append(start(queue.pop()))
            replies = agent.act([env.messages for _, env in live])
            if len(replies) != len(live):
                raise RuntimeError(
                    f"agent returned {len(replies)} replies for {len(live)} episodes"
                )
            still: list[tuple[int, DBBenchEnv]] = []
            for (i, env), reply in zip(live, replies, strict=True):
                result = env.finish() if reply is None else env.step(reply)
                if result.done:
                    finish(i, env)
                else:
                    still.append((i, env))
            live = still
    finally:
        for _, env in live:
            env.close()
    return [r for r in results if r is not None]


def _run_trials(
    tasks: Sequence[Any],
    agent: Agent,
    backend: SQLBackend | None,
    p: EvalProtocol,
    bar: Any,
    make_env: Callable[[], Any] | None = None,
) -> list[list[dict[str, Any]]]:
    """Attempts of an ``Agent``: unsolved items are retried, with the agent's reflections (when
    it has ``reflect``) added to the next attempt's instructions."""
    trials: list[list[dict[str, Any]]] = []
    notes: dict[str, str] = {}
    todo = list(tasks)
    for trial in range(p.reflexion_trials):
        if trial > 0:
            bar.reset(total=len(todo))
            bar.set_description(f"trial {trial + 1}")
        lines = run_episodes(
            todo, agent, backend, batch_size=p.max_batch, max_rounds=p.max_rounds, trial=trial,
            notes=notes, on_done=lambda _line: bar.update(1), make_env=make_env,
        )  # fmt: skip
        trials.append(lines)
        failed = [line for line in lines if not _solved(line)]
        todo = [t for t, line in zip(todo, lines, strict=True) if not _solved(line)]
        if not todo:
            break
        reflect = getattr(agent, "reflect", None)
        if callable(reflect) and trial + 1 < p.reflexion_trials:
            for line, note in zip(failed, reflect(failed), strict=True):
                notes[line["task_id"]] = note
    return trials


# -- the CLI ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate an agent on an AgentBench-format DBBench task file."""

    data: Path
    """Task file: AgentBench DBBench JSONL (or a JSON list)."""
    out: Path
    """Output directory for results.json and episodes.jsonl."""
    model: str | None = None
    """Model for --agent model: a training run directory (its base + the adapters of a
    checkpoint), a preset, an HF directory or a .gguf file."""
    step: NonNegInt | None = None
    """With a run directory: the checkpoint step to load (default: the newest)."""
    slot: str | None = None
    """With a run directory: the Assistant's adapter slot (default: the slot the run trained;
    "none" = the base model)."""
    task: Literal["db", "os", "dbbench"] = "db"
    """Task of --data, named as `train cmat --task` names it: db, AgentBench DB (a JSONL file;
    `dbbench` is its other name), or os, OS interaction (a JSON problem file)."""
    script_dir: Path | None = None
    """--task os: the folder the problem file's script paths are relative to (default: the
    problem file's folder)."""
    agent: Literal["model", "oracle", "null"] = "model"
    """model: an LLM (--model); oracle: replays the gold answers; null: answers nothing."""
    checker: bool = False
    """Let the Checker role verify each proposal before it runs (model agent only; the run's
    'checker' slot, else the base)."""
    reflexion_trials: PosInt | None = None
    """Attempts per item; > 1 adds a separately reported reflexion (pass@N) number
    (default: the run's reflexion_trials, else 1)."""
    limit: PosInt | None = None
    """Evaluate only the first N items."""
    batch_size: PosInt | None = None
    """Rows per generation call, and scripted agents' live episodes (default: the run's
    max_batch, else 16)."""
    backend: Literal["sqlite", "mysql"] = "sqlite"
    """SQL engine the episodes run on."""
    mysql_option_file: str | None = None
    """--backend mysql: administrator credentials in a MySQL option file (its [client] group:
    user, password, socket or host/port). Without one the password comes from the
    CMAT_MYSQL_PASSWORD environment variable; it is never a flag (argv is public)."""
    mysql_socket: str | None = None
    """--backend mysql: unix socket of the server (else host and port)."""
    mysql_host: str = "localhost"
    """--backend mysql: server host."""
    mysql_port: Annotated[int, Range(ge=1, le=65535)] = 3306
    """--backend mysql: server port."""
    mysql_user: str = "cmat_admin"
    """--backend mysql: administrator account (needs only CREATE USER and ALL ON `cmat_ep_%`.*
    WITH GRANT OPTION; see cmat_jax.envs.mysql_backend.ADMIN_GRANTS)."""
    statement_time_limit_s: PosFloat = 3.0
    """Seconds one SQL statement may run before it is stopped."""
    max_rounds: PosInt | None = None
    """Environment round limit of an episode (default: the run's eval_max_rounds, else 15)."""
    max_new_tokens: PosInt | None = None
    """Token cap of one reply (default: the run's eval_max_new_tokens, else 512)."""
    reason_max_new_tokens: NonNegInt | None = None
    """Token cap of a Checker's rejection reason (0 = --max-new-tokens; default: the run's)."""
    max_context: PosInt | None = None
    """Prompt + reply tokens per generation; longer episodes drop their oldest steps first
    (default: the run's eval_max_context, else 2048)."""
    dtype: Dtype | None = None
    """Base parameter and matmul dtype (default: the run's param_dtype, else bfloat16)."""
    attention_impl: AttentionImpl | None = None
    """Prefill attention kernel (default: the run's, else auto: chunked on CPU, cuDNN /
    Pallas on GPU and TPU)."""
    max_revisions: NonNegInt | None = None
    """With --checker: Assistant revisions after rejections in one round (default: the run's,
    else 2)."""
    reuse_prefix: bool = True
    """Reuse the keys/values of prompt prefixes earlier generation calls computed."""
    live_episodes: PosInt | None = None
    """Model agent: episodes advanced together (default: 4 x batch size)."""
    overwrite: bool = False
    """Replace an existing DIR/results.json (or start an interrupted evaluation over)."""
    resume: bool = False
    """Continue the interrupted evaluation in DIR (its DIR/journal.jsonl): finished chunks of
    episodes are not run again, and the outputs equal an uninterrupted run's. The settings
    must be the ones it started with (--out, --progress aside)."""
    progress: bool = True
    """Show a progress bar."""

    def protocol(self, run_cfg: Mapping[str, Any] | None = None) -> EvalProtocol:
        """The protocol: flags given here, else the run's evaluation settings, else defaults."""
        flags = dict(
            checker=self.checker,
            reflexion_trials=self.reflexion_trials,
            max_rounds=self.max_rounds,
            max_new_tokens=self.max_new_tokens,
            reason_max_new_tokens=self.reason_max_new_tokens,
            max_context=self.max_context,
            max_revisions=self.max_revisions,
            max_batch=self.batch_size,
            live_episodes=self.live_episodes,
            reuse_prefix=self.reuse_prefix,
        )
        given = {k: v for k, v in flags.items() if v is not None}
        return EvalProtocol.from_run_config(run_cfg or {}, **given)


def _check_config(cfg: EvalConfig) -> None:
    if cfg.agent != "model":
        for flag, value in (("--checker", cfg.checker or None), ("--step", cfg.step),
                            ("--model", cfg.model), ("--slot", cfg.slot)):  # fmt: skip
            if value is not None:
                raise UsageError(f"{flag} only applies to --agent model")
    elif cfg.model is None:
        raise UsageError(
            "--agent model needs --model (a run directory, a preset, an HF dir or a .gguf file)"
        )
    if not Path(cfg.data).is_file():
        raise UsageError(f"--data: {cfg.data}: no such file")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out}: exists and is not a directory")
    check_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)


def evaluate(cfg: EvalConfig, agent: Agent | None = None) -> dict[str, Any]:
    """Run the evaluation ``cfg`` describes (``agent``: a scripted Agent in place of
    --agent); writes DIR/results.json and DIR/episodes.jsonl only once everything is loaded."""
    from cmat_jax.run_loader import load_source
    from cmat_jax.tasks import task_spec

    spec = task_spec(cfg.task)
    _check_config(cfg)
    protocol = _task_protocol(cfg, cfg.protocol())  # checks the flags before anything loads
    tasks = spec.load(Path(cfg.data), cfg.script_dir, cfg.limit)
    if not tasks:
        raise UsageError(f"--data: {cfg.data}: no tasks")
    lm = None
    if agent is None:
        if cfg.agent == "oracle":
            agent = spec.oracle(tasks)
        elif cfg.agent == "null":
            agent = NullAgent()
        else:
            lm = load_source(
                cfg.model, cfg.step, dtype=cfg.dtype, attention_impl=cfg.attention_impl
            )
            protocol = _task_protocol(cfg, cfg.protocol(lm.run_config))
            assistant = lm.slot(cfg.slot)
            checker = "checker" if "checker" in lm.slots else "none"
            reflector = lm.slot(lm.run_config.get("reflector_slot", assistant), "reflector_slot")
            roles = eval_roles(assistant, checker, reflector, task=spec.name)
    out = Path(cfg.out)
    # One name per task in the settings (a resume under the task's other name is the same run).
    settings = {**dataclasses.asdict(cfg), "task": spec.name, **dataclasses.asdict(protocol)}
    journal = None
    if lm is not None:  # scripted agents run in seconds: they are not journaled
        journal_settings = {**settings, "model_info": lm.info(), "data_sha256": _inputs_sha256(cfg)}
        journal = EvalJournal(out, journal_settings, resume=cfg.resume, overwrite=cfg.overwrite)
    # The DB task runs on the chosen SQL backend; other tasks build their own environments.
    backend = _make_backend(cfg) if spec.name == "db" else None
    env_factory, close_envs = (None, None) if backend else spec.open_envs(protocol.max_rounds)
    if journal is not None:
        journal.start()

    bar = _progress(len(tasks), cfg.progress)
    t0 = time.perf_counter()
    try:
        if lm is not None:
            results = evaluate_agent(
                lm.model, lm.tokenizer, tasks, protocol, roles=roles, backend=backend,
                ltm_path=lm.run_dir / "ltm.sqlite" if lm.run_dir else None,
                episodes_path=out / "episodes.jsonl", on_done=bar.update, journal=journal,
                env_factory=env_factory, metrics=spec.metrics,
            )  # fmt: skip
            results["model_info"] = {
                **lm.info(), "assistant_slot": assistant, "checker_slot": checker,
            }  # fmt: skip
        else:
            trials = _run_trials(tasks, agent, backend, protocol, bar, env_factory)
            results = score(tasks, trials, protocol.reflexion_trials, spec.metrics)
            results["eval_wall_s"] = round(time.perf_counter() - t0, 3)
            write_episodes(out / "episodes.jsonl", trials)
    finally:
        bar.close()
        if backend is not None:
            backend.close()
        if close_envs is not None:
            close_envs()
    wall = time.perf_counter() - t0
    results["wall_s"] = round(wall, 3)
    results["episodes_per_minute"] = round(results["episodes"] / wall * 60, 1) if wall > 0 else None
    results["round_limit"] = protocol.max_rounds
    results["settings"] = {  # what was evaluated, not how this process ran (resumed or not)
        k: str(v) if isinstance(v, Path) else v
        for k, v in settings.items()
        if k not in RESUMABLE_SETTINGS or k == "out"
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if journal is not None:
        journal.finish()
    return results


def _inputs_sha256(cfg: EvalConfig) -> str:
    """What the tasks are read from: the data file and, for the OS task, its scripts."""
    h = hashlib.sha256(Path(cfg.data).read_bytes())
    if cfg.script_dir:
        for f in sorted(p for p in Path(cfg.script_dir).rglob("*") if p.is_file()):
            h.update(str(f.relative_to(cfg.script_dir)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _task_protocol(cfg: EvalConfig, protocol: EvalProtocol) -> EvalProtocol:
    """A task whose protocol fixes the round limit (OS: 8) keeps it unless --max-rounds."""
    from cmat_jax.tasks import task_spec

    limit = task_spec(cfg.task).round_limit
    if limit is None or cfg.max_rounds is not None:
        return protocol
    return dataclasses.replace(protocol, max_rounds=limit)


def _counts(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", disable=not enabled)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg = parse(
        EvalConfig, argv, prog="python -m cmat_jax.evaluate", description=__doc__.splitlines()[0]
    )
    results = evaluate(cfg)
    keys = ("overall_cat_accuracy", "accuracy", "success_rate", "n", "episodes_per_minute")
    summary = {k: results[k] for k in keys if k in results}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    run_cli(main)
