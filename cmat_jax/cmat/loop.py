"""The CMAT recipe end to end (docs/method.md §6) and the project's default job.

`run_cmat(job)`:
  1. load the base (HF dir, GGUF or preset), add LoRA slots `assistant` and `checker`, and put
     it on the job's device mesh (`session.CMATRun`, with the one `Trainer`);
  2. agent tuning (the TinyAgent stage, `expert`): the Assistant on scripted-expert
     trajectories of the job's tasks (`--task`, `cmat_jax.tasks`) (plus any `--sft-data` JSONL) and the Checker on the verdicts they imply,
     trained by the same trainer and loss as the rounds (rwr, no KL: plain token NLL);
  3. CMAT rounds (`rounds`): rollouts -> the round's rows -> CMAT-loss steps for E epochs ->
     periodic evaluation; a checkpoint after every round;
  4. evaluation (`evaluation`) on held-out synthetic tasks (and each task's AgentBench dev
     split when found) after each stage; `results.json`, plots, an exported PEFT adapter and a summary
     table (`report`).

A crash at any point resumes with `--resume` from the newest complete checkpoint: the stage,
round, running baseline and results so far live in the checkpoint's data state, and long-term
memory records written after it are dropped so the resumed run sees the memory it had then.
"""

from __future__ import annotations

import time
from typing import Any

from cmat_jax.cmat.evaluation import eval_all
from cmat_jax.cmat.expert import expert_rows
from cmat_jax.cmat.job import EVAL_SEED_OFFSET, CMATJob, dev_splits
from cmat_jax.cmat.loss import LossConfig
from cmat_jax.cmat.report import finish_run
from cmat_jax.cmat.rounds import run_round, synth_tasks
from cmat_jax.cmat.session import CMATRun
from cmat_jax.faults import scope
from cmat_jax.tasks import TASKS

# Agent tuning: the CMAT loss reduced to the token NLL of the expert rows (weights 1, no KL).
AGENT_TUNING_LOSS = LossConfig(mode="rwr", kl_coef=0.0)


def run_cmat(job: CMATJob) -> dict[str, Any]:
    """The whole recipe; returns the results dict also written to DIR/results.json."""
    t_start = time.perf_counter()
    splits = dev_splits(job)
    anchor_pool: list | None = None
    r = CMATRun(job)
    try:
        held_out = synth_tasks(job, job.eval_tasks, job.seed + EVAL_SEED_OFFSET)
        dev = {
            name: TASKS[name].load(path, script_dir, job.dev_limit)
            for name, (path, script_dir) in splits.items()
        }
        results = r.progress["results"]
        stage = r.progress["stage"]

        if stage == "start":
            if job.eval_base:
                results["base"] = eval_all(r, "base", held_out, dev)
            if job.sft_steps > 0:
                t = time.perf_counter()
                rows = expert_rows(r.tok, job, r.slots, r.roles)
                anchor_pool = [row for row in rows if row.role == "assistant"]
                r.log(f"agent tuning: {len(rows)} rows, {job.sft_steps} steps")
                with scope("agent_tuning"):
                    hist = r.train_rows(rows, job.sft_steps, "sft", AGENT_TUNING_LOSS, job.seed)
                r.log(
                    f"agent tuning done: loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} "
                    f"({time.perf_counter() - t:.0f}s)"
                )
            results["agent_tuning"] = eval_all(r, "agent_tuning", held_out, dev)
            r.save("agent_tuning", 0)
            stage = "agent_tuning"

        if job.anchor_rows and anchor_pool is None:  # resumed, or no agent tuning this run
            anchor_pool = [
                row for row in expert_rows(r.tok, job, r.slots, r.roles) if row.role == "assistant"
            ]
        opened = {name: TASKS[name].open_envs(job.train_max_rounds) for name in r.tasks}
        try:
            envs = {name: make for name, (make, _) in opened.items()}
            start_round = int(r.progress["round"]) if stage in ("round", "done") else 0
            for rnd in range(start_round, job.rounds):
                run_round(r, rnd, envs, anchor_pool or [])
                if job.eval_every and (rnd + 1) % job.eval_every == 0 and rnd + 1 < job.rounds:
                    results[f"round_{rnd + 1}"] = eval_all(r, f"round_{rnd + 1}", held_out, None)
                r.save("round", rnd + 1)
        finally:
            for _, close in opened.values():
                close()

        if "cmat" not in results:
            results["cmat"] = eval_all(r, "cmat", held_out, dev)
            r.save("done", job.rounds)
        r.ckpt.wait()
        final = finish_run(r, results, splits, time.perf_counter() - t_start)
    finally:
        r.close()
    return final
