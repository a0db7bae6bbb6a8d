"""The CMAT job's report: DIR/results.json, the exported Assistant adapter, plots of the rounds
and of the training steps, and the summary table printed at the end."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cmat_jax.cmat.evaluation import dev_scores
from cmat_jax.cmat.session import CMATRun
from cmat_jax.export import ExportArgs, export
from cmat_jax.run_dir import read_metrics
from cmat_jax.tasks import TASKS


def finish_run(
    r: CMATRun, results: dict[str, Any], dev_splits: dict[str, tuple[Path, Any]], wall_s: float
) -> dict[str, Any]:
    """results.json, plots, the exported adapter and the summary table. `dev_splits`: each
    task's dev file (and script dir)."""
    job = r.job
    out: dict[str, Any] = {"run": str(r.dir), "model": job.model, "wall_s": round(wall_s, 1)}
    out["tasks"] = list(r.tasks)
    # Where the wall time went: the evaluations (every stage, split and protocol) vs the rest.
    eval_s = sum(
        v.get("eval_wall_s", 0.0)
        for stage in results.values()
        for v in stage.values()
        if isinstance(v, dict)
    )
    out["eval_wall_s"] = round(eval_s, 1)
    out["train_wall_s"] = round(wall_s - eval_s, 1)
    for stage in ("base", "agent_tuning", "cmat"):
        if stage in results:
            out[f"success_rate_after_{stage}" if stage != "base" else "success_rate_base"] = (
                results[stage]["synthetic"]["success_rate"]
            )
    out["held_out_synthetic_tasks"] = job.eval_tasks
    if len(r.tasks) == 1:
        split = dev_splits.get(r.tasks[0])
        out["dev_data"] = str(split[0]) if split else None
    else:
        out["dev_data"] = {name: str(split[0]) for name, split in dev_splits.items()}
    out["stages"] = results
    if job.export:
        try:
            # Every process exports (the checkpoint reads are collective), each into its own
            # directory: process 0's is the run's.
            target = r.scratch / "export" / "assistant-peft"
            if not target.exists():
                export(
                    ExportArgs(model=str(r.dir), out=str(target), format="peft", slot="assistant")
                )
            out["peft_adapter"] = str(target)
        except Exception as e:  # the run's numbers stand without the export; say why
            out["peft_adapter_error"] = f"{type(e).__name__}: {e}"
    if not r.primary:  # the run directory's shared files are process 0's
        return out
    try:
        out["plots"] = make_plots(r.dir)
    except Exception as e:
        out["plots_error"] = f"{type(e).__name__}: {e}"
    (r.dir / "results.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(summary_table(out, r.tasks), flush=True)
    return out


def make_plots(run_dir: Path) -> list[str]:
    """PNG plots: reward / success / Checker precision-recall per round, loss and KL per step."""
    paths = []
    rounds = []
    rp = run_dir / "rounds.jsonl"
    if rp.is_file():
        rounds = [json.loads(x) for x in rp.read_text().splitlines() if x.strip()]
    if rounds:
        x = [d["round"] for d in rounds]
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
        axes[0].plot(x, [d["mean_reward"] for d in rounds], "o-", label="mean reward")
        axes[0].plot(x, [d["success_rate"] for d in rounds], "s-", label="success rate")
        axes[0].set_title("rollouts")
        for key in ("checker_precision", "checker_recall"):
            axes[1].plot(x, [np.nan if d[key] is None else d[key] for d in rounds], "o-", label=key)
        axes[1].set_title("Checker (positive = bad proposal)")
        for a in axes:  # rates on a fixed [0, 1] scale, whole rounds (a one-round job reads too)
            lo, hi = a.get_ylim()
            a.set_ylim(min(lo, -0.05), max(hi, 1.05))
            a.set_xticks(x)
            a.set_xlim(min(x) - 0.5, max(x) + 0.5)
            a.set_xlabel("round")
            a.legend()
        p = run_dir / "rounds.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        paths.append(str(p))
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]
    if steps:
        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2)
        axes[0].plot([m["step"] for m in steps], [m["train/loss"] for m in steps])
        axes[0].set_title("loss per step")
        axes[1].plot([m["step"] for m in steps], [m.get("train/kl") for m in steps])
        axes[1].set_title("KL to the base per step")
        for a in axes:
            a.set_xlabel("step")
        p = run_dir / "train.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        paths.append(str(p))
    return paths


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_table(out: dict[str, Any], tasks: Sequence[str]) -> str:
    rows = [("stage", "synthetic", "synthetic+checker", "dev", "dev+checker")]

    def dev(res: dict, split: str) -> str:
        scores = dev_scores(res, tasks, split)
        if len(tasks) == 1:
            return _fmt(scores.get(tasks[0]))
        return " ".join(f"{name} {_fmt(v)}" for name, v in scores.items()) or "-"

    for stage, res in out["stages"].items():

        def g(k: str, m: str, res: dict = res) -> Any:
            return res.get(k, {}).get(m)

        rows.append(
            (
                stage,
                _fmt(g("synthetic", "success_rate")),
                _fmt(g("synthetic_checker", "success_rate")),
                dev(res, "dev"),
                dev(res, "dev_checker"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    took = f"{out['wall_s']:.0f}s, of which evaluation {out['eval_wall_s']:.0f}s"
    metrics = ", ".join(f"{TASKS[n].title} dev {TASKS[n].headline}" for n in tasks)
    head = f"CMAT run {out['run']} ({took}): success rate on held-out synthetic tasks, {metrics}"
    return "\n".join([head, *lines])
