"""`python -m cmat_jax.train`: crash-resume with a real SIGKILL, run dirs, presets, CLI errors."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cmat_jax import train
from cmat_jax.cli import run_cli
from cmat_jax.run_dir import read_metrics
from cmat_jax.training.checkpoint import CheckpointConfig, completed_steps
from tests.fixtures_tiny import make_sft_workspace, sft_args, sft_records, write_jsonl

REPO = Path(__file__).resolve().parent.parent
STEPS = 20


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_sft_workspace(tmp_path_factory.mktemp("sft"))


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one CPU device, as in an ordinary run
    return env


def _popen(args: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cmat_jax.train", *args]
    with log.open("w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cmat_jax.train", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _restore_lora(run: Path, step: int) -> dict[str, np.ndarray]:
    import jax

    from cmat_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    try:
        lora, meta = ckpt.restore_lora(step=step)
        assert meta["step"] == step
    finally:
        ckpt.close()
    flat, _ = jax.tree_util.tree_flatten_with_path(lora)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _kill_after_checkpoint(proc: subprocess.Popen, run: Path, step: int, log: Path) -> None:
    """Let `proc` run in short slices (SIGCONT/SIGSTOP) until checkpoint `step` is complete, then
    SIGKILL it: the slices make sure the kill lands before the run can finish."""
    deadline = time.monotonic() + 240
    stopped = False
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(
                    f"run exited (rc {proc.returncode}) before checkpoint {step}:\n"
                    + log.read_text()[-3000:]
                )
            metrics = read_metrics(run / "metrics.jsonl")
            near = bool(metrics) and metrics[-1]["step"] >= step - 2
            if near:
                os.kill(proc.pid, signal.SIGSTOP)
                stopped = True
                if step in completed_steps(run / "checkpoints"):
                    return
            os.kill(proc.pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.02 if near else 0.2)
        pytest.fail(f"checkpoint {step} did not appear in time:\n" + log.read_text()[-3000:])
    finally:
        if stopped or proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def test_crash_resume_matches_uninterrupted_run(workspace, tmp_path):
    model, data = workspace
    common = ["--steps", str(STEPS), "--checkpoint.every", "5", "--checkpoint.keep", "2"]
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    full = _popen(sft_args(model, data, full_dir, *common), tmp_path / "full.log")
    crash_log = tmp_path / "crash.log"
    crash = _popen(sft_args(model, data, crash_dir, *common), crash_log)
    _kill_after_checkpoint(crash, crash_dir, 10, crash_log)
    assert crash.returncode == -signal.SIGKILL
    done_before = completed_steps(crash_dir / "checkpoints")
    assert 10 in done_before and STEPS not in done_before
    assert read_metrics(crash_dir / "metrics.jsonl")[-1]["step"] < STEPS

    # Resuming without --resume is refused; with it the run continues to the end.
    refused = _run(sft_args(model, data, crash_dir, *common))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = _run(sft_args(model, data, crash_dir, *common, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-3000:]

    full_log = read_metrics(full_dir / "metrics.jsonl")
    crash_log_records = read_metrics(crash_dir / "metrics.jsonl")
    assert [r["step"] for r in full_log] == list(range(1, STEPS + 1))
    # Throughput metrics are wall-clock; every other metric of every step matches bit for bit.
    timing = {"mfu", "tflops_per_device", "tokens_per_second"}
    assert all(0 < r["mfu"] < 1 and r["tokens_per_second"] > 0 for r in full_log[1:])
    strip = lambda log: [{k: v for k, v in r.items() if k not in timing} for r in log]
    assert strip(crash_log_records) == strip(full_log)
    assert full_log[-1]["loss"] < full_log[0]["loss"]  # it trained

    assert completed_steps(crash_dir / "checkpoints") == [15, 20]  # keep=2
    a, b = _restore_lora(full_dir, STEPS), _restore_lora(crash_dir, STEPS)
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "'b'" in k)  # B moved off zero

    cfg = json.loads((crash_dir / "config.json").read_text())
    assert cfg["model"] == str(model.resolve()) and cfg["steps"] == STEPS
    assert list((crash_dir / "tb").glob("events.out.tfevents.*"))


def test_malformed_jsonl_exits_2_naming_file_and_line(workspace, tmp_path):
    model, _ = workspace
    bad = write_jsonl(tmp_path / "bad.jsonl", sft_records(2))
    with bad.open("a") as f:
        f.write('{"messages": [ {"role": "user"\n')
    out = tmp_path / "run"
    # Through a preset too: presets must resolve when run as `python -m cmat_jax.train`.
    proc = _run([*sft_args(model, bad, out, "--steps", "2"), "--preset", "smollm2-sft-demo"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and f"{bad}:3" in lines[-1]
    assert not out.exists()  # nothing created for a run that never started


def _cli_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    return err


def test_existing_run_dir_is_refused_and_config_mismatch_on_resume(workspace, tmp_path, capsys):
    model, data = workspace
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(train.resolved_config(train.SFTJob(
        model=str(model), data=(str(data),), out=str(run), steps=20))))  # fmt: skip
    (run / "keep.txt").write_text("user data")
    err = _cli_error(sft_args(model, data, run, "--steps", "20"), capsys)
    assert str(run) in err and "already exists" in err and "--resume" in err
    err = _cli_error(sft_args(model, data, run, "--steps", "20", "--resume"), capsys)
    assert "cannot resume with a different config" in err and "lora.rank" in err
    assert (run / "keep.txt").read_text() == "user data"


def test_unknown_preset_and_subcommand(capsys):
    err = _cli_error(["sft", "--preset", "nope"], capsys)
    assert "unknown preset 'nope'" in err and "smollm2-sft-demo" in err
    err = _cli_error(["fly"], capsys)
    assert "unknown subcommand 'fly'" in err and "sft" in err


def test_preset_sets_defaults_and_flags_override():
    job = train.preset_default(train.SFTJob, ["--preset", "smollm2-sft-demo"])
    assert job.preset == "smollm2-sft-demo" and job.steps == 20 and job.lora.rank == 8
    assert Path(job.data[0]).is_file()
    import tyro

    parsed = tyro.cli(train.SFTJob, args=["--steps", "3", "--mix", ""], default=job)
    assert parsed.steps == 3 and parsed.lora.rank == 8 and parsed.data == job.data


def test_data_mix_and_overlong_pass_through():
    job = train.SFTJob(data=("a.jsonl", "b.jsonl"), mix="0.8,0.2", overlong="error", seq_len=64)
    cfg = job.data_config()
    assert cfg.paths == ("a.jsonl", "b.jsonl") and cfg.mix == (0.8, 0.2)
    assert cfg.overlong == "error" and cfg.seq_len == 64 and cfg.global_batch == job.batch_size
    with pytest.raises(ValueError, match="--mix"):
        train.SFTJob(data=("a",), mix="0.8;0.2").data_config()
    import tyro

    parsed = tyro.cli(train.SFTJob, args=["--data", "x.jsonl", "--data", "y.jsonl"])
    assert parsed.data == ("x.jsonl", "y.jsonl")


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def test_help_documents_every_field(capsys):
    from cmat_jax.model.lora import LoRAConfig
    from cmat_jax.sharding import MeshConfig
    from cmat_jax.training.step import OptimConfig

    # The CLI mirrors stay complete.
    for mirror, real in [
        (train.LoRAArgs, LoRAConfig),
        (train.OptimArgs, OptimConfig),
        (train.MeshArgs, MeshConfig),
    ]:
        assert [f.name for f in dataclasses.fields(mirror)] == [
            f.name for f in dataclasses.fields(real)
        ]
        assert mirror().build() == real()
    with pytest.raises(SystemExit) as e:
        train.main(["sft", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    nested = {
        "lora": train.LoRAArgs,
        "optim": train.OptimArgs,
        "mesh": train.MeshArgs,
        "checkpoint": CheckpointConfig,
    }
    for cls, prefix in [(train.SFTJob, ""), *[(c, p + ".") for p, c in nested.items()]]:
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name in nested and cls is train.SFTJob:
                continue
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            flag = "--" + prefix + f.name.replace("_", "-")
            assert flag in text, flag
            assert " ".join(docs[f.name].split())[:30] in text, f"{flag} help missing"


def test_run_dir_metrics_truncate_and_resumable_fields(tmp_path):
    from cmat_jax.run_dir import MetricsLogger, RunDir, config_differences, truncate_metrics

    rd = RunDir(tmp_path / "run")
    assert rd.open({"steps": 5, "log_every": 1, "lora": {"rank": 4}}, resume=False) is False
    log = MetricsLogger(rd)
    for s in range(1, 5):
        log.log(s, {"loss": 1.0 / s, "grad_norm": float("nan"), "tokens": 10})
    log.close()
    with rd.metrics_path.open("a") as f:
        f.write('{"step": 5, "lo')  # torn by a crash mid-write
    truncate_metrics(rd.metrics_path, 2)
    assert read_metrics(rd.metrics_path) == [
        {"step": 1, "loss": 1.0, "grad_norm": None, "tokens": 10},
        {"step": 2, "loss": 0.5, "grad_norm": None, "tokens": 10},
    ]
    assert list(rd.tb_dir.glob("events.out.tfevents.*"))
    old = {"steps": 5, "log_every": 1, "checkpoint": {"every": 10, "keep": 2}, "lora": {"r": 4}}
    new = {"steps": 6, "log_every": 5, "checkpoint": {"every": 3, "keep": 2}, "lora": {"r": 8}}
    assert config_differences(old, new) == ["lora.r", "steps"]
    assert rd.open({"steps": 5, "log_every": 9, "lora": {"rank": 4}}, resume=True) is True
    assert json.loads(rd.config_path.read_text())["log_every"] == 9
