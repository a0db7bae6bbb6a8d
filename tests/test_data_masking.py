"""Assistant-only loss masks from chat templates, with real tokenizers trained in the test."""

from __future__ import annotations

import numpy as np
import pytest

from cmat_jax.data import DataError, load_dataset, parse_record, tokenize_conversation
from cmat_jax.tokenizer import load_tokenizer
from cmat_jax.weights.registry import smollm2_gguf_path
from tests.test_data_helpers import (
    make_llama2_tokenizer,
    make_tokenizer,
    messages_record,
    sharegpt_record,
    write_jsonl,
)


@pytest.fixture(scope="module")
def chatml():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    return make_llama2_tokenizer(tmp_path_factory.mktemp("spm"))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


AGENT = messages_record(
    ("system", "You are a SQL agent."),
    ("user", "How many users are older than 30?"),
    ("assistant", "Action: Operation\n```sql\nSELECT COUNT(*) FROM users WHERE age > 30;\n```"),
    ("user", "[(7,)]"),
    ("assistant", 'Action: Answer\nFinal Answer: ["7"]'),
    ("user", "thanks"),  # trailing turn after the last assistant: carries no loss, dropped
)


def test_chatml_mask_is_exactly_the_assistant_turns(chatml):
    conv = parse_record(AGENT, "agent.jsonl:1")
    ex = tokenize_conversation(chatml, conv)
    asst = [m.content for m in conv.messages if m.role == "assistant"]
    spans = runs(ex.loss_mask)
    assert [chatml.decode(ex.tokens[a:b]) for a, b in spans] == [c + "<|im_end|>" for c in asst]
    # Each run starts right after the generation prompt and ends on the end-of-turn token.
    for a, b in spans:
        assert chatml.decode(ex.tokens[:a]).endswith("<|im_start|>assistant\n")
        assert ex.tokens[b - 1] == chatml.eos_id
    # Same ids as the tokenizer's own apply_chat_template, cut after the last assistant turn.
    full = chatml.apply_chat_template(conv.template_messages(), tokenize=True)
    assert ex.tokens.dtype == np.int32 and ex.loss_mask.dtype == bool
    assert ex.tokens.tolist() == full[: len(ex.tokens)]
    assert chatml.decode(full[len(ex.tokens) :]) == "<|im_start|>user\nthanks<|im_end|>\n"
    assert not ex.truncated


def test_smollm2_real_tokenizer_and_template():
    # The real SmolLM2-135M-Instruct tokenizer and template (which inserts a default system
    # prompt when the conversation has none).
    tok = load_tokenizer(smollm2_gguf_path())
    rec = sharegpt_record(
        *[
            (r, m["content"])
            for r, m in zip(["human", "gpt"] * 2, AGENT["messages"][1:5], strict=True)
        ]
    )
    conv = parse_record(rec, "agent.jsonl:1")
    ex = tokenize_conversation(tok, conv)
    assert ex.tokens.tolist() == tok.apply_chat_template(conv.template_messages(), tokenize=True)
    assert tok.decode(ex.tokens).startswith("<|im_start|>system\nYou are a helpful AI assistant")
    asst = [m.content for m in conv.messages if m.role == "assistant"]
    spans = runs(ex.loss_mask)
    assert [tok.decode(ex.tokens[a:b]) for a, b in spans] == [c + "<|im_end|>" for c in asst]


def test_loss_flags_and_weights(chatml):
    rec = sharegpt_record(
        ("human", "task"),
        ("gpt", "OK"),
        ("human", "go"),
        ("gpt", "done"),
        loss=(None, False, None, None),
    )
    ex = tokenize_conversation(chatml, parse_record(rec, "s.jsonl:1"))
    assert [chatml.decode(ex.tokens[a:b]) for a, b in runs(ex.loss_mask)] == ["done<|im_end|>"]

    rec = messages_record(("user", "a"), ("assistant", "one"), ("user", "b"), ("assistant", "two"))
    rec["messages"][1]["weight"] = 0.25
    ex = tokenize_conversation(chatml, parse_record(rec, "m.jsonl:1"))
    (a1, b1), (a2, b2) = runs(ex.loss_mask)
    assert np.all(ex.weights[a1:b1] == 0.25) and np.all(ex.weights[a2:b2] == 1.0)
    assert np.all(ex.weights[~ex.loss_mask] == 0)


def test_llama2_sentencepiece_template(llama2):
    msgs = [m for m in AGENT["messages"] if m["role"] != "user" or m["content"] != "thanks"]
    conv = parse_record({"messages": msgs}, "agent.jsonl:1")
    ex = tokenize_conversation(llama2, conv)
    full = llama2.apply_chat_template(conv.template_messages(), tokenize=True)
    assert ex.tokens.tolist() == full
    assert full[0] == llama2.bos_id  # the template writes BOS; it is not added twice
    asst = [m.content for m in conv.messages if m.role == "assistant"]
    spans = runs(ex.loss_mask)
    # The template renders ' ' + content.strip() + ' ' + eos_token after '[/INST]'.
    assert [llama2.decode(ex.tokens[a:b]) for a, b in spans] == [c + " </s>" for c in asst]
    assert all(ex.tokens[b - 1] == llama2.eos_id for _, b in spans)


def test_boundary_merge_falls_back_to_per_turn_tokens(chatml):
    # The generation prompt ends with a space that BPE would merge into the first answer token.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    )
    rec = messages_record(("user", "count users"), ("assistant", "name FROM users"))
    conv = parse_record(rec, "m.jsonl:1")
    text = chatml.apply_chat_template(conv.template_messages(), template=template)

    class Templated:  # the real tokenizer, rendering with the template above
        eos_ids = chatml.eos_ids
        encode, decode = chatml.encode, chatml.decode

        def apply_chat_template(self, messages, **kw):
            return chatml.apply_chat_template(messages, template=template, **kw)

    ex = tokenize_conversation(Templated(), conv)
    assert ex.tokens.tolist() != chatml.encode(text)  # the merged tokenization was not used
    assert chatml.decode(ex.tokens) == text
    ((a, b),) = runs(ex.loss_mask)
    assert chatml.decode(ex.tokens[:a]) == "User: count users\nAssistant: "
    assert chatml.decode(ex.tokens[a:b]) == "name FROM users<|im_end|>"


def test_dummy_prefix_pieces_use_prefix_boundaries(llama2):
    # sentencepiece adds '▁' to text encoded on its own, so the answer tokenized alone differs
    # from the answer inside the chat; boundaries then come from the prefixes' tokenizations.
    template = (
        "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + eos_token + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}"
    )

    class Templated:  # the real sentencepiece tokenizer, rendering with the template above
        eos_ids = llama2.eos_ids
        encode, decode = llama2.encode, llama2.decode

        def apply_chat_template(self, messages, **kw):
            return llama2.apply_chat_template(messages, template=template, **kw)

    conv = parse_record(
        messages_record(("user", "count users"), ("assistant", "Hello there")), "p:1"
    )
    text = Templated().apply_chat_template(conv.template_messages())
    ex = tokenize_conversation(Templated(), conv)
    assert ex.tokens.tolist() == llama2.encode(text, add_bos=False)[: len(ex.tokens)]
    ((a, b),) = runs(ex.loss_mask)
    assert llama2.decode(ex.tokens[a:b]) == "Hello there</s>"
    assert llama2.encode("Hello there</s>", add_bos=False) != ex.tokens[a:b].tolist()


def test_template_that_rewrites_history_is_refused(chatml):
    template = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endfor %}"
    )

    class Templated:
        eos_ids = chatml.eos_ids
        encode, decode = chatml.encode, chatml.decode

        def apply_chat_template(self, messages, **kw):
            return chatml.apply_chat_template(messages, template=template, **kw)

    conv = parse_record(
        messages_record(("user", "u"), ("assistant", "a"), ("user", "v")), "t.jsonl:9"
    )
    with pytest.raises(DataError, match=r"t\.jsonl:9: chat template renders message 1 differently"):
        tokenize_conversation(Templated(), conv)


LONG = messages_record(
    ("user", "first question"),
    ("assistant", "short answer"),
    ("user", "second question " * 20),
    ("assistant", "long answer " * 20),
)


def test_overlong_error_names_source_and_length(chatml):
    conv = parse_record(LONG, "long.jsonl:3")
    n = len(tokenize_conversation(chatml, conv).tokens)
    with pytest.raises(
        DataError, match=rf"long\.jsonl:3: conversation is {n} tokens, longer than seq_len 40"
    ):
        tokenize_conversation(chatml, conv, seq_len=40, overlong="error")


def test_overlong_truncate_drops_whole_trailing_turns(chatml):
    conv = parse_record(LONG, "long.jsonl:3")
    first_turn = tokenize_conversation(
        chatml, parse_record({"messages": LONG["messages"][:2]}, "x:1")
    )
    n1 = len(first_turn.tokens)
    ex = tokenize_conversation(chatml, conv, seq_len=n1 + 10, overlong="truncate")
    assert ex.truncated
    assert ex.tokens.tolist() == first_turn.tokens.tolist()
    assert ex.loss_mask.tolist() == first_turn.loss_mask.tolist()


def test_overlong_truncate_cuts_inside_a_single_long_turn(chatml):
    conv = parse_record(messages_record(("user", "q"), ("assistant", "word " * 100)), "one.jsonl:1")
    full = tokenize_conversation(chatml, conv)
    ex = tokenize_conversation(chatml, conv, seq_len=30, overlong="truncate")
    assert ex.truncated and len(ex.tokens) == 30
    assert ex.tokens.tolist() == full.tokens[:30].tolist()
    assert ex.loss_mask.tolist() == full.loss_mask[:30].tolist() and ex.loss_mask.any()


def test_dataset_counts_truncated_and_dropped(chatml, tmp_path):
    tiny_room = messages_record(("user", "question " * 30), ("assistant", "answer"))
    path = write_jsonl(
        tmp_path / "d.jsonl", [LONG, tiny_room, messages_record(("user", "q"), ("assistant", "a"))]
    )
    ds = load_dataset(path, chatml, seq_len=25, overlong="truncate")
    assert (ds.stats.truncated, ds.stats.dropped_overlong, ds.stats.conversations) == (1, 1, 2)
    assert [s.rsplit(":", 1)[1] for s in ds.sources] == ["1", "3"]
    assert max(ds.length(i) for i in range(len(ds))) <= 25
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: conversation is \d+ tokens, longer than seq_len 25"
    ):
        load_dataset(path, chatml, seq_len=25, overlong="error")
