"""One tokenizer interface over `tokenizer.json`, sentencepiece `tokenizer.model` and GGUF metadata.

Every source is turned into a `tokenizers.Tokenizer` (Rust; batch encoding runs in parallel), built
the way transformers builds it, so ids match `AutoTokenizer` exactly. Chat templates are the model's
own Jinja template rendered in a sandbox configured like transformers', so prompts match
`apply_chat_template` byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from cmat_jax.textfile import read_json, read_text

__all__ = ["BUILTIN_TEMPLATES", "Tokenizer", "TokenizerError", "load_tokenizer"]


class TokenizerError(ValueError):
    """A tokenizer source (file, directory, GGUF field) is missing or malformed."""


# ---------------------------------------------------------------------------------------------
# Built-in chat templates (used only when the model ships none).

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 chat format: the system prompt is folded into the first user turn inside <<SYS>>.
_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "llama2": _LLAMA2}

# Tokens that end an assistant turn in common templates; counted as EOS when the template uses them.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "</s>")


class _GenerationTag(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (assistant-mask markers) as a pass-through."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes; transformers' does not.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------
# Backend builders: each returns a `tokenizers.Tokenizer` with no post-processor (BOS is ours).


def _generate_merges(
    vocab: dict[str, int], scores: dict[str, float] | None = None
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a piece into two pieces, ranked by the
    piece's id (ascending) or, given `scores`, by score (descending); ties by part lengths, in the
    direction transformers uses, so merge ranks (and thus ids) match it exactly."""
    rank = scores if scores is not None else vocab
    candidates = []
    for piece, key in rank.items():
        pairs = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        candidates.extend((left, right, key) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=scores is not None)
    return [(left, right) for left, right, _ in candidates]


# sentencepiece piece types (sentencepiece_model.proto; the GGUF token_type uses the same numbers).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _spm_bpe_backend(
    pieces: Sequence[str],
    scores: Sequence[float] | None,
    types: Sequence[int],
    add_dummy_prefix: bool,
) -> HFTokenizer:
    """A sentencepiece BPE vocabulary as transformers' LlamaTokenizer builds it: byte fallback,
    Metaspace that prepends '▁' to the first section only, no normalizer. Merges are ranked by
    piece id (tokenizer.model, as transformers does) or by `scores` (GGUF, as transformers does)."""
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = _generate_merges(
        vocab, None if scores is None else dict(zip(pieces, scores, strict=True))
    )
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = None
    scheme = "first" if add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=scheme, split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    special = [p for p, t in zip(pieces, types, strict=True) if t in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in special])
    user = [p for p, t in zip(pieces, types, strict=True) if t == _USER_DEFINED]
    if user:
        tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in user])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_CHARS = _bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_CHARS.values())

# Split regexes for `tokenizer.ggml.pre` (llama.cpp's names), applied before the byte mapping.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_REGEX_PRE = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's own regex (ByteLevel use_regex=True). SmolLM / StarCoder vocabularies also split every
# \p{N} character first (their tokenizer.json: Digits(individual_digits) + ByteLevel; llama.cpp:
# a "\p{N}" split before the GPT-2 regex).
_GPT2_PRE = ("gpt2", "default")
_DIGITS_PRE = ("smollm", "starcoder", "refact")


def _byte_level_pre_tokenizer(pre: str | None, source: str):
    if pre in _REGEX_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre is None or pre in _GPT2_PRE:
        return byte_level
    supported = sorted([*_REGEX_PRE, *_GPT2_PRE, *_DIGITS_PRE])
    raise TokenizerError(
        f"{source}: tokenizer.ggml.pre = {pre!r} is not supported (supported: {', '.join(supported)})"
    )


def _byte_level_backend(
    tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str | None, source: str
) -> HFTokenizer:
    # Tokens outside the byte alphabet (rare; e.g. a literal space) are respelled byte by byte.
    vocab = {
        t if set(t) <= _BYTE_ALPHABET else "".join(_BYTE_CHARS[b] for b in t.encode()): i
        for i, t in enumerate(tokens)
    }
    pairs = []
    for line, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise TokenizerError(
                f"{source}: tokenizer.ggml.merges[{line}] = {merge!r} is not 'a b'"
            )
        pairs.append((parts[0], parts[1]))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre, source)
    tok.decoder = decoders.ByteLevel()
    # CONTROL tokens are special; one spelled outside the byte alphabet is a llama.cpp mislabel.
    control = [
        t
        for t, ty in zip(tokens, types, strict=True)
        if ty == _CONTROL and set(t) <= _BYTE_ALPHABET
    ]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tok


# ---------------------------------------------------------------------------------------------
# Readers.


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    data = read_json(path, TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _load_spm_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: sentencepiece model has no pieces")
    if proto.trainer_spec.model_type != spm_pb2.TrainerSpec.BPE:
        kind = spm_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise TokenizerError(f"{path}: trainer_spec.model_type = {kind}; only BPE is supported")
    return proto


def _gguf_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.") or name == "general.architecture"
    }


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Encode / decode / chat templates over a `tokenizers.Tokenizer` backend.

    `add_bos` is whether `encode()` prepends BOS by default (transformers' `add_special_tokens=True`
    behaviour for this model); the backend itself never adds special tokens.
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        fallback_template: str = "chatml",
        source: str = "<memory>",
    ):
        self._tok = backend
        self._tok.post_processor = None
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int | None = self._required_id(bos_token, "bos_token") if bos_token else None
        self.eos_id: int = self._required_id(eos_token, "eos_token")
        self.pad_id: int = self._required_id(pad_token, "pad_token") if pad_token else self.eos_id
        self.unk_id: int | None = backend.token_to_id(unk_token) if unk_token else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template: str | None = chat_template
        if fallback_template not in BUILTIN_TEMPLATES:
            raise TokenizerError(
                f"fallback_template = {fallback_template!r}; choose one of {sorted(BUILTIN_TEMPLATES)}"
            )
        self.fallback_template = fallback_template
        self._special_strings = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token if pad_token else eos_token,
            "unk_token": unk_token,
        }
        eos = {self.eos_id}
        for tok in _END_OF_TURN:
            tid = backend.token_to_id(tok)
            if tid is not None and chat_template and tok in chat_template:
                eos.add(tid)
        self.eos_ids: frozenset[int] = frozenset(eos)

    def _required_id(self, token: str, field: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{self.source}: {field} {token!r} is not in the vocabulary")
        return tid

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: list[str], *, add_bos: bool | None = None) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(e.ids, add_bos) for e in encs]

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            return [self.bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, tok: str) -> int | None:
        return self._tok.token_to_id(tok)

    def id_to_token(self, i: int) -> str:
        tok = self._tok.id_to_token(int(i))
        if tok is None:
            raise IndexError(f"token id {i} out of range [0, {self.vocab_size})")
        return tok

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        template: str | None = None,
        **template_vars,
    ) -> str | list[int]:
        """Render `messages` with the model's template (or `template`: a built-in name such as
        'chatml' / 'llama2', or Jinja source). With `tokenize=True` the text is encoded without
        adding BOS, since templates write it themselves (as transformers does)."""
        if template is None:
            source = self.chat_template or BUILTIN_TEMPLATES[self.fallback_template]
        else:
            source = BUILTIN_TEMPLATES.get(template, template)
        variables = {k: v for k, v in self._special_strings.items() if v is not None}
        variables.update(template_vars)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = _compile_template(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
        return self.encode(text, add_bos=False) if tokenize else text

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, fallback_template: str = "chatml") -> Tokenizer:
        """A HF model directory: `tokenizer.json`, else `tokenizer.model` (sentencepiece BPE);
        `tokenizer_config.json` and `chat_template.jinja` beside them when present."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"{root}: no such directory")
        cfg_path = root / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        bos = _token_content(cfg.get("bos_token"))
        eos = _token_content(cfg.get("eos_token"))
        pad = _token_content(cfg.get("pad_token"))
        unk = _token_content(cfg.get("unk_token"))
        add_bos_cfg = cfg.get("add_bos_token")

        if (root / "tokenizer.json").is_file():
            json_path = root / "tokenizer.json"
            try:
                backend = HFTokenizer.from_file(str(json_path))
            except Exception as e:
                raise TokenizerError(f"{json_path}: cannot load ({e})") from None
            add_bos = add_bos_cfg if add_bos_cfg is not None else _post_processor_adds(backend, bos)
        elif (root / "tokenizer.model").is_file():
            proto = _load_spm_proto(root / "tokenizer.model")
            pieces = [p.piece for p in proto.pieces]
            backend = _spm_bpe_backend(
                pieces,
                None,
                [p.type for p in proto.pieces],
                proto.normalizer_spec.add_dummy_prefix,
            )
            spec = proto.trainer_spec

            def piece(i: int) -> str | None:
                return pieces[i] if 0 <= i < len(pieces) else None

            bos = bos or piece(spec.bos_id)
            eos = eos or piece(spec.eos_id)
            unk = unk or piece(spec.unk_id)
            add_bos = bool(add_bos_cfg)  # transformers: only when the config asks for it
        else:
            raise TokenizerError(f"{root}: neither tokenizer.json nor tokenizer.model found")

        # Added tokens that transformers keeps only in tokenizer_config.json.
        for _tid, spec_tok in sorted(
            (cfg.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])
        ):
            content = _token_content(spec_tok)
            if content and backend.token_to_id(content) is None:
                special = (
                    bool(spec_tok.get("special", False)) if isinstance(spec_tok, dict) else False
                )
                backend.add_tokens([AddedToken(content, normalized=False, special=special)])

        if eos is None:
            eos = next(
                (
                    t
                    for t in ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
                    if backend.token_to_id(t) is not None
                ),
                None,
            )
        if eos is None:
            raise TokenizerError(
                f"{cfg_path}: eos_token is missing and no usual EOS token is in the vocabulary"
            )

        template = cfg.get("chat_template")
        jinja_path = root / "chat_template.jinja"
        if jinja_path.is_file():
            template = read_text(jinja_path, TokenizerError)
        elif isinstance(template, list):  # named templates: use "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            unk_token=unk,
            add_bos=bool(add_bos),
            chat_template=template,
            fallback_template=fallback_template,
            source=str(root),
        )

    @classmethod
    def from_gguf(cls, path: str | Path, *, fallback_template: str = "chatml") -> Tokenizer:
        """The tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.*`)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such file")
        f = _gguf_fields(path)
        kind = f.get("tokenizer.ggml.model")
        if kind is None:
            raise TokenizerError(
                f"{path}: no tokenizer metadata (field tokenizer.ggml.model missing)"
            )
        tokens = f.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{path}: field tokenizer.ggml.tokens missing or empty")
        types = f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise TokenizerError(
                f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokens has {len(tokens)}"
            )

        if kind == "gpt2":
            merges = f.get("tokenizer.ggml.merges")
            if merges is None:
                raise TokenizerError(
                    f"{path}: field tokenizer.ggml.merges missing (needed for tokenizer.ggml.model 'gpt2')"
                )
            backend = _byte_level_backend(
                tokens, merges, types, f.get("tokenizer.ggml.pre"), str(path)
            )
            add_bos_default = False
        elif kind == "llama":
            scores = f.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise TokenizerError(
                    f"{path}: field tokenizer.ggml.scores missing or not one per token"
                )
            prefix = f.get("tokenizer.ggml.add_space_prefix", True)
            backend = _spm_bpe_backend(tokens, scores, types, bool(prefix))
            add_bos_default = (
                True  # llama.cpp adds BOS to sentencepiece vocabularies unless told not to
            )
        else:
            raise TokenizerError(
                f"{path}: tokenizer.ggml.model = {kind!r} is not supported (supported: 'gpt2', 'llama')"
            )

        def token_at(field: str) -> str | None:
            i = f.get(f"tokenizer.ggml.{field}")
            if i is None:
                return None
            if not 0 <= int(i) < len(tokens):
                raise TokenizerError(
                    f"{path}: tokenizer.ggml.{field} = {i} is outside the vocabulary"
                )
            return tokens[int(i)]

        eos = token_at("eos_token_id")
        if eos is None:
            raise TokenizerError(f"{path}: field tokenizer.ggml.eos_token_id missing")
        add_bos = f.get("tokenizer.ggml.add_bos_token", add_bos_default)
        return cls(
            backend,
            bos_token=token_at("bos_token_id"),
            eos_token=eos,
            pad_token=token_at("padding_token_id"),
            unk_token=token_at("unknown_token_id"),
            add_bos=bool(add_bos),
            chat_template=f.get("tokenizer.chat_template"),
            fallback_template=fallback_template,
            source=str(path),
        )


def _post_processor_adds(backend: HFTokenizer, bos: str | None) -> bool:
    """Whether a tokenizer.json's post-processor prepends BOS (what transformers then does)."""
    if bos is None or backend.post_processor is None:
        return False
    bos_id = backend.token_to_id(bos)
    ids = backend.encode("a", add_special_tokens=True).ids
    return (
        bool(ids)
        and ids[0] == bos_id
        and backend.encode("a", add_special_tokens=False).ids[:1] != [bos_id]
    )


def load_tokenizer(path: str | Path, *, fallback_template: str = "chatml") -> Tokenizer:
    """A `Tokenizer` from a HF model directory or a `.gguf` file."""
    p = Path(path)
    if p.is_dir():
        return Tokenizer.from_dir(p, fallback_template=fallback_template)
    if p.is_file() and p.suffix == ".gguf":
        return Tokenizer.from_gguf(p, fallback_template=fallback_template)
    if p.is_file():
        raise TokenizerError(f"{p}: expected a model directory or a .gguf file")
    raise TokenizerError(f"{p}: no such file or directory")
