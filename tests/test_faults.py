"""Faults: a real `python -m cmat_jax.train cmat` SIGKILLed in every stage (agent tuning, a round's
rollouts, its update, the final evaluation) and resumed ends exactly where an uninterrupted run
does; a full disk or an unwritable run directory ends with one line and exit 2.

The kills come from the `CMAT_JAX_FAULT` hook (`cmat_jax.faults`): the process SIGKILLs itself
at a named point, so each kill lands in its stage on any machine speed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cmat_jax.faults import FAULT_ENV
from cmat_jax.run_dir import read_metrics
from cmat_jax.training.checkpoint import completed_steps
from tests.fixtures_hf import save_tiny_model_dir
from tests.os_fixtures import OS_DEV, OS_SCRIPTS, os_image  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent

# The tiny job of tests/test_cmat_loop.py, with short evaluations: agent tuning (3 steps), two
# rounds of 2 tasks x G=2 with Checker and memory, evaluation with and without the Checker.
CMAT_FLAGS = [
    "--param-dtype", "float32", "--compute-dtype", "float32",
    "--lora.rank", "4", "--lora.alpha", "8.0", "--lora.slots", "assistant", "checker",
    "--sft-steps", "3", "--sft-examples", "3", "--sft-batch-size", "4",
    "--rounds", "2", "--tasks-per-round", "2", "--group-size", "2", "--batch-size", "4",
    "--seq-len", "1024", "--sft-seq-len", "768", "--max-new-tokens", "12",
    "--train-max-rounds", "2", "--eval-tasks", "2", "--eval-max-new-tokens", "12",
    "--eval-max-rounds", "3", "--eval-max-context", "1025", "--min-batch", "4", "--max-batch", "4",
    "--dev-data", "",
    "--no-progress", "--no-drop-failed-groups", "--anchor-coef", "1.0", "--anchor-rows", "2",
]  # fmt: skip
TIMING = ("wall_s", "rollout_s", "train_s")  # key suffixes of wall-clock numbers


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=2048)


def _env(cache: Path, fault: str | None = None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    env.pop(FAULT_ENV, None)
    # The processes share compiled programs (an XLA cache hit runs the same program).
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    if fault:
        env[FAULT_ENV] = fault
    return env


def _cmat_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cmat_jax.train", "cmat", "--model", str(model),
            "--out", str(out), *CMAT_FLAGS, *extra]  # fmt: skip


def _run(cmd: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _strip(obj, run_dir: Path, timing: tuple[str, ...] = TIMING):
    """`obj` without wall-clock numbers and with the run directory's path replaced."""
    if isinstance(obj, dict):
        return {k: _strip(v, run_dir, timing) for k, v in obj.items() if not k.endswith(timing)}
    if isinstance(obj, list):
        return [_strip(v, run_dir, timing) for v in obj]
    if isinstance(obj, str):
        return obj.replace(str(run_dir), "DIR")
    return obj


def _jsonl(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _ltm_records(run: Path) -> list[tuple]:
    conn = sqlite3.connect(run / "ltm.sqlite")
    try:  # every column but the wall-clock time of the write
        return conn.execute(
            "SELECT id, task_family, task_id, task_text, trajectory_summary, reflection, reward,"
            " split FROM records ORDER BY id"
        ).fetchall()
    finally:
        conn.close()


def _adapters(run: Path) -> dict[str, np.ndarray]:
    import jax

    from cmat_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(run / "checkpoints", read_only=True)
    try:
        lora, _ = ckpt.restore_lora()
    finally:
        ckpt.close()
    flat, _ = jax.tree_util.tree_flatten_with_path(lora)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def _checkpoint_data(run: Path) -> dict:
    steps = completed_steps(run / "checkpoints")
    return json.loads((run / "checkpoints" / str(steps[-1]) / "data" / "metadata").read_text())


def test_cmat_sigkill_in_every_stage_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    cache = tmp_path / "xla_cache"
    ref, crash = tmp_path / "ref", tmp_path / "crash"
    with (tmp_path / "ref.log").open("w") as log:
        reference = subprocess.Popen(
            _cmat_cmd(tiny_model, ref), cwd=REPO, env=_env(cache), stdout=log, stderr=log
        )
    try:
        # Each process of the chain is killed inside the next stage; all but the first resume.
        chain = [
            ("agent_tuning/update_step:2", "agent tuning, after its 2nd optimizer step"),
            ("round2/rollout_step:2", "round 2's rollouts, after their 2nd lockstep step"),
            ("round2/update_step:1", "round 2's update, after its 1st optimizer step"),
            ("eval_cmat/episodes_written:1", "the final evaluation, one split written"),
        ]
        for i, (fault, where) in enumerate(chain):
            resume = ["--resume"] if i else []
            p = _run(_cmat_cmd(tiny_model, crash, *resume), _env(cache, fault))
            assert p.returncode == -signal.SIGKILL, (
                f"{where}: rc {p.returncode}\n{p.stderr[-3000:]}"
            )
            steps = completed_steps(crash / "checkpoints")
            if i == 0:
                # No checkpoint before agent tuning's evaluation; metrics of 2 steps were logged.
                assert steps == [] and [
                    m["step"] for m in read_metrics(crash / "metrics.jsonl")
                ] == [1, 2]
            elif i == 1:
                # Killed after round 1's checkpoint, with round 2's memory records already written.
                data = _checkpoint_data(crash)
                assert data["stage"] == "round" and data["round"] == 1
                assert len(_ltm_records(crash)) > data["ltm_records"]
                assert [r["round"] for r in _jsonl(crash / "rounds.jsonl")] == [1]
            elif i == 2:
                # Metrics of a step after the newest checkpoint were logged.
                assert read_metrics(crash / "metrics.jsonl")[-1]["step"] > steps[-1]
            else:
                assert _checkpoint_data(crash)["stage"] == "round"  # round 2 saved, eval not
                assert (crash / "eval" / "cmat" / "a" / "episodes.jsonl").is_file()
                assert not (crash / "results.json").exists()
        done = _run(_cmat_cmd(tiny_model, crash, "--resume"), _env(cache))
        assert done.returncode == 0, done.stderr[-3000:]
        assert reference.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    # Same adapters, bit for bit, and the same results, rounds, metrics, memory and episodes.
    a, b = _adapters(ref), _adapters(crash)
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    res_ref = _strip(json.loads((ref / "results.json").read_text()), ref)
    res_crash = _strip(json.loads((crash / "results.json").read_text()), crash)
    assert res_crash == res_ref
    assert _strip(_jsonl(crash / "rounds.jsonl"), crash) == _strip(
        _jsonl(ref / "rounds.jsonl"), ref
    )
    assert [r["round"] for r in _jsonl(ref / "rounds.jsonl")] == [1, 2]
    assert _strip(read_metrics(crash / "metrics.jsonl"), crash) == _strip(
        read_metrics(ref / "metrics.jsonl"), ref
    )
    assert _ltm_records(crash) == _ltm_records(ref) and _ltm_records(ref)
    for stage in ("agent_tuning", "cmat"):
        for split in ("a", "b"):
            e_ref = _jsonl(ref / "eval" / stage / split / "episodes.jsonl")
            assert _jsonl(crash / "eval" / stage / split / "episodes.jsonl") == e_ref and e_ref


def _eval_cmd(out: Path, *extra: str) -> list[str]:
    from tests.dbbench_data import DBBENCH_DEV

    return [sys.executable, "-m", "cmat_jax.evaluate", "--data", str(DBBENCH_DEV),
            "--out", str(out), "--no-progress", *extra]  # fmt: skip


# -- full and unwritable disks ----------------------------------------------------------------


def _mount(args: list[str], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    # Mounting needs root (or CAP_SYS_ADMIN), as on the CI runners.
    assert p.returncode == 0, f"cannot mount a test filesystem: {p.stderr.strip()}"


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], check=False)


_FILLER = "filler"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: a disk a test can fill (a tiny run's checkpoint is ~350 KiB). Its
    filler file is created now, while the disk is empty: how much a file costs a tmpfs
    (page or large-folio blocks) differs between kernels, and filling must not need a
    new inode or directory block once the run has written its files."""
    mnt = tmp_path / "disk"
    _mount(["-t", "tmpfs", "-o", "size=16m", "tmpfs"], mnt)
    (mnt / _FILLER).touch()
    try:
        yield mnt
    finally:
        _umount(mnt)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only bind mount of an empty directory (root ignores permission bits)."""
    src, mnt = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    _mount(["--bind", str(src)], mnt)
    try:
        p = subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], capture_output=True)
        assert p.returncode == 0, p.stderr
        yield mnt
    finally:
        _umount(mnt)


def _fill(disk: Path) -> Path:
    """Append to the disk's filler file until the disk is full; returns the file."""
    filler = disk / _FILLER
    with filler.open("ab") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == 28  # ENOSPC
    return filler


def _wait_stopped(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(
                f"exited (rc {proc.returncode}) before stopping:\n{log.read_text()[-3000:]}"
            )
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return
        time.sleep(0.05)
    pytest.fail("the process did not reach its stop point in time")


def test_disk_full_while_saving_a_checkpoint_exits_2_and_keeps_the_last_one(small_disk, tmp_path):
    from tests.fixtures_tiny import make_sft_workspace, sft_args

    model, data = make_sft_workspace(tmp_path / "ws")
    run = small_disk / "run"
    args = sft_args(model, data, run, "--steps", "12", "--checkpoint.every", "4",
                    "--checkpoint.keep", "1", "--log-every", "1")  # fmt: skip
    cmd = [sys.executable, "-m", "cmat_jax.train", *args]
    log = tmp_path / "sft.log"
    with log.open("w") as f:  # stops itself as it starts saving checkpoint 8
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(tmp_path / "xla", "checkpoint_save:2:stop"),
                                stdout=f, stderr=f)  # fmt: skip
    try:
        _wait_stopped(proc, log)
        assert completed_steps(run / "checkpoints") == [4]
        before = _adapters(run)
        filler = _fill(small_disk)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=300) == 2, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    errors = [x for x in text.splitlines() if x.startswith("error: ")]
    assert errors == [text.strip().splitlines()[-1]], text[-4000:]
    assert "Traceback" not in text, text[-4000:]
    assert errors[0] == (f"error: {run / 'checkpoints'}: saving checkpoint 8 failed: "
                   "No space left on device (newest complete checkpoint: 4)")  # fmt: skip
    # The last checkpoint is intact (keep=1 did not delete it for the failed one) and restores.
    assert completed_steps(run / "checkpoints") == [4]
    after = _adapters(run)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    # With space again the run resumes from it to the end.
    filler.unlink()
    p = _run([*cmd, "--resume"], _env(tmp_path / "xla"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert completed_steps(run / "checkpoints") == [12]
    assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == list(range(1, 13))


def test_disk_full_while_writing_metrics_is_one_line_naming_the_file(small_disk, capsys):
    from cmat_jax.cli import run_cli
    from cmat_jax.run_dir import MetricsLogger, RunDir

    run = RunDir(small_disk / "run")
    run.open({"job": "test"}, resume=False)
    logger = MetricsLogger(run)
    try:
        logger.log(1, {"loss": 1.0})
        _fill(small_disk)
        # A record longer than a page needs a block the full disk does not have.
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: logger.log(2, {f"metric_{i}": float(i) for i in range(400)}))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {run.metrics_path}: No space left on device"
    finally:
        with contextlib.suppress(OSError):
            logger.close()
    assert read_metrics(run.metrics_path)[0] == {"step": 1, "loss": 1.0}


def test_unwritable_run_directory_is_one_line_and_exit_2(read_only_dir, tiny_model, tmp_path):
    from tests.fixtures_tiny import make_sft_workspace, sft_args

    model, data = make_sft_workspace(tmp_path / "ws")
    cases = {
        "sft": [sys.executable, "-m", "cmat_jax.train",
                *sft_args(model, data, read_only_dir / "sft", "--steps", "2")],
        "cmat": _cmat_cmd(tiny_model, read_only_dir / "cmat"),
        "evaluate": _eval_cmd(read_only_dir / "evaluate", "--agent", "oracle", "--limit", "2"),
    }  # fmt: skip
    for name, cmd in cases.items():
        p = _run(cmd, _env(tmp_path / "xla"))
        lines = [x for x in p.stderr.splitlines() if x.strip()]
        assert p.returncode == 2, (name, p.stderr[-3000:])
        assert "Traceback" not in p.stderr, (name, p.stderr[-3000:])
        assert lines[-1].startswith(f"error: {read_only_dir / name}") and lines[-1].endswith(
            "Read-only file system"
        ), (name, lines[-1])
    assert not any(read_only_dir.iterdir())


# -- `python -m cmat_jax.evaluate --resume` --------------------------------------------------

# 3 items, one episode per chunk, two reflexion attempts: the first attempt's reflections are
# written to the evaluation's memory and read by the second.
MODEL_EVAL_FLAGS = [
    "--limit", "3", "--max-new-tokens", "8", "--max-rounds", "2", "--dtype", "float32",
    "--batch-size", "2", "--max-context", "1536", "--live-episodes", "1", "--reflexion-trials", "2",
]  # fmt: skip


def _model_eval_cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return _eval_cmd(out, "--model", str(model), *MODEL_EVAL_FLAGS, *extra)


def _results(out: Path) -> dict:
    return _strip(json.loads((out / "results.json").read_text()), out, (*TIMING, "per_minute"))


def _journal(out: Path) -> tuple[list[tuple[int, int]], list[str]]:
    """The (trial, chunk) pairs journaled in `out` and the task ids of its memory's records."""
    chunks = [(r["trial"], r["unit"]) for r in _jsonl(out / "journal.jsonl")[1:]]
    conn = sqlite3.connect(out / "journal_ltm.sqlite")
    try:
        ids = [x for (x,) in conn.execute("SELECT task_id FROM records ORDER BY id")]
    finally:
        conn.close()
    return chunks, ids


def test_evaluate_sigkill_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    from cmat_jax.evaluate import main

    cache = tmp_path / "xla_cache"
    ref, out = tmp_path / "ref", tmp_path / "out"
    r = _run(_model_eval_cmd(tiny_model, ref), _env(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    episodes = _jsonl(ref / "episodes.jsonl")
    assert [e["trial"] for e in episodes] == [1, 1, 1, 2, 2, 2]  # 6 chunks of one episode
    assert all(e["reflection"] for e in episodes[:3])  # the memory the 2nd attempt reads
    assert sorted(p.name for p in ref.iterdir()) == ["episodes.jsonl", "results.json"]

    # Killed as the 3rd chunk is journaled: its episode is in the memory, its line is not.
    r = _run(_model_eval_cmd(tiny_model, out), _env(cache, "eval_journal_append:3"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert _journal(out) == ([(0, 0), (0, 1)], ["dev-0", "dev-1", "dev-2"])
    assert not (out / "results.json").exists()
    with (out / "journal.jsonl").open("a") as f:
        f.write('{"trial": 0, "unit": 2, "lines": [{"ta')  # and a write torn by the kill

    args = [*_model_eval_cmd(tiny_model, out)[3:], "--resume"]
    with pytest.raises(FileExistsError, match="interrupted evaluation; pass --resume"):
        main(args[:-1])
    with pytest.raises(ValueError, match="--resume and --overwrite exclude each other"):
        main([*args, "--overwrite"])
    r = _run(_model_eval_cmd(tiny_model, out, "--resume", "--max-rounds", "3"), _env(cache))
    errors = [x for x in r.stderr.splitlines() if not x.startswith("warning: ")]  # data notes
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "--resume with different settings: max_rounds (2 -> 3)" in errors[0]

    # Resumed, and killed again as its 4th chunk is journaled: it ran only unfinished chunks,
    # and the memory holds one record per episode run (the cut-off chunk's was dropped).
    r = _run(_model_eval_cmd(tiny_model, out, "--resume"), _env(cache, "eval_journal_append:4"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    tasks = [e["task_id"] for e in episodes]
    assert _journal(out) == ([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)], tasks)

    # The last chunk is all that is left: a 2nd append would kill the process.
    r = _run(_model_eval_cmd(tiny_model, out, "--resume"), _env(cache, "eval_journal_append:2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "episodes.jsonl").read_bytes() == (ref / "episodes.jsonl").read_bytes()
    assert _results(out) == _results(ref)
    assert sorted(p.name for p in out.iterdir()) == ["episodes.jsonl", "results.json"]
    with pytest.raises(FileExistsError, match=r"results\.json exists; pass --overwrite"):
        main(args)


@pytest.mark.usefixtures("os_image")
def test_os_evaluate_sigkill_resumes_to_the_uninterrupted_result(tiny_model, tmp_path):
    # The OS task's evaluation runs through the same chunk loop, so the same journal resumes it.
    cache = tmp_path / "xla_cache"
    flags = ["--task", "os", "--data", str(OS_DEV), "--script-dir", str(OS_SCRIPTS),
             "--model", str(tiny_model), "--limit", "3", "--max-new-tokens", "8",
             "--max-rounds", "2", "--dtype", "float32", "--batch-size", "2",
             "--max-context", "1536", "--live-episodes", "1", "--no-progress"]  # fmt: skip

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "cmat_jax.evaluate", *flags, "--out", str(out), *extra]

    ref, out = tmp_path / "ref", tmp_path / "out"
    r = _run(cmd(ref), _env(cache))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_jsonl(ref / "episodes.jsonl")) == 3
    r = _run(cmd(out), _env(cache, "eval_journal_append:2"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert [(x["trial"], x["unit"]) for x in _jsonl(out / "journal.jsonl")[1:]] == [(0, 0)]
    # The finished chunk is taken from the journal: a 3rd append would kill the process.
    r = _run(cmd(out, "--resume"), _env(cache, "eval_journal_append:3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "episodes.jsonl").read_bytes() == (ref / "episodes.jsonl").read_bytes()
    assert _results(out) == _results(ref)
