"""``python -m cmat_jax.evaluate --task os``: on the 26 AgentBench OS dev problems the oracle
scores 1.0 and the null agent 0.0, per label too, with every episode saved."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cmat_jax.evaluate import main
from tests.os_fixtures import OS_DEV, OS_SCRIPTS, os_image  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("os_image")


@pytest.mark.parametrize("agent, want", [("oracle", 1.0), ("null", 0.0)])
def test_dev_split_oracle_and_null(tmp_path, agent, want):
    out = tmp_path / agent
    args = [
        "--task",
        "os",
        "--agent",
        agent,
        "--data",
        str(OS_DEV),
        "--script-dir",
        str(OS_SCRIPTS),
    ]
    res = main([*args, "--out", str(out), "--no-progress"])
    assert res["n"] == 26 and res["accuracy"] == want and res["passed"] == 26 * want
    assert set(res["label_accuracy"].values()) == {want}
    assert res["label_counts"]["file"] == 14 and res["label_counts"]["user"] == 8
    saved = json.loads((out / "results.json").read_text())
    assert saved["accuracy"] == want and saved["round_limit"] == 8
    lines = [json.loads(x) for x in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == 26 and {tr["family"] for tr in lines} == {"os"}
    assert all(tr["reward"] == want and tr["output"]["correct"] == bool(want) for tr in lines)
    statuses = {tr["status"] for tr in lines}
    assert statuses == ({"completed"} if want else {"agent_validation_failed"})


def test_bad_problem_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"description": "d", "evaluation": {"check": [None]}}]))
    cmd = "from cmat_jax.cli import run_cli; from cmat_jax.evaluate import main; run_cli(main)"
    args = ["--task", "os", "--agent", "null", "--data", str(bad), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-c", cmd, *args, "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {bad}: problem 0.evaluation.example: a null check script needs an example"
    )
    assert not (tmp_path / "out").exists()
