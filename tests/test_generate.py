"""Generation engine: exactness vs transformers and the no-cache forward, sampling, stops, adapters.

Tiny-model tests share one Generator and one batch/prompt/new-token bucket (batch 4, prompt 16,
16 new tokens) so the whole file compiles few programs.
"""

from __future__ import annotations

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cmat_jax.inference.generate import (
    GenerationError,
    Generator,
    PrefixCache,
    SamplingParams,
    _draw,
    _filter_top_k_top_p,
    _split_block,
    bucket_batch,
    bucket_length,
    compile_counts,
    first_argmax,
)
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import KVCache, Llama
from cmat_jax.model.lora import LoRAConfig
from cmat_jax.tokenizer import load_tokenizer
from tests.fixtures_hf import save_tiny_tokenizer

TINY = ModelConfig(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
)
PROMPT_LENS = (3, 9, 14, 6)  # one prompt bucket (16) and one batch bucket (4)


@pytest.fixture(scope="module")
def tiny():
    """A tiny f32 model with two random (non-zero) LoRA slots, a trained BPE tokenizer, prompts."""
    model = Llama(TINY, rngs=nnx.Rngs(0))
    model.add_lora(LoRAConfig(rank=4, slots=("assistant", "checker")), rngs=nnx.Rngs(1))
    for i, b in enumerate(model.lora.b.values()):
        b[...] = 0.5 * jax.random.normal(jax.random.key(10 + i), b[...].shape)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 300, size=n).tolist() for n in PROMPT_LENS]
    return model, prompts


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def gen(tiny, tiny_tok):
    model, _ = tiny
    return Generator(model, tiny_tok, cache_dtype="float32")


_FORWARDS = {}


def _no_cache_logits(model, seq, adapter_id):
    """Raw logits [len(seq), V] of the plain (no cache) forward; one compile for the whole file
    (right-padded to 32 tokens: causal attention makes the padding invisible)."""
    if id(model) not in _FORWARDS:
        _FORWARDS[id(model)] = jax.jit(lambda ids, ad: model(ids, adapter_ids_B=ad))
    buf = np.zeros((1, 32), np.int32)
    buf[0, : len(seq)] = seq
    out = _FORWARDS[id(model)](buf, jnp.array([adapter_id], jnp.int32))
    return np.asarray(out)[0, : len(seq)]


def _no_cache_rollout(model, prompt, tokens, adapter_id=-1):
    """Raw logits [len(tokens), V] of the no-cache forward at each generated step."""
    logits = _no_cache_logits(model, list(prompt) + list(tokens), adapter_id)
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]


# ------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("prefill_impl", ["xla", "chunked"])
def test_cached_forward_logits_equal_no_cache(tiny, prefill_impl):
    """Prefill of left-padded ragged prompts + 3 single-token steps == the no-cache forward,
    with the prefill's attention over the cache ("xla") or through the chunked kernel."""
    model, prompts = tiny
    ref_model = model
    if prefill_impl != "xla":
        model = copy.deepcopy(model)
        model.config = dataclasses.replace(model.config, attention_impl=prefill_impl)
    T, S = 16, 24
    B = len(prompts)
    ids = np.zeros((B, T), np.int32)
    start = np.array([T - len(p) for p in prompts], np.int32)
    for i, p in enumerate(prompts):
        ids[i, start[i] :] = p
    extra = np.random.default_rng(1).integers(3, 300, size=(B, 3)).astype(np.int32)
    adapters = jnp.array([-1, 0, 1, 0], jnp.int32)

    @jax.jit
    def run(ids, start, extra):
        cache = KVCache.init(TINY, B, S, jnp.float32, start)
        h, cache = model.hidden(ids, adapter_ids_B=adapters, cache=cache, prefill=True)
        hs = [h[:, -1]]
        for t in range(extra.shape[1]):
            h, cache = model.hidden(extra[:, t : t + 1], adapter_ids_B=adapters, cache=cache)
            hs.append(h[:, 0])
        return jnp.stack(hs, 1) @ model.head_weight_DV()

    got = np.asarray(run(ids, start, extra))
    for i, p in enumerate(prompts):
        ref = _no_cache_logits(ref_model, list(p) + extra[i].tolist(), int(adapters[i]))
        np.testing.assert_allclose(got[i], ref[len(p) - 1 :], rtol=1e-4, atol=1e-4)


def test_greedy_tokens_and_logprobs_equal_no_cache(gen, tiny):
    model, prompts = tiny
    out = gen.generate(prompts, max_new_tokens=12, eos_ids=[])
    assert out.finish_reasons == ["length"] * 4 and out.lengths.tolist() == [12] * 4
    for p, toks, lps in zip(prompts, out.tokens, out.logprobs, strict=True):
        ref = _no_cache_rollout(model, p, toks, adapter_id=-1)
        assert toks == ref.argmax(-1).tolist()
        ref_lp = jax.nn.log_softmax(ref, axis=-1)[np.arange(len(toks)), toks]
        np.testing.assert_allclose(lps, ref_lp, rtol=1e-4, atol=1e-4)


def test_sampled_logprobs_are_tempered_model_logprobs(gen, tiny):
    """Behaviour log-probs (and `scores`) are log_softmax(logits / τ) of the row's temperature,
    before top-k / top-p; a greedy row in the same batch keeps τ = 1."""
    model, prompts = tiny
    tau = 1.7
    params = [SamplingParams(temperature=tau, top_k=5, top_p=0.9)] * 3 + [SamplingParams()]
    score_ids = [3, 17]
    out = gen.generate(
        prompts, max_new_tokens=12, sampling=params, key=jax.random.key(3), score_ids=score_ids
    )
    for i, (p, toks, lps) in enumerate(zip(prompts, out.tokens, out.logprobs, strict=True)):
        ref = _no_cache_rollout(model, p, toks, adapter_id=-1)
        top5 = np.argsort(-ref, axis=-1)[:, :5]
        assert all(t in row for t, row in zip(toks, top5, strict=True))
        t = tau if i < 3 else 1.0
        ref_logp = np.asarray(jax.nn.log_softmax(ref / t, axis=-1))
        np.testing.assert_allclose(lps, ref_logp[np.arange(len(toks)), toks], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out.scores[i], ref_logp[0, score_ids], rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_smollm2():
    """8 chat prompts of different lengths in one batch == HF greedy generate, token for token."""
    import torch
    import transformers

    from cmat_jax import load_model
    from cmat_jax.weights.registry import smollm2_gguf_path

    model, tok = load_model("smollm2-135m-instruct", dtype="float32")
    questions = [
        "Hi!",
        "What is the capital of France?",
        "Write a SQL query that counts the rows of table users.",
        "Name three colors.",
        "Explain in one sentence what a database index is and why it is useful for queries.",
        "2+2=?",
        "Translate 'good morning' to Spanish, then to French, then to German, please.",
        "What does the SQL keyword DISTINCT do?",
    ]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        for q in questions
    ]
    assert len({len(p) for p in prompts}) == len(prompts)
    new = 20
    out = Generator(model, tok, cache_dtype="float32").generate(prompts, max_new_tokens=new)

    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    eos = sorted(tok.eos_ids)
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new, eos_token_id=eos, pad_token_id=tok.pad_id
    )
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        assert out.tokens[i] == ref, (i, out.tokens[i], ref)
        assert out.finish_reasons[i] == ("eos" if ref[-1] in eos else "length")
        assert out.texts[i] == tok.decode([t for t in ref if t not in eos])


# ------------------------------------------------------------------------ sampling


def test_sampling_reproducible_with_fixed_key(gen, tiny):
    _, prompts = tiny
    params = SamplingParams(temperature=1.0, top_p=0.95)
    a = gen.generate(prompts, max_new_tokens=12, sampling=params, key=jax.random.key(7))
    b = gen.generate(prompts, max_new_tokens=12, sampling=params, key=jax.random.key(7))
    chunked = gen.generate(
        prompts, max_new_tokens=12, sampling=params, key=jax.random.key(7), chunk_steps=3
    )
    other = gen.generate(prompts, max_new_tokens=12, sampling=params, key=jax.random.key(8))
    assert a.tokens == b.tokens == chunked.tokens
    assert all(np.array_equal(x, y) for x, y in zip(a.logprobs, b.logprobs, strict=True))
    assert a.tokens != other.tokens


def test_top_k_1_and_tiny_top_p_are_greedy(gen, tiny):
    _, prompts = tiny
    greedy = gen.generate(prompts, max_new_tokens=12, eos_ids=[])
    k1 = SamplingParams(temperature=2.0, top_k=1)
    p0 = SamplingParams(temperature=2.0, top_p=1e-6)
    mixed = [k1, p0, SamplingParams(), k1]  # per-row sampling parameters
    for sampling in (k1, p0, mixed):
        out = gen.generate(
            prompts, max_new_tokens=12, sampling=sampling, key=jax.random.key(1), eos_ids=[]
        )
        assert out.tokens == greedy.tokens


def test_first_argmax_equals_argmax_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(64, 300)).astype(np.float32)  # many ties per row
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))
    x[3] = np.nan
    assert 0 <= int(first_argmax(jnp.asarray(x))[3]) < 300


def test_top_k_top_p_filter_keeps_the_right_set():
    p = np.array([[0.5, 0.3, 0.15, 0.05]] * 3, np.float32)
    logits = jnp.log(jnp.asarray(p))
    top_k = jnp.array([0, 3, 3], jnp.int32)
    top_p = jnp.array([0.7, 1.0, 0.75], jnp.float32)
    kept = np.isfinite(np.asarray(_filter_top_k_top_p(logits, top_k, top_p)))
    # top_p=0.7: 0.5 + 0.3 reach it; top_k=3; top_k=3 then top_p=0.75 of the renormalized 3.
    assert kept.tolist() == [
        [True, True, False, False],
        [True, True, True, False],
        [True, True, False, False],
    ]


def _reference_keep(x, k, p):
    order = np.argsort(-x, kind="stable")
    k = len(x) if k == 0 else min(k, len(x))
    top = order[:k]
    probs = np.exp(x[top] - x[top].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep = np.zeros(len(x), bool)
    keep[top[before < p]] = True
    return keep


def test_filter_matches_sort_reference_on_both_paths():
    """Candidate (top-256) path and full-sort fallback agree with a numpy sort reference."""
    rng = np.random.default_rng(0)
    V = 1000
    peaked = rng.normal(size=(4, V)) * 4.0  # the best 256 hold nearly all mass
    flat = rng.normal(size=(4, V)) * 0.1  # they do not: top_p = 0.9 needs the full sort
    settings = [(0, 0.9), (5, 1.0), (50, 0.5), (600, 0.95)]
    for x in (peaked, flat):
        k = np.array([s[0] for s in settings], np.int32)
        p = np.array([s[1] for s in settings], np.float32)
        got = np.isfinite(np.asarray(_filter_top_k_top_p(jnp.asarray(x, jnp.float32), k, p)))
        for row in range(4):
            ref = _reference_keep(x[row].astype(np.float32), k[row], p[row])
            assert (got[row] == ref).all(), (row, got[row].sum(), ref.sum())


def test_draw_follows_the_distribution():
    probs = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
    n = 8000
    x = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 5))
    draws = np.asarray(_draw(jax.random.split(jax.random.key(0), n), x))
    freq = np.bincount(draws, minlength=5) / n
    assert freq[1] == 0
    np.testing.assert_allclose(freq, probs, atol=0.02)


# ------------------------------------------------------------------------ stops, adapters


def test_eos_ends_a_row(gen, tiny):
    _, prompts = tiny
    ref = gen.generate(prompts, max_new_tokens=12, eos_ids=[])
    eos = ref.tokens[1][4]
    first = [toks.index(eos) if eos in toks else None for toks in ref.tokens]
    out = gen.generate(prompts, max_new_tokens=12, eos_ids=[eos])
    for i, f in enumerate(first):
        if f is None:
            assert out.finish_reasons[i] == "length" and out.tokens[i] == ref.tokens[i]
        else:
            assert out.finish_reasons[i] == "eos"
            assert out.tokens[i] == ref.tokens[i][: f + 1]
            assert out.texts[i] == gen.tokenizer.decode(ref.tokens[i][:f])


def test_per_row_max_new_tokens_cut_each_row_at_its_own_limit(gen, tiny):
    _, prompts = tiny
    ref = gen.generate(prompts, max_new_tokens=12, eos_ids=[])
    limits = [3, 12, 1, 7]
    out = gen.generate(prompts, max_new_tokens=limits, eos_ids=[])
    assert out.lengths.tolist() == limits and out.finish_reasons == ["length"] * 4
    for i, m in enumerate(limits):
        assert out.tokens[i] == ref.tokens[i][:m]
        np.testing.assert_allclose(out.logprobs[i], ref.logprobs[i][:m], rtol=1e-5, atol=1e-5)


def test_stop_strings_truncate_text_and_tokens(gen, tiny):
    _, prompts = tiny
    tok = gen.tokenizer
    ref = gen.generate(prompts, max_new_tokens=12, eos_ids=[])
    text = ref.texts[2]
    # A 2-character ASCII stop string from the middle of row 2's output.
    stop = next(
        text[i : i + 2]
        for i in range(4, len(text) - 1)
        if text[i : i + 2].isascii() and text[i : i + 2].strip() == text[i : i + 2]
    )
    out = gen.generate(prompts, max_new_tokens=12, eos_ids=[], stop=[stop], chunk_steps=2)
    for i, toks in enumerate(ref.tokens):
        full = ref.texts[i]
        if stop not in full:
            assert out.finish_reasons[i] == "length" and out.tokens[i] == toks
            continue
        k = next(k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k]))
        assert out.finish_reasons[i] == "stop"
        assert out.tokens[i] == toks[:k] and len(out.logprobs[i]) == k
        assert out.texts[i] == full[: full.index(stop) + len(stop)]
    assert out.finish_reasons[2] == "stop"


def test_streaming_delivers_every_token_once(gen, tiny):
    _, prompts = tiny
    got: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    out = gen.generate(
        prompts, max_new_tokens=12, eos_ids=[], stream=lambda i, t: got[i].extend(t), chunk_steps=5
    )
    assert [got[i] for i in range(len(prompts))] == out.tokens


def test_adapter_ids_mix_rows(gen, tiny):
    """Rows of one batch use different LoRA slots; -1 / 'none' rows equal the base model."""
    model, prompts = tiny
    same = [prompts[1]] * 4
    out = gen.generate(same, max_new_tokens=12, eos_ids=[], adapter_ids=["none", 0, -1, "checker"])
    base = gen.generate(same, max_new_tokens=12, eos_ids=[])  # no adapter ids: base model
    assert out.tokens[0] == out.tokens[2] == base.tokens[0]
    assert out.tokens[1] != out.tokens[0] and out.tokens[3] != out.tokens[0]
    assert out.tokens[1] != out.tokens[3]
    for row, slot in ((1, 0), (3, 1)):
        ref = _no_cache_rollout(model, same[row], out.tokens[row], adapter_id=slot)
        assert out.tokens[row] == ref.argmax(-1).tolist()


# ------------------------------------------------------------------------ prefix reuse


def _next_turn(prompts, outputs, rng):
    """Each prompt grows by its output and 4 new tokens (an environment's answer)."""
    return [
        p + t + rng.integers(3, 300, size=4).tolist() for p, t in zip(prompts, outputs, strict=True)
    ]


def test_prefix_cache_turns_equal_fresh_generation(gen, tiny):
    """Four turns of growing prompts, rows reordered every turn and one replaced by a new
    prompt, mixed adapters: with the prefix cache the tokens equal a fresh generation's and the
    log-probs match to 1e-5, while the last turn takes most of its prompt from the cache."""
    _, prompts = tiny
    rng = np.random.default_rng(7)
    pc = PrefixCache()
    cur, ads = list(prompts), [-1, 0, 1, 0]
    total = 0
    for turn in range(4):
        reused, last_len = pc.reused_tokens, sum(len(p) for p in cur)
        total += last_len
        kw = dict(max_new_tokens=8, eos_ids=[], adapter_ids=ads)
        out = gen.generate(cur, prefix_cache=pc, **kw)
        ref = gen.generate(cur, **kw)
        assert out.tokens == ref.tokens, turn
        for a, b in zip(out.logprobs, ref.logprobs, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        if turn == 0:
            assert pc.reused_tokens == 0
        cur = _next_turn(cur, out.tokens, rng)
        order = [2, 0, 3, 1]
        cur, ads = ([x[i] for i in order] for x in (cur, ads))
        if turn == 1:
            cur[3] = rng.integers(3, 300, size=7).tolist()
    assert pc.reused_tokens + pc.prefilled_tokens == total
    assert pc.reused_tokens - reused >= last_len // 2


def test_prefix_cache_shares_prefixes_across_rows_and_calls(gen, tiny):
    """Rows reuse any cached row's prefix (not only their own), from the last `max_calls`
    calls: a call of other prompts in between does not lose the first call's rows."""
    _, prompts = tiny
    rng = np.random.default_rng(11)
    head = rng.integers(3, 300, size=30).tolist()
    pc = PrefixCache(max_calls=2)
    kw = dict(max_new_tokens=4, eos_ids=[])
    gen.generate([[*head, 5, 6]], prefix_cache=pc, **kw)
    gen.generate(prompts, prefix_cache=pc, **kw)  # unrelated prompts in between
    assert pc.reused_tokens == 0
    shared = [head + rng.integers(3, 300, size=n).tolist() for n in (3, 9)]
    out = gen.generate(shared, prefix_cache=pc, **kw)
    # The head is cached; the rest (3 and 9 tokens) fits one 16-token block.
    assert pc.reused_tokens == (len(head) + 3 - 16) + (len(head) + 9 - 16)
    assert out.tokens == gen.generate(shared, **kw).tokens
    one = [[head[0]], head[:2]]  # a 1-token prompt has nothing to reuse
    assert gen.generate(one, prefix_cache=pc, **kw).tokens == gen.generate(one, **kw).tokens


def test_a_long_new_row_is_staged_not_shared(gen, tiny):
    """Three rows continue a cached turn (5 new tokens each) beside a new 90-token prompt. The
    new row's head is prefilled by a staged call of its own, so the others still prefill one
    16-token block (not 96) and reuse the rest; with `max_calls=1` the staged cache does not
    push out the cached turn. Tokens equal a fresh generation's, log-probs to 1e-5."""
    _, prompts = tiny
    rng = np.random.default_rng(5)
    pc = PrefixCache(max_calls=1)
    kw = dict(max_new_tokens=8, eos_ids=[], adapter_ids=[-1, 0, 1, 0])
    out = gen.generate(prompts, prefix_cache=pc, **kw)
    cur = _next_turn(prompts, out.tokens, rng)
    cur[3] = rng.integers(3, 300, size=90).tolist()
    before = (pc.reused_tokens, pc.prefilled_tokens)
    staged = gen.generate(cur, prefix_cache=pc, **kw)
    ref = gen.generate(cur, **kw)
    assert staged.tokens == ref.tokens
    for a, b in zip(staged.logprobs, ref.logprobs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    reused = pc.reused_tokens - before[0]
    assert reused == sum(max(len(p) - 16, 0) for p in cur[:3])
    assert reused + pc.prefilled_tokens - before[1] == sum(len(p) for p in cur)
    # The next turn reuses this call's rows, the staged new row included.
    nxt = _next_turn(cur, staged.tokens, rng)
    before = pc.reused_tokens
    assert gen.generate(nxt, prefix_cache=pc, **kw).tokens == gen.generate(nxt, **kw).tokens
    assert pc.reused_tokens - before == sum(max(len(p) - 16, 0) for p in nxt)
    # The staged call's cache is forgotten once the call is done.
    roomy = PrefixCache(max_calls=4)
    gen.generate(prompts, prefix_cache=roomy, **kw)
    gen.generate(cur, prefix_cache=roomy, **kw)
    assert len(roomy._calls) == 2


def test_split_block_only_when_it_pays():
    batch, length = (lambda n: bucket_batch(n)), (lambda n: bucket_length(n))
    # One 360-token row beside short ones: 8 x 96 + 1 x 384 token slots, not 8 x 384.
    assert _split_block(np.array([8, 8, 78, 78, 78, 360]), batch, length) == 96
    assert _split_block(np.array([8, 8, 555, 558, 562]), batch, length) == 16
    for even in ([64, 60, 64, 50], [300, 310], [12]):  # similar parts: one shared block
        assert _split_block(np.array(even), batch, length) is None


def test_prefix_cache_is_not_used_across_weights_or_adapters(tiny):
    """A row whose adapter changed, or any row after the weights changed, is prefilled in full
    and generates what a fresh call generates."""
    model, prompts = tiny
    model = copy.deepcopy(model)
    g = Generator(model, cache_dtype="float32")
    rng = np.random.default_rng(3)
    pc = PrefixCache()
    kw = dict(max_new_tokens=8, eos_ids=[])
    out = g.generate(prompts, adapter_ids=[0, 0, 1, 1], prefix_cache=pc, **kw)
    cur = _next_turn(prompts, out.tokens, rng)
    swapped = g.generate(cur, adapter_ids=[1, 1, 0, 0], prefix_cache=pc, **kw)
    assert pc.reused_tokens == 0
    assert swapped.tokens == g.generate(cur, adapter_ids=[1, 1, 0, 0], **kw).tokens
    cur = _next_turn(cur, swapped.tokens, rng)
    b = next(iter(model.lora.b.values()))
    b[...] = b[...] + 0.3
    changed = g.generate(cur, adapter_ids=[1, 1, 0, 0], prefix_cache=pc, **kw)
    assert pc.reused_tokens == 0
    assert changed.tokens == g.generate(cur, adapter_ids=[1, 1, 0, 0], **kw).tokens
    cur = _next_turn(cur, changed.tokens, rng)
    g.generate(cur, adapter_ids=[1, 1, 0, 0], prefix_cache=pc, **kw)
    assert pc.reused_tokens > 0  # same weights and adapters again: reused


# ------------------------------------------------------------------------ compile reuse, buckets


def test_rollout_loop_reuses_compiled_programs(gen, tiny):
    _, prompts = tiny
    gen.generate(prompts, max_new_tokens=12)
    before = compile_counts()
    # Other lengths in the same buckets, other sampling knobs, adapters, keys: no recompile.
    rng = np.random.default_rng(5)
    shorter = [rng.integers(3, 300, size=n).tolist() for n in (2, 16, 5)]
    gen.generate(shorter, max_new_tokens=9, sampling=SamplingParams(0.5, 3, 0.8))
    gen.generate(prompts, max_new_tokens=16, adapter_ids=[0, 1, -1, 0], key=jax.random.key(2))
    assert compile_counts() == before


def test_min_batch_pads_dwindling_batches_into_one_bucket(gen, tiny, tiny_tok):
    model, prompts = tiny
    padded = Generator(model, tiny_tok, cache_dtype="float32", min_batch=4)
    padded.generate(prompts, max_new_tokens=12)
    before = compile_counts()
    for n in (3, 2, 1):  # rows ending one by one: still the 4-row programs
        out = padded.generate(prompts[:n], max_new_tokens=12)
        ref = gen.generate(prompts[:n], max_new_tokens=12)
        assert out.tokens == ref.tokens
    assert compile_counts()["prefill"] - before["prefill"] <= 2  # only `gen`'s 2- and 1-row
    assert bucket_batch(1, minimum=4) == 4 and bucket_batch(5, minimum=4) == 8


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 64, 65, 256, 257, 300, 1000)] == [
        16, 16, 32, 64, 96, 256, 384, 384, 1024,
    ]  # fmt: skip
    assert [bucket_batch(n) for n in (1, 3, 4, 5, 16)] == [1, 4, 4, 8, 16]
    assert bucket_batch(3, multiple=8) == 8


# ------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors(gen, tiny):
    _, prompts = tiny
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        gen.generate([[5, 6], []])
    with pytest.raises(GenerationError, match="non-empty list"):
        gen.generate([])
    with pytest.raises(GenerationError, match=r"prompt 0 has 120 tokens.*cache holds 128"):
        gen.generate([[5] * 120], max_new_tokens=16)
    with pytest.raises(GenerationError, match="outside"):
        gen.generate([[5, 999]])
    with pytest.raises(GenerationError, match=r"adapter_ids\[1\] = 'critic' is not a LoRA slot"):
        gen.generate(prompts[:2], adapter_ids=["assistant", "critic"])
    with pytest.raises(GenerationError, match=r"adapter_ids\[0\] = 2 is not a valid slot"):
        gen.generate(prompts[:2], adapter_ids=[2, 0])
    with pytest.raises(GenerationError, match="adapter_ids has 1 entries for 2 prompts"):
        gen.generate(prompts[:2], adapter_ids=[0])
    no_lora = Generator(Llama(TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(GenerationError, match="model has no LoRA slots"):
        no_lora.generate(prompts[:1], adapter_ids=[0])
    with pytest.raises(GenerationError, match="temperature"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(GenerationError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(GenerationError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        gen.generate(prompts, max_new_tokens=0)
    with pytest.raises(GenerationError, match=r"max_new_tokens\[2\] must be an integer >= 1"):
        gen.generate(prompts, max_new_tokens=[4, 4, 0, 4])
    with pytest.raises(GenerationError, match="max_new_tokens has 2 entries for 4 prompts"):
        gen.generate(prompts, max_new_tokens=[4, 4])
    with pytest.raises(GenerationError, match="no tokenizer"):
        no_lora.generate(["hello"])
    with pytest.raises(ValueError, match="max_calls must be >= 1"):
        PrefixCache(max_calls=0)
    with pytest.raises(GenerationError, match=r"score_ids \[5, 320\] must be token ids"):
        gen.generate(prompts, max_new_tokens=1, score_ids=[5, 320])


# ------------------------------------------------------------------------ chat


def test_chat_streams_keeps_history_and_resets(tiny, tiny_tok):
    import io

    from cmat_jax.chat import ChatArgs, chat

    model, _ = tiny
    args = ChatArgs(max_new_tokens=6, chunk_steps=2)
    out = io.StringIO()
    history = chat(args, model, tiny_tok, io.StringIO("hello\nmore\n/reset\nhello\n"), out)
    assert [m["role"] for m in history] == ["user", "assistant"]
    reply = history[1]["content"]
    # Same conversation after /reset -> the same greedy reply, streamed exactly once.
    text = out.getvalue()
    assert text.startswith(reply + "\n") and text.endswith("\n[history cleared]\n" + reply + "\n")
    with pytest.raises(GenerationError, match="'critic' is not a LoRA slot"):
        chat(ChatArgs(slot="critic"), model, tiny_tok, io.StringIO("hi\n"), io.StringIO())


def test_chat_cli_driven_by_a_pipe(tmp_path):
    import subprocess
    import sys

    from tests.fixtures_hf import save_tiny_model_dir

    path = save_tiny_model_dir(tmp_path / "m")
    cmd = [sys.executable, "-m", "cmat_jax.chat", "--model", str(path), "--dtype", "float32"]
    cmd += ["--max-new-tokens", "5"]
    proc = subprocess.run(
        cmd, input="hello\n/reset\nhello\n/quit\nignored\n", capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("[history cleared]\n")
    assert first == second and first.endswith("\n") and len(first) > 1
    bad = subprocess.run([*cmd, "--slot", "critic"], input="hi\n", capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --slot: 'critic' is not")


# ------------------------------------------------------------------------ sharding

_MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
from cmat_jax.inference.generate import Generator, PrefixCache, SamplingParams, cache_spec
from cmat_jax.model.config import ModelConfig
from cmat_jax.model.llama import KVCache, Llama
from cmat_jax.sharding import shard_model
cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128)
rng = np.random.default_rng(0)
prompts = [rng.integers(3, 300, size=n).tolist() for n in (3, 9, 14)]
kw = dict(max_new_tokens=10, eos_ids=[], sampling=SamplingParams(1.0, 20, 0.9),
          key=jax.random.key(3))
ref = Generator(Llama(cfg, rngs=nnx.Rngs(0)), cache_dtype="float32").generate(prompts, **kw)
mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
assert cache_spec(mesh) == P(None, ("data", "fsdp"), "tensor", None, None), cache_spec(mesh)
model = shard_model(Llama(cfg, rngs=nnx.Rngs(0)), mesh)
out = Generator(model, cache_dtype="float32", mesh=mesh).generate(prompts, **kw)
assert out.tokens == ref.tokens, (out.tokens, ref.tokens)
np.testing.assert_allclose(np.concatenate(out.logprobs), np.concatenate(ref.logprobs), atol=1e-4)
# A second turn that reuses the sharded cache's prefixes.
pc = PrefixCache()
sharded = Generator(model, cache_dtype="float32", mesh=mesh)
sharded.generate(prompts, prefix_cache=pc, **kw)
turn2 = [p + t + [7, 8, 9] for p, t in zip(prompts, out.tokens)]
out2 = sharded.generate(turn2, prefix_cache=pc, **kw)
ref2 = Generator(Llama(cfg, rngs=nnx.Rngs(0)), cache_dtype="float32").generate(turn2, **kw)
assert pc.reused_tokens > 0 and out2.tokens == ref2.tokens, (pc.reused_tokens, out2.tokens)
# A third turn beside a new 80-token prompt: its head is prefilled by a staged sharded call,
# the continuing rows prefill one 16-token block.
turn3 = [p + t + [7, 8, 9] for p, t in zip(turn2[:2], out2.tokens)]
turn3.append(rng.integers(3, 300, size=80).tolist())
before = pc.reused_tokens
out3 = sharded.generate(turn3, prefix_cache=pc, **kw)
ref3 = Generator(Llama(cfg, rngs=nnx.Rngs(0)), cache_dtype="float32").generate(turn3, **kw)
assert out3.tokens == ref3.tokens, (out3.tokens, ref3.tokens)
assert pc.reused_tokens - before == sum(len(p) - 16 for p in turn3[:2]), pc.reused_tokens
print("OK")
"""


def test_mesh_sharded_generation_equals_single_device():
    """4 host devices, mesh data=2 x tensor=2: cache over batch and kv heads, same tokens (also
    for a second turn that reuses the first's cached prefixes)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]
