"""CMAT rounds (docs/method.md §6, stage 3): the job's synthetic tasks -> `RolloutEngine` (G
episodes per task, Checker, revisions, memory) -> the round's training rows -> the trainer's
CMAT-loss steps for E epochs. Long-term memory is written by the episodes themselves. A job
with several tasks runs one engine per task each round (each with its environment and roles)
and trains on the union of their rows."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.expert import draw_anchor_rows
from cmat_jax.cmat.job import CMATJob
from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine, RolloutResult, summarize
from cmat_jax.cmat.session import CMATRun
from cmat_jax.data.rows import TrainRow
from cmat_jax.envs.base import Env
from cmat_jax.faults import scope
from cmat_jax.tasks import by_task, mixed_tasks

EnvFactories = Mapping[str, Callable[[], Env]]


def synth_tasks(job: CMATJob, n: int, seed: int, start: int = 0) -> list[tuple[str, Any]]:
    """`n` synthetic tasks from index `start` of the job's stream `seed`, as (task name, item);
    an item's `.task` is its environment's task."""
    return mixed_tasks(job, n, seed, start)


def rollout_round(r: CMATRun, rnd: int, envs: EnvFactories) -> RolloutResult:
    """Round `rnd`'s rollouts: `tasks_per_round` fresh synthetic tasks, G episodes each, on
    `envs[task name]()` environments."""
    job = r.job
    items = synth_tasks(job, job.tasks_per_round, job.seed, rnd * job.tasks_per_round)
    key = jax.random.key(job.seed * 1000 + rnd)
    parts: dict[str, RolloutResult] = {}
    with LongTermMemory(r.ltm_path) as ltm:
        for k, (name, group) in enumerate(by_task(items).items()):
            engine = RolloutEngine(
                r.model,
                r.tok,
                envs[name],
                roles=r.roles[name],
                cmat_cfg=job.cmat_config(),
                rollout_cfg=RolloutConfig(
                    temperature=job.temperature,
                    max_new_tokens=job.max_new_tokens,
                    reason_max_new_tokens=job.reason_max_new_tokens,
                    max_batch=job.max_batch,
                    min_batch=job.min_batch,
                    # every training row fits seq_len whole: prompts that would outgrow it
                    # are rebuilt from short-term memory instead
                    max_context=job.seq_len + 1,
                ),
                ltm=ltm,
                read_policy=ReadPolicy.training(),
                baseline=r.baseline,
                mesh=r.mesh,
            )
            task_key = key if len(r.tasks) == 1 else jax.random.fold_in(key, k)
            parts[name] = engine.run([st.task for st in group], key=task_key)
    return merge_rollouts(parts, job.cmat_config())


# Engine counters that add up over the tasks of a round.
_SUMMED = ("generate_calls", "mixed_calls", "generated_tokens", "verdict_calls", "env_steps",
           "counterfactual_steps", "reused_prompt_tokens", "prefilled_prompt_tokens", "wall_s",
           "context_rebuilds", "episodes_with_memory")  # fmt: skip


def merge_rollouts(parts: Mapping[str, RolloutResult], cfg: CMATConfig) -> RolloutResult:
    """One round's result from each task's: episodes, outputs and rows concatenated (row
    episode indices and group ids made unique), the summary over all episodes, and each task's
    reward, success rate and Checker numbers as `<task>/<metric>`. One task: its own result."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    episodes, outputs, rows, reflections = [], [], [], []
    stats: dict[str, Any] = {}
    for name, res in parts.items():
        base = len(episodes)
        episodes += [dataclasses.replace(e, group_id=f"{name}:{e.group_id}") for e in res.episodes]
        outputs += res.outputs
        reflections += res.reflections
        rows += [dataclasses.replace(row, episode=base + row.episode) for row in res.rows]
        for k in _SUMMED:
            stats[k] = stats.get(k, 0) + (res.stats.get(k) or 0)
        for k, v in summarize(res.episodes, cfg).items():
            stats[f"{name}/{k}"] = v
    stats.update(summarize(episodes, cfg))
    return RolloutResult(episodes, outputs, rows, stats, reflections)


def run_round(
    r: CMATRun, rnd: int, envs: EnvFactories, anchor_pool: list[TrainRow]
) -> tuple[dict[str, Any], RolloutResult, list[dict]]:
    """One rollout -> update round: `(stats, rollouts, per-step train metrics)`; the stats
    line is written to DIR/rounds.jsonl."""
    with scope(f"round{rnd + 1}"):
        return _run_round(r, rnd, envs, anchor_pool)


def _run_round(
    r: CMATRun, rnd: int, envs: EnvFactories, anchor_pool: list[TrainRow]
) -> tuple[dict[str, Any], RolloutResult, list[dict]]:
    job = r.job
    t = time.perf_counter()
    res = rollout_round(r, rnd, envs)
    t_roll = time.perf_counter() - t
    seed = job.seed * 1000 + rnd
    rows = select_rows(res, job, seed=seed)
    if rows and job.anchor_rows:
        rows += draw_anchor_rows(anchor_pool, job.anchor_rows, seed=seed)
    hist: list[dict] = []
    for epoch in range(job.epochs):
        if rows:
            hist += r.train_rows(
                rows, None, "cmat", job.loss_config(), job.seed * 7 + rnd * 31 + epoch
            )
    st = dict(res.stats)
    st.update(
        round=rnd + 1,
        rows=len(rows),
        rollout_s=t_roll,
        train_s=time.perf_counter() - t - t_roll,
        loss=float(np.mean([h["loss"] for h in hist])) if hist else None,
        # no "kl" metric without the KL term (kl_coef 0)
        kl=float(np.mean([h["kl"] for h in hist])) if hist and "kl" in hist[0] else None,
    )
    r.write_round(st)
    r.log(
        f"round {rnd + 1}/{job.rounds}: reward {st['mean_reward']:.3f}, "
        f"success {st['success_rate']:.3f}, "
        f"checker P/R {st['checker_precision']}/{st['checker_recall']}, {len(rows)} rows, "
        + "".join(
            f"{name} success {st[f'{name}/success_rate']:.3f}, "
            for name in r.tasks
            if f"{name}/success_rate" in st
        )
        + f"{time.perf_counter() - t:.0f}s"
    )
    return st, res, hist


def select_rows(res: Any, job: CMATJob, seed: int = 0) -> list:
    """The round's training rows (see `CMATJob.drop_failed_groups` and
    `CMATJob.checker_rows_per_round`)."""
    rows = list(res.rows)
    if job.loss_mode == "rwr" and job.drop_failed_groups:
        best: dict[str, float] = {}
        for e in res.episodes:
            best[e.group_id] = max(best.get(e.group_id, 0.0), e.reward)
        rows = [
            row
            for row in rows
            if row.role != "assistant" or best[res.episodes[row.episode].group_id] > 0.0
        ]
    checker = [row for row in rows if row.role == "checker"]
    rows = [row for row in rows if row.role != "checker"]
    return rows + balance_checker_rows(checker, job.checker_rows_per_round, seed)


def balance_checker_rows(rows: list, cap: int, seed: int) -> list:
    """Checker rows with both verdicts weighted equally: at most `cap` rows (0 = all), drawn
    half from each label where both have enough, and each label's rows weighted so that the
    two labels carry the same total weight.

    Labels follow the episode's outcome, so in a round where most episodes fail most labels are
    "reject"; trained as they come, a few steps teach the Checker to reject everything, and its
    rejections then derail the Assistant's next round."""
    rng = np.random.default_rng(seed)
    by_label = {True: [r for r in rows if r.label], False: [r for r in rows if not r.label]}
    if cap and len(rows) > cap:
        minority = min(by_label, key=lambda label: len(by_label[label]))
        small, big = by_label[minority], by_label[not minority]
        n_small = min(len(small), cap // 2)
        keep_small = [small[i] for i in rng.permutation(len(small))[:n_small]]
        keep_big = [big[i] for i in rng.permutation(len(big))[: cap - n_small]]
        by_label = {True: [], False: []}
        for r in keep_small + keep_big:
            by_label[bool(r.label)].append(r)
    present = [label for label, rs in by_label.items() if rs]
    total = sum(len(by_label[label]) for label in present)
    out = []
    for label in present:
        scale = total / (len(present) * len(by_label[label]))
        out += [dataclasses.replace(r, weight=r.weight * scale) for r in by_label[label]]
    return out
