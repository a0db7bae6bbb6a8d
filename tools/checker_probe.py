"""How well a run's Checker tells good proposals from bad ones, on labelled items of held-out
synthetic tasks — no rollouts, one forward pass per item.

The items are the ones agent tuning trains the Checker on (`ExpertEpisode.checker_items`: every
expert step, labelled by its execution; a premature answer and a changed final answer, labelled
by the judge on a copy of the episode), drawn from the job's held-out synthetic stream
(`EVAL_SEED_OFFSET`, which no training stage draws from). Each is scored with the run's Checker
slot and with the frozen base (slot `none`, the Checker's zero-shot prior):

    python tools/checker_probe.py --run runs/cmat --tasks 48

Per kind of item it prints the mean p_accept; overall the AUC of p_accept between good and bad
items (`feedback.separation_auc`) and the accuracy at the evaluation threshold 0.5. The last
line is one JSON object; `ratio` is the trained Checker's AUC over the base's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

import numpy as np

from cmat_jax.cli import run_cli
from cmat_jax.cmat import roles as R
from cmat_jax.cmat.feedback import separation_auc
from cmat_jax.cmat.job import EVAL_SEED_OFFSET
from cmat_jax.cmat.rollout import checker_prompt_ids
from cmat_jax.inference.generate import Generator
from cmat_jax.run_loader import SourceError, load_run
from cmat_jax.tasks import TASKS, CheckerItem, by_task, mixed_tasks


def labelled_items(cfg: dict, n_tasks: int) -> list[tuple[str, str, CheckerItem]]:
    """(task name, task text, item) of the held-out synthetic tasks' expert episodes, in stream
    order."""
    job = SimpleNamespace(**cfg)  # the task stream reads only the job's task and mix fields
    seed = int(cfg["seed"]) + EVAL_SEED_OFFSET
    out = []
    for name, items in by_task(mixed_tasks(job, n_tasks, seed)).items():
        for ep in TASKS[name].expert(items, seed):
            out += [(name, ep.task_text, item) for item in ep.checker_items]
    return out


def score(
    gen: Generator, prompts: list[list[int]], slot: str, ids: tuple[int, int], batch: int
) -> np.ndarray:
    """p_accept of each prompt under adapter `slot` (the next token's two verdict words)."""
    out = []
    for lo in range(0, len(prompts), batch):
        part = prompts[lo : lo + batch]
        res = gen.generate(
            part, max_new_tokens=1, adapter_ids=[slot] * len(part), score_ids=ids, eos_ids=[]
        )
        out.append(R.p_accept(np.asarray(res.scores), (0, 1)))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a CMAT run directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    ap.add_argument("--tasks", type=int, default=48, help="held-out synthetic tasks")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024, help="prompt token budget")
    args = ap.parse_args(argv)
    loaded = load_run(args.run, args.step)
    cfg = loaded.run_config
    if "checker" not in loaded.slots:
        raise SourceError(f"{args.run}: the run has no 'checker' adapter slot")
    tok = loaded.tokenizer
    items = labelled_items(cfg, args.tasks)
    roles = {name: TASKS[name].roles() for name in {it[0] for it in items}}
    prompts = [
        checker_prompt_ids(tok, roles[name].checker, text, it.history, it.proposal, args.max_len)
        for name, text, it in items
    ]
    good = np.array([it.good for _, _, it in items])
    kinds = [f"{'good' if it.good else 'bad'} {it.kind}" for _, _, it in items]
    gen = Generator(loaded.model, tok, max_cache_len=args.max_len + 8, min_batch=args.batch)
    ids = R.verdict_token_ids(tok)
    result: dict = {"run": str(args.run), "step": loaded.step, "items": len(items)}
    t = time.perf_counter()
    kind_names = sorted(set(kinds))
    for slot in ("checker", "none"):
        p = score(gen, prompts, slot, ids, args.batch)
        auc = separation_auc(p[good], p[~good])
        acc = float(np.mean((p >= 0.5) == good))
        means = {k: float(p[[x == k for x in kinds]].mean()) for k in kind_names}
        print(
            f"slot {slot}: AUC {auc if auc is None else round(auc, 3)}, accuracy at 0.5 {acc:.3f}"
        )
        for k in kind_names:
            print(f"  {k:<28} n={kinds.count(k):<4} mean p_accept {means[k]:.3f}")
        result[slot] = {
            "auc": None if auc is None else round(auc, 4),
            "accuracy": round(acc, 4),
            "mean_p_accept": {k: round(v, 4) for k, v in means.items()},
        }
    result["wall_s"] = round(time.perf_counter() - t, 1)
    a, b = result["checker"]["auc"], result["none"]["auc"]
    result["ratio"] = round(a / b, 4) if a is not None and b else None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
