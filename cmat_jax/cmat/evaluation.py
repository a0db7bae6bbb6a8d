"""The CMAT job's evaluations: greedy episodes on held-out synthetic tasks and the AgentBench DB
dev split, with and without the Checker (and reflexion retries), on a copy of the training
long-term memory. (Moved unchanged from loop.py, plus the mesh; to be replaced by the one
evaluation function of `cmat_jax.evaluate`.)"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.job import CMATJob
from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine
from cmat_jax.cmat.session import CMATRun
from cmat_jax.envs.dbbench import DBBenchEnv, dbbench_metrics
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.faults import fault_point, scope


def _copy_sqlite(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    a = sqlite3.connect(src)
    b = sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Any],
    roles: Any,
    job: CMATJob,
    *,
    checker: bool,
    ltm_source: Path | None,
    work_dir: Path,
    reflexion_trials: int = 1,
    mesh: Any = None,
) -> dict[str, Any]:
    """Greedy single-attempt evaluation (`job.eval_max_rounds` rounds), optionally with the
    Checker; with `reflexion_trials > 1` failed items are retried with their reflections
    (reported separately as pass@N). Long-term memory: a copy of the training memory is read
    (policy `evaluation`: nothing written on test items is read, except same-item reflections
    in the reflexion protocol)."""
    backend = SQLiteBackend(time_limit_s=3.0)
    ltm = None
    if ltm_source is not None and ltm_source.is_file():
        _copy_sqlite(ltm_source, work_dir / "ltm.sqlite")
        ltm = LongTermMemory(work_dir / "ltm.sqlite")
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        outputs: dict[str, Any] = {}
        first: dict[str, Any] = {}
        todo = list(tasks)
        for trial in range(reflexion_trials):
            engine = RolloutEngine(
                model,
                tokenizer,
                lambda: DBBenchEnv(backend, max_rounds=job.eval_max_rounds),
                roles=roles,
                cmat_cfg=CMATConfig(
                    group_size=1,
                    use_checker=checker,
                    max_revisions=job.max_revisions,
                    use_reflection=reflexion_trials > 1,
                    ltm_k=job.ltm_k if ltm is not None else 0,
                    ltm_token_budget=job.ltm_token_budget,
                    ltm_solutions=job.ltm_solutions,
                    ltm_similar=job.ltm_similar,
                ),
                rollout_cfg=RolloutConfig(
                    temperature=0.0,
                    checker_sample=False,
                    max_new_tokens=job.eval_max_new_tokens,
                    reason_max_new_tokens=job.reason_max_new_tokens,
                    max_batch=job.max_batch,
                    min_batch=job.min_batch,
                    max_context=job.eval_max_context,
                    counterfactual=False,
                    ltm_split="eval" if reflexion_trials > 1 else "",
                ),
                ltm=ltm,
                read_policy=ReadPolicy.evaluation(reflexion=trial > 0),
                mesh=mesh,
            )
            res = engine.run(todo, group_size=1, train=False)
            _write_episodes(work_dir / "episodes.jsonl", trial, todo, res)
            fault_point("episodes_written")
            for task, out in zip(todo, res.outputs, strict=True):
                outputs[task.task_id] = out
                if trial == 0:
                    first[task.task_id] = out
            if trial == 0:
                results.update(res.stats)
            todo = [t for t in todo if not (outputs[t.task_id] or {}).get("correct")]
            if not todo:
                break
        results.update(dbbench_metrics(first.get(t.task_id) for t in tasks))
        results["success_rate"] = float(
            np.mean([bool((first.get(t.task_id) or {}).get("correct")) for t in tasks])
        )
        results["n"] = len(tasks)
        if reflexion_trials > 1:
            best = dbbench_metrics(outputs.get(t.task_id) for t in tasks)
            results["reflexion"] = {
                "note": f"pass@{reflexion_trials}: solved in any of {reflexion_trials} attempts",
                "success_rate": float(
                    np.mean([bool((outputs.get(t.task_id) or {}).get("correct")) for t in tasks])
                ),
                "overall_cat_accuracy": best["overall_cat_accuracy"],
            }
    finally:
        if ltm is not None:
            ltm.close()
        backend.close()
    results["eval_wall_s"] = time.perf_counter() - t0
    return results


def _write_episodes(path: Path, trial: int, tasks: Sequence[Any], res: Any) -> None:
    """Append one line per evaluated episode (the task, every proposal with its verdict and
    observation, the scored output): what one reads to see why an item failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if trial == 0 else "a", encoding="utf-8") as f:
        for task, rec, out in zip(tasks, res.episodes, res.outputs, strict=True):
            line = {
                "trial": trial + 1,
                "type": task.type,
                "description": task.description,
                "table_name": task.table_name,
                "output": out,
                **rec.to_dict(),  # task_id, reward, every turn
            }
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


def eval_all(r: CMATRun, stage: str, held_out: list, dev: list | None) -> dict[str, Any]:
    with scope(f"eval_{stage}"):  # fault points: eval_<stage>/...
        return _eval_all(r, stage, held_out, dev)


def _eval_all(r: CMATRun, stage: str, held_out: list, dev: list | None) -> dict[str, Any]:
    job = r.job
    res: dict[str, Any] = {}
    ltm = r.ltm_path if r.ltm_path.is_file() else None
    base = r.scratch / "eval" / stage
    t = time.perf_counter()
    res["synthetic"] = evaluate_tasks(
        r.model,
        r.tok,
        held_out,
        r.roles,
        job,
        checker=False,
        ltm_source=ltm,
        work_dir=base / "a",
        reflexion_trials=job.reflexion_trials,
    )
    if job.eval_checker and job.synthetic_checker:
        res["synthetic_checker"] = evaluate_tasks(
            r.model,
            r.tok,
            held_out,
            r.roles,
            job,
            checker=True,
            ltm_source=ltm,
            mesh=r.mesh,
            work_dir=base / "b",
        )
    if dev and stage in job.dev_stages:
        res["dev"] = evaluate_tasks(
            r.model,
            r.tok,
            dev,
            r.roles,
            job,
            checker=False,
            ltm_source=ltm,
            mesh=r.mesh,
            work_dir=base / "dev_a",
            reflexion_trials=job.reflexion_trials,
        )
        if job.eval_checker and job.dev_checker:
            res["dev_checker"] = evaluate_tasks(
                r.model,
                r.tok,
                dev,
                r.roles,
                job,
                checker=True,
                ltm_source=ltm,
                mesh=r.mesh,
                work_dir=base / "dev_b",
            )
    r.log(
        f"eval {stage}: synthetic success {res['synthetic']['success_rate']:.3f}"
        + (
            f", dev overall_cat_accuracy {res['dev']['overall_cat_accuracy']:.3f}"
            if "dev" in res
            else ""
        )
        + f" ({time.perf_counter() - t:.0f}s)"
    )
    return res
