"""The evaluator: CLI, results.json and transcripts, batching, reflexion retries, guards."""

from __future__ import annotations

import json

import pytest

from cmat_jax.envs.agents import NullAgent, ReplayAgent, oracle_plan
from cmat_jax.envs.dbbench import load_tasks
from cmat_jax.envs.sqlite_backend import SQLiteBackend
from cmat_jax.evaluate import EvalConfig, EvalProtocol, evaluate, main, run_episodes
from cmat_jax.run_loader import load_source
from cmat_jax.training.checkpoint import CheckpointError
from tests.dbbench_data import DBBENCH_DEV
from tests.fixtures_run import save_tiny_run_dir

DEV = DBBENCH_DEV


def test_cli_oracle_and_null(tmp_path):
    out = tmp_path / "oracle"
    res = main(["--task", "db", "--data", str(DEV), "--out", str(out), "--agent", "oracle",
                "--batch-size", "16", "--no-progress"])  # fmt: skip
    saved = json.loads((out / "results.json").read_text())
    assert saved == res and saved["n"] == 60 and saved["overall_cat_accuracy"] == 1.0
    for typ in ("other", "counting", "comparison", "ranking", "aggregation-SUM",
                "aggregation-MIN", "aggregation-MAX", "aggregation-AVG", "SELECT", "INSERT", "UPDATE"):  # fmt: skip
        assert saved[f"{typ}_accuracy"] == 1.0
    assert saved["settings"]["agent"] == "oracle" and saved["settings"]["batch_size"] == 16
    lines = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == 60 and all(tr["reward"] == 1.0 and tr["trial"] == 1 for tr in lines)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["--data", str(DEV), "--out", str(out), "--agent", "null", "--no-progress"])
    # the default task named explicitly
    res = main(["--task", "dbbench", "--data", str(DEV), "--out", str(out), "--agent", "null",
                "--overwrite", "--limit", "10", "--no-progress"])  # fmt: skip
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
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [tr["trial"] for tr in lines] == [1] * 6 + [2] * 6


def test_guards(tmp_path):
    with pytest.raises(ValueError, match="--checker only applies"):
        evaluate(EvalConfig(data=DEV, out=tmp_path, agent="oracle", checker=True))
    with pytest.raises(ValueError, match="--step only applies"):
        evaluate(EvalConfig(data=DEV, out=tmp_path, agent="oracle", step=3))
    with pytest.raises(ValueError, match=r"--max-context \(64\) must exceed --max-new-tokens"):
        evaluate(EvalConfig(data=DEV, out=tmp_path, model="x", max_context=64, max_new_tokens=64))
    with pytest.raises(ValueError, match="needs --model"):
        evaluate(EvalConfig(data=DEV, out=tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written before validation passed
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


# -- the model agent (a tiny random model through the CMAT rollout engine) -------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.fixtures_hf import save_tiny_model_dir

    # Long enough context for a DBBench prompt (~1000 tokens with the tiny byte-level BPE).
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


@pytest.mark.parametrize("checker", [False, True])
def test_model_agent_end_to_end(tmp_path, tiny_dir, checker):
    out = tmp_path / "eval"
    args = ["--model", str(tiny_dir), "--data", str(DEV), "--out", str(out), "--limit", "3",
            "--max-new-tokens", "8", "--max-rounds", "2", "--dtype", "float32", "--batch-size",
            "2", "--max-context", "1536", "--no-progress"] + (["--checker"] if checker else [])  # fmt: skip
    res = main(args)
    saved = json.loads((out / "results.json").read_text())
    assert saved == res and saved["n"] == 3 and saved["episodes"] == 3
    assert 0.0 <= saved["overall_cat_accuracy"] <= 1.0
    assert saved["settings"]["checker"] is checker and saved["settings"]["agent"] == "model"
    assert saved["settings"]["model"] == str(tiny_dir) and saved["settings"]["batch_size"] == 2
    assert saved["settings"]["max_context"] == 1536
    assert saved["model_info"] == {
        "source": str(tiny_dir), "kind": "base", "assistant_slot": "none", "checker_slot": "none"
    }  # fmt: skip
    lines = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert [tr["task_id"] for tr in lines] == ["dev-0", "dev-1", "dev-2"]
    for tr in lines:
        assert tr["done"] and tr["trial"] == 1 and tr["output"]["type"] == tr["type"]
        assert tr["turns"], "every episode proposes at least once"
        for turn in tr["turns"]:
            if checker:
                assert turn["verdict"] in ("accept", "reject") and 0 <= turn["p_accept"] <= 1
            else:
                assert turn["verdict"] is None and turn["executed"]
    eng = saved["engine"]
    assert eng["generate_calls"] >= 2 and eng["proposals"] == sum(len(t["turns"]) for t in lines)
    assert (eng["verdict_calls"] > 0) is checker


def test_run_dir_model_source(tmp_path, tiny_dir):
    import jax
    import numpy as np
    from flax import nnx

    from cmat_jax.model.lora import LoRAParam

    run = tmp_path / "cmat_run"
    params = save_tiny_run_dir(run, tiny_dir, ("assistant", "checker"), "assistant")
    lm = load_source(str(run), dtype="float32")
    assert lm.default_slot == "assistant" and lm.slots == ("none", "assistant", "checker")
    assert lm.info()["kind"] == "run" and lm.step == 7 and lm.base == str(tiny_dir)
    # evaluation reads the run's memory the way the run did (no other tasks' solutions here)
    p = EvalProtocol.from_run_config(lm.run_config)
    assert (p.ltm_k, p.ltm_token_budget, p.ltm_solutions, p.ltm_similar) == (2, 64, False, False)
    got = nnx.split(lm.model, LoRAParam, ...)[1].to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), got, params)

    lm = load_source(str(run), 3, dtype="float32")  # an earlier stage of the same run
    assert lm.step == 3 and lm.info()["stage"] == "agent_tuning"
    got = nnx.split(lm.model, LoRAParam, ...)[1].to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), -b), got, params)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 5 \(have \[3, 7\]\)"):
        load_source(str(run), 5, dtype="float32")
    with pytest.raises(ValueError, match="--step 3 needs a training run directory"):
        load_source(str(tiny_dir), 3, dtype="float32")
    with pytest.raises(ValueError, match="--slot: 'user' is not an adapter slot"):
        lm.slot("user")

    sft = tmp_path / "sft_run"  # an SFT run: one trained slot, no Checker adapter
    save_tiny_run_dir(sft, tiny_dir, ("tuned",), None)
    lm = load_source(str(sft), dtype="float32")
    assert lm.default_slot == "tuned" and "checker" not in lm.slots
    assert EvalProtocol.from_run_config(lm.run_config) == EvalProtocol()

    (sft / "config.json").write_text(json.dumps({"model": 5, "lora": {}}))
    with pytest.raises(ValueError, match=r"config\.json: field 'model'"):
        load_source(str(sft))
