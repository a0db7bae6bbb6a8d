"""Agent-tuning data (the TinyAgent stage): scripted-expert trajectories of the job's tasks
(`cmat_jax.tasks`) as training rows for the Assistant and the Checker's labelled items, and the
SFT-anchor rows drawn from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from cmat_jax.cmat import roles as R
from cmat_jax.cmat.job import SFT_SEED_OFFSET, CMATJob
from cmat_jax.cmat.rollout import ChatTokens, checker_prompt_ids
from cmat_jax.data import parse_record, read_jsonl, tokenize_conversation
from cmat_jax.data.rows import TrainRow
from cmat_jax.tasks import TASKS, CheckerItem, by_task, mixed_tasks


def expert_rows(
    tokenizer: Any, job: CMATJob, slots: dict[str, int], roles: Mapping[str, R.RoleSet]
) -> list:
    """Agent-tuning rows: the Assistant on expert trajectories (assistant tokens), the Checker
    on the items each task's expert labels (`ExpertEpisode.checker_items`). `roles`: each
    task's role set, by task name."""
    sft_len = job.sft_row_len
    rows: list[TrainRow] = []
    convs = []
    checker_items = []
    seed = job.seed + SFT_SEED_OFFSET
    for name, items in by_task(mixed_tasks(job, job.sft_examples, seed)).items():
        for ep in TASKS[name].expert(items, seed):
            convs.append(parse_record({"messages": ep.messages}, f"expert:{ep.task_id}"))
            checker_items += [(name, ep.task_text, item) for item in ep.checker_items]
    for path in job.sft_data:
        for where, rec in read_jsonl(path):
            convs.append(parse_record(rec, where))
    for conv in convs:
        ex = tokenize_conversation(tokenizer, conv, seq_len=sft_len + 1, overlong="truncate")
        if ex is None:
            continue
        m = ex.loss_mask.astype(np.float32)
        rows.append(
            TrainRow(
                ex.tokens.astype(np.int32),
                m,
                m,
                m,
                np.zeros_like(m),
                slots["assistant"],
                "assistant",
                -1,
                1.0,
            )
        )
    if job.checker_sft:
        # Capped and balanced: at most half as many rows as the Assistant's (each is a long
        # prompt for a verdict and, for a reject, its reason), bad proposals (reject) drawn evenly over their kinds
        # (`CheckerItem.kind`: premature answers alone would otherwise fill the draw and are
        # the easiest to learn) and at most twice as many good ones (accept), seeded draws.
        rng = np.random.default_rng(seed)
        bad = [c for c in checker_items if not c[2].good]
        good_items = [c for c in checker_items if c[2].good]
        rng.shuffle(good_items)
        cap = max(2, len(rows) // 2)
        chosen_bad = draw_evenly(bad, lambda c: c[2].kind, cap // 2, rng)
        n_good = min(len(good_items), cap - len(chosen_bad), 2 * max(len(chosen_bad), 1))
        chosen = chosen_bad + good_items[:n_good]
        ids = R.verdict_token_ids(tokenizer)
        turn_end = ChatTokens(tokenizer).turn_end_id
        for name, task_text, item in chosen:
            target = checker_target(tokenizer, item, ids, turn_end)
            prompt = checker_prompt_ids(
                tokenizer,
                roles[name].checker,
                task_text,
                item.history,
                item.proposal,
                sft_len + 1 - len(target),
            )
            toks = np.asarray([*prompt, *target], np.int32)
            m = np.zeros(len(toks), np.float32)
            m[len(prompt) :] = 1.0
            rows.append(
                TrainRow(toks, m, m, m, np.zeros_like(m), slots["checker"], "checker", -1, 1.0)
            )
    return rows


def checker_target(
    tokenizer: Any, item: CheckerItem, ids: tuple[int, int], turn_end: int | None
) -> list[int]:
    """The Checker's trained tokens after its prompt: the accept word; or the reject word, the
    reason for the item's kind (`roles.REJECT_REASONS`) and the end of the turn, so that at a
    rejection the Checker writes a reason the Assistant was taught to act on. The verdict stays
    the first token (p_accept reads it); a tokenizer that merges it with what follows gets the
    reject word alone."""
    if item.good:
        return [ids[0]]
    reason = R.REJECT_REASONS.get(item.kind)
    toks = tokenizer.encode(R.format_verdict(False, reason), add_bos=False) if reason else []
    if not toks or toks[0] != ids[1]:
        return [ids[1]]
    return toks + ([turn_end] if turn_end is not None else [])


def draw_evenly(items: list, kind_of: Any, n: int, rng: np.random.Generator) -> list:
    """Up to `n` of `items`, taken round-robin over their kinds (each kind in a random order),
    so every kind gets an equal share while it lasts; the kinds' order is sorted, the draw
    seeded by `rng`."""
    pools: dict[str, list] = {}
    for it in items:
        pools.setdefault(kind_of(it), []).append(it)
    queues = []
    for kind in sorted(pools):
        pool = pools[kind]
        queues.append([pool[int(i)] for i in rng.permutation(len(pool))])
    out: list = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def draw_anchor_rows(pool: list, n: int, seed: int) -> list:
    """`n` expert rows drawn from `pool` (without replacement while it lasts) as SFT-anchor rows:
    `anchor` set and the policy weight zeroed, so only λ·NLL trains them."""
    if not pool:
        return []
    rng = np.random.default_rng(seed)
    idx = [int(i) for i in rng.permutation(len(pool))][:n]
    idx += [int(i) for i in rng.integers(0, len(pool), max(0, n - len(idx)))]
    return [
        dataclasses.replace(
            pool[i],
            anchor=True,
            weight=np.zeros_like(pool[i].weight),
            advantage=np.zeros_like(pool[i].advantage),
        )
        for i in idx
    ]
