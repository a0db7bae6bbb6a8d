"""Chat-template tokenization with assistant-only loss masks.

How the assistant spans are found: the template is rendered for growing prefixes of the
conversation. For assistant message i, `render(msgs[:i], add_generation_prompt=True)` ends
where the model starts generating and `render(msgs[:i+1])` ends after its turn; both must be
prefixes of the full render (else the template rewrites history and we refuse, naming the
turn). The full render is tokenized once; the pieces between boundaries are tokenized too, and when
their concatenation equals the full tokenization (the usual case: boundaries sit at special
tokens or newlines) the boundaries are known. Otherwise each boundary's token index is the
length of the prefix's tokenization, checked to be a prefix of the full token list. If a BPE
merge crosses a boundary, the pieces' own tokenizations are used instead (what inference does:
prompt tokens, then generated tokens), after checking that each piece round-trips.

Loss mask: True from the first generated token through the turn's last end-of-turn token
(an id in `eos_ids`) — what the model must learn to emit; template text after it (e.g. the
newline after `<|im_end|>`) is not trained. Without an end-of-turn id in the span the whole
span is trained.

Tokens are `encode(render, add_bos=False)`, exactly `apply_chat_template(tokenize=True)`:
templates write BOS themselves, as in transformers, so training matches inference prompts.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from cmat_jax.data.conversation import Conversation
from cmat_jax.data.errors import DataError

Overlong = Literal["truncate", "error"]


class ChatTokenizer(Protocol):
    """The part of `cmat_jax.tokenizer.Tokenizer` this module uses."""

    eos_ids: frozenset[int]

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def apply_chat_template(
        self, messages, *, add_generation_prompt: bool = False, tokenize: bool = False, **kw
    ) -> str | list[int]: ...


@dataclass(frozen=True)
class TokenizedExample:
    tokens: np.ndarray  # int32[n]
    loss_mask: np.ndarray  # bool[n]: token n is trained (predicted from tokens[:n])
    weights: np.ndarray  # float32[n]: per-message weight on masked tokens, 0 elsewhere
    source: str  # path:line
    truncated: bool


@dataclass(frozen=True)
class _Turn:
    start: int  # char offset where generation starts
    end: int  # char offset after the turn's template text
    weight: float


def tokenize_conversation(
    tokenizer: ChatTokenizer,
    conv: Conversation,
    *,
    seq_len: int | None = None,
    overlong: Overlong = "error",
) -> TokenizedExample | None:
    """Tokens + assistant-only mask for one conversation.

    Tokens after the last trained assistant turn are dropped (they carry no loss). Longer than
    `seq_len`: `overlong="error"` raises naming the source; `"truncate"` keeps the longest head
    that ends at an assistant turn's end, else cuts inside the first turn; returns None if
    nothing trainable is left.
    """
    text, turns = _render_turns(tokenizer, conv)
    cuts = sorted({c for t in turns for c in (t.start, t.end)} - {0, len(text)})
    tokens, at = _tokenize_at(tokenizer, text, cuts, conv.source)
    mask = np.zeros(len(tokens), bool)
    weights = np.zeros(len(tokens), np.float32)
    ends = []  # token index after each assistant turn that keeps something trainable
    for t in turns:
        a, b = at(t.start), at(t.end)
        if t.weight > 0:
            stop = b
            for k in range(b - 1, a - 1, -1):
                if tokens[k] in tokenizer.eos_ids:
                    stop = k + 1
                    break
            mask[a:stop] = True
            weights[a:stop] = t.weight
        ends.append(b)
    trained_ends = [b for b in ends if mask[1:b].any()]
    if not trained_ends:
        raise DataError(f"{conv.source}: conversation has no trained assistant tokens")
    n = trained_ends[-1]
    truncated = False
    if seq_len is not None and n > seq_len:
        if overlong == "error":
            raise DataError(
                f"{conv.source}: conversation is {n} tokens, longer than seq_len {seq_len} "
                "(set overlong='truncate' to cut it)"
            )
        fitting = [b for b in trained_ends if b <= seq_len]
        n = fitting[-1] if fitting else seq_len
        truncated = True
        if not mask[1:n].any():
            return None
    return TokenizedExample(
        np.asarray(tokens[:n], np.int32), mask[:n], weights[:n], conv.source, truncated
    )


def _render(tokenizer: ChatTokenizer, msgs: list, gen: bool, where: str) -> str:
    try:
        out = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    except Exception as e:  # template errors (jinja raise_exception, bad roles) are data errors
        raise DataError(f"{where}: chat template failed: {e}".replace("\n", " ")) from None
    if not isinstance(out, str):
        raise DataError(f"{where}: chat template returned {type(out).__name__}, not text")
    return out


def _render_turns(tokenizer: ChatTokenizer, conv: Conversation) -> tuple[str, list[_Turn]]:
    where = conv.source
    full = _render(tokenizer, conv.template_messages(), False, where)
    turns = []
    for i, m in enumerate(conv.messages):
        if m.role != "assistant":
            continue
        prompt = _render(tokenizer, conv.template_messages(i), True, where)
        upto = _render(tokenizer, conv.template_messages(i + 1), False, where)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                f"{where}: chat template renders message {i} differently depending on what "
                "follows it; cannot locate the assistant tokens"
            )
        turns.append(_Turn(len(prompt), len(upto), m.weight))
    return full, turns


def _encode(tokenizer: ChatTokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_bos=False)) if text else []


def _encode_many(tokenizer: ChatTokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)  # parallel in the Rust backend
    if batch is None:
        return [_encode(tokenizer, t) for t in texts]
    return [
        list(ids) if t else [] for t, ids in zip(texts, batch(texts, add_bos=False), strict=True)
    ]


def _tokenize_at(tokenizer: ChatTokenizer, text: str, cuts: list[int], where: str):
    """Tokenize `text`; return (tokens, char_offset -> token_index) for offsets in `cuts`."""
    body = _encode(tokenizer, text)
    bounds = [0, *cuts, len(text)]
    spans = list(itertools.pairwise(bounds))
    pieces = _encode_many(tokenizer, [text[lo:hi] for lo, hi in spans])
    ends = itertools.accumulate(len(p) for p in pieces)
    piecewise, index = [t for p in pieces for t in p], dict(zip(bounds, [0, *ends], strict=True))
    if piecewise == body:  # usual case (boundaries at special tokens / newlines): O(length)
        return body, index.__getitem__
    # Some token straddles or is shaped by a boundary: the tokenization of each prefix must be
    # a prefix of the whole (O(turns x length)).
    prefix_index = {0: 0, len(text): len(body)}
    for c in cuts:
        head = _encode(tokenizer, text[:c])
        if body[: len(head)] != head:
            break
        prefix_index[c] = len(head)
    else:
        return body, prefix_index.__getitem__
    # A merge crosses a boundary: keep the pieces tokenized on their own (as at inference: the
    # prompt's tokens, then the generated ones) if each piece round-trips to its text.
    for (lo, hi), piece in zip(spans, pieces, strict=True):
        if tokenizer.decode(piece, skip_special=False) != text[lo:hi]:
            raise DataError(
                f"{where}: tokenizer cannot split the rendered chat at turn boundaries "
                f"(piece {text[lo:hi][:40]!r} does not round-trip)"
            )
    return piecewise, index.__getitem__
