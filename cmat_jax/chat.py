"""Interactive chat with streaming output: `python -m cmat_jax.chat --model M`.

Reads one user message per line from stdin (so it can be driven by a pipe), renders the
conversation with the model's chat template, and prints the reply as tokens arrive (decoded
in small chunks). `/reset` clears the history, `/quit` (or end of input) exits.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, TextIO

import jax
import tyro

from cmat_jax.cli import run_cli
from cmat_jax.inference.generate import Generator, SamplingParams
from cmat_jax.inference.prefix_cache import PrefixCache


@dataclasses.dataclass(frozen=True)
class ChatArgs:
    model: str = "smollm2-135m-instruct"
    """Anything `load_model` takes: an HF dir, a .gguf file or a preset name."""
    dtype: str = "bfloat16"
    """Parameter and compute dtype."""
    system: str | None = None
    """System prompt (default: the chat template's own, if any)."""
    adapter: str = "none"
    """LoRA slot to chat with ("none" = the base model)."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    chunk_steps: int = 4
    """Decode steps between prints (smaller = smoother streaming, a little slower)."""


class _StreamPrinter:
    """Prints the new text of a growing token list; holds back an incomplete UTF-8 tail."""

    def __init__(self, tokenizer: Any, out: TextIO, eos_ids: frozenset[int]):
        self.tok, self.out, self.eos_ids = tokenizer, out, eos_ids
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, new_tokens: list[int]) -> None:
        self.ids.extend(t for t in new_tokens if t not in self.eos_ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def chat(
    args: ChatArgs,
    model: Any,
    tokenizer: Any,
    inp: TextIO = sys.stdin,
    out: TextIO = sys.stdout,
) -> list[dict[str, str]]:
    """The chat loop; returns the final history (for tests and scripting)."""
    gen = Generator(model, tokenizer)
    prefix = PrefixCache(max_calls=1)  # each turn prefills only what the last one added
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    gen._adapter_ids([args.adapter], 1)  # validate the slot name before the first turn
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    key = jax.random.key(args.seed)
    interactive = inp.isatty()
    turn = 0
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line or line.strip() == "/quit":
            break
        message = line.rstrip("\n")
        if message.strip() == "/reset":
            history = list(base)
            prefix.clear()
            out.write("[history cleared]\n")
            out.flush()
            continue
        if not message.strip():
            continue
        history.append({"role": "user", "content": message})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        printer = _StreamPrinter(tokenizer, out, tokenizer.eos_ids)
        result = gen.generate(
            [prompt],
            max_new_tokens=args.max_new_tokens,
            sampling=sampling,
            key=jax.random.fold_in(key, turn),
            adapter_ids=[args.adapter],
            stream=printer,
            chunk_steps=args.chunk_steps,
            prefix_cache=prefix,
        )
        reply = result.texts[0]
        out.write(reply[printer.printed :] + "\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
        turn += 1
    return history


def main(argv: list[str] | None = None) -> None:
    args = tyro.cli(ChatArgs, args=argv, description=__doc__.splitlines()[0])

    def run() -> None:
        from cmat_jax import load_model

        model, tokenizer = load_model(args.model, args.dtype)
        chat(args, model, tokenizer)

    run_cli(run)


if __name__ == "__main__":
    main()
