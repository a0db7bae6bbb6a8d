"""Reuse of earlier `Generator.generate` calls' KV caches for prompts that start the same way.

A multi-turn rollout sends, turn after turn, prompts that extend the previous prompt with what
the model generated and the environment's answer; episodes of one task share the system prompt
and the task. `PrefixCache` keeps the caches of the last few calls and, for each new prompt,
finds the cached row (same adapter, same weights) with the longest common prefix. The call then
prefills only one block of T tokens per row (T = the bucketed longest part no row has cached);
the keys and values of each row's first len - T tokens are copied from the old cache instead.

Host side only: matching tokens and planning the copy. The copy itself is `gather_reused`
(one small program per source cache shape) and the block prefill is `generate._prefill`
given the reused keys/values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cmat_jax.model.llama import KVCache


@dataclasses.dataclass
class _CachedCall:
    """One finished call's cache and the tokens each of its rows holds keys/values for."""

    cache: KVCache
    tokens_RL: np.ndarray  # int64 [rows, longest], -1 after a row's end
    lens_R: np.ndarray  # tokens held per row, in slots [start_R, start_R + lens_R)
    start_R: np.ndarray
    adapters_R: np.ndarray  # -1 = base model
    params: weakref.ref  # the (converted) weights the cache was computed with; weak, so an
    # old copy of the weights is not kept alive by its cache
    cache_dtype: str


@dataclasses.dataclass
class Reuse:
    """What one call takes from the cache: row b's first used[b] tokens come from call
    src_call[b], row src_row[b], slots src_slot_BP[b, P - used[b]:]."""

    src_call_B: np.ndarray
    src_row_B: np.ndarray
    src_slot_BP: np.ndarray
    ids_BT: np.ndarray  # the block each row prefills (left-padded when the row is shorter)
    start_B: np.ndarray  # first valid slot per row of the new cache
    used: np.ndarray  # reused tokens per prompt


class PrefixCache:
    """The KV caches of the last `max_calls` generate calls, for reuse by the next ones.

    Pass the same object to consecutive `generate(..., prefix_cache=)` calls. Outputs do not
    depend on it (up to float rounding): a prompt with no cached prefix, or after the weights
    changed, is prefilled in full. The caches stay in device memory ([L, B, K, S, Dh] keys and
    values per call) until pushed out by newer calls or `clear()`.
    """

    def __init__(self, max_calls: int = 2) -> None:
        if max_calls < 1:
            raise ValueError(f"PrefixCache: max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self._calls: list[_CachedCall] = []
        self._staging = 0  # open `staging()` blocks: stores push nothing out meanwhile
        self.reused_tokens = 0  # prompt tokens whose keys/values came from an earlier call
        self.prefilled_tokens = 0  # prompt tokens that went through the model

    def clear(self) -> None:
        self._calls = []

    @contextlib.contextmanager
    def staging(self) -> Iterator[None]:
        """Calls made inside keep their caches beside the last `max_calls` ones (pushing none
        out) until the block exits, which forgets them and their token counts. A generate
        call prefills its long rows' prompt heads this way, then copies them."""
        calls, counts = list(self._calls), (self.reused_tokens, self.prefilled_tokens)
        self._staging += 1
        try:
            yield
        finally:
            self._staging -= 1
            kept = {id(c) for c in calls}
            self._calls = [c for c in self._calls if id(c) in kept]
            self.reused_tokens, self.prefilled_tokens = counts

    def match(
        self, ids: list[list[int]], adapters: np.ndarray, params: Any, cache_dtype: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per prompt: (call, row) of the cached row with the longest common prefix under the
        same adapter and weights, and that length (0 = none). At least each prompt's last token
        stays uncached: its logits start the decode."""
        n = len(ids)
        best = np.zeros(n, np.int64)
        call_n, row_n = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for c, cc in enumerate(self._calls):
            if cc.params() is not params or cc.cache_dtype != cache_dtype:
                continue
            for i, p in enumerate(ids):
                same = cc.adapters_R == adapters[i]
                m = min(len(p) - 1, cc.tokens_RL.shape[1])
                if m <= 0 or not same.any():
                    continue
                eq_RM = cc.tokens_RL[:, :m] == np.asarray(p[:m])[None]
                # Common prefix per row: index of the first mismatch (m when none).
                lcp_R = np.where(eq_RM.all(1), m, np.argmin(eq_RM, axis=1))
                lcp_R = np.where(same, np.minimum(lcp_R, cc.lens_R), 0)
                r = int(np.argmax(lcp_R))
                if lcp_R[r] > best[i]:
                    best[i], call_n[i], row_n[i] = lcp_R[r], c, r
        return call_n, row_n, best

    def plan(
        self,
        ids: list[list[int]],
        match: tuple[np.ndarray, np.ndarray, np.ndarray],
        *,
        prompt_bucket: int,
        block: int,
        batch: int,
        pad_id: int,
    ) -> Reuse | None:
        """Lay out a call of `batch` rows whose cache keeps the plain prefill's length
        (`prompt_bucket` prompt slots, so the decode program is the same one): reused tokens
        in slots [P - used, P), P = prompt_bucket - block, the block after them. None when no
        row reuses anything."""
        call_n, row_n, cached = match
        lens = np.array([len(p) for p in ids])
        used = np.maximum(lens - block, 0)
        if (used > cached).any():
            raise ValueError(f"block of {block} tokens is shorter than an uncached prompt part")
        P = prompt_bucket - block  # >= longest - block = used.max()
        if P <= 0 or not used.any():
            return None
        ids_BT = np.full((batch, block), pad_id, np.int32)
        start_B = np.full((batch,), P + block - 1, np.int32)  # padding rows: one token
        src_call_B = np.full((batch,), -1, np.int32)
        src_row_B = np.zeros((batch,), np.int32)
        src_slot_BP = np.zeros((batch, P), np.int32)
        for i, p in enumerate(ids):
            u = int(used[i])
            if u:
                ids_BT[i] = p[u:]
                start_B[i] = P - u
                src_call_B[i], src_row_B[i] = call_n[i], row_n[i]
                old_start = self._calls[call_n[i]].start_R[row_n[i]]
                src_slot_BP[i, P - u :] = old_start + np.arange(u)
            else:
                ids_BT[i, block - len(p) :] = p
                start_B[i] = P + block - len(p)
        return Reuse(src_call_B, src_row_B, src_slot_BP, ids_BT, start_B, used)

    def gather(self, reuse: Reuse) -> tuple[jax.Array, jax.Array]:
        """The reused keys/values [L, B, K, P, Dh] (cache storage dtype), each row's from its
        source call."""
        c0 = self._calls[int(reuse.src_call_B.max())].cache
        L, _, K, _, D = c0.k_LBKSD.shape
        B, P = reuse.src_slot_BP.shape
        k = v = jnp.zeros((L, B, K, P, D), c0.k_LBKSD.dtype)
        for c in sorted(set(reuse.src_call_B[reuse.src_call_B >= 0].tolist())):
            old = self._calls[c].cache
            take_B = reuse.src_call_B == c
            k, v = _gather_rows(
                k, v, old.k_LBKSD, old.v_LBKSD, take_B, reuse.src_row_B, reuse.src_slot_BP
            )
        return k, v

    def store(
        self,
        cache: KVCache,
        tokens: list[list[int]],
        start_B: np.ndarray,
        adapters: np.ndarray,
        params: Any,
        cache_dtype: str,
    ) -> None:
        """Remember a finished call: row i holds keys/values of `tokens[i]` from slot
        start_B[i] on."""
        n = len(tokens)
        lens = np.array([len(t) for t in tokens], np.int64)
        tokens_RL = np.full((n, max(int(lens.max()), 1)), -1, np.int64)
        for i, t in enumerate(tokens):
            tokens_RL[i, : len(t)] = t
        call = _CachedCall(
            cache,
            tokens_RL,
            lens,
            np.asarray(start_B[:n]),
            adapters[:n],
            weakref.ref(params),
            cache_dtype,
        )
        self._calls = [*self._calls, call]
        if not self._staging:
            self._calls = self._calls[-self.max_calls :]


@jax.jit
def _gather_rows(
    k_LBKPD: jax.Array,
    v_LBKPD: jax.Array,
    old_k_LBKSD: jax.Array,
    old_v_LBKSD: jax.Array,
    take_B: jax.Array,
    src_row_B: jax.Array,
    src_slot_BP: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Rows where take_B: old row src_row_B[b], slots src_slot_BP[b] (others unchanged)."""
    rows = jnp.minimum(src_row_B, old_k_LBKSD.shape[1] - 1)
    slots = jnp.minimum(src_slot_BP, old_k_LBKSD.shape[3] - 1)
    by_row = jax.vmap(lambda r_LKSD, s_P: jnp.take(r_LKSD, s_P, axis=2), (1, 0), 1)

    def pick(new: jax.Array, old: jax.Array) -> jax.Array:
        got = by_row(jnp.take(old, rows, axis=1), slots)
        return jnp.where(take_B[None, :, None, None, None], got, new)

    return pick(k_LBKPD, old_k_LBKSD), pick(v_LBKPD, old_v_LBKSD)
