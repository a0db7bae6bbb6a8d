"""DataConfig: everything the SFT data pipeline needs, as one frozen dataclass (CLI-embeddable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cmat_jax.data.errors import DataError


@dataclass(frozen=True)
class DataConfig:
    """SFT data: JSONL files, how to mix them, and the fixed batch shape [global_batch, seq_len]."""

    paths: tuple[str, ...] = ()
    """JSONL files (OpenAI `messages` or ShareGPT/AgentInstruct `conversations` records)."""
    mix: tuple[float, ...] = ()
    """Share of conversations drawn from each file, e.g. (0.8, 0.2); normalised. Empty = by size."""
    seq_len: int = 2048
    """Row length T of a packed batch; also the longest conversation kept."""
    global_batch: int = 8
    """Rows per global batch (all processes together)."""
    seed: int = 0
    """Seeds dataset choice and each epoch's shuffle."""
    overlong: Literal["truncate", "error"] = "truncate"
    """Conversations longer than seq_len: drop trailing turns / cut ('truncate') or fail."""
    format: Literal["auto", "messages", "sharegpt"] = "auto"
    """Record format; 'auto' decides per line from the key present."""
    skip_untrainable: bool = False
    """Skip (and count) conversations without a trained assistant turn instead of failing."""
    pack_buffer: int = 16
    """Open rows kept by the first-fit packer (more = denser packing, more buffering)."""
    emit_weights: bool = False
    """Add `loss_weights` float32[B, T] (per-message weights) to each batch."""

    def __post_init__(self) -> None:
        # Empty paths are allowed here (a CLI default; a job may fill them in with
        # dataclasses.replace); `require_paths()` checks before loading.
        if self.mix:
            if self.paths and len(self.mix) != len(self.paths):
                raise DataError(
                    f"data.mix: {len(self.mix)} ratios for {len(self.paths)} data files"
                )
            if any(not (r > 0) for r in self.mix):
                raise DataError(f"data.mix: ratios must be > 0, got {self.mix}")
        if self.seq_len < 2:
            raise DataError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if self.global_batch < 1:
            raise DataError(f"data.global_batch must be >= 1, got {self.global_batch}")
        if self.pack_buffer < 1:
            raise DataError(f"data.pack_buffer must be >= 1, got {self.pack_buffer}")
        if self.overlong not in ("truncate", "error"):
            raise DataError(f"data.overlong must be 'truncate' or 'error', got {self.overlong!r}")
        if self.format not in ("auto", "messages", "sharegpt"):
            raise DataError(f"data.format: unknown format {self.format!r}")

    def require_paths(self) -> None:
        if not self.paths:
            raise DataError("data.paths: at least one JSONL file is required")
