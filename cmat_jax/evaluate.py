"""Evaluate an agent on DBBench: ``python -m cmat_jax.evaluate --model M --task dbbench
--data FILE.jsonl --out DIR``.

Episodes run batched: up to ``--batch-size`` environments are live at once, the agent is called
on all their message lists together, and a finished episode's slot is refilled from the queue
at once. Writes ``DIR/results.json`` (``overall_cat_accuracy``, every per-type accuracy, ``n``,
the settings, throughput) and ``DIR/transcripts.jsonl`` (one line per episode).

Agents: ``model`` (the generation engine; see :func:`make_model_agent`), ``oracle`` (replays the
gold labels: the scorer's ceiling) and ``null`` (answers nothing: its floor).

``--reflexion-trials N`` (N > 1) re-runs the items not yet solved, up to N attempts in all, with
the agent's reflections on the failed attempt (when it can reflect) added to the next attempt's
instructions; the headline numbers stay single-attempt and the retries are reported separately
under ``reflexion`` as a pass@N-style number.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from cmat_jax.envs.agents import Agent, NullAgent, oracle_agent
from cmat_jax.envs.dbbench import DBBenchEnv, DBTask, dbbench_metrics, load_tasks
from cmat_jax.envs.sql_backend import SQLBackend

__all__ = ["Agent", "EvalConfig", "evaluate", "main", "make_model_agent", "run_episodes"]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate an agent on an AgentBench-format task file."""

    data: Path
    """Task file: AgentBench DBBench JSONL (or a JSON list)."""
    out: Path
    """Output directory for results.json and transcripts.jsonl."""
    model: str | None = None
    """Model source for --agent model: anything load_model takes (HF dir, .gguf, preset)."""
    task: Literal["dbbench"] = "dbbench"
    agent: Literal["model", "oracle", "null"] = "model"
    checker: bool = False
    """Let the Checker role verify each proposal before it runs (model agent only)."""
    reflexion_trials: int = 1
    """Attempts per item; > 1 adds a separately reported reflexion (pass@N-style) number."""
    limit: int | None = None
    """Evaluate only the first N items."""
    batch_size: int = 16
    """Episodes stepped together (and the generation batch)."""
    backend: Literal["sqlite", "mysql"] = "sqlite"
    mysql_socket: str | None = None
    mysql_host: str = "localhost"
    mysql_port: int = 3306
    mysql_user: str = "root"
    mysql_password: str = ""
    statement_time_limit_s: float = 3.0
    max_rounds: int = 15
    max_new_tokens: int = 512
    overwrite: bool = False
    """Replace an existing DIR/results.json."""
    progress: bool = True


# -- agents ----------------------------------------------------------------------------------


def make_model_agent(
    model_source: str | None, *, checker: bool = False, max_new_tokens: int = 512, **kwargs: Any
) -> Agent:
    """The LLM agent: chat template + batched generation. Needs ``cmat_jax.generate``."""
    if model_source is None:
        raise ValueError("--agent model needs --model (an HF dir, a .gguf file or a preset)")
    try:
        from cmat_jax import generate as _gen
    except ImportError as e:
        raise NotImplementedError(
            "--agent model needs the generation engine (cmat_jax.generate), which is not "
            "available in this installation; use --agent oracle or --agent null"
        ) from e
    if checker:
        raise NotImplementedError(
            "--checker needs the CMAT Checker role wired into the evaluator (cmat_jax.cmat); "
            "not available yet"
        )
    from cmat_jax import load_model

    model, tokenizer = load_model(model_source, **kwargs)
    return _ModelAgent(_gen.Generator(model, tokenizer), tokenizer, max_new_tokens)


class _ModelAgent:
    """Greedy replies from one model; an episode whose prompt no longer fits ends (None)."""

    def __init__(self, generator: Any, tokenizer: Any, max_new_tokens: int) -> None:
        self.gen, self.tok, self.max_new_tokens = generator, tokenizer, max_new_tokens

    def act(self, batch: Sequence[Sequence[dict[str, str]]]) -> list[str | None]:
        prompts = [
            self.tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True)
            for m in batch
        ]
        fits = [len(p) + self.max_new_tokens <= self.gen.max_cache_len for p in prompts]
        todo = [p for p, ok in zip(prompts, fits, strict=True) if ok]
        texts = iter([])
        if todo:
            out = self.gen.generate(todo, max_new_tokens=self.max_new_tokens)
            texts = iter(out.texts or [self.tok.decode(t) for t in out.tokens])
        return [next(texts) if ok else None for ok in fits]


def _make_backend(cfg: EvalConfig) -> SQLBackend:
    if cfg.backend == "mysql":
        from cmat_jax.envs.mysql_backend import MySQLBackend, MySQLParams

        params = MySQLParams(
            unix_socket=cfg.mysql_socket,
            host=cfg.mysql_host,
            port=cfg.mysql_port,
            user=cfg.mysql_user,
            password=cfg.mysql_password,
        )
        return MySQLBackend(params, time_limit_s=cfg.statement_time_limit_s)
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    return SQLiteBackend(time_limit_s=cfg.statement_time_limit_s)


# -- the batched episode loop ----------------------------------------------------------------


def run_episodes(
    tasks: Sequence[DBTask],
    agent: Agent,
    backend: SQLBackend,
    *,
    batch_size: int = 16,
    max_rounds: int = 15,
    notes: dict[str, str] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run one episode per task with up to ``batch_size`` live at once; returns the
    transcripts in task order (each with the scorer's ``output``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    queue = list(range(len(tasks)))[::-1]
    live: list[tuple[int, DBBenchEnv]] = []

    def start(i: int) -> tuple[int, DBBenchEnv]:
        env = DBBenchEnv(backend, max_rounds=max_rounds)
        note = (notes or {}).get(tasks[i].task_id)
        if note:
            env.system_prompt += "\n\nNotes from your earlier attempts at this task:\n" + note
        env.reset(tasks[i])
        return i, env

    def finish(i: int, env: DBBenchEnv) -> None:
        tr = env.transcript()
        tr["output"] = env.output()
        env.close()
        results[i] = tr
        if on_done is not None:
            on_done(tr)

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


def evaluate(cfg: EvalConfig, agent: Agent | None = None) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; writes and returns the results dict."""
    if cfg.task != "dbbench":
        raise ValueError(f"unknown task {cfg.task!r}")
    if cfg.reflexion_trials < 1:
        raise ValueError(f"--reflexion-trials must be >= 1, got {cfg.reflexion_trials}")
    if cfg.checker and cfg.agent != "model":
        raise ValueError("--checker only applies to --agent model")
    out = Path(cfg.out)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'results.json'} exists; pass --overwrite to replace it")
    tasks = load_tasks(cfg.data, limit=cfg.limit)
    if agent is None:
        if cfg.agent == "oracle":
            agent = oracle_agent(tasks)
        elif cfg.agent == "null":
            agent = NullAgent()
        else:
            agent = make_model_agent(
                cfg.model, checker=cfg.checker, max_new_tokens=cfg.max_new_tokens
            )
    backend = _make_backend(cfg)
    out.mkdir(parents=True, exist_ok=True)

    bar = _progress(len(tasks) * 1, cfg.progress)
    t0 = time.perf_counter()
    trials: list[list[dict[str, Any]]] = []
    solved: dict[str, bool] = {}
    notes: dict[str, str] = {}
    try:
        for trial in range(cfg.reflexion_trials):
            todo = [t for t in tasks if not solved.get(t.task_id)]
            if not todo:
                break
            if trial > 0:
                bar.reset(total=len(todo))
                bar.set_description(f"trial {trial + 1}")
            trs = run_episodes(
                todo,
                agent,
                backend,
                batch_size=cfg.batch_size,
                max_rounds=cfg.max_rounds,
                notes=notes,
                on_done=lambda _tr: bar.update(1),
            )
            for tr in trs:
                tr["trial"] = trial + 1
                solved[tr["task_id"]] = solved.get(tr["task_id"], False) or tr["reward"] == 1.0
            trials.append(trs)
            reflect = getattr(agent, "reflect", None)
            if callable(reflect) and trial + 1 < cfg.reflexion_trials:
                failed = [tr for tr in trs if tr["reward"] < 1.0]
                for tr, note in zip(failed, reflect(failed), strict=True):
                    notes[tr["task_id"]] = note
    finally:
        bar.close()
        backend.close()
    wall = time.perf_counter() - t0

    first = trials[0] if trials else []
    results: dict[str, Any] = dict(dbbench_metrics(tr["output"] for tr in first))
    results["n"] = len(first)
    episodes = sum(len(t) for t in trials)
    results["episodes"] = episodes
    results["wall_s"] = round(wall, 3)
    results["episodes_per_minute"] = round(episodes / wall * 60, 1) if wall > 0 else None
    results["status_counts"] = _counts(tr["status"] for tr in first)
    settings = dataclasses.asdict(cfg)
    settings.pop("mysql_password")
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    if cfg.reflexion_trials > 1:
        best = {tr["task_id"]: tr for trs in trials for tr in trs if tr["reward"] == 1.0}
        final = [best.get(tr["task_id"], tr) for tr in first]
        results["reflexion"] = {
            "note": f"item counts as solved if any of {cfg.reflexion_trials} attempts succeeded",
            "trials": cfg.reflexion_trials,
            **dbbench_metrics(tr["output"] for tr in final),
        }
    with (out / "transcripts.jsonl").open("w", encoding="utf-8") as f:
        for trs in trials:
            for tr in trs:
                f.write(json.dumps(tr, ensure_ascii=False, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _counts(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", disable=not enabled)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import tyro

    cfg = tyro.cli(EvalConfig, args=argv)
    results = evaluate(cfg)
    summary = {k: results[k] for k in ("overall_cat_accuracy", "n", "episodes_per_minute")}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    main()
