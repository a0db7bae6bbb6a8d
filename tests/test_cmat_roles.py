"""Roles, prompts, the Checker's verdict grammar and its one-token p_accept."""

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from cmat_jax.cmat.roles import (
    CHECKER_PREFIX,
    NO_REASON,
    assistant_messages,
    checker_messages,
    checker_prompt_text,
    clean_reflection,
    fit_history,
    format_verdict,
    make_roles,
    p_accept,
    parse_verdict,
    reflector_messages,
    rejection_feedback,
    slot_index,
    verdict_token_ids,
)
from cmat_jax.tokenizer import Tokenizer

CORPUS = [
    "Verdict: accept",
    "Verdict: reject: the column Title does not exist",
    "Action: Operation\n```sql\nSELECT name FROM people WHERE age > 30;\n```",
    'Action: Answer\nFinal Answer: ["Alice", "Bob"]',
    "A reviewer rejected this action. Revise it and reply again.",
    "You review the next action an SQL programmer wants to take.",
    "Is this action correct? Answer with the verdict.",
] * 20


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    """A real byte-level BPE (GPT-2 / SmolLM2 style) trained here, behind the project Tokenizer."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS, trainer)
    return Tokenizer(backend, bos_token=None, eos_token="<|im_end|>", fallback_template="chatml")


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory) -> Tokenizer:
    """A real sentencepiece BPE model (Llama style: dummy prefix, ▁ pieces) trained here."""
    out = tmp_path_factory.mktemp("spm")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=200,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return Tokenizer.from_dir(out)


@pytest.mark.parametrize(
    ("text", "accept", "reason"),
    [
        (" accept", True, ""),
        ("Verdict: ACCEPT", True, ""),
        ("  accepted. The query looks right.", True, ""),
        ("**Accept**", True, ""),
        ("I approve this action.", True, ""),
        (" reject: the column Title does not exist", False, "the column Title does not exist"),
        ("reject: 'Title' is not a column", False, "'Title' is not a column"),
        ("Verdict: Reject - wrong table name\nMore text here.", False, "wrong table name"),
        ("REJECTED. Because the WHERE clause is missing", False, "the WHERE clause is missing"),
        ("**Reject**: use `people`, not `persons`", False, "use `people`, not `persons`"),
        ("reject", False, NO_REASON),
        ("Unacceptable: the table is dropped", False, "the table is dropped"),
        ("I would not accept this: it drops the table", False, "it drops the table"),
        ("\n\n  Reject:\n  quote the string value\n", False, "quote the string value"),
        ("reject: reason. accept", False, "reason. accept"),  # the first verdict word decides
        # A weak Checker repeats the verdict word instead of giving a reason.
        (" reject: reject: reject: reject: reje", False, NO_REASON),
        (" reject: accept: reject: reject", False, NO_REASON),
        (" reject: reject: wrong table name", False, "wrong table name"),
    ],
)
def test_parse_verdict_on_messy_output(text, accept, reason):
    v = parse_verdict(text)
    assert v.parsed
    assert v.accept is accept
    assert v.reason == reason


@pytest.mark.parametrize("text", ["", "   ", "looks fine to me", "acceptance test", "<|im_end|>"])
def test_unparseable_verdict_takes_the_documented_default(text):
    v = parse_verdict(text)
    assert not v.parsed
    assert v.accept is True  # DEFAULT_VERDICT_ACCEPT: the environment then labels the action
    assert v.reason == ""


def test_format_verdict_round_trips_through_the_parser():
    assert format_verdict(True) == " accept"
    assert format_verdict(False, "  wrong\n column ") == " reject: wrong column"
    assert format_verdict(False) == f" reject: {NO_REASON}"
    for accept, reason in [(True, ""), (False, "wrong column name")]:
        v = parse_verdict(CHECKER_PREFIX + format_verdict(accept, reason))
        assert (v.accept, v.reason) == (accept, reason)


def test_roles_and_adapter_slots():
    roles = make_roles()
    assert roles.assistant.adapter_slot == "assistant"
    assert roles.checker.adapter_slot == "checker"
    assert roles.reflector.adapter_slot == "assistant"  # the Assistant in reflect mode
    assert roles.user.adapter_slot == "none"
    assert roles.slots() == ("none", "assistant", "checker")
    shared = make_roles(checker_slot="assistant")
    assert shared.slots() == ("none", "assistant")
    table = {"none": 0, "assistant": 1, "checker": 2}
    assert [slot_index(roles, table, n) for n in ("user", "assistant", "checker", "reflector")] == [
        0,
        1,
        2,
        1,
    ]
    with pytest.raises(ValueError, match="adapter slot 'checker'"):
        slot_index(roles, {"none": 0, "assistant": 1}, "checker")
    # the DB Assistant prompt states the AgentBench action grammar
    p = roles.assistant.system_prompt
    for needle in ("Action: Operation", "```sql", "Action: Answer", "Final Answer:"):
        assert needle in p
    assert "Verdict: accept" in roles.checker.system_prompt
    with pytest.raises(ValueError, match="task family 'os'"):
        make_roles("os")
    os_roles = make_roles("os", assistant_prompt="Act in a shell with Action: bash.")
    assert os_roles.assistant.system_prompt.startswith("Act in a shell")
    with pytest.raises(ValueError, match="assistant_slot"):
        make_roles(assistant_slot="none")


def test_message_builders():
    roles = make_roles()
    history = [
        {"role": "assistant", "content": "Action: Operation\n```sql\nSELECT * FROM t;\n```"},
        {"role": "user", "content": "[(1, 'a')]"},
    ]
    msgs = assistant_messages(
        roles.assistant, "How many rows?", history, ["Check column names first."]
    )
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    # Lessons first: the task (and its table) stays right before the reply.
    assert msgs[1]["content"].endswith("\n\nHow many rows?")
    assert "- Check column names first." in msgs[1]["content"]
    assert assistant_messages(roles.assistant, "How many rows?")[1]["content"] == "How many rows?"

    cm = checker_messages(
        roles.checker, "How many rows?", history, "Action: Answer\nFinal Answer: [1]"
    )
    assert [m["role"] for m in cm] == ["system", "user"]
    assert cm[0]["content"] == roles.checker.system_prompt
    body = cm[1]["content"]
    assert (
        body.index("How many rows?")
        < body.index("SELECT * FROM t;")
        < body.index("Final Answer: [1]")
    )

    rm = reflector_messages(roles.reflector, "How many rows?", history, 0.0, "wrong answer")
    assert "not solved" in rm[1]["content"] and "wrong answer" in rm[1]["content"]
    assert rejection_feedback("bad column").startswith(
        "A reviewer rejected this action: bad column."
    )
    assert (
        clean_reflection("Reflection:  I used the   wrong\ncolumn.") == "I used the wrong column."
    )
    long = clean_reflection("word " * 200, max_chars=30)
    assert len(long) <= 30 and long.endswith("word")
    acted = "Check the columns first.\nAction: Operation\n```sql\nSELECT * FROM `t`\n```"
    assert clean_reflection(acted) == "Check the columns first."
    assert clean_reflection("Action: Answer\nFinal Answer: [1]") == ""


@pytest.mark.parametrize("which", ["bpe", "spm"])
def test_verdict_token_ids_with_real_tokenizers(which, bpe_tokenizer, spm_tokenizer):
    tok = bpe_tokenizer if which == "bpe" else spm_tokenizer
    accept_id, reject_id = verdict_token_ids(tok)
    assert accept_id != reject_id
    # in context: the prompt as the engine renders it, then each verdict; the token right after
    # the prompt is the one looked up
    roles = make_roles()
    prompt = checker_prompt_text(
        tok, checker_messages(roles.checker, "task", [], "Action: Answer\nFinal Answer: []")
    )
    assert prompt.endswith("<|im_start|>assistant\n" + CHECKER_PREFIX)
    n = len(tok.encode(prompt, add_bos=False))
    for word_id, verdict in (
        (accept_id, format_verdict(True)),
        (reject_id, format_verdict(False, "bad column")),
    ):
        ids = tok.encode(prompt + verdict, add_bos=False)
        assert ids[:n] == tok.encode(prompt, add_bos=False)
        assert ids[n] == word_id
        piece = tok.decode([word_id]).strip()
        assert piece and verdict.strip().startswith(piece)


def test_verdict_token_ids_rejects_a_tokenizer_that_cannot_tell_them_apart():
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trained without the verdict words: both start with the bare "Ġ" byte token
    backend.train_from_iterator(
        ["Verdict: x"] * 5,
        trainers.BpeTrainer(
            vocab_size=270,
            special_tokens=["<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = Tokenizer(backend, bos_token=None, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="same token"):
        verdict_token_ids(tok)


def test_p_accept_numpy_and_jax():
    ids = (3, 5)
    logits = np.zeros((2, 8), dtype=np.float32)
    logits[0, 3], logits[0, 5] = 2.0, 0.0
    logits[1, 3], logits[1, 5] = -1.0, 1.0
    logits[:, 0] = 50.0  # other tokens do not matter
    expected = [math.exp(2) / (math.exp(2) + 1), math.exp(-1) / (math.exp(-1) + math.exp(1))]
    np.testing.assert_allclose(p_accept(logits, ids), expected, rtol=1e-6)
    got = jax.jit(lambda x: p_accept(x, ids))(jnp.asarray(logits))
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    extreme = np.array([0.0, 0.0, 0.0, 1e4, 0.0, -1e4], dtype=np.float32)
    assert p_accept(extreme, ids) == 1.0
    assert p_accept(-extreme, ids) == 0.0


def test_verdict_tokens_of_smollm2():
    """The default model's tokenizer has " accept" and " reject" as single tokens."""
    from cmat_jax.tokenizer import load_tokenizer
    from cmat_jax.weights.registry import smollm2_gguf_path

    tok = load_tokenizer(smollm2_gguf_path())
    accept_id, reject_id = verdict_token_ids(tok)
    assert (tok.decode([accept_id]), tok.decode([reject_id])) == (" accept", " reject")
    roles = make_roles()
    prompt = checker_prompt_text(
        tok, checker_messages(roles.checker, "task", [], "Action: Answer\nFinal Answer: []")
    )
    n = len(tok.encode(prompt, add_bos=False))
    assert tok.encode(prompt + format_verdict(True), add_bos=False)[n:] == [accept_id]
    assert tok.encode(prompt + format_verdict(False, "x"), add_bos=False)[n] == reject_id


def test_fit_history_drops_oldest_steps_first():
    history = [
        {"role": "assistant", "content": f"a{i}"}
        if k == 0
        else {"role": "user", "content": f"o{i}"}
        for i in range(4)
        for k in range(2)
    ]

    def encode(h):  # one "token" per character of the head plus each message
        return list("SYSTEM+TASK" + "".join(m["content"] for m in h))

    assert encode(history) == fit_history(encode, history, 100)
    fitted = "".join(fit_history(encode, history, len("SYSTEM+TASK") + 5))
    assert fitted == "SYSTEM+TASKa3o3"  # whole (action, feedback) pairs, newest kept
    assert "".join(fit_history(encode, history, 4)) == "TASK"  # nothing left to drop: cut
