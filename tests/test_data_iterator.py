"""Mixing, deterministic order, exact resume from a JSON state, per-process sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmat_jax.data import DataConfig, DataError, build_iterator
from cmat_jax.data.mixing import MixtureSampler
from tests.test_data_helpers import make_tokenizer, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    return (make_tokenizer(), *write_corpus(tmp))


def config(corpus, **kw) -> DataConfig:
    _, agent, general = corpus
    base = dict(paths=(agent, general), mix=(0.8, 0.2), seq_len=96, global_batch=4, seed=7)
    return DataConfig(**{**base, **kw})


def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_mix_ratio_over_many_batches(corpus):
    tok = corpus[0]
    it = build_iterator(config(corpus), tok)
    counts = np.zeros(2)
    for _ in range(600):
        for row in it.next_refs():
            for d, _ in row:
                counts[d] += 1
    frac = counts / counts.sum()
    assert counts.sum() > 2000
    assert abs(frac[0] - 0.8) < 0.03, frac
    # without a mix: proportional to dataset sizes (120 : 40)
    it = build_iterator(config(corpus, mix=()), tok)
    refs = [d for _ in range(600) for row in it.next_refs() for d, _ in row]
    assert abs(np.mean(np.array(refs) == 0) - 0.75) < 0.03


def test_deterministic_order_from_seed(corpus):
    tok = corpus[0]
    a, b = build_iterator(config(corpus), tok), build_iterator(config(corpus), tok)
    other = build_iterator(config(corpus, seed=8), tok)
    xs, ys, zs = ([next(it) for _ in range(10)] for it in (a, b, other))
    assert all(batches_equal(x, y) for x, y in zip(xs, ys, strict=True))
    assert not all(batches_equal(x, z) for x, z in zip(xs, zs, strict=True))


def test_epochs_visit_every_example_and_reshuffle():
    s = MixtureSampler([10], [1.0], seed=5)
    draws = [s.next()[1] for _ in range(30)]
    epochs = [draws[k : k + 10] for k in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    again = MixtureSampler([10], [1.0], seed=5)
    assert [again.next()[1] for _ in range(30)] == draws
    assert s.state() == {"draws": 30, "epochs": [3], "cursors": [0]}


@pytest.mark.parametrize("stop", [0, 1, 13, 57])
def test_state_restore_resumes_to_identical_batches(corpus, stop):
    tok = corpus[0]
    cfg = config(corpus, emit_weights=True)
    it = build_iterator(cfg, tok)
    for _ in range(stop):
        next(it)
    saved = json.loads(json.dumps(it.state()))  # the checkpoint stores it as JSON
    expected = [next(it) for _ in range(5)]
    resumed = build_iterator(cfg, tok)  # a fresh process: reload data, then restore
    resumed.restore(saved)
    got = [next(resumed) for _ in range(5)]
    assert all(batches_equal(x, y) for x, y in zip(expected, got, strict=True))
    assert resumed.state() == it.state()


def test_restore_refuses_a_state_from_other_data(corpus):
    tok = corpus[0]
    saved = build_iterator(config(corpus), tok).state()
    other = build_iterator(config(corpus, global_batch=8), tok)
    with pytest.raises(DataError, match="saved with different data or data config"):
        other.restore(saved)
    with pytest.raises(DataError, match="version"):
        other.restore({"batches": 3})
    it = build_iterator(config(corpus), tok)
    next(it)
    before = it.state()
    corrupt = json.loads(json.dumps(before))
    corrupt["packer"]["open"] = [[0, 10_000]]  # no such example
    with pytest.raises(DataError, match=r"no example \(0, 10000\)"):
        it.restore(corrupt)
    corrupt = {**before, "mixer": {"draws": 1}}
    with pytest.raises(DataError, match="bad mixture state"):
        it.restore(corrupt)
    assert it.state() == before  # a failed restore changes nothing


def test_shard_for_process_yields_this_hosts_rows(corpus):
    tok = corpus[0]
    cfg = config(corpus, global_batch=6)
    it = build_iterator(cfg, tok)
    next(it)  # shards start from the current state
    shards = [it.shard_for_process(p, 3) for p in range(3)]
    for _ in range(8):
        full = next(it)
        parts = [next(s) for s in shards]
        for k in full:
            assert all(p[k].shape == (2, 96) for p in parts)
            assert np.array_equal(np.concatenate([p[k] for p in parts]), full[k])
    assert all(s.state() == it.state() for s in shards)  # one state resumes every host
    with pytest.raises(DataError, match="not divisible by the 4 processes"):
        it.shard_for_process(0, 4)
