"""``python -m cmat_jax.evaluate --task os --data FILE.json --script-dir DIR --out OUT``: any
AgentBench OS problem file (dev or the numbered test files), one sandboxed episode per problem
through the generic batched episode loop; writes ``OUT/results.json`` (accuracy overall and per
label, status counts, throughput, settings) and ``OUT/transcripts.jsonl`` (one line per episode).

Agents: ``oracle`` (the matched string, or the example script's output: the scorer's
ceiling), ``null`` (its floor) and ``model`` (greedy replies of the model's Assistant slot).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from cmat_jax.envs.agents import Agent, NullAgent
from cmat_jax.envs.os_sandbox import ensure_rootfs
from cmat_jax.envs.os_task import ROUND_LIMIT, OSEnv, OSOracleAgent, load_os_tasks, os_metrics
from cmat_jax.evaluate import EvalConfig, _counts, _progress, make_model_agent, run_episodes


def evaluate_os(cfg: EvalConfig, agent: Agent | None = None) -> dict[str, Any]:
    """Run the OS evaluation described by ``cfg``; writes and returns the results dict."""
    if cfg.checker or cfg.reflexion_trials != 1:
        raise ValueError("--task os does not support --checker or --reflexion-trials yet")
    if cfg.step is not None and cfg.agent != "model":
        raise ValueError("--step only applies to --agent model")
    out = Path(cfg.out)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out / 'results.json'} exists; pass --overwrite to replace it")
    tasks = load_os_tasks(cfg.data, cfg.script_dir, limit=cfg.limit)
    for image in sorted({t.image for t in tasks}):
        ensure_rootfs(image, log=print if cfg.progress else None)
    if agent is None:
        if cfg.agent == "oracle":
            agent = OSOracleAgent(tasks)
        elif cfg.agent == "null":
            agent = NullAgent()
        else:
            agent = make_model_agent(cfg.model, max_new_tokens=cfg.max_new_tokens, dtype=cfg.dtype)
    out.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(tasks), cfg.progress)
    t0 = time.perf_counter()
    try:
        transcripts = run_episodes(
            tasks,
            agent,
            None,  # type: ignore[arg-type]  # no SQL backend: the envs come from make_env
            batch_size=cfg.batch_size,
            on_done=lambda _tr: bar.update(1),
            make_env=OSEnv,
        )
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    results: dict[str, Any] = os_metrics(tr["output"] for tr in transcripts)
    results["n"] = len(transcripts)
    results["episodes"] = len(transcripts)
    results["round_limit"] = ROUND_LIMIT
    results["wall_s"] = round(wall, 3)
    results["episodes_per_minute"] = round(len(transcripts) / wall * 60, 1) if wall > 0 else None
    results["status_counts"] = _counts(tr["status"] for tr in transcripts)
    settings = dataclasses.asdict(cfg)
    settings.pop("mysql_password")
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    with (out / "transcripts.jsonl").open("w", encoding="utf-8") as f:
        for tr in transcripts:
            f.write(json.dumps({**tr, "trial": 1}, ensure_ascii=False, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results
