"""The user's path: build the wheel, install it into a fresh venv, run each console script from a
directory outside the checkout (presets and their data must come from the installed package).

The venv gets the running environment's packages through a .pth line (so nothing is downloaded)
and the wheel is installed with --no-deps; only `cmat_jax` itself comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from cmat_jax.envs.dbbench_synth import write_tasks_jsonl
from tests.fixtures_hf import save_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("cmat-train", "cmat-evaluate", "cmat-chat", "cmat-export", "cmat-sandbox")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    # Build from a copy of the sources, so the checkout gets no build/ or *.egg-info.
    src = root / "src"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".*_cache", "tests"
        ),
    )
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(dist), str(src)])  # fmt: skip
    (wheel,) = dist.glob("cmat_jax-*.whl")

    env_dir = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    python = env_dir / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    shared = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site.stdout.strip()) / "_running_env.pth").write_text("\n".join(shared) + "\n")
    # --ignore-installed: the running environment (seen through the .pth) may hold an editable
    # cmat-jax of the same version; pip must neither skip the wheel nor touch that install.
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--ignore-installed", str(wheel)])  # fmt: skip
    return env_dir


def _user_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CMAT_JAX_CONFIGS")}
    return {**env, "JAX_PLATFORMS": "cpu"}


def test_console_scripts_and_presets_come_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    bin_dir, env = venv / "bin", _user_env()
    for script in SCRIPTS:
        out = _run([str(bin_dir / script), "--help"], cwd=tmp_path, env=env).stdout
        assert "usage" in out.lower(), (script, out)
    probe = (
        "import cmat_jax, cmat_jax_kernels.common as k; from cmat_jax.train import configs_dir;"
        "print(cmat_jax.__file__); print(k.__file__); print(configs_dir())"
    )
    lines = _run([str(bin_dir / "python"), "-c", probe], cwd=tmp_path, env=env).stdout.split()
    for line in lines:
        assert Path(line).resolve().is_relative_to(venv.resolve()), lines
    assert (Path(lines[2]) / "data" / "sft_demo.jsonl").is_file()


def test_tiny_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    bin_dir, env = venv / "bin", _user_env()
    model = save_tiny_model_dir(tmp_path / "tiny")
    # SFT from the shipped demo preset (its data file is inside the installed package).
    _run([str(bin_dir / "cmat-train"), "sft", "--preset", "smollm2-sft-demo", "--model",
          str(model), "--steps", "2", "--batch-size", "2", "--out", "run", "--no-progress"],
         cwd=tmp_path, env=env)  # fmt: skip
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (data,) = config["data"]
    assert Path(data).resolve().is_relative_to(venv.resolve()), data
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1

    _run([str(bin_dir / "cmat-export"), "--run", "run", "--out", "adapter"],
         cwd=tmp_path, env=env)  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    write_tasks_jsonl(tmp_path / "tasks.jsonl", 3, seed=0)
    _run([str(bin_dir / "cmat-evaluate"), "--data", "tasks.jsonl", "--out", "eval",
          "--agent", "oracle"], cwd=tmp_path, env=env)  # fmt: skip
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["n"] == 3 and results["episodes"] == 3

    chat = [str(bin_dir / "cmat-chat"), "--model", str(model), "--dtype", "float32",
            "--max-new-tokens", "4"]  # fmt: skip
    proc = _run(chat, cwd=tmp_path, env=env, input="hello\n")
    assert proc.stdout.strip(), proc.stdout


def test_repo_kernels_dir_does_not_shadow_an_installed_kernels_package() -> None:
    # From the repository root (first on sys.path), `import kernels` must not find kernels/:
    # it is a directory without __init__.py, so any installed `kernels` package wins.
    probe = "import kernels; print(getattr(kernels, '__file__', None) or 'namespace')"
    out = _run([sys.executable, "-c", probe], cwd=REPO, env=_user_env()).stdout.strip()
    assert out == "namespace" or not Path(out).resolve().is_relative_to(REPO / "kernels"), out
