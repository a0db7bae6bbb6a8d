"""CI smoke run of the whole CMAT loop on a tiny model with the real DBBench env: agent tuning ->
rollout -> cmat_step -> LTM -> eval -> checkpoint, a crash, then resume to the end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmat_jax.cmat import roles as R
from cmat_jax.cmat.expert import draw_anchor_rows, draw_evenly, expert_rows
from cmat_jax.cmat.job import CMATJob, resolve_dev_data
from cmat_jax.cmat.loop import run_cmat
from cmat_jax.cmat.memory import LongTermMemory
from cmat_jax.cmat.rollout import RolloutEngine
from cmat_jax.cmat.rounds import select_rows
from cmat_jax.train import LoRAArgs
from cmat_jax.training.checkpoint import completed_steps
from tests.fixtures_hf import save_tiny_model_dir


class Crash(RuntimeError):
    pass


def test_cmat_loop_smoke_with_crash_and_resume(tmp_path, monkeypatch):
    model_dir = save_tiny_model_dir(tmp_path / "tiny", max_position_embeddings=2048)
    out = tmp_path / "run"
    job = CMATJob(
        model=str(model_dir),
        out=str(out),
        param_dtype="float32",
        compute_dtype="float32",
        lora=LoRAArgs(rank=4, alpha=8.0, slots=("assistant", "checker")),
        sft_steps=2,
        sft_examples=3,
        sft_batch_size=4,
        rounds=2,
        tasks_per_round=2,
        group_size=2,
        batch_size=4,
        # The tiny fixture's tokenizer spends ~4x the tokens of SmolLM2's on the same prompt.
        seq_len=1024,
        sft_seq_len=768,  # the Assistant rows need ~500 tokens to reach a first reply
        max_new_tokens=12,
        train_max_rounds=2,
        eval_tasks=2,
        eval_max_new_tokens=12,
        dev_data="",
        progress=False,
        drop_failed_groups=False,  # a random model fails every group; train its rows anyway
        anchor_coef=1.0,
        anchor_rows=2,
    )
    # Crash inside the second round's rollout (after round 1 was checkpointed).
    calls = {"n": 0}
    real_run = RolloutEngine.run

    def crashing_run(self, tasks, **kw):
        if kw.get("train", True):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash("injected crash in round 2")
        return real_run(self, tasks, **kw)

    monkeypatch.setattr(RolloutEngine, "run", crashing_run)
    with pytest.raises(Crash):
        run_cmat(job)
    steps = completed_steps(out / "checkpoints")
    assert len(steps) >= 1  # agent tuning and round 1 were saved
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1]
    with LongTermMemory(out / "ltm.sqlite") as m:
        assert len(m) == 4  # 2 tasks x G=2, written when each episode ended

    # A run directory is never overwritten without --resume.
    monkeypatch.setattr(RolloutEngine, "run", real_run)
    with pytest.raises(ValueError, match="resume"):
        run_cmat(job)
    final = run_cmat(job.__class__(**{**job.__dict__, "resume": True}))

    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["episodes"] == 4 and r["rows"] >= 4 for r in rounds)
    with LongTermMemory(out / "ltm.sqlite") as m:
        assert len(m) == 8
    res = json.loads((out / "results.json").read_text())
    assert res == json.loads(json.dumps(final))
    for key in ("success_rate_after_agent_tuning", "success_rate_after_cmat"):
        assert 0.0 <= res[key] <= 1.0
    for stage in ("agent_tuning", "cmat"):
        s = res["stages"][stage]
        assert s["synthetic"]["n"] == 2 and "overall_cat_accuracy" in s["synthetic"]
        assert "success_rate" in s["synthetic_checker"]
        # Every evaluated episode is kept, with its proposals, for reading why an item failed.
        for split, n_ok in (("a", s["synthetic"]), ("b", s["synthetic_checker"])):
            eps = (out / "eval" / stage / split / "episodes.jsonl").read_text().splitlines()
            eps = [json.loads(x) for x in eps]
            first = [e for e in eps if e["trial"] == 1]
            assert len(first) == 2 and all(e["turns"] and e["description"] for e in first)
            assert sum(e["reward"] == 1.0 for e in first) == round(2 * n_ok["success_rate"])
    assert (out / "export" / "assistant-peft" / "adapter_model.safetensors").is_file()
    assert {p.split("/")[-1] for p in res["plots"]} == {"rounds.png", "train.png"}
    assert any((out / "tb").iterdir())
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/kl" in m for m in metrics) and any("round/success_rate" in m for m in metrics)
    # The SFT anchor trains on expert rows in every round's update.
    anchor = [m["train/anchor_nll"] for m in metrics if m.get("train/anchor_tokens", 0) > 0]
    assert anchor and all(np.isfinite(anchor))
    assert len(completed_steps(out / "checkpoints")) >= 1


def test_job_validation_names_the_field():
    with pytest.raises(ValueError, match="--group-size"):
        CMATJob(group_size=0)
    with pytest.raises(ValueError, match=r"--lora\.slots"):
        CMATJob(lora=LoRAArgs(slots=("assistant",)))
    with pytest.raises(ValueError, match="--anchor-coef"):
        CMATJob(anchor_rows=4)
    with pytest.raises(ValueError, match="--sft-seq-len"):
        CMATJob(anchor_rows=4, anchor_coef=1.0, sft_seq_len=1024, seq_len=512)
    with pytest.raises(ValueError, match="--reflector-slot"):
        CMATJob(reflector_slot="user")
    # checked by the rounds' own configs, named by the job's flag
    with pytest.raises(ValueError, match=r"^--clip-eps must be in \(0, 1\), got 5.0$"):
        CMATJob(clip_eps=5.0)
    with pytest.raises(ValueError, match=r"^--max-revisions must be >= 0, got -1$"):
        CMATJob(max_revisions=-1)
    with pytest.raises(FileNotFoundError, match="--dev-data"):
        resolve_dev_data("/nonexistent/dev.jsonl")


def test_select_rows_drops_failed_groups_and_balances_checker_rows():
    from types import SimpleNamespace

    import numpy as np

    from cmat_jax.data.rows import TrainRow

    def row(role, episode, label=None):
        z = np.zeros(2, np.float32)
        w = np.array([0.0, 1.0], np.float32)
        return TrainRow(np.zeros(2, np.int32), z, z, w, z, 0, role, episode, 0.0, label)

    episodes = [
        SimpleNamespace(group_id="g0", reward=0.0),
        SimpleNamespace(group_id="g0", reward=1.0),
        SimpleNamespace(group_id="g1", reward=0.0),
    ]
    # 8 "reject" labels and 2 "accept" ones, as in a round where most episodes failed.
    checker = [row("checker", e % 3, label=e < 2) for e in range(10)]
    rows = [row("assistant", e) for e in range(3)] + checker
    res = SimpleNamespace(episodes=episodes, rows=rows)

    def summary(kept):
        return [(r.role, r.episode, r.label, float(r.weight[-1])) for r in kept]

    kept = select_rows(res, CMATJob(checker_rows_per_round=6), seed=1)
    assert [r.episode for r in kept if r.role == "assistant"] == [0, 1]  # g1 failed everywhere
    c = [r for r in kept if r.role == "checker"]
    # Capped at 6: both accepts, 4 rejects; each label carries half of the total weight.
    assert len(c) == 6 and sum(r.label for r in c) == 2
    w = {lab: sum(float(r.weight[-1]) for r in c if r.label == lab) for lab in (True, False)}
    assert w[True] == pytest.approx(3.0) and w[False] == pytest.approx(3.0)
    assert summary(kept) == summary(select_rows(res, CMATJob(checker_rows_per_round=6), seed=1))
    # No cap: all 10, weights 10/(2*2) for accepts and 10/(2*8) for rejects.
    c = [r for r in select_rows(res, CMATJob(), seed=1) if r.role == "checker"]
    assert len(c) == 10
    assert {(r.label, float(r.weight[-1])) for r in c} == {(True, 2.5), (False, 0.625)}
    # Only one label present: weights unchanged.
    one = SimpleNamespace(episodes=episodes, rows=[row("checker", 0, label=False)] * 3)
    assert [float(r.weight[-1]) for r in select_rows(one, CMATJob(), seed=1)] == [1.0] * 3
    capped = select_rows(one, CMATJob(checker_rows_per_round=2), seed=1)
    assert [float(r.weight[-1]) for r in capped] == [1.0] * 2
    with pytest.raises(ValueError, match="checker-rows-per-round"):
        CMATJob(checker_rows_per_round=-1)


def test_anchor_rows_are_expert_rows_trained_by_the_anchor_term_only():
    from cmat_jax.data.rows import TrainRow, rows_to_batch

    def expert(i):
        m = np.array([0, 0, 1, 1], np.float32)
        return TrainRow(np.arange(4, dtype=np.int32) + i, m, m, m, m * 0, 0, "assistant", -1, 1.0)

    pool = [expert(i) for i in range(3)]
    drawn = draw_anchor_rows(pool, 5, seed=0)
    assert len(drawn) == 5 and all(r.anchor for r in drawn)
    # Every pool row is drawn once before any repeats; the pool itself is left as it was.
    assert sorted(int(r.tokens[0]) for r in drawn[:3]) == [0, 1, 2]
    assert all(not r.weight.any() and not r.advantage.any() for r in drawn)
    assert all(r.loss_mask.tolist() == [0, 0, 1, 1] for r in drawn)
    assert all(not r.anchor and r.weight.any() for r in pool)
    assert draw_anchor_rows([], 4, seed=0) == []
    batch = rows_to_batch([pool[0], drawn[0]], seq_len=4)
    assert batch["anchor"][:, 0].tolist() == [0.0, 1.0]


def test_checker_items_are_drawn_evenly_over_their_kinds():
    items = [("premature", i) for i in range(100)] + [("repeat", i) for i in range(3)]
    items += [("wrong_answer", i) for i in range(10)]
    drawn = draw_evenly(items, lambda it: it[0], 12, np.random.default_rng(0))
    kinds = [k for k, _ in drawn]
    # 4 each while every kind lasts would be 4/4/4; "repeat" has only 3, so the rest go on
    assert len(drawn) == 12 and len(set(drawn)) == 12
    assert (
        kinds.count("repeat") == 3 and kinds.count("premature") + kinds.count("wrong_answer") == 9
    )
    assert abs(kinds.count("premature") - kinds.count("wrong_answer")) <= 1
    # more asked than there are: every item, once
    assert sorted(draw_evenly(items, lambda it: it[0], 500, np.random.default_rng(1))) == sorted(
        items
    )


def test_expert_checker_rows_reject_with_the_reason_the_assistant_is_taught(tmp_path):
    """Agent tuning's Checker rows: an accept is the verdict token alone; a reject is the verdict
    token, the reason for the item's kind and the end of the turn, all trained. The Assistant's
    rows hold revision demos whose rejection message gives the same reasons."""
    from cmat_jax.tokenizer import load_tokenizer

    model_dir = save_tiny_model_dir(tmp_path / "tiny", max_position_embeddings=2048)
    tok = load_tokenizer(str(model_dir))
    job = CMATJob(model=str(model_dir), out=str(tmp_path / "run"), sft_examples=24,
                  sft_seq_len=1536, seq_len=1536, dev_data="", progress=False)  # fmt: skip
    rows = expert_rows(tok, job, {"assistant": 0, "checker": 1}, {"db": R.make_roles("dbbench")})
    accept_id, reject_id = R.verdict_token_ids(tok)
    checker = [r for r in rows if r.role == "checker"]
    reasons = {f"{R.REJECT_WORD}: {why}" for why in R.REJECT_REASONS.values()}
    n_reject = 0
    for r in checker:
        trained = r.tokens[r.loss_mask > 0].tolist()
        assert r.loss_mask[-len(trained) :].all()  # the trained tokens end the row
        if trained[0] == accept_id:
            assert len(trained) == 1
        else:
            assert trained[0] == reject_id and trained[-1] in tok.eos_ids
            assert tok.decode(trained[:-1]) in reasons
            n_reject += 1
    assert n_reject >= 4 and len(checker) - n_reject >= n_reject
    demos = [
        tok.decode(r.tokens.tolist())
        for r in rows
        if r.role == "assistant"
        and "A reviewer rejected this action" in tok.decode(r.tokens.tolist())
    ]
    assert demos and all(any(why in d for why in R.REJECT_REASONS.values()) for d in demos)
