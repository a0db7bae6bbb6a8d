"""The SFT batch iterator: mix -> first-fit pack -> fixed-shape batches, resumable exactly.

Every process runs the same deterministic stream (same datasets, config and state) and keeps
only its own rows of each global batch, so the state is identical on all hosts and one copy
in the checkpoint resumes all of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence

import numpy as np

from cmat_jax.data.config import DataConfig
from cmat_jax.data.dataset import TokenizedDataset, load_datasets
from cmat_jax.data.errors import DataError
from cmat_jax.data.masking import ChatTokenizer
from cmat_jax.data.mixing import MixtureSampler
from cmat_jax.data.packing import FirstFitPacker, Ref, assemble_rows

STATE_VERSION = 1


class SFTBatchIterator(Iterator[dict[str, np.ndarray]]):
    """Infinite iterator of packed batches `[global_batch // process_count, seq_len]`.

    Keys: inputs, targets (int32), loss_mask (bool, on targets), segment_ids (int32, 0 = pad),
    positions (int32, restart at 0 per segment), plus loss_weights (float32) if configured.
    """

    def __init__(
        self,
        datasets: Sequence[TokenizedDataset],
        config: DataConfig,
        pad_id: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(datasets) != len(config.paths):
            raise DataError(f"data: {len(datasets)} datasets for {len(config.paths)} paths")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise DataError(f"data: bad process {process_index} of {process_count}")
        if config.global_batch % process_count:
            raise DataError(
                f"data.global_batch {config.global_batch} is not divisible by the "
                f"{process_count} processes"
            )
        self.datasets = list(datasets)
        self.config = config
        self.pad_id = int(pad_id)
        self.process_index, self.process_count = process_index, process_count
        self.ratios = list(config.mix) if config.mix else [len(d) for d in datasets]
        self.batches = 0
        self._mixer = MixtureSampler([len(d) for d in datasets], self.ratios, config.seed)
        self._packer = FirstFitPacker(config.seq_len, config.pack_buffer, self._length)

    def _length(self, ref: Ref) -> int:
        d, i = ref
        if not (0 <= d < len(self.datasets) and 0 <= i < len(self.datasets[d])):
            raise DataError(f"data iterator state: no example {ref}")
        return self.datasets[d].length(i)

    @property
    def local_batch(self) -> int:
        return self.config.global_batch // self.process_count

    def __iter__(self) -> SFTBatchIterator:
        return self

    def next_refs(self) -> list[list[Ref]]:
        """The next global batch as rows of (dataset, example) refs (advances the state)."""
        B = self.config.global_batch
        while len(self._packer.ready) < B:
            self._packer.add(self._mixer.next())
        self.batches += 1
        return [self._packer.ready.popleft() for _ in range(B)]

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.next_refs()
        lo = self.process_index * self.local_batch
        local = rows[lo : lo + self.local_batch]
        examples = [[self.datasets[d].example(i) for d, i in row] for row in local]
        return assemble_rows(
            examples, self.config.seq_len, self.pad_id, emit_weights=self.config.emit_weights
        )

    # --- resumable state -------------------------------------------------------------------

    def fingerprint(self) -> str:
        """Identifies the data stream (config + data sizes); a state only restores onto it."""
        c = self.config
        key = [
            c.seq_len,
            c.global_batch,
            c.seed,
            c.pack_buffer,
            [float(r) for r in self.ratios],
            [[len(d), int(d.offsets[-1])] for d in self.datasets],
        ]
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]

    def state(self) -> dict:
        """JSON-able position in the stream (plain ints and lists)."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "batches": self.batches,
            "mixer": self._mixer.state(),
            "packer": self._packer.state(),
        }

    def restore(self, state: dict) -> None:
        """Continue from `state()`: the next batch is the one that followed it."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(f"data iterator state: expected version {STATE_VERSION}")
        if state.get("fingerprint") != self.fingerprint():
            raise DataError(
                "data iterator state was saved with different data or data config "
                "(paths, mix, seq_len, global_batch, seed or pack_buffer changed)"
            )
        # Restore into fresh objects so a bad state leaves this iterator untouched.
        mixer = MixtureSampler([len(d) for d in self.datasets], self.ratios, self.config.seed)
        packer = FirstFitPacker(self.config.seq_len, self.config.pack_buffer, self._length)
        try:
            mixer.restore(state["mixer"])
            packer.restore(state["packer"])
            batches = int(state["batches"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"data iterator state: missing or bad field ({e!r})") from None
        self._mixer, self._packer, self.batches = mixer, packer, batches

    def shard_for_process(self, process_index: int, process_count: int) -> SFTBatchIterator:
        """A copy at the same state that yields only this process's rows of each batch."""
        it = SFTBatchIterator(
            self.datasets,
            self.config,
            self.pad_id,
            process_index=process_index,
            process_count=process_count,
        )
        it.restore(self.state())
        return it

    def stats(self) -> dict:
        return {d.name: vars(d.stats) for d in self.datasets}


def build_iterator(
    config: DataConfig,
    tokenizer: ChatTokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> SFTBatchIterator:
    """Load and tokenize `config.paths`, then iterate packed batches."""
    pad_id = getattr(tokenizer, "pad_id", None)
    if pad_id is None:
        raise DataError("tokenizer has no pad_id")
    return SFTBatchIterator(
        load_datasets(config, tokenizer),
        config,
        pad_id,
        process_index=process_index,
        process_count=process_count,
    )
