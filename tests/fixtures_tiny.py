"""Tiny SFT fixtures for the training CLI, checkpoint and export tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures_hf import save_tiny_model_dir

_QUESTIONS = [
    ("How many users are older than 30?", "SELECT COUNT(*) FROM users WHERE age > 30;", "[3]"),
    ("List the names of all users.", "SELECT name FROM users;", '["a", "b"]'),
    ("What is the oldest age?", "SELECT MAX(age) FROM users;", "[44]"),
    ("Add user x aged 20.", "INSERT INTO users VALUES ('x', 20);", "[]"),
    ("Who is the youngest?", "SELECT name FROM users ORDER BY age LIMIT 1;", '["b"]'),
    ("Sum all ages.", "SELECT SUM(age) FROM users;", "[99]"),
]


def sft_records(n: int = 12) -> list[dict]:
    """Short two-turn agent conversations (tool observation in between), `messages` form."""
    out = []
    for i in range(n):
        q, sql, answer = _QUESTIONS[i % len(_QUESTIONS)]
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You are a SQL programmer."},
                    {"role": "user", "content": f"{q} ({i})"},
                    {"role": "assistant", "content": f"Action: Operation\n```sql\n{sql}\n```"},
                    {"role": "user", "content": answer},
                    {"role": "assistant", "content": f"Action: Answer\nFinal Answer: {answer}"},
                ]
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def make_sft_workspace(root: Path) -> tuple[Path, Path]:
    """`(model_dir, data.jsonl)`: a random-init tiny Llama + BPE tokenizer, and SFT data."""
    model = save_tiny_model_dir(root / "model", "llama", seed=0)
    data = write_jsonl(root / "data.jsonl", sft_records())
    return model, data


def sft_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """CLI args of a tiny, fast SFT run (float32, short rows) into `out`."""
    return [
        "sft",
        "--model", str(model),
        "--data", str(data),
        "--out", str(out),
        "--seq-len", "192",
        "--batch-size", "2",
        "--lora.rank", "4",
        "--optim.lr", "1e-2",
        "--optim.warmup-steps", "2",
        "--param-dtype", "float32",
        "--compute-dtype", "float32",
        "--no-progress",
        *extra,
    ]  # fmt: skip
