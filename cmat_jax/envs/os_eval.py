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

from cmat_jax.cli import UsageError
from cmat_jax.envs.agents import Agent, NullAgent
from cmat_jax.envs.os_sandbox import ensure_rootfs
from cmat_jax.envs.os_task import ROUND_LIMIT, OSEnv, OSOracleAgent, load_os_tasks, os_metrics
from cmat_jax.evaluate import EvalConfig, _counts, _progress, run_episodes

DEFAULT_BATCH = 16


class ChatAgent:
    """Greedy replies of one adapter slot through the generator; an episode whose prompt no
    longer fits the cache ends (None). The OS task has no Checker or memory yet, so its model
    agent is this plain chat loop rather than the DB task's rollout engine."""

    def __init__(self, model: Any, tokenizer: Any, slot: str, max_new_tokens: int) -> None:
        from cmat_jax.inference.generate import Generator

        self.gen, self.tok, self.slot = Generator(model, tokenizer), tokenizer, slot
        self.max_new_tokens = max_new_tokens

    def act(self, batch: Any) -> list[str | None]:
        prompts = [
            self.tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True)
            for m in batch
        ]
        fits = [len(p) + self.max_new_tokens <= self.gen.max_cache_len for p in prompts]
        todo = [p for p, ok in zip(prompts, fits, strict=True) if ok]
        texts = iter([])
        if todo:
            out = self.gen.generate(
                todo, max_new_tokens=self.max_new_tokens, adapter_ids=[self.slot] * len(todo)
            )
            texts = iter(out.texts)
        return [next(texts) if ok else None for ok in fits]


def evaluate_os(cfg: EvalConfig, agent: Agent | None = None) -> dict[str, Any]:
    """Run the OS evaluation described by ``cfg``; writes and returns the results dict."""
    if cfg.checker or (cfg.reflexion_trials or 1) != 1:
        raise UsageError("--task os does not support --checker or --reflexion-trials yet")
    if cfg.agent != "model" and (cfg.step is not None or cfg.model is not None):
        raise UsageError("--model and --step only apply to --agent model")
    if cfg.agent == "model" and cfg.model is None:
        raise UsageError(
            "--agent model needs --model (a run directory, a preset, an HF dir or a .gguf file)"
        )
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
            from cmat_jax.run_loader import load_source

            lm = load_source(
                cfg.model, cfg.step, dtype=cfg.dtype, attention_impl=cfg.attention_impl
            )
            agent = ChatAgent(lm.model, lm.tokenizer, lm.slot(cfg.slot), cfg.max_new_tokens or 512)
    out.mkdir(parents=True, exist_ok=True)
    bar = _progress(len(tasks), cfg.progress)
    t0 = time.perf_counter()
    try:
        transcripts = run_episodes(
            tasks,
            agent,
            None,  # type: ignore[arg-type]  # no SQL backend: the envs come from make_env
            batch_size=cfg.batch_size or DEFAULT_BATCH,
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
    results["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()}
    with (out / "transcripts.jsonl").open("w", encoding="utf-8") as f:
        for tr in transcripts:
            f.write(json.dumps({**tr, "trial": 1}, ensure_ascii=False, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results
