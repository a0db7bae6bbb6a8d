"""The CMAT job's evaluations: greedy episodes on held-out synthetic tasks and the AgentBench DB
dev split, with and without the Checker (and reflexion retries), on a copy of the training
long-term memory — through the one evaluation of `python -m cmat_jax.evaluate`
(`evaluate_agent` with the run's settings, `EvalProtocol.from_run_config`), so a run evaluated
after the job gives the job's own numbers."""

from __future__ import annotations

import time
from typing import Any

from cmat_jax.cmat.session import CMATRun
from cmat_jax.evaluate import EvalProtocol, evaluate_agent
from cmat_jax.faults import fault_point, scope


def eval_all(r: CMATRun, stage: str, held_out: list, dev: list | None) -> dict[str, Any]:
    """Every evaluation the job reports at `stage`, each written to
    `eval/<stage>/<split>/episodes.jsonl` (a: synthetic, b: synthetic with the Checker, dev_a,
    dev_b: the dev split)."""
    job = r.job
    base = r.scratch / "eval" / stage
    t = time.perf_counter()

    def run(tasks: list, split: str, checker: bool) -> dict[str, Any]:
        trials = 1 if checker else job.reflexion_trials
        protocol = EvalProtocol.from_run_config(r.config, checker=checker, reflexion_trials=trials)
        out = evaluate_agent(
            r.model, r.tok, tasks, protocol, roles=r.roles, ltm_path=r.ltm_path, mesh=r.mesh,
            episodes_path=base / split / "episodes.jsonl",
        )  # fmt: skip
        fault_point("episodes_written")  # testing hook (cmat_jax.faults)
        return out

    with scope(f"eval_{stage}"):  # fault points: eval_<stage>/...
        res: dict[str, Any] = {"synthetic": run(held_out, "a", checker=False)}
        if job.eval_checker and job.synthetic_checker:
            res["synthetic_checker"] = run(held_out, "b", checker=True)
        if dev and stage in job.dev_stages:
            res["dev"] = run(dev, "dev_a", checker=False)
            if job.eval_checker and job.dev_checker:
                res["dev_checker"] = run(dev, "dev_b", checker=True)
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
