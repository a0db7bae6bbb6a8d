"""Every CLI's bad input, run as a user runs it (a subprocess): one line on stderr naming the
flag, field, file or line, exit code 2, no traceback, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_hf import save_tiny_model_dir
from tests.fixtures_run import save_tiny_run_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model_dir(root / "model")
    save_tiny_run_dir(root / "run", model, ("assistant", "checker"), "assistant")
    save_tiny_model_dir(root / "small_vocab", vocab_size=200)  # tokenizer keeps ~259+ ids
    task = {"description": "How many?", "label": ["1"], "type": ["counting"],
            "table": {"table_name": "t", "table_info": {"columns": [{"name": "a"}], "rows": [["1"]]}}}  # fmt: skip
    (root / "tasks.jsonl").write_text(json.dumps(task) + "\n")
    (root / "bad_json.jsonl").write_text(json.dumps(task) + "\n{not json\n")
    (root / "no_label.jsonl").write_text(
        json.dumps({k: v for k, v in task.items() if k != "label"})
    )
    (root / "bad.json").write_text('{\n  "limit": 3,\n  oops\n}\n')
    (root / "bad.yaml").write_text("limit: 3\nmax_rounds: [1,\n")
    (root / "unknown.yaml").write_text("limt: 3\n")
    (root / "wrong_type.json").write_text('{"max_rounds": "many"}')
    (root / "a_file").write_text("x")
    (root / "done").mkdir()
    (root / "done" / "results.json").write_text("{}")
    (root / "exists").mkdir()
    return root


def _run(module: str, argv: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


# (module, argv with {root} for the fixture dir, a fragment the message must contain)
CASES = [
    ("evaluate", ["--data", "{root}/tasks.jsonl", "--limit", "-1"], "--limit must be >= 1, got -1"),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--statement-time-limit-s", "-1"],
        "--statement-time-limit-s must be > 0",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--max-rounds", "-3"],
        "--max-rounds must be >= 1",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--statement-time-limit-s", "nan"],
        "--statement-time-limit-s must be a finite number",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--agent", "smart"],
        "'smart' for argument '--agent'",
    ),
    ("evaluate", ["--data", "{root}/tasks.jsonl", "--limit", "many"], "--limit"),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--dtype", "float7"],
        "'float7' for argument '--dtype'",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--mysql-port", "70000"],
        "--mysql-port must be <= 65535",
    ),
    ("evaluate", ["--data", "{root}/nope.jsonl", "--agent", "null"], "nope.jsonl: no such file"),
    (
        "evaluate",
        ["--data", "{root}/bad_json.jsonl", "--agent", "null"],
        "bad_json.jsonl:2: invalid JSON",
    ),
    ("evaluate", ["--data", "{root}/no_label.jsonl", "--agent", "null"], "missing field 'label'"),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--model", "{root}/missing_model"],
        "missing_model",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--model", "smollm3"],
        "unknown model source 'smollm3'",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--model", "{root}/small_vocab"],
        "tokenizer and model do not match",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--model", "{root}/run", "--slot", "user"],
        "--slot: 'user' is not an adapter slot",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--model", "{root}/run", "--step", "99"],
        "no checkpoint for step 99",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--agent", "oracle", "--checker"],
        "--checker only applies to --agent model",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--agent", "null", "--out", "{root}/a_file"],
        "exists and is not a directory",
    ),
    (
        "evaluate",
        ["--data", "{root}/tasks.jsonl", "--agent", "null", "--out", "{root}/done"],
        "pass --overwrite",
    ),
    ("evaluate", ["--config", "{root}/missing.yaml"], "--config:"),
    ("evaluate", ["--config", "{root}/bad.json"], "bad.json:3: invalid JSON"),
    ("evaluate", ["--config", "{root}/bad.yaml"], "bad.yaml:"),
    ("evaluate", ["--config", "{root}/unknown.yaml"], "unknown.yaml: unknown field 'limt'"),
    ("evaluate", ["--config", "{root}/wrong_type.json"], "wrong_type.json: field 'max_rounds'"),
    ("chat", ["--dtype", "float7"], "'float7' for argument '--dtype'"),
    (
        "chat",
        ["--model", "{root}/run", "--slot", "critic"],
        "--slot: 'critic' is not an adapter slot",
    ),
    ("chat", ["--temperature", "-1"], "--temperature must be >= 0"),
    ("chat", ["--top-p", "0"], "--top-p must be > 0"),
    ("chat", ["--model", "{root}/missing_model"], "missing_model"),
    ("export", ["--model", "{root}/run", "--out", "{root}/exists"], "already exists"),
    ("export", ["--model", "{root}/model", "--out", "{root}/x1"], "needs a training run directory"),
    (
        "export",
        ["--model", "{root}/run", "--out", "{root}/x2", "--slot", "none"],
        "'none' is the base model and has no adapter",
    ),
    (
        "export",
        ["--model", "{root}/run", "--out", "{root}/x3", "--format", "zip"],
        "'zip' for argument '--format'",
    ),
    ("export", ["--model", "{root}/run"], "--out"),
    (
        "train",
        ["sft", "--data", "{root}/tasks.jsonl", "--out", "{root}/t1", "--optim.lr", "nan"],
        "--optim.lr must be a finite number",
    ),
    ("train", ["cmat", "--out", "{root}/t2", "--lr", "nan"], "--lr must be a finite number"),
    (
        "train",
        ["cmat", "--out", "{root}/t3", "--config", "{root}/unknown.yaml"],
        "unknown field 'limt'",
    ),
]


@pytest.mark.parametrize(
    ("module", "argv", "fragment"), CASES, ids=[" ".join(c[1])[:60] for c in CASES]
)
def test_bad_input_is_one_line_exit_2(files, module, argv, fragment):
    argv = [a.format(root=files) for a in argv]
    if module == "evaluate" and "--out" not in argv and "--config" not in argv:
        argv += ["--out", str(files / "eval_out")]
    before = sorted(p.name for p in files.iterdir())
    proc = _run(f"cmat_jax.{module}", argv, cwd=files)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert fragment in lines[0], lines[0]
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written
    print(f"{module} {' '.join(argv)}\n  -> {lines[0]}")


def test_chat_takes_a_run_directory(files):
    """`chat --model RUN_DIR` (issue: "config.json: field 'model_type' is None")."""
    argv = ["--model", str(files / "run"), "--max-new-tokens", "4", "--slot", "checker"]
    proc = _run("cmat_jax.chat", argv, cwd=files, stdin="hi\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.endswith("\n") and len(proc.stdout) > 1


@pytest.mark.parametrize(
    ("module", "kind_path"),
    [
        ("evaluate", "cmat_jax.evaluate:EvalConfig"),
        ("chat", "cmat_jax.chat:ChatArgs"),
        ("export", "cmat_jax.export:ExportArgs"),
        ("train sft", "cmat_jax.train:SFTJob"),
        ("train cmat", "cmat_jax.cmat.job:CMATJob"),
    ],
)
def test_help_documents_every_flag(module, kind_path, capsys):
    import dataclasses
    import importlib

    from cmat_jax.cli import parse
    from tests.test_train_cli import _field_docs

    mod_name, cls_name = kind_path.split(":")
    kind = getattr(importlib.import_module(mod_name), cls_name)
    with pytest.raises(SystemExit) as e:
        parse(kind, ["--help"], prog=module)
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    docs = _field_docs(kind)
    for f in dataclasses.fields(kind):
        assert f.name in docs, f"{kind.__name__}.{f.name} has no help text"
        flag = "--" + f.name.replace("_", "-")
        assert flag in text and " ".join(docs[f.name].split())[:25] in text, flag
    assert "--config" in text
