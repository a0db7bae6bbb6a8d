"""Tokenizer parity with transformers: SmolLM2 GGUF, a sentencepiece model trained here, and
tokenizer.json directories; chat templates; bad input."""

from __future__ import annotations

import copy
import io
import json
import random
import re
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
from gguf import GGUFWriter
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer, LlamaTokenizer

from cmat_jax.tokenizer import BUILTIN_TEMPLATES, Tokenizer, TokenizerError, load_tokenizer
from cmat_jax.weights.registry import smollm2_gguf_path

# ---------------------------------------------------------------------------------------------
# Deterministic test strings.

_FRAGMENTS = [
    "Hello, world!",
    "the quick brown fox",
    "It's we'll they'RE I'M",
    "naïve café résumé",
    "Ünïcödé Straße",
    "你好，世界",
    "日本語のテキスト",
    "한국어",
    "Привет мир",
    "مرحبا بالعالم",
    "😀",
    "👩‍💻",
    "🇺🇸🇯🇵",
    "❤️",
    "x²³",
    "½ ¾",
    "٣٤٥",
    "１２３",
    "Ⅻ",
    "3.14159",
    "1,000,000",
    "-42",
    "0x1F",
    "1e-9",
    "SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;",
    "INSERT INTO t (a, b) VALUES ('x', 2);",
    "UPDATE `Title` SET x = NULL",
    "def f(x):\n    return x",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    '<div class="a">b</div>',
    "**bold** _it_",
    "# Heading\n\n- item",
    '{"key": [1, 2, {"n": null}]}',
    "https://example.com/a?b=c&d=e",
    "a\tb",
    "\r\n",
    "\n\n\n",
    "   ",
    "\t\t",
    " ",
    "\u00a0",
    "\u200b",
    "\u3000",
    "--",
    "...",
    "<|im_start|>",
    "<|im_end|>",
    "<s>",
    "</s>",
    "<unk>",
    "[INST]",
    "<<SYS>>",
    "▁",
    "Ġ",
]
_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0123456789",
    " \t\n\r",
    "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
    "éèêëàâäôöûüçñßøåæœ",
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年",
    "αβγδεζηθλμπσω",
    "😀😂🤖🎉🔥👍🏽",
    "²³¹¼½¾٠١٢٣",
]
_HARD_CASES = [
    "",
    " ",
    "  ",
    "\n",
    " \n ",
    "a",
    " a",
    "  leading",
    "trailing  ",
    "a  b   c    d",
    "\t\tindented\n\t\tcode",
    "line1\r\nline2\r\n",
    "x" * 300,
    " " * 17 + "x",
    "🤖" * 20,
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] hi [/INST]</s>",
    "<s><s></s>",
    "text<|im_end|>more",
    "ĠĠ weird ▁▁ markers",
    "\u0000nul\u0001ctl",
    "\ufeffbom",
    "e\u0301 combining",
    "Ａｂｃ fullwidth",
    "12345678901234567890",
    "x²³ ¹/₂ ٣٤ 12a",
]


def _random_string(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.55:
            parts.append(rng.choice(_FRAGMENTS))
        else:
            alphabet = rng.choice(_ALPHABETS)
            parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))))
        parts.append(rng.choice(["", " ", " ", "  ", "\n", "\t", ", "]))
    return "".join(parts)


def _test_strings(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return _HARD_CASES + [_random_string(rng) for _ in range(n)]


STRINGS = _test_strings()


def _assert_parity(ours: Tokenizer, hf, strings: list[str]) -> None:
    """Ids identical to `hf.encode` (default special tokens and none); decodes identical."""
    ours_ids = ours.encode_batch(strings)
    for text, ids in zip(strings, ours_ids, strict=True):
        ref = hf.encode(text)
        assert ids == ref, f"ids differ for {text!r}: {ids} != {ref}"
        assert ours.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == hf.decode(ref), text
        assert ours.decode(ids, skip_special=True) == hf.decode(ref, skip_special_tokens=True), text


_MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a SQL expert."},
        {"role": "user", "content": "List the tables."},
        {"role": "assistant", "content": "SHOW TABLES;"},
        {"role": "user", "content": "  Now count rows in `users`.  "},
    ],
    [
        {"role": "system", "content": "Be brief.\nVery brief."},
        {"role": "user", "content": "hi 😀"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye <s> </s>"},
    ],
]


def _assert_chat_parity(ours: Tokenizer, hf) -> None:
    for messages in _MESSAGES:
        for gen in (False, True):
            text = ours.apply_chat_template(messages, add_generation_prompt=gen)
            ref = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert text == ref
            ids = ours.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            ref_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            assert ids == list(ref_ids["input_ids"])


# ---------------------------------------------------------------------------------------------
# (a) SmolLM2 GGUF (byte-level BPE from GGUF metadata) and (c) its tokenizer.json.


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_gguf) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf):
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_gguf_metadata(smollm2_ours):
    tok = smollm2_ours
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.eos_ids == frozenset({2})
    assert tok.add_bos is False
    assert tok.id_to_token(2) == "<|im_end|>" and tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("no-such-token-xyz") is None
    assert tok.chat_template.startswith("{% for message in messages %}")


def test_smollm2_gguf_parity(smollm2_ours, smollm2_hf):
    # SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split off every numeral
    # before the GPT-2 regex; transformers' GGUF loader omits that step (it changes e.g. "  12" and
    # "x²³"). Compare with transformers' tokenizer given the model's published pre-tokenizer...
    published = copy.deepcopy(smollm2_hf)
    published.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    assert len(STRINGS) >= 1000
    _assert_parity(smollm2_ours, published, STRINGS)
    # ... and with the unmodified loader on every string both pre-tokenizers split alike.
    gpt2_pre = smollm2_hf.backend_tokenizer.pre_tokenizer
    same_split = [
        s
        for s in STRINGS
        if gpt2_pre.pre_tokenize_str(s)
        == published.backend_tokenizer.pre_tokenizer.pre_tokenize_str(s)
    ]
    assert len(same_split) >= 500
    _assert_parity(smollm2_ours, smollm2_hf, same_split)
    # Byte-level BPE is lossless.
    for text in STRINGS:
        assert smollm2_ours.decode(smollm2_ours.encode(text)) == text


def test_smollm2_numerals_split_individually(smollm2_ours, smollm2_hf):
    text = "x²³ ¹/₂ ٣٤ 12a"
    pieces = ["x", "²", "³", " ", "¹", "/", "₂", " ", "٣", "٤", " ", "1", "2", "a"]
    assert smollm2_ours.encode(text) == [i for p in pieces for i in smollm2_ours.encode(p)]
    # transformers' GGUF loader keeps "²³" together (no individual numeral split).
    assert smollm2_hf.encode(text) != smollm2_ours.encode(text)


def test_smollm2_chat_template_parity(smollm2_ours, smollm2_hf):
    _assert_chat_parity(smollm2_ours, smollm2_hf)
    text = smollm2_ours.apply_chat_template(_MESSAGES[0], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_tokenizer_json_dir(smollm2_hf, tmp_path):
    smollm2_hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    ours = Tokenizer.from_dir(tmp_path)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (49152, 1, 2, 2)
    assert ours.add_bos is False
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    _assert_parity(ours, reloaded, STRINGS)
    _assert_chat_parity(ours, reloaded)


# ---------------------------------------------------------------------------------------------
# (b) A sentencepiece BPE model trained here (Llama-2 style: byte fallback, identity normalizer).


def _train_sentencepiece(vocab_size: int = 800, model_type: str = "bpe") -> bytes:
    rng = random.Random(1)
    syllables = [
        "ka",
        "to",
        "ri",
        "men",
        "sa",
        "lo",
        "qu",
        "est",
        "ion",
        "ing",
        "th",
        "er",
        "an",
        "re",
        "on",
        "at",
        "en",
        "nd",
        "ti",
        "es",
        "or",
        "te",
        "of",
        "ed",
        "is",
        "it",
    ]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    words += ["SELECT", "FROM", "WHERE", "def", "return", "你好", "世界", "café", "😀"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(4000)]
    lines += _test_strings(300, seed=7)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, user_defined_symbols=["<tool>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return buf.getvalue()


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spm")
    (root / "tokenizer.model").write_bytes(_train_sentencepiece())
    config = {"add_bos_token": True, "chat_template": BUILTIN_TEMPLATES["llama2"]}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def spm_hf(spm_dir):
    return LlamaTokenizer.from_pretrained(spm_dir)


def test_sentencepiece_parity(spm_dir, spm_hf):
    ours = Tokenizer.from_dir(spm_dir)
    assert ours.vocab_size == 800
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, 2, True)
    assert ours.eos_ids == frozenset({2})
    assert ours.encode("hi")[0] == 1 and ours.encode("hi", add_bos=False)[0] != 1
    # Unseen characters fall back to their UTF-8 bytes.
    utf8 = [ours.token_to_id(f"<0x{b:02X}>") for b in "ĀĂ".encode()]
    assert ours.encode("ĀĂ", add_bos=False) == [ours.token_to_id("▁"), *utf8]
    tool = ours.token_to_id("<tool>")
    assert ours.encode("a<tool>b", add_bos=False)[-2:] == [tool, ours.token_to_id("b")]
    _assert_parity(ours, spm_hf, STRINGS)


def test_sentencepiece_llama2_chat_template(spm_dir, spm_hf):
    ours = Tokenizer.from_dir(spm_dir)
    _assert_chat_parity(ours, spm_hf)
    # BOS comes from the template text only, once per turn, never doubled.
    ids = ours.apply_chat_template(_MESSAGES[1], tokenize=True)
    assert ids[0] == ours.bos_id and ids[1] != ours.bos_id
    assert ids.count(ours.bos_id) == 2


def test_sentencepiece_saved_tokenizer_json(spm_hf, tmp_path):
    spm_hf.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.add_bos is True and ours.chat_template == BUILTIN_TEMPLATES["llama2"]
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    _assert_parity(ours, reloaded, STRINGS)
    _assert_chat_parity(ours, reloaded)


def _write_gguf(path: Path, **fields) -> Path:
    """A tensor-less GGUF with the given tokenizer metadata (None values are left out)."""
    writer = GGUFWriter(path, "llama")
    adders = {
        "model": writer.add_tokenizer_model, "pre": writer.add_tokenizer_pre,
        "tokens": writer.add_token_list, "scores": writer.add_token_scores,
        "types": writer.add_token_types, "merges": writer.add_token_merges,
        "bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id, "add_bos": writer.add_add_bos_token,
        "template": writer.add_chat_template,
    }  # fmt: skip
    for name, value in fields.items():
        if value is not None:
            adders[name](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_style_gguf(spm_dir, spm_hf, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    types = [
        2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
        4 if sp.id_to_piece(i) == "<tool>" else 1
        for i in range(n)
    ]  # fmt: skip
    path = _write_gguf(
        tmp_path / "spm.gguf", model="llama", tokens=[sp.id_to_piece(i) for i in range(n)],
        scores=[sp.get_score(i) for i in range(n)], types=types, bos=1, eos=2, unk=0,
        template=BUILTIN_TEMPLATES["llama2"],
    )  # fmt: skip
    ours = load_tokenizer(path)
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.add_bos) == (800, 1, 2, True)
    _assert_parity(ours, spm_hf, STRINGS)
    _assert_chat_parity(ours, spm_hf)


# ---------------------------------------------------------------------------------------------
# Built-in templates and template machinery.


def test_builtin_fallbacks(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None and tok.add_bos is False
    msgs = _MESSAGES[1]
    chatml = (
        "<|im_start|>system\nYou are a SQL expert.<|im_end|>\n"
        "<|im_start|>user\nList the tables.<|im_end|>\n"
        "<|im_start|>assistant\nSHOW TABLES;<|im_end|>\n"
        "<|im_start|>user\n  Now count rows in `users`.  <|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == chatml
    llama2 = (
        "<s>[INST] <<SYS>>\nYou are a SQL expert.\n<</SYS>>\n\nList the tables. [/INST]"
        " SHOW TABLES; </s><s>[INST] Now count rows in `users`. [/INST]"
    )
    assert tok.apply_chat_template(msgs, template="llama2") == llama2
    by_ctor = Tokenizer.from_dir(tmp_path, fallback_template="llama2")
    assert by_ctor.apply_chat_template(msgs) == llama2
    assert by_ctor.apply_chat_template(msgs, tokenize=True) == tok.encode(llama2, add_bos=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}] * 2, template="llama2")
    with pytest.raises(TokenizerError, match="fallback_template"):
        Tokenizer.from_dir(tmp_path, fallback_template="vicuna")


def test_template_helpers_match_transformers(smollm2_hf, smollm2_ours):
    source = (
        "{% for m in messages %}{{ m | tojson }}\n{% if loop.last %}{% break %}{% endif %}"
        "{% endfor %}{{ bos_token }}|{{ eos_token }}|{{ extra }}|{{ strftime_now('%Y') }}"
        "{% generation %}gen{% endgeneration %}{{ tools is none }}"
    )
    msgs = [{"role": "user", "content": "<b>&'\"é😀</b>"}, {"role": "assistant", "content": "x"}]
    ours = smollm2_ours.apply_chat_template(msgs, template=source, extra=7)
    ref = smollm2_hf.apply_chat_template(msgs, chat_template=source, tokenize=False, extra=7)
    assert ours == ref and '"<b>&' in ours
    sandbox = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        smollm2_ours.apply_chat_template(msgs, template=sandbox)


def test_chat_template_jinja_file_wins(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors naming the file or field.


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_paths(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path / "nope.gguf")
    assert "nope.gguf" in _one_line(e)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(tmp_path)
    assert "neither tokenizer.json nor tokenizer.model" in _one_line(e)
    with pytest.raises(TokenizerError) as e:
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    assert "missing.gguf" in _one_line(e)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TokenizerError, match=r"weights\.bin"):
        load_tokenizer(tmp_path / "weights.bin")


def test_bad_files(spm_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=re.escape(str(broken / "tokenizer.json"))):
        Tokenizer.from_dir(broken)
    (broken / "tokenizer_config.json").write_text('{\n  "eos_token": }')
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json:2: invalid JSON"):
        Tokenizer.from_dir(broken)
    unigram = tmp_path / "unigram"
    unigram.mkdir()
    (unigram / "tokenizer.model").write_bytes(_train_sentencepiece(600, "unigram"))
    with pytest.raises(TokenizerError, match="model_type = UNIGRAM"):
        Tokenizer.from_dir(unigram)
    bad_eos = tmp_path / "bad_eos"
    bad_eos.mkdir()
    (bad_eos / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (bad_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match=r"eos_token '<\|nope\|>' is not in the vocabulary"):
        Tokenizer.from_dir(bad_eos)


def test_bad_gguf_metadata(tmp_path):
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(_write_gguf(tmp_path / "bare.gguf"))
    assert "tokenizer.ggml.model missing" in _one_line(e)
    tokens = ["<unk>", "a", "b", "ab"]
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(_write_gguf(tmp_path / "rwkv.gguf", model="rwkv", tokens=tokens, eos=0))
    assert "tokenizer.ggml.model = 'rwkv'" in _one_line(e)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(_write_gguf(tmp_path / "nomerge.gguf", model="gpt2", tokens=tokens, eos=0))
    assert "tokenizer.ggml.merges missing" in _one_line(e)
    path = _write_gguf(
        tmp_path / "pre.gguf", model="gpt2", pre="klingon", tokens=tokens, merges=["a b"], eos=0
    )
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(path)
    assert "tokenizer.ggml.pre = 'klingon'" in _one_line(e)
    path = _write_gguf(tmp_path / "eos.gguf", model="gpt2", tokens=tokens, merges=["a b"])
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.eos_token_id missing"):
        load_tokenizer(path)
    path = _write_gguf(tmp_path / "range.gguf", model="gpt2", tokens=tokens, merges=["a b"], eos=9)
    with pytest.raises(TokenizerError, match=r"eos_token_id = 9 is outside"):
        load_tokenizer(path)
    ok = load_tokenizer(
        _write_gguf(
            tmp_path / "ok.gguf", model="gpt2", pre="qwen2", tokens=tokens, merges=["a b"], eos=0
        )
    )
    assert (ok.encode("abab"), ok.encode("ba"), ok.bos_id, ok.pad_id) == ([3, 3], [2, 1], None, 0)
