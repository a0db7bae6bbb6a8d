"""Cluster scripts: their --dry-run commands (Python and JAX versions, paths, gs:// mounts), and
`--mode jax` going through `jax.distributed.initialize()`'s own SLURM detection."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tools" / "launch_tpu_vm.sh"
SLURM = REPO / "tools" / "slurm_gpu.sbatch"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _dry_run(script: Path, *args: str, **env: str) -> list[list[str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "SLURM_"))}
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _remote(commands: list[list[str]]) -> list[str]:
    """The worker-side shell commands of the `gcloud ... ssh --worker=all` calls."""
    return [
        arg.removeprefix("--command=")
        for cmd in commands
        if cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
        for arg in cmd
        if arg.startswith("--command=")
    ]


def _jax_pin() -> str:
    (tpu,) = PYPROJECT["project"]["optional-dependencies"]["tpu"]
    name, version = tpu.split("==")
    assert name == "jax[tpu]"
    return version


def test_jax_pin_satisfies_the_dependency_and_python_the_requirement() -> None:
    from packaging.specifiers import SpecifierSet

    (jax_dep,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("jax")]
    assert _jax_pin() in SpecifierSet(jax_dep.removeprefix("jax")), (_jax_pin(), jax_dep)
    (cuda,) = PYPROJECT["project"]["optional-dependencies"]["cuda"]
    assert cuda == f"jax[cuda12]=={_jax_pin()}"
    assert "3.11" in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_tpu_setup_brings_python_and_pinned_jax() -> None:
    commands = _dry_run(
        TPU, "setup", TPU_NAME="cmat-7b", ZONE="us-west4-a", HF_REPO="meta-llama/Llama-2-7b-hf"
    )
    scp = next(c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    assert scp[5].endswith(".tar.gz") and scp[6] == "cmat-7b:/tmp/cmat_jax.tar.gz"
    assert "--zone=us-west4-a" in scp and "--worker=all" in scp
    install, download = _remote(commands)
    steps = [shlex.split(s) for s in install.removeprefix("set -e; ").split(" && ")]
    assert ["tar", "-xzf", "/tmp/cmat_jax.tar.gz", "-C", "~/cmat_jax"] in steps
    assert ["python3", "-m", "pip", "install", "-q", "--user", "-U", "uv"] in steps
    assert ["$HOME/.local/bin/uv", "python", "install", "3.11"] in steps
    assert ["$HOME/.local/bin/uv", "venv", "--allow-existing", "--python", "3.11", ".venv"] in steps
    pip = next(s for s in steps if s[1:3] == ["pip", "install"])
    assert pip[4:8] == ["--python", ".venv/bin/python", "-e", "."]
    assert f"jax[tpu]=={_jax_pin()}" in pip
    assert "~/cmat_jax/.venv/bin/hf download meta-llama/Llama-2-7b-hf" in download
    assert "--local-dir ~/models/Llama-2-7b-hf" in download


def test_tpu_run_mounts_gs_paths_and_uses_the_venv() -> None:
    commands = _dry_run(
        TPU,
        "run",
        "train",
        "sft",
        "--preset",
        "llama2-7b-v5e-8",
        "--data",
        "gs://my-bucket/data/agent.jsonl",
        "--out=gs://my-bucket/runs/sft one",
        TPU_NAME="cmat-7b",
        ZONE="us-west4-a",
        PROJECT="proj",
    )
    (remote,) = _remote(commands)
    assert "--project=proj" in commands[0]
    assert "gcsfuse --implicit-dirs my-bucket gcs/my-bucket" in remote
    assert remote.count("gcsfuse --implicit-dirs") == 1  # one mount per bucket
    launch = remote[remote.index("nohup ") :].split(" > ")[0]
    assert shlex.split(launch) == [
        "nohup", ".venv/bin/python", "-m", "cmat_jax.distributed", "--mode", "tpu",
        "train", "sft", "--preset", "llama2-7b-v5e-8", "--data", "gcs/my-bucket/data/agent.jsonl",
        "--out=gcs/my-bucket/runs/sft one",
    ]  # fmt: skip
    assert remote.startswith("cd ~/cmat_jax && mkdir -p logs && ")


def test_tpu_script_refuses_missing_settings() -> None:
    proc = subprocess.run(
        ["bash", str(TPU), "--dry-run", "run", "train"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: set TPU_NAME")


def test_slurm_dry_run_relies_on_jax_cluster_detection() -> None:
    (command,) = _dry_run(
        SLURM,
        MODEL="llama2-7b@/models/Llama-2-7b-chat-hf",
        DATA="data/agent.jsonl data/general.jsonl",
        EXTRA="--steps 5 --mesh.data -1",
        VENV="/opt/venv",
    )
    assert command == [
        "srun", "--kill-on-bad-exit=1", "--cpu-bind=none",
        "/opt/venv/bin/python", "-m", "cmat_jax.distributed", "--mode", "jax",
        "train", "sft", "--preset", "llama2-7b-h100x8", "--model",
        "llama2-7b@/models/Llama-2-7b-chat-hf", "--data", "data/agent.jsonl",
        "--data", "data/general.jsonl", "--out", "runs/llama2-7b-h100x8-local",
        "--steps", "5", "--mesh.data", "-1",
    ]  # fmt: skip


@pytest.mark.parametrize("slurm", [True, False], ids=["slurm-env", "no-cluster"])
def test_mode_jax_uses_jax_own_slurm_detection(slurm: bool, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    env["JAX_PLATFORMS"] = "cpu"
    if slurm:  # what srun sets for a one-task step
        env.update(
            SLURM_JOB_ID="4242",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="1",
            SLURM_PROCID="0",
            SLURM_LOCALID="0",
        )
    proc = subprocess.run(
        [sys.executable, "-m", "cmat_jax.distributed", "--mode", "jax", "evaluate", "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if slurm:
        assert proc.returncode == 0, proc.stderr
        assert "distributed: jax, 1 process(es)" in proc.stderr
    else:  # nothing for JAX to detect: one clear line, no traceback
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
