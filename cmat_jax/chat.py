"""Interactive chat with streaming output: `python -m cmat_jax.chat --model M`.

M is a training run directory (its base plus the adapters of its newest checkpoint, or
`--step`; the reply comes from `--slot`, default the slot the run trained), a preset, an HF
directory or a GGUF file. Reads one user message per line from stdin (so it can be driven by a
pipe), renders the conversation with the model's chat template, and prints the reply as tokens
arrive (decoded in small chunks). `/reset` clears the history, `/quit` (or end of input) exits.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from typing import Annotated, Any, TextIO

import jax

from cmat_jax.cli import AttentionImpl, Dtype, NonNegFloat, NonNegInt, PosInt, Range, parse, run_cli
from cmat_jax.inference.generate import Generator, SamplingParams
from cmat_jax.inference.prefix_cache import PrefixCache


@dataclasses.dataclass(frozen=True)
class ChatArgs:
    """Chat with a model in the terminal (or through a pipe)."""

    model: str = "smollm2-135m-instruct"
    """A training run directory, a preset, an HF directory or a .gguf file."""
    slot: str | None = None
    """LoRA slot to chat with (default: the slot a run trained; "none" = the base model)."""
    step: NonNegInt | None = None
    """With a run directory: the checkpoint step to load (default: the newest)."""
    dtype: Dtype | None = None
    """Parameter and compute dtype (default: a run's param_dtype, else bfloat16)."""
    attention_impl: AttentionImpl | None = None
    """Prefill attention kernel (default: a run's, else auto)."""
    system: str | None = None
    """System prompt (default: the chat template's own, if any)."""
    max_new_tokens: PosInt = 256
    """Token cap of one reply."""
    temperature: NonNegFloat = 0.0
    """Sampling temperature; 0 = greedy."""
    top_k: NonNegInt = 0
    """Sample from the k most likely tokens (0 = all)."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    seed: int = 0
    """Seeds sampling."""
    chunk_steps: PosInt = 4
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
    slot = args.slot or "none"
    gen._adapter_ids([slot], 1)  # validate the slot name before the first turn
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
            adapter_ids=[slot],
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


def main(argv: Sequence[str] | None = None) -> None:
    from cmat_jax.run_loader import load_source

    args = parse(
        ChatArgs, argv, prog="python -m cmat_jax.chat", description=__doc__.splitlines()[0]
    )
    lm = load_source(args.model, args.step, dtype=args.dtype, attention_impl=args.attention_impl)
    chat(dataclasses.replace(args, slot=lm.slot(args.slot)), lm.model, lm.tokenizer)


if __name__ == "__main__":
    run_cli(main)
