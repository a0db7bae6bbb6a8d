"""A seeded comparison of CMAT rounds against an equal-compute continuation of agent tuning
(issue 26), from one agent-tuning checkpoint of a CMAT job:

- arm `cmat`, seed s: the job's CMAT rounds (`rounds.run_round`) with rollout tasks and sampling
  drawn from seed s;
- arm `sft`, seed s: as many optimizer steps of the same shape (`batch_size` sequences of
  `seq_len` tokens, packed as the rounds pack theirs) on fresh scripted-expert rows of the same
  generator (`expert.expert_rows`, drawn from seed s), trained by agent tuning's loss;
- both continue the one optimizer of the job from the restored checkpoint, so both get the
  rounds' constant `lr`; both are evaluated by the job's `eval_all` on the same held-out
  synthetic tasks and dev items (with and without the Checker where the job reports both).

Every arm-seed is a CMAT run directory of its own under OUT/<arm>/seed_<s>; OUT/compare.json
holds every number, OUT/compare.png the plot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cmat_jax.cmat.evaluation import eval_all
from cmat_jax.cmat.expert import expert_rows
from cmat_jax.cmat.job import EVAL_SEED_OFFSET, CMATJob, resolved_config
from cmat_jax.cmat.loop import AGENT_TUNING_LOSS
from cmat_jax.cmat.rounds import run_round, synth_tasks
from cmat_jax.cmat.session import CMATRun
from cmat_jax.envs.dbbench import load_tasks
from cmat_jax.paired_stats import compare_paired
from cmat_jax.run_dir import RunDir, config_differences
from cmat_jax.tasks import TASKS, stratified_sample
from cmat_jax.training.checkpoint import Checkpointer

ARMS = ("cmat", "sft")
# (result key, metric) of each score `eval_all` can report; the dev one is the headline.
SCORES = {
    "dev": ("dev", "overall_cat_accuracy"),
    "dev_checker": ("dev_checker", "overall_cat_accuracy"),
    "synthetic": ("synthetic", "success_rate"),
    "synthetic_checker": ("synthetic_checker", "success_rate"),
}
# Fields an agent-tuning checkpoint must share with the job continuing it: the adapters' shapes
# and the optimizer's schedule (agent tuning's length and rates).
CHECKPOINT_FIELDS = ("model", "param_dtype", "lora", "sft_steps", "sft_lr", "lr")
CONTINUATION_TAG = "sft_continuation"  # any tag but "sft": the rounds' batch shape


@dataclass(frozen=True)
class CompareConfig:
    job: CMATJob
    out: Path
    seeds: int = 3
    checkpoint: Path | None = None
    """A CMAT run directory holding the job's agent-tuning checkpoint (None = produce one)."""
    dev_data: Path | None = None
    dev_limit: int | None = None
    dev_sample: int | None = None
    """Evaluate on this many dev items drawn per query type (`tasks.stratified_sample`)."""
    dev_sample_seed: int = 0


def arm_seeds(job: CMATJob, n: int) -> list[int]:
    """Seeds of the arms: after the job's own seed, whose expert draw agent tuning used."""
    return [job.seed + 1 + k for k in range(n)]


def validate(cfg: CompareConfig) -> None:
    """Every check that needs no model, before anything is written."""
    if not 1 <= cfg.seeds <= 20:
        raise ValueError(f"--seeds must be in [1, 20], got {cfg.seeds}")
    if cfg.out.exists():
        raise FileExistsError(f"--out {cfg.out}: already exists; choose a new directory")
    if cfg.dev_limit is not None and cfg.dev_limit < 1:
        raise ValueError(f"--limit must be >= 1, got {cfg.dev_limit}")
    if cfg.dev_sample is not None and cfg.dev_sample < 1:
        raise ValueError(f"--sample must be >= 1, got {cfg.dev_sample}")
    if cfg.dev_sample is not None and cfg.dev_limit is not None:
        raise ValueError("--sample and --limit exclude each other: choose one dev subset")
    if cfg.dev_data is not None and not cfg.dev_data.is_file():
        raise FileNotFoundError(f"--dev-data {cfg.dev_data}: no such file")
    job = cfg.job
    if job.rounds < 1:
        raise ValueError("--rounds must be >= 1: the cmat arm is the job's CMAT rounds")
    if job.sft_row_len > job.seq_len:
        raise ValueError(
            f"--sft-seq-len {job.sft_row_len} exceeds --seq-len {job.seq_len}: the sft arm "
            "trains expert rows in the rounds' sequences"
        )
    if cfg.checkpoint is not None:
        config = RunDir(cfg.checkpoint).config_path
        if not config.is_file():
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint}: no CMAT run directory")
        old = json.loads(config.read_text())
        new = resolved_config(dataclasses.replace(job, out=str(cfg.checkpoint)))
        diff = [
            k
            for k in config_differences(old, new)
            if any(k == f or k.startswith(f + ".") for f in CHECKPOINT_FIELDS)
        ]
        if diff:
            raise ValueError(f"{config}: the checkpoint's job differs in {', '.join(diff)}")
        agent_tuning_step(cfg.checkpoint)


def dev_items(cfg: CompareConfig) -> list:
    """The dev items every arm and seed is evaluated on: the first `dev_limit`, a stratified
    sample of `dev_sample` by query type, or the whole split."""
    tasks = load_tasks(cfg.dev_data, limit=cfg.dev_limit)
    if cfg.dev_sample is None:
        return tasks
    return stratified_sample(tasks, cfg.dev_sample, cfg.dev_sample_seed, lambda t: t.type)


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    """Agent tuning (unless given), both arms for every seed, statistics, JSON and plot."""
    validate(cfg)
    job = dataclasses.replace(
        cfg.job,
        dev_data=str(cfg.dev_data) if cfg.dev_data else "",
        dev_limit=cfg.dev_limit,
        dev_stages=("agent_tuning", "cmat"),
        resume=False,
        export=False,
    )
    # The same evaluation items for every arm and seed.
    held_out = synth_tasks(job, job.eval_tasks, job.seed + EVAL_SEED_OFFSET)
    dev = {"db": dev_items(cfg)} if cfg.dev_data else None
    cfg.out.mkdir(parents=True)
    out: dict[str, Any] = {
        "job": resolved_config(dataclasses.replace(job, out=str(cfg.out))),
        "dev_data": str(cfg.dev_data) if cfg.dev_data else None,
        "dev_items": len(dev["db"]) if dev else 0,
        "dev_task_ids": [t.task_id for t in dev["db"]] if dev else [],
        "held_out_synthetic_tasks": len(held_out),
        "seeds": arm_seeds(job, cfg.seeds),
    }
    if cfg.checkpoint is None:
        at_dir = cfg.out / "agent_tuning"
        out["agent_tuning"] = agent_tuning(job, at_dir, held_out, dev)
    else:
        at_dir = cfg.checkpoint
        out["agent_tuning"] = {"run": str(at_dir), "given": True}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    for seed in out["seeds"]:
        c = run_arm("cmat", job, seed, at_dir, cfg.out / "cmat" / f"seed_{seed}", held_out, dev)
        runs["cmat"].append(c)
        s = run_arm(
            "sft",
            job,
            seed,
            at_dir,
            cfg.out / "sft" / f"seed_{seed}",
            held_out,
            dev,
            steps=c["steps"],
        )
        runs["sft"].append(s)
    out["runs"] = runs
    out["stats"] = {
        name: compare_paired(
            [r["scores"][name] for r in runs["cmat"]], [r["scores"][name] for r in runs["sft"]]
        )
        for name in SCORES
        if all(name in r["scores"] for arm in ARMS for r in runs[arm])
    }
    (cfg.out / "compare.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    out["plot"] = str(plot(out, cfg.out / "compare.png"))
    (cfg.out / "compare.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


def agent_tuning(job: CMATJob, run_dir: Path, held_out: list, dev: dict | None) -> dict:
    """The job's stage 2 (as `loop.run_cmat` runs it) into `run_dir`, its evaluation, and the
    checkpoint the arms start from."""
    r = CMATRun(dataclasses.replace(job, out=str(run_dir)))
    try:
        t = time.perf_counter()
        if job.sft_steps > 0:
            rows = expert_rows(r.tok, r.job, r.slots, r.roles)
            r.train_rows(rows, job.sft_steps, "sft", AGENT_TUNING_LOSS, job.seed)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        ev = eval_all(r, "agent_tuning", held_out, dev)
        eval_s = time.perf_counter() - t
        r.progress["results"]["agent_tuning"] = ev
        r.save("agent_tuning", 0)
        return {
            "run": str(r.dir),
            "given": False,
            "steps": r.trainer.step_count,
            "scores": scores(ev),
            "eval": ev,
            "train_s": round(train_s, 1),
            "eval_s": round(eval_s, 1),
        }
    finally:
        r.close()


def agent_tuning_step(run_dir: Path) -> int:
    """The step of the agent-tuning checkpoint in a CMAT run directory."""
    ck = Checkpointer(RunDir(run_dir).checkpoint_dir, read_only=True)
    try:
        for step in ck.all_steps():
            _, meta = ck.restore_lora(step=step)
            if meta.get("stage") == "agent_tuning":
                return step
    finally:
        ck.close()
    raise ValueError(f"{run_dir}: no agent-tuning checkpoint (an older one was rotated out?)")


def run_arm(
    arm: str,
    job: CMATJob,
    seed: int,
    at_dir: Path,
    run_dir: Path,
    held_out: list,
    dev: dict | None,
    steps: int | None = None,
) -> dict[str, Any]:
    """One arm for one seed from the agent-tuning checkpoint: train, evaluate, and what it did
    (optimizer steps, the tasks its rollouts or expert rows came from, times, scores)."""
    r = CMATRun(dataclasses.replace(job, seed=seed, out=str(run_dir)))
    try:
        ck = Checkpointer(RunDir(at_dir).checkpoint_dir, read_only=True)
        try:
            r.trainer.restore(ck, step=agent_tuning_step(at_dir))
        finally:
            ck.close()
        r.trainer.sync_into(r.model)
        start = r.trainer.step_count
        t = time.perf_counter()
        if arm == "cmat":
            pool = []
            if job.anchor_rows:  # the SFT anchor's expert rows, as `loop.run_cmat` draws them
                pool = [
                    x for x in expert_rows(r.tok, r.job, r.slots, r.roles) if x.role == "assistant"
                ]
            opened = {name: TASKS[name].open_envs(job.train_max_rounds) for name in r.tasks}
            envs = {name: make for name, (make, _) in opened.items()}
            task_ids: list[str] = []
            try:
                for rnd in range(job.rounds):
                    _, res, _ = run_round(r, rnd, envs, pool)
                    task_ids += [e.task_id for e in res.episodes]
            finally:
                for _, close in opened.values():
                    close()
            data_digest = None
        else:
            data = expert_rows(r.tok, r.job, r.slots, r.roles)
            data_digest = rows_digest(data)
            if steps:
                r.train_rows(data, steps, CONTINUATION_TAG, AGENT_TUNING_LOSS, seed)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        ev = eval_all(r, "cmat", held_out, dev)
        return {
            "arm": arm,
            "seed": seed,
            "run": str(r.dir),
            "start_step": start,
            "steps": r.trainer.step_count - start,
            "sequences_per_step": job.batch_size,
            "tokens_per_sequence": job.seq_len,
            "rollout_task_ids": task_ids if arm == "cmat" else None,
            "expert_rows_sha1": data_digest,
            "scores": scores(ev),
            "eval": ev,  # everything `eval_all` reported (reflexion, SQL error rates, ...)
            "train_s": round(train_s, 1),
            "eval_s": round(time.perf_counter() - t, 1),
        }
    finally:
        r.close()


def rows_digest(rows: list) -> str:
    """SHA-1 of training rows' tokens and slots: tells two seeds' data apart."""
    h = hashlib.sha1()
    for x in rows:
        h.update(np.asarray(x.tokens, np.int32).tobytes() + bytes([x.adapter_id % 256]))
    return h.hexdigest()


def scores(ev: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of one `eval_all` result."""
    return {name: float(ev[k][m]) for name, (k, m) in SCORES.items() if k in ev}


def plot(out: dict[str, Any], path: Path) -> Path:
    """One panel per score: each arm's per-seed values (paired seeds joined), mean +- sd."""
    names = list(out["stats"])
    fig = Figure(figsize=(4 * max(1, len(names)), 4))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        st = out["stats"][name]
        for i, key in enumerate(("a", "b")):
            ax.errorbar([i], [st[key]["mean"]], yerr=[st[key]["sd"]], fmt="s", capsize=6, ms=9)
        for a, b in zip(st["a"]["values"], st["b"]["values"], strict=True):
            ax.plot([0, 1], [a, b], "o-", color="gray", alpha=0.6)
        if "agent_tuning" in out and name in out["agent_tuning"].get("scores", {}):
            ax.axhline(
                out["agent_tuning"]["scores"][name], ls="--", color="k", label="agent tuning"
            )
            ax.legend()
        p = st["paired_t"]["p"]
        ax.set_title(
            f"{name}: diff {st['diff']['mean']:+.3f}\n"
            f"t-test p={'-' if p is None else f'{p:.3f}'}, sign-flip p={st['sign_flip_p']:.3f}"
        )
        ax.set_xticks([0, 1], ["cmat", "sft (equal compute)"])
        ax.set_xlim(-0.5, 1.5)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -0.05), max(hi, 1.05))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
