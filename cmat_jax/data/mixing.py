"""Seeded mixture sampling over several datasets with a plain-int state.

Randomness is counter-based (`default_rng([seed, stream, counter])`), so the whole state is a
few integers: the number of draws so far and each dataset's (epoch, cursor). Each dataset is
walked in a permutation that depends on (seed, dataset, epoch): epochs reshuffle, reproducibly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmat_jax.data.errors import DataError

_BLOCK = 4096  # dataset choices drawn per RNG block
_CHOICE, _PERM = 1, 2  # RNG stream ids


class MixtureSampler:
    def __init__(self, sizes: Sequence[int], ratios: Sequence[float], seed: int):
        if len(sizes) != len(ratios) or not sizes:
            raise DataError("mixture: need one ratio per dataset")
        p = np.asarray(ratios, np.float64)
        self._cum = np.cumsum(p / p.sum())
        self._sizes = [int(s) for s in sizes]
        self._seed = int(seed)
        self.draws = 0
        self.epochs = [0] * len(sizes)
        self.cursors = [0] * len(sizes)
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _choose(self, k: int) -> int:
        if len(self._sizes) == 1:
            return 0
        b = k // _BLOCK
        if self._block is None or self._block[0] != b:
            u = np.random.default_rng([self._seed, _CHOICE, b]).random(_BLOCK)
            self._block = (
                b,
                np.minimum(np.searchsorted(self._cum, u, side="right"), len(self._cum) - 1),
            )
        return int(self._block[1][k % _BLOCK])

    def _perm(self, d: int) -> np.ndarray:
        e = self.epochs[d]
        cached = self._perms.get(d)
        if cached is None or cached[0] != e:
            rng = np.random.default_rng([self._seed, _PERM, d, e])
            cached = (e, rng.permutation(self._sizes[d]))
            self._perms[d] = cached
        return cached[1]

    def next(self) -> tuple[int, int]:
        """(dataset index, example index) of the next draw."""
        d = self._choose(self.draws)
        i = int(self._perm(d)[self.cursors[d]])
        self.draws += 1
        self.cursors[d] += 1
        if self.cursors[d] == self._sizes[d]:
            self.epochs[d] += 1
            self.cursors[d] = 0
        return d, i

    def state(self) -> dict:
        return {"draws": self.draws, "epochs": list(self.epochs), "cursors": list(self.cursors)}

    def restore(self, state: dict) -> None:
        n = len(self._sizes)
        try:
            draws, epochs, cursors = int(state["draws"]), state["epochs"], state["cursors"]
            epochs, cursors = [int(e) for e in epochs], [int(c) for c in cursors]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"data iterator state: bad mixture state ({e})") from None
        if (
            len(epochs) != n
            or len(cursors) != n
            or any(not 0 <= c < s for c, s in zip(cursors, self._sizes, strict=True))
        ):
            raise DataError("data iterator state: mixture state does not match the datasets")
        self.draws, self.epochs, self.cursors = draws, epochs, cursors
