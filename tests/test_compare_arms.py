"""tools/compare_arms.py end to end on a tiny random-init model (agent tuning once, then two
seeds of CMAT rounds vs equal-compute agent tuning, evaluated on dev items and held-out
synthetic tasks), and the paired statistics against known values."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cmat_jax.cli import run_cli
from cmat_jax.cmat.compare import SCORES, validate
from cmat_jax.envs.dbbench import load_tasks
from cmat_jax.paired_stats import (
    betainc,
    compare_paired,
    mean_sd,
    paired_t,
    sign_flip_p,
    sign_test_p,
    t_two_sided_p,
)
from cmat_jax.tasks import stratified_sample
from tests.fixtures_hf import save_tiny_model_dir

TOOLS = Path(__file__).resolve().parent.parent / "tools"
DEV = Path(__file__).resolve().parent / "data" / "agentbench_dbbench" / "dev.jsonl"


def test_paired_statistics_match_known_values():
    m, sd = mean_sd([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and sd == pytest.approx(math.sqrt(5 / 3))
    # Closed forms of Student's t: df=1 is Cauchy, df=2 has P(|T|>=t) = 1 - t/sqrt(t^2+2).
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert t_two_sided_p(3.0, 1) == pytest.approx(1 - 2 / math.pi * math.atan(3.0), abs=1e-12)
    assert t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)
    assert t_two_sided_p(2.0, 200) == pytest.approx(math.erfc(2 / math.sqrt(2)), abs=2e-3)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    # Published table value: t_{0.975, 10} = 2.228.
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-4)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # 1 - sum of binomials
    # d = (1, 2, 3): mean 2, sd 1, t = 2 sqrt(3), df 2.
    t = paired_t([1.0, 2.0, 3.0])
    assert t["t"] == pytest.approx(2 * math.sqrt(3)) and t["df"] == 2
    assert t["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), abs=1e-12)
    assert paired_t([0.5, 0.5])["p"] == 0.0 and paired_t([0.0, 0.0])["p"] == 1.0
    assert paired_t([1.0])["p"] is None
    # Sign flips of (1, 2, 3): |mean| >= 2 only for all-plus and all-minus: 2/8.
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert sign_flip_p([1.0, -1.0]) == 1.0
    assert sign_flip_p([3.0, 1.0, 0.0]) == 0.5  # |±3±1±0|/3 >= 4/3 for 4 of the 8
    assert sign_test_p([1.0, 2.0, 3.0]) == 0.25 and sign_test_p([1.0, 0.0, -2.0]) == 1.0
    assert sign_test_p([1.0] * 6) == pytest.approx(2 / 64)
    c = compare_paired([0.3, 0.5], [0.2, 0.2])
    assert c["diff"]["values"] == pytest.approx([0.1, 0.3]) and c["a"]["mean"] == 0.4
    with pytest.raises(ValueError, match="length"):
        compare_paired([1.0], [1.0, 2.0])


def _load_tool(name: str = "compare_arms"):
    sys.path.insert(0, str(TOOLS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(TOOLS))


def test_compare_arms_end_to_end(tmp_path, capsys):
    tool = _load_tool()
    model_dir = save_tiny_model_dir(tmp_path / "tiny", max_position_embeddings=2048)
    out = tmp_path / "cmp"
    job_flags = [
        "--model", str(model_dir),
        "--param-dtype", "float32",
        "--compute-dtype", "float32",
        "--lora.rank", "4",
        "--lora.alpha", "8",
        "--sft-steps", "2",
        "--sft-examples", "3",
        "--sft-batch-size", "2",
        "--rounds", "1",
        "--tasks-per-round", "2",
        "--group-size", "2",
        "--batch-size", "2",
        "--seq-len", "1024",
        "--sft-seq-len", "768",
        "--max-new-tokens", "8",
        "--train-max-rounds", "2",
        "--eval-tasks", "2",
        "--eval-max-new-tokens", "8",
        "--eval-max-rounds", "2",
        "--anchor-rows", "2",
        "--checker-rows-per-round", "2",
        "--no-use-checker",  # in the rollouts: fewer programs to compile (test_cmat_loop has it)
        "--min-batch", "4",  # one generation batch shape
        "--eval-checker",
        "--dev-checker",
        "--no-drop-failed-groups",  # a random model fails every group; train its rows anyway
        "--no-progress",
    ]  # fmt: skip
    argv = ["--out", str(out), "--seeds", "2", "--sample", "2", "--dev-data", str(DEV)]
    result = tool.main(argv + job_flags)
    printed = capsys.readouterr().out.strip().splitlines()

    saved = json.loads((out / "compare.json").read_text())
    assert saved["plot"] == str(out / "compare.png") and (out / "compare.png").stat().st_size > 0
    assert saved == json.loads(json.dumps(result))
    assert saved["seeds"] == [1, 2] and saved["dev_items"] == 2
    sampled = stratified_sample(load_tasks(DEV), 2, 0, lambda t: t.type)
    assert saved["dev_task_ids"] == [t.task_id for t in sampled]
    cmat, sft = saved["runs"]["cmat"], saved["runs"]["sft"]
    at = saved["agent_tuning"]
    assert at["steps"] == 2 and set(at["scores"]) == set(SCORES)
    for c, s in zip(cmat, sft, strict=True):
        # Both arms start from the agent-tuning checkpoint and take the same optimizer steps of
        # the same shape.
        assert c["start_step"] == s["start_step"] == 2
        assert c["steps"] == s["steps"] >= 1
        assert (c["sequences_per_step"], c["tokens_per_sequence"]) == (2, 1024)
        assert (s["sequences_per_step"], s["tokens_per_sequence"]) == (2, 1024)
        metrics = [
            json.loads(x) for x in (Path(s["run"]) / "metrics.jsonl").read_text().splitlines()
        ]
        assert sum("train/loss" in m for m in metrics) == s["steps"]
        assert len(c["rollout_task_ids"]) == 2 * 2  # tasks x group size
    # Each seed draws its own rollout tasks and its own expert rows.
    assert set(cmat[0]["rollout_task_ids"]).isdisjoint(cmat[1]["rollout_task_ids"])
    assert sft[0]["expert_rows_sha1"] != sft[1]["expert_rows_sha1"]
    # The evaluation items are the same for every run: the dev items and held-out tasks.
    for runs in (cmat, sft):
        for r in runs:
            eps = Path(r["run"]) / "eval" / "cmat" / "a" / "episodes.jsonl"
            ids = [json.loads(x)["task_id"] for x in eps.read_text().splitlines()]
            first = Path(cmat[0]["run"]) / "eval" / "cmat" / "a" / "episodes.jsonl"
            assert ids == [json.loads(x)["task_id"] for x in first.read_text().splitlines()]
            assert set(r["scores"]) == set(SCORES)

    # The statistics are those of the per-seed numbers.
    for name in SCORES:
        a = [r["scores"][name] for r in cmat]
        b = [r["scores"][name] for r in sft]
        st = saved["stats"][name]
        d = np.subtract(a, b)
        assert st["a"]["mean"] == pytest.approx(np.mean(a))
        assert st["b"]["sd"] == pytest.approx(np.std(b, ddof=1))
        assert st["diff"]["values"] == pytest.approx(d.tolist())
        flips = [abs(d[0] * x + d[1] * y) / 2 for x in (1, -1) for y in (1, -1)]
        assert st["sign_flip_p"] == pytest.approx(
            np.mean([f >= abs(d.mean()) - 1e-12 for f in flips])
        )
        if np.std(d, ddof=1) > 0:
            t = d.mean() / (np.std(d, ddof=1) / math.sqrt(2))
            assert st["paired_t"]["t"] == pytest.approx(t)
            # df = 1: Student's t is the Cauchy distribution.
            assert st["paired_t"]["p"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(t)))

    last = json.loads(printed[-1])
    dev = saved["stats"]["dev"]
    assert last["metric"] == "dev" and last["seeds"] == 2
    assert last["cmat_mean"] == round(dev["a"]["mean"], 4)
    sft_mean = dev["b"]["mean"]
    assert last["ratio"] == (round(dev["a"]["mean"] / sft_mean, 4) if sft_mean else None)
    assert any(line.startswith("dev ") for line in printed)

    # An existing output directory is never overwritten.
    with pytest.raises(FileExistsError, match="already exists"):
        tool.main(argv + job_flags)
    # The agent-tuning run is a checkpoint a later comparison can start from (same adapters and
    # optimizer schedule), and one of a different job is refused.
    again = tool.parse(["--out", str(tmp_path / "again"), "--checkpoint", at["run"], *job_flags])
    validate(again)
    other = dataclasses.replace(again.job, sft_lr=again.job.sft_lr * 2)
    with pytest.raises(ValueError, match="sft_lr"):
        validate(dataclasses.replace(again, job=other))

    # tools/checker_probe.py on the agent-tuning run: both slots scored on labelled items of
    # held-out synthetic tasks, each kind's mean p_accept a probability.
    probe = _load_tool("checker_probe")
    assert probe.main(["--run", at["run"], "--tasks", "2", "--max-len", "2000"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 2 and last["items"] >= 2 * 3  # premature, step(s), answer per task
    for slot in ("checker", "none"):
        means = last[slot]["mean_p_accept"]
        assert "bad premature" in means and all(0.0 <= v <= 1.0 for v in means.values())
        assert 0.0 <= last[slot]["auc"] <= 1.0
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: probe.main(["--run", str(tmp_path / "nothing")]))
    assert exit_.value.code == 2 and "nothing" in capsys.readouterr().err


def test_bad_input_exits_2_before_writing(tmp_path, capsys):
    tool = _load_tool()
    out = tmp_path / "cmp"
    for extra, msg in (
        (["--seeds", "0"], "--seeds"),
        (["--dev-data", str(tmp_path / "missing.jsonl")], "--dev-data"),
        (["--rounds", "0"], "--rounds"),
        (["--checkpoint", str(tmp_path)], "--checkpoint"),
        (["--dev-limit", "3"], "--dev-limit"),
        (["--limit", "0"], "--limit"),
        (["--sample", "0"], "--sample"),
        (["--sample", "3", "--limit", "3"], "exclude each other"),
    ):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda extra=extra: tool.main(["--out", str(out), *extra]))
        err = capsys.readouterr()
        assert e.value.code == 2 and err.out == ""
        assert len(err.err.strip().splitlines()) == 1 and msg in err.err
        assert not out.exists()


def test_stratified_dev_sample():
    """A seeded subset in proportion to the split's query types, in file order; the first N
    items are not one (the in-repo dev split's first 30 hold no UPDATE)."""
    tasks = load_tasks(DEV)
    kind = lambda t: t.type
    counts = {k: sum(kind(t) == k for t in tasks) for k in {kind(t) for t in tasks}}
    assert counts.get("UPDATE", 0) > 0 and not any(kind(t) == "UPDATE" for t in tasks[:30])
    n = 30
    for seed in range(5):
        sub = stratified_sample(tasks, n, seed, kind)
        assert len(sub) == n and len({t.task_id for t in sub}) == n
        order = [tasks.index(t) for t in sub]
        assert order == sorted(order)
        for k, c in counts.items():
            share = n * c / len(tasks)  # every type within one item of its share
            got = sum(kind(t) == k for t in sub)
            assert math.floor(share) <= got <= math.ceil(share), (k, got, share)
    assert stratified_sample(tasks, n, 3, kind) == stratified_sample(tasks, n, 3, kind)
    assert stratified_sample(tasks, n, 3, kind) != stratified_sample(tasks, n, 4, kind)
    assert stratified_sample(tasks, len(tasks) + 5, 0, kind) == tasks
    with pytest.raises(ValueError, match="sample size"):
        stratified_sample(tasks, 0, 0, kind)
