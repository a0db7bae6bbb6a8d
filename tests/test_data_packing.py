"""First-fit packing and packed-batch invariants (segments, positions, shifted targets)."""

from __future__ import annotations

import numpy as np
import pytest

from cmat_jax.data import DataConfig, assemble_rows, build_iterator
from cmat_jax.data.packing import FirstFitPacker
from tests.test_data_helpers import make_tokenizer, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    return (make_tokenizer(), *write_corpus(tmp))


def test_first_fit_placement_and_closing():
    lengths = {(0, i): n for i, n in enumerate([6, 5, 4, 3, 2, 10, 7, 7])}
    p = FirstFitPacker(seq_len=10, max_open=2, length=lengths.__getitem__)
    for i in range(4):
        p.add((0, i))
    # 6 -> row A; 5 -> row B; 4 -> A (fills it: closed); 3 -> B (5+3=8)
    assert list(p.ready) == [[(0, 0), (0, 2)]]
    assert p.open == [[(0, 1), (0, 3)]]
    p.add((0, 4))  # 2 -> B fills it exactly
    assert list(p.ready)[-1] == [(0, 1), (0, 3), (0, 4)] and p.open == []
    p.add((0, 5))  # a full-length example is a row on its own
    assert list(p.ready)[-1] == [(0, 5)]
    p.add((0, 6))
    p.add((0, 2))  # 4 does not fit 7 -> second open row
    p.add((0, 7))  # 7 fits nowhere, both slots taken -> the fullest (7) is closed first
    assert list(p.ready)[-1] == [(0, 6)] and p.open == [[(0, 2)], [(0, 7)]]


def test_assemble_rows_exact_layout():
    ex = lambda toks, mask: (
        np.array(toks, np.int32),
        np.array(mask, bool),
        np.array(mask, np.float32),
    )
    rows = [
        [ex([10, 11, 12], [0, 1, 1]), ex([20, 21], [0, 1])],
        [ex([30, 31, 32, 33], [0, 0, 1, 1])],
    ]
    b = assemble_rows(rows, seq_len=6, pad_id=0, emit_weights=True)
    assert b["inputs"].tolist() == [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 0, 0]]
    assert b["targets"].tolist() == [[11, 12, 0, 21, 0, 0], [31, 32, 33, 0, 0, 0]]
    assert b["loss_mask"].astype(int).tolist() == [[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]]
    assert np.array_equal(b["loss_weights"], b["loss_mask"].astype(np.float32))


def test_packed_batch_invariants(corpus):
    tok, agent, general = corpus
    cfg = DataConfig(paths=(agent, general), mix=(0.7, 0.3), seq_len=96, global_batch=4, seed=3)
    it = build_iterator(cfg, tok)
    shadow = build_iterator(
        cfg, tok
    )  # same stream, used to read each batch's (dataset, example) refs
    real_tokens = 0
    for _ in range(40):
        refs = shadow.next_refs()
        b = next(it)
        assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for k, v in b.items():
            assert v.shape == (4, 96), k
            assert v.dtype == (bool if k == "loss_mask" else np.int32), k
        for r, row_refs in enumerate(refs):
            seg, pos = b["segment_ids"][r], b["positions"][r]
            inp, tgt, m = b["inputs"][r], b["targets"][r], b["loss_mask"][r]
            n_seg = len(row_refs)
            used = int((seg > 0).sum())
            # segments 1..n in order, contiguous, padding (0) only at the end
            assert np.all(seg[:used] > 0) and np.all(seg[used:] == 0)
            assert np.all(np.diff(seg[:used]) >= 0) and seg[used - 1] == n_seg
            assert (
                np.all(inp[used:] == tok.pad_id) and not m[used:].any() and np.all(pos[used:] == 0)
            )
            for s, (d, i) in enumerate(row_refs, start=1):
                (idx,) = np.nonzero(seg == s)
                toks, mask, _ = it.datasets[d].example(i)
                assert np.array_equal(idx, np.arange(idx[0], idx[0] + len(toks)))  # contiguous
                assert np.array_equal(pos[idx], np.arange(len(toks)))  # positions restart
                assert np.array_equal(inp[idx], toks)
                # targets shifted inside the segment; the last position predicts nothing
                assert np.array_equal(tgt[idx[:-1]], toks[1:])
                assert np.array_equal(m[idx[:-1]], mask[1:]) and not m[idx[-1]]
                # the masked targets are exactly the assistant tokens + end-of-turn markers
                assert tok.decode(tgt[idx][m[idx]]) == tok.decode(toks[mask])
            # no prediction crosses a segment boundary
            crossing = (seg[:-1] != seg[1:]) & (seg[:-1] > 0)
            assert not m[:-1][crossing].any()
            real_tokens += used
    assert real_tokens / (40 * 4 * 96) > 0.8  # first-fit keeps rows dense


def test_prefix_groups_pick_the_prompts_worth_sharing():
    """The trie choice: rows of two task prompts under one adapter share only a short header,
    so each prompt is its own group; a row's trained tokens are never inside its prefix."""
    from cmat_jax.data.rows import MIN_SHARED_PREFIX, TrainRow, prefix_groups, shareable_prefix

    rng = np.random.default_rng(0)
    header = rng.integers(0, 50, 10)
    db, os_ = rng.integers(50, 100, 60), rng.integers(100, 150, 90)

    def row(prompt, n_own, adapter=0, first_trained=3):
        toks = np.concatenate([header, prompt, rng.integers(150, 200, n_own)]).astype(np.int32)
        m = np.zeros(len(toks), np.float32)
        m[len(header) + len(prompt) + first_trained :] = 1
        z = np.zeros_like(m)
        return TrainRow(toks, m, m, m, z, adapter, "assistant", -1, 1.0)

    rows = [row(db, 8), row(os_, 9), row(db, 5), row(os_, 12), row(db, 7), row(db, 6, adapter=1)]
    # Shareable: everything before the first trained token but the token that predicts it.
    assert shareable_prefix(rows[0]) == 10 + 60 + 2
    got = sorted((sorted(g), P) for g, P in prefix_groups(rows))
    # Own tokens are drawn independently, so a group may share a few more by chance.
    assert [g for g, _ in got] == [[0, 2, 4], [1, 3]]
    assert 10 + 60 <= got[0][1] <= 10 + 60 + 2 and 10 + 90 <= got[1][1] <= 10 + 90 + 2
    # Two rows whose common prefix is too short to be worth a segment: no group.
    short = [row(db[: MIN_SHARED_PREFIX - 15], 4), row(os_[:20], 4)]
    assert prefix_groups(short) == []


def test_shared_prefix_layout_refuses_rows_that_do_not_share_it():
    from cmat_jax.data import DataError
    from cmat_jax.data.packing import build_packed_batch

    seg = lambda toks: (np.array(toks, np.int32), {"m": np.ones(len(toks), np.float32)})
    b = build_packed_batch(
        [[seg([1, 2, 3, 7, 8]), seg([1, 2, 4, 9])]], 6, 0, {"m": np.float32},
        keep_last_input=False, who="t", shared=[2],
    )  # fmt: skip
    # The prefix [1, 2] once, then each segment from position 2 on; 3 and 4 are predicted by
    # the prefix's last position in their own rows, so their targets (never trained) drop out.
    assert b["inputs"].tolist() == [[1, 2, 3, 7, 4, 0]]
    assert b["targets"].tolist() == [[0, 0, 7, 8, 9, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 2, 0]]
    assert b["segment_ids"][0, 2:].tolist() == [1, 1, 2, 0]
    assert b["m"].tolist() == [[0, 0, 1, 1, 1, 0]]
    with pytest.raises(DataError, match="share 3 leading tokens"):
        build_packed_batch(
            [[seg([1, 2, 3, 7, 8]), seg([1, 2, 4, 9])]], 6, 0, {"m": np.float32},
            keep_last_input=False, who="t", shared=[3],
        )  # fmt: skip
    with pytest.raises(DataError, match="shared prefix of 7 overflows seq_len 6"):
        build_packed_batch(
            [[seg([1, 2, 3, 4, 5, 6, 7, 8])]], 6, 0, {"m": np.float32},
            keep_last_input=False, who="t", shared=[7],
        )  # fmt: skip
