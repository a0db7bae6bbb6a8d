"""Shared fixtures for the data-pipeline tests (no tests here): real tokenizers trained in the
test (byte-level BPE + ChatML, sentencepiece BPE + Llama-2 template) and JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from cmat_jax.tokenizer import BUILTIN_TEMPLATES, Tokenizer

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "SELECT name FROM users WHERE age > 30;",
    "The quick brown fox jumps over the lazy dog.",
    "Action: Operation\n```sql\nSELECT * FROM t;\n```",
    'Action: Answer\nFinal Answer: ["42"]',
    "user assistant system tool Hello there! How can I help you today?",
    "Thought: I should look at the table first. Observation: [(1, 'a')]",
] * 20


def make_tokenizer(template: str = CHATML) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, like SmolLM2 / Qwen2) with a ChatML template."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(
        backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=template,
    )


def make_llama2_tokenizer(tmp: Path) -> Tokenizer:
    """A sentencepiece BPE `tokenizer.model` (Llama-2 style: BOS, dummy prefix) trained here,
    loaded from a model directory with the Llama-2 chat template."""
    model_dir = tmp / "llama2_tok"
    model_dir.mkdir()
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(model_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    cfg = {"add_bos_token": True, "chat_template": BUILTIN_TEMPLATES["llama2"]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return Tokenizer.from_dir(model_dir)


def write_jsonl(path: Path, records: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def messages_record(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def sharegpt_record(*turns: tuple[str, str], loss: tuple[bool | None, ...] | None = None) -> dict:
    conv = [{"from": f, "value": v} for f, v in turns]
    if loss is not None:
        for c, flag in zip(conv, loss, strict=True):
            if flag is not None:
                c["loss"] = flag
    return {"conversations": conv}


WORDS = [
    "select",
    "name",
    "from",
    "users",
    "where",
    "age",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
]


def sentence(rng: np.random.Generator, lo: int = 1, hi: int = 25) -> str:
    return " ".join(rng.choice(WORDS, rng.integers(lo, hi)))


def write_corpus(tmp: Path, n_agent: int = 120, n_general: int = 40) -> tuple[str, str]:
    """Two JSONL datasets of varied lengths: agent trajectories (messages form) and general
    instructions (ShareGPT form)."""
    rng = np.random.default_rng(0)
    agent = [
        messages_record(
            ("system", "You are a SQL agent."),
            ("user", sentence(rng)),
            ("assistant", "Action: Operation " + sentence(rng)),
            ("user", sentence(rng, 1, 5)),
            ("assistant", "Action: Answer " + sentence(rng, 1, 5)),
        )
        for _ in range(n_agent)
    ]
    general = [
        sharegpt_record(("human", sentence(rng)), ("gpt", sentence(rng, 1, 60)))
        for _ in range(n_general)
    ]
    return (
        str(write_jsonl(tmp / "agent.jsonl", agent)),
        str(write_jsonl(tmp / "general.jsonl", general)),
    )
