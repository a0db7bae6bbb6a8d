"""Greedy first-fit packing of conversations into rows of length T, and row -> array assembly.

Row layout: segment s (1..n) occupies a contiguous span; padding is segment 0 at the end.
Inside a segment, `targets[t] = tokens[t+1]`; the segment's last position predicts nothing
(target = pad, mask False), so no position ever predicts across a boundary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
from cmat_jax_kernels.common import SHARED_SEGMENT

from cmat_jax.data.errors import DataError

Ref = tuple[int, int]  # (dataset index, example index)
Row = list[Ref]


class FirstFitPacker:
    """Keeps up to `max_open` partly filled rows; each example goes into the first that fits
    (and, with `key`, whose examples share its key: e.g. one LoRA slot per row).

    When none fits and all slots are taken, the fullest open row is closed (emitted) to make
    room. Closed rows queue in `ready` in closing order. State = plain lists of ints.
    """

    def __init__(
        self,
        seq_len: int,
        max_open: int,
        length: Callable[[Ref], int],
        key: Callable[[Ref], Hashable] | None = None,
    ):
        self.seq_len = seq_len
        self.max_open = max_open
        self._length = length
        self._key = key
        self.open: list[Row] = []
        self._fill: list[int] = []
        self.ready: deque[Row] = deque()

    def add(self, ref: Ref) -> None:
        n = self._length(ref)
        if not 0 < n <= self.seq_len:
            raise DataError(f"packer: example {ref} has {n} tokens, row length is {self.seq_len}")
        for r, fill in enumerate(self._fill):
            if fill + n <= self.seq_len and (
                self._key is None or self._key(self.open[r][0]) == self._key(ref)
            ):
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
Segment = tuple[np.ndarray, Mapping[str, np.ndarray]]  # tokens [n], per-token columns [n]


def build_packed_batch(
    rows: Sequence[Sequence[Segment]],
    seq_len: int,
    pad_id: int,
    columns: Mapping[str, type],
    *,
    keep_last_input: bool,
    who: str,
    shared: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Rows of token segments -> inputs, targets, segment_ids, positions and `columns` [B, T].

    The one place training rows become arrays (SFT conversations and CMAT rows alike). Segment
    s (1..n) of a row takes a contiguous span; padding is segment 0 at the end. A segment of n
    tokens predicts n - 1 targets (`targets = tokens[1:]`), and each per-token column (aligned
    with its tokens, keyed by the token it scores) is written at those target positions, so
    nothing predicts across a boundary. `keep_last_input` also gives the segment's last token
    an input position that predicts nothing (span n instead of n - 1).

    `shared[b]` = P > 0: every segment of row b begins with the same P tokens. They are laid out
    once, first, as segment `SHARED_SEGMENT` (seen by all the row's segments; it predicts
    nothing), and each segment continues from position P with its own tokens[P:]. The caller
    guarantees that no column is used at the targets this drops (tokens[1..P]).
    """
    B, T = len(rows), seq_len
    out = {
        "inputs": np.full((B, T), pad_id, np.int32),
        "targets": np.full((B, T), pad_id, np.int32),
        "segment_ids": np.zeros((B, T), np.int32),
        "positions": np.zeros((B, T), np.int32),
    }
    out |= {k: np.zeros((B, T), dtype) for k, dtype in columns.items()}
    for b, row in enumerate(rows):
        P = 0 if shared is None else int(shared[b])
        if P:
            prefix = row[0][0][:P]
            if P > T:
                raise DataError(f"{who}: row {b}'s shared prefix of {P} overflows seq_len {T}")
            if any(not np.array_equal(tok[:P], prefix) for tok, _ in row):
                raise DataError(f"{who}: row {b}'s segments do not share {P} leading tokens")
            out["inputs"][b, :P] = prefix
            out["segment_ids"][b, :P] = SHARED_SEGMENT
            out["positions"][b, :P] = np.arange(P, dtype=np.int32)
        o = P
        for s, (tokens, per_token) in enumerate(row, start=1):
            n_targets = len(tokens) - 1
            span = len(tokens) if keep_last_input else n_targets
            if o + span - P > T:
                raise DataError(f"{who}: row {b} overflows seq_len {T}")
            n = span - P  # positions this segment takes after the shared prefix
            out["inputs"][b, o : o + n] = tokens[P:span]
            out["targets"][b, o : o + n_targets - P] = tokens[P + 1 :]
            for k in columns:
                out[k][b, o : o + n_targets - P] = per_token[k][P + 1 :]
            out["segment_ids"][b, o : o + n] = s
            out["positions"][b, o : o + n] = np.arange(P, span, dtype=np.int32)
            o += n
    return out


def assemble_rows(
    rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int, *, emit_weights: bool = False
) -> dict[str, np.ndarray]:
    """Packed SFT rows -> inputs, targets, loss_mask (on targets), segment_ids, positions
    [B, T] (and loss_weights): each conversation keeps its last token as an input."""
    columns = (
        {"loss_mask": bool, "loss_weights": np.float32} if emit_weights else {"loss_mask": bool}
    )
    segments = [
        [(tok, {"loss_mask": mask, "loss_weights": w}) for tok, mask, w in row] for row in rows
    ]
    return build_packed_batch(
        segments, seq_len, pad_id, columns, keep_last_input=True, who="packer"
    )
