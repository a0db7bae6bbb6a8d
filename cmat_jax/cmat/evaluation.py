"""The CMAT job's evaluations: greedy episodes on held-out synthetic tasks and each task's
AgentBench dev split, with and without the Checker (and reflexion retries), on a copy of the
training long-term memory — through the one evaluation of `python -m cmat_jax.evaluate`
(`evaluate_agent` with the run's settings, `EvalProtocol.from_run_config`), so a run evaluated
after the job gives the job's own numbers.

A job with several tasks evaluates each task's share of the held-out tasks and each dev split
separately; a split's result is then `{"success_rate", "n", "eval_wall_s", "tasks": {name:
that task's result}}`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cmat_jax.cmat.session import CMATRun
from cmat_jax.evaluate import EvalProtocol, evaluate_agent
from cmat_jax.faults import fault_point, scope
from cmat_jax.tasks import TASKS, by_task


def eval_all(
    r: CMATRun, stage: str, held_out: Sequence[tuple[str, Any]], dev: Mapping[str, list] | None
) -> dict[str, Any]:
    """Every evaluation the job reports at `stage`, each written to
    `eval/<stage>/<split>[/<task>]/episodes.jsonl` (a: synthetic, b: synthetic with the Checker,
    dev_a, dev_b: the dev splits). `held_out`: (task name, synthetic item) pairs; `dev`: each
    task's dev tasks."""
    job = r.job
    base = r.scratch / "eval" / stage
    multi = len(r.tasks) > 1
    t = time.perf_counter()

    def run_task(name: str, tasks: list, split: str, checker: bool) -> dict[str, Any]:
        spec = TASKS[name]
        trials = 1 if checker else job.reflexion_trials
        protocol = EvalProtocol.from_run_config(r.config, checker=checker, reflexion_trials=trials)
        if spec.round_limit is not None:
            protocol = dataclasses.replace(protocol, max_rounds=spec.round_limit)
        make_env, close = spec.open_envs(protocol.max_rounds)
        folder = base / split / name if multi else base / split
        try:
            out = evaluate_agent(
                r.model, r.tok, tasks, protocol, roles=r.roles[name], ltm_path=r.ltm_path,
                mesh=r.mesh, episodes_path=folder / "episodes.jsonl", env_factory=make_env,
                metrics=spec.metrics,
            )  # fmt: skip
        finally:
            close()
        fault_point("episodes_written")  # testing hook (cmat_jax.faults)
        return out

    def run(groups: Mapping[str, list], split: str, checker: bool) -> dict[str, Any]:
        outs = {name: run_task(name, tasks, split, checker) for name, tasks in groups.items()}
        if not multi:
            return next(iter(outs.values()))
        n = sum(o["n"] for o in outs.values())
        return {
            "success_rate": sum(o["success_rate"] * o["n"] for o in outs.values()) / max(n, 1),
            "n": n,
            "eval_wall_s": round(sum(o.get("eval_wall_s", 0.0) for o in outs.values()), 3),
            "tasks": outs,
        }

    held = {name: [st.task for st in items] for name, items in by_task(held_out).items()}
    with scope(f"eval_{stage}"):  # fault points: eval_<stage>/...
        res: dict[str, Any] = {"synthetic": run(held, "a", checker=False)}
        if job.eval_checker and job.synthetic_checker:
            res["synthetic_checker"] = run(held, "b", checker=True)
        if dev and stage in job.dev_stages:
            res["dev"] = run(dev, "dev_a", checker=False)
            if job.eval_checker and job.dev_checker:
                res["dev_checker"] = run(dev, "dev_b", checker=True)
    dev_note = ", ".join(
        f"dev {name} {TASKS[name].headline} {value:.3f}"
        for name, value in dev_scores(res, r.tasks).items()
    )
    r.log(
        f"eval {stage}: synthetic success {res['synthetic']['success_rate']:.3f}"
        + (f", {dev_note}" if dev_note else "")
        + f" ({time.perf_counter() - t:.0f}s)"
    )
    return res


def dev_scores(
    stage_results: Mapping[str, Any], tasks: Sequence[str], split: str = "dev"
) -> dict[str, float]:
    """Each task's headline dev metric in one stage's results (none when it has no dev run);
    `tasks`: the job's task names."""
    res = stage_results.get(split)
    if not res:
        return {}
    per = res.get("tasks", {tasks[0]: res} if len(tasks) == 1 else {})
    return {name: out[TASKS[name].headline] for name, out in per.items()}
