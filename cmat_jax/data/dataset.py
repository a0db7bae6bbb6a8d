"""A tokenized SFT dataset held as flat arrays (one concatenation + offsets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmat_jax.data.config import DataConfig
from cmat_jax.data.errors import DataError
from cmat_jax.data.masking import ChatTokenizer, Overlong, tokenize_conversation
from cmat_jax.data.readers import Format, read_jsonl


@dataclass
class DatasetStats:
    conversations: int = 0  # kept
    skipped_untrainable: int = 0
    truncated: int = 0
    dropped_overlong: int = 0  # nothing trainable left after truncation
    tokens: int = 0
    trained_tokens: int = 0


@dataclass
class TokenizedDataset:
    """Examples i = tokens[offsets[i]:offsets[i+1]] (with loss_mask / weights alike)."""

    name: str
    tokens: np.ndarray  # int32[N]
    loss_mask: np.ndarray  # bool[N]
    weights: np.ndarray  # float32[N]
    offsets: np.ndarray  # int64[n+1]
    sources: list[str]
    stats: DatasetStats = field(default_factory=DatasetStats)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.tokens[lo:hi], self.loss_mask[lo:hi], self.weights[lo:hi]


def load_dataset(
    path: str | Path,
    tokenizer: ChatTokenizer,
    *,
    seq_len: int,
    overlong: Overlong = "truncate",
    fmt: Format = "auto",
    skip_untrainable: bool = False,
) -> TokenizedDataset:
    """Read, validate and tokenize one JSONL file (errors name path:line)."""
    read = read_jsonl(path, fmt, skip_untrainable=skip_untrainable)
    stats = DatasetStats(skipped_untrainable=read.skipped)
    toks, masks, weights, sources = [], [], [], []
    for conv in read.conversations:
        ex = tokenize_conversation(tokenizer, conv, seq_len=seq_len, overlong=overlong)
        if ex is None:
            stats.dropped_overlong += 1
            continue
        stats.truncated += ex.truncated
        toks.append(ex.tokens)
        masks.append(ex.loss_mask)
        weights.append(ex.weights)
        sources.append(ex.source)
    if not toks:
        raise DataError(f"{path}: no conversation fits seq_len {seq_len} with a trained token")
    offsets = np.zeros(len(toks) + 1, np.int64)
    np.cumsum([len(t) for t in toks], out=offsets[1:])
    ds = TokenizedDataset(
        str(path),
        np.concatenate(toks).astype(np.int32),
        np.concatenate(masks),
        np.concatenate(weights).astype(np.float32),
        offsets,
        sources,
        stats,
    )
    stats.conversations = len(ds)
    stats.tokens = int(offsets[-1])
    stats.trained_tokens = int(ds.loss_mask.sum())
    return ds


def load_datasets(config: DataConfig, tokenizer: ChatTokenizer) -> list[TokenizedDataset]:
    config.require_paths()
    return [
        load_dataset(
            p,
            tokenizer,
            seq_len=config.seq_len,
            overlong=config.overlong,
            fmt=config.format,
            skip_untrainable=config.skip_untrainable,
        )
        for p in config.paths
    ]
