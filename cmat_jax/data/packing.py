"""Greedy first-fit packing of conversations into rows of length T, and row -> array assembly.

Row layout: segment s (1..n) occupies a contiguous span; padding is segment 0 at the end.
Inside a segment, `targets[t] = tokens[t+1]`; the segment's last position predicts nothing
(target = pad, mask False), so no position ever predicts across a boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import numpy as np

from cmat_jax.data.errors import DataError

Ref = tuple[int, int]  # (dataset index, example index)
Row = list[Ref]


class FirstFitPacker:
    """Keeps up to `max_open` partly filled rows; each example goes into the first that fits.

    When none fits and all slots are taken, the fullest open row is closed (emitted) to make
    room. Closed rows queue in `ready` in closing order. State = plain lists of ints.
    """

    def __init__(self, seq_len: int, max_open: int, length: Callable[[Ref], int]):
        self.seq_len = seq_len
        self.max_open = max_open
        self._length = length
        self.open: list[Row] = []
        self._fill: list[int] = []
        self.ready: deque[Row] = deque()

    def add(self, ref: Ref) -> None:
        n = self._length(ref)
        if not 0 < n <= self.seq_len:
            raise DataError(f"packer: example {ref} has {n} tokens, row length is {self.seq_len}")
        for r, fill in enumerate(self._fill):
            if fill + n <= self.seq_len:
                self.open[r].append(ref)
                self._fill[r] += n
                if self._fill[r] == self.seq_len:
                    self._close(r)
                return
        if len(self.open) == self.max_open:
            self._close(int(np.argmax(self._fill)))
        self.open.append([ref])
        self._fill.append(n)
        if n == self.seq_len:
            self._close(len(self.open) - 1)

    def _close(self, r: int) -> None:
        self.ready.append(self.open.pop(r))
        self._fill.pop(r)

    def state(self) -> dict:
        flat = lambda rows: [[x for ref in row for x in ref] for row in rows]
        return {"open": flat(self.open), "ready": flat(self.ready)}

    def restore(self, state: dict) -> None:
        try:
            unflat = lambda rows: [
                [(int(row[k]), int(row[k + 1])) for k in range(0, len(row), 2)] for row in rows
            ]
            self.open = unflat(state["open"])
            self.ready = deque(unflat(state["ready"]))
            self._fill = [sum(self._length(ref) for ref in row) for row in self.open]
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DataError(f"data iterator state: bad packer state ({e!r})") from None
        if any(f > self.seq_len for f in self._fill):
            raise DataError("data iterator state: packer rows do not fit seq_len")


Example = tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, loss_mask, weights


def assemble_rows(
    rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int, *, emit_weights: bool = False
) -> dict[str, np.ndarray]:
    """Packed rows -> inputs, targets, loss_mask (on targets), segment_ids, positions [B, T]."""
    B, T = len(rows), seq_len
    inputs = np.full((B, T), pad_id, np.int32)
    targets = np.full((B, T), pad_id, np.int32)
    loss_mask = np.zeros((B, T), bool)
    loss_weights = np.zeros((B, T), np.float32)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b, row in enumerate(rows):
        o = 0
        for s, (tok, mask, w) in enumerate(row, start=1):
            n = len(tok)
            if o + n > T:
                raise DataError(f"packer: row {b} overflows seq_len {T}")
            inputs[b, o : o + n] = tok
            targets[b, o : o + n - 1] = tok[1:]
            loss_mask[b, o : o + n - 1] = mask[1:]
            loss_weights[b, o : o + n - 1] = w[1:]
            segment_ids[b, o : o + n] = s
            positions[b, o : o + n] = np.arange(n, dtype=np.int32)
            o += n
    batch = {
        "inputs": inputs,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
    }
    if emit_weights:
        batch["loss_weights"] = loss_weights
    return batch
