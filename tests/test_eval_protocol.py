"""One evaluation protocol: `python -m cmat_jax.evaluate` on a CMAT run directory repeats the
job's own evaluation (same numbers, same episodes proposal by proposal), and a run directory
works with chat and as a `--config`."""

from __future__ import annotations

import io
import json

import pytest

from cmat_jax.cmat import loop
from cmat_jax.cmat.loop import CMATJob, run_cmat
from cmat_jax.train import LoRAArgs
from tests.fixtures_hf import save_tiny_model_dir


@pytest.fixture(scope="module")
def cmat_run(tmp_path_factory):
    """A tiny CMAT job (the smoke test's settings, cut to one round of one task) run to the end."""
    root = tmp_path_factory.mktemp("cmat")
    model_dir = save_tiny_model_dir(root / "tiny", max_position_embeddings=2048)
    job = CMATJob(
        model=str(model_dir),
        out=str(root / "run"),
        param_dtype="float32",
        compute_dtype="float32",
        lora=LoRAArgs(rank=4, alpha=8.0, slots=("assistant", "checker")),
        sft_steps=1,
        sft_examples=2,
        sft_batch_size=4,
        rounds=1,
        tasks_per_round=1,
        group_size=2,
        batch_size=4,
        seq_len=1024,
        sft_seq_len=768,
        max_new_tokens=8,
        train_max_rounds=2,
        eval_tasks=2,
        eval_max_new_tokens=8,
        dev_data="",
        progress=False,
        drop_failed_groups=False,
        export=False,
    )
    final = run_cmat(job)
    return root, job, final


def _episodes(path):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return [(e["trial"], e["task_id"], e["reward"], e["output"], e["turns"]) for e in lines]


@pytest.mark.parametrize(("checker", "split"), [(False, "a"), (True, "b")])
def test_run_dir_evaluation_equals_the_jobs_number(cmat_run, checker, split):
    from cmat_jax.evaluate import main

    root, job, final = cmat_run
    run = root / "run"
    assert (run / "ltm.sqlite").is_file()  # the round wrote memory; both evaluations read it
    held_out = loop.synth_tasks(job, job.eval_tasks, job.seed + loop.EVAL_SEED_OFFSET)
    data = root / "held_out.jsonl"
    data.write_text("".join(json.dumps(st.task.to_record()) + "\n" for _, st in held_out))
    out = root / f"eval-{split}"
    argv = ["--model", str(run), "--data", str(data), "--out", str(out), "--no-progress"]
    res = main(argv + (["--checker"] if checker else []))
    theirs = final["stages"]["cmat"]["synthetic_checker" if checker else "synthetic"]
    for key in ("n", "success_rate", "overall_cat_accuracy"):
        assert res[key] == theirs[key], key
    assert res["model_info"]["step"] == max(int(p.name) for p in (run / "checkpoints").iterdir()
                                            if p.name.isdigit())  # fmt: skip
    # Not only the numbers: every proposal, verdict, p_accept and observation is the job's.
    ours = _episodes(out / "episodes.jsonl")
    assert ours == _episodes(run / "eval" / "cmat" / split / "episodes.jsonl")
    assert all(turns for *_, turns in ours)
    if checker:
        assert all(t["verdict"] in ("accept", "reject") for *_, turns in ours for t in turns)


def test_chat_with_a_run_directory(cmat_run):
    from cmat_jax.chat import ChatArgs, chat
    from cmat_jax.run_loader import load_source

    root, _, _ = cmat_run
    lm = load_source(root / "run")
    assert lm.kind == "run" and lm.default_slot == "assistant"
    replies = {}
    for slot in ("assistant", "none"):
        hist = chat(ChatArgs(slot=slot, max_new_tokens=6), lm.model, lm.tokenizer,
                    io.StringIO("hello\n"), io.StringIO())  # fmt: skip
        replies[slot] = hist[-1]["content"]
    assert all(isinstance(r, str) for r in replies.values())


def test_a_runs_config_json_is_a_config_file(cmat_run):
    from cmat_jax.cli import parse

    root, job, _ = cmat_run
    again = parse(CMATJob, ["--config", str(root / "run" / "config.json"), "--rounds", "3"],
                  prog="train cmat")  # fmt: skip
    assert again.rounds == 3 and again.lora == job.lora and again.eval_tasks == job.eval_tasks
    assert again.model == str(root / "tiny")


def test_a_run_directory_is_told_from_a_model_directory(tmp_path):
    """A run's config.json names its job (or its LoRA config); an HF model's names its
    model_type. A run that never reached its first checkpoint says so instead of failing as a
    model directory would."""
    from cmat_jax.run_loader import SourceError, is_run_dir, load_source

    kinds = {
        "job": {"job": "cmat", "model": "m"},
        "lora": {"lora": {}},
        "hf": {"model_type": "llama"},
    }
    for name, cfg in kinds.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    assert [is_run_dir(tmp_path / k) for k in kinds] == [True, True, False]
    with pytest.raises(SourceError, match="nothing trained yet"):
        load_source(tmp_path / "job")
