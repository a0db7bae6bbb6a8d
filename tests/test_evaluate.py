"""The evaluator: CLI, results.json and transcripts, batching, reflexion retries, guards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmat_jax.envs.agents import NullAgent, ReplayAgent, oracle_plan
from cmat_jax.envs.dbbench import load_tasks
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.evaluate import EvalConfig, evaluate, main, make_model_agent, run_episodes

DEV = Path(__file__).resolve().parents[2] / "shared/data/agentbench_dbbench/dev.jsonl"


def test_cli_oracle_and_null(tmp_path):
    out = tmp_path / "oracle"
    res = main(["--task", "dbbench", "--data", str(DEV), "--out", str(out), "--agent", "oracle",
                "--batch-size", "16", "--no-progress"])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved == res and saved["n"] == 60 and saved["overall_cat_accuracy"] == 1.0
    for typ in ("other", "counting", "comparison", "ranking", "aggregation-SUM",
                "aggregation-MIN", "aggregation-MAX", "aggregation-AVG", "SELECT", "INSERT", "UPDATE"):  # fmt: skip
        assert saved[f"{typ}_accuracy"] == 1.0
    assert saved["settings"]["agent"] == "oracle" and saved["settings"]["batch_size"] == 16
    lines = [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and all(tr["reward"] == 1.0 and tr["trial"] == 1 for tr in lines)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--data", str(DEV), "--out", str(out), "--agent", "null", "--no-progress"])
    res = main(["--data", str(DEV), "--out", str(out), "--agent", "null", "--overwrite",
                "--limit", "10", "--no-progress"])  # fmt: skip
    assert res["n"] == 10 and res["overall_cat_accuracy"] == 0.0


def test_batch_size_does_not_change_results():
    tasks = load_tasks(DEV, limit=25)

    class Mixed:  # solves every third task, fumbles the rest in different ways
        def act(self, batch):
            out = []
            for msgs in batch:
                task = next(t for t in tasks if t.prompt == msgs[1]["content"])
                k = int(task.task_id.rsplit("-", 1)[1])
                turn = sum(m["role"] == "assistant" for m in msgs)
                plan = oracle_plan(task) if k % 3 == 0 else [
                    "Action: Operation\n```sql\nSELECT COUNT(*) FROM nope\n```", "Final Answer: x"]  # fmt: skip
                out.append(plan[min(turn, len(plan) - 1)])
            return out

    runs = [
        [
            (tr["task_id"], tr["reward"], tr["messages"])
            for tr in run_episodes(tasks, Mixed(), SQLiteBackend(), batch_size=b)
        ]
        for b in (1, 4, 64)
    ]
    assert runs[0] == runs[1] == runs[2]
    assert sum(r for _, r, _ in runs[0]) == 9


def test_reflexion_trials_reported_separately(tmp_path):
    tasks = load_tasks(DEV, limit=6)

    class Learner:
        """Fails the first attempt, reflects, then solves the task with the note present."""

        def __init__(self):
            self.oracle = ReplayAgent((t.prompt, oracle_plan(t)) for t in tasks)

        def act(self, batch):
            return [
                self.oracle.act([m])[0] if "earlier attempts" in m[0]["content"] else ""
                for m in batch
            ]

        def reflect(self, transcripts):
            return ["- I gave no action; answer with the grammar." for _ in transcripts]

    cfg = EvalConfig(data=DEV, out=tmp_path, agent="oracle", limit=6, reflexion_trials=2,
                     progress=False)  # fmt: skip
    res = evaluate(cfg, agent=Learner())
    assert res["overall_cat_accuracy"] == 0.0  # the headline number is single-attempt
    assert res["reflexion"]["trials"] == 2 and res["reflexion"]["SELECT_accuracy"] == 1.0
    assert res["episodes"] == 12
    lines = [json.loads(x) for x in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert [tr["trial"] for tr in lines] == [1] * 6 + [2] * 6


def test_guards(tmp_path):
    with pytest.raises(ValueError, match="--checker only applies"):
        evaluate(EvalConfig(data=DEV, out=tmp_path, agent="oracle", checker=True))
    with pytest.raises(ValueError, match="needs --model"):
        make_model_agent(None)
    with pytest.raises(ValueError, match="batch_size"):
        run_episodes(load_tasks(DEV, limit=1), NullAgent(), SQLiteBackend(), batch_size=0)

    class Short:
        def act(self, batch):
            return []

    with pytest.raises(RuntimeError, match="0 replies for 1 episodes"):
        run_episodes(load_tasks(DEV, limit=1), Short(), SQLiteBackend())


def test_context_limit_ends_episode():
    class Full:
        def act(self, batch):
            return [None for _ in batch]

    trs = run_episodes(load_tasks(DEV, limit=3), Full(), SQLiteBackend())
    assert [tr["status"] for tr in trs] == ["agent_context_limit"] * 3
