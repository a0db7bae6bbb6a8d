"""Shared fixtures for the data-pipeline tests: a real byte-level BPE trained here, with a
ChatML template, behind the `Tokenizer` interface (no tests in this module)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

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
    "Action: Answer\nFinal Answer: [\"42\"]",
    "user assistant system tool Hello there! How can I help you today?",
    "Thought: I should look at the table first. Observation: [(1, 'a')]",
] * 20


class ChatMLTokenizer:
    """Stand-in with the `cmat_jax.tokenizer.Tokenizer` interface over a real HF tokenizer."""

    def __init__(self, tok: HFTokenizer, template: str = CHATML):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos_id = None
        self.eos_id = tok.token_to_id("<|im_end|>")
        self.pad_id = tok.token_to_id("<|endoftext|>")
        self.eos_ids = frozenset({self.eos_id, self.pad_id})
        self.chat_template = template
        self.add_bos = False
        self._template = jinja2.Environment().from_string(template)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=False, **kw):
        text = self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **kw
        )
        return self.encode(text) if tokenize else text


def make_tokenizer(template: str = CHATML) -> ChatMLTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return ChatMLTokenizer(tok, template)


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
