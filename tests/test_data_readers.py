"""JSONL readers: both formats, role mapping, loss flags, errors naming file:line."""

from __future__ import annotations

import re

import pytest

from cmat_jax.data import DataConfig, DataError, load_datasets, read_jsonl
from tests.test_data_helpers import messages_record, sharegpt_record, write_jsonl


def test_messages_format(tmp_path):
    rec = messages_record(("system", "S"), ("user", "U"), ("assistant", "A"))
    rec["messages"][2]["weight"] = 0.5
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "p1"}, {"type": "text", "text": "p2"}],
    }
    rec2 = {"messages": [parts, {"role": "assistant", "content": "B"}]}
    res = read_jsonl(write_jsonl(tmp_path / "m.jsonl", [rec, "", rec2]))
    assert res.skipped == 0
    c1, c2 = res.conversations
    assert [(m.role, m.content) for m in c1.messages] == [
        ("system", "S"),
        ("user", "U"),
        ("assistant", "A"),
    ]
    assert c1.messages[2].weight == 0.5
    assert c1.source.endswith("m.jsonl:1")
    assert c2.source.endswith("m.jsonl:3")  # blank line 2 skipped, numbering kept
    assert c2.messages[0].content == "p1p2"


def test_sharegpt_agentinstruct_format(tmp_path):
    rec = sharegpt_record(
        ("human", "task"),
        ("gpt", "OK"),
        ("human", "obs"),
        ("gpt", "act"),
        loss=(None, False, None, True),
    )
    rec["system"] = "You are an agent."
    rec2 = sharegpt_record(("user", "q"), ("observation", "o"), ("model", "a"))
    conv, conv2 = read_jsonl(write_jsonl(tmp_path / "s.jsonl", [rec, rec2])).conversations
    assert [m.role for m in conv.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.weight for m in conv.messages if m.role == "assistant"] == [0.0, 1.0]
    assert conv.trained_turns == 1
    assert [m.role for m in conv2.messages] == ["user", "tool", "assistant"]


def test_forced_format_mismatch(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [messages_record(("user", "u"), ("assistant", "a"))])
    with pytest.raises(DataError, match=r"m\.jsonl:1: field 'conversations' must be a list"):
        read_jsonl(path, "sharegpt")


BAD_LINES = [
    ('{"messages": [', r"bad\.jsonl:2: malformed JSON"),
    ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
    ('{"text": "hi"}', r"bad\.jsonl:2: record has neither 'messages' nor 'conversations'"),
    ('{"messages": [{"content": "x"}]}', r"bad\.jsonl:2: messages\[0\] has no 'role' field"),
    (
        '{"messages": [{"role": "narrator", "content": "x"}]}',
        r"bad\.jsonl:2: messages\[0\]\.role: unknown role 'narrator'",
    ),
    ('{"messages": [{"role": "user"}]}', r"bad\.jsonl:2: messages\[0\]\.content is missing"),
    (
        '{"messages": [{"role": "user", "content": 3}]}',
        r"bad\.jsonl:2: messages\[0\]\.content must be a string",
    ),
    (
        '{"conversations": [{"from": "alien", "value": "x"}]}',
        r"bad\.jsonl:2: conversations\[0\]\.from: unknown role 'alien'",
    ),
    (
        '{"conversations": [{"from": "gpt", "value": "x", "loss": "yes"}]}',
        r"bad\.jsonl:2: conversations\[0\]\.loss must be true, false or null",
    ),
    (
        '{"messages": [{"role": "assistant", "content": "x", "weight": -1}]}',
        r"bad\.jsonl:2: messages\[0\]\.weight must be a finite number >= 0",
    ),
    ('{"messages": []}', r"bad\.jsonl:2: conversation is empty"),
    ('{"messages": "hello"}', r"bad\.jsonl:2: field 'messages' must be a list"),
]


@pytest.mark.parametrize(("line", "pattern"), BAD_LINES)
def test_bad_input_names_file_and_line(tmp_path, line, pattern):
    good = messages_record(("user", "u"), ("assistant", "a"))
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line, good])
    with pytest.raises(DataError, match=pattern) as e:
        read_jsonl(path)
    assert "\n" not in str(e.value)


def test_no_assistant_turn_errors_or_skips(tmp_path):
    good = messages_record(("user", "u"), ("assistant", "a"))
    no_asst = messages_record(("system", "s"), ("user", "u"))
    untrained = sharegpt_record(("human", "u"), ("gpt", "a"), loss=(None, False))
    path = write_jsonl(tmp_path / "d.jsonl", [good, no_asst, untrained, good])
    with pytest.raises(DataError, match=r"d\.jsonl:2: conversation has no trained assistant turn"):
        read_jsonl(path)
    res = read_jsonl(path, skip_untrainable=True)
    assert res.skipped == 2
    assert [c.source.rsplit(":", 1)[1] for c in res.conversations] == ["1", "4"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: data file not found")
    ):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no usable conversations"):
        read_jsonl(write_jsonl(tmp_path / "empty.jsonl", [""]))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"paths": ("a", "b"), "mix": (1.0,)}, r"data\.mix: 1 ratios for 2 data files"),
        ({"paths": ("a", "b"), "mix": (1.0, 0.0)}, r"data\.mix: ratios must be > 0"),
        ({"paths": ("a",), "seq_len": 1}, "data.seq_len"),
        ({"paths": ("a",), "global_batch": 0}, "data.global_batch"),
        ({"paths": ("a",), "overlong": "drop"}, "data.overlong"),
    ],
)
def test_config_validation(kwargs, pattern):
    with pytest.raises(DataError, match=pattern):
        DataConfig(**kwargs)


def test_config_default_is_constructible_but_needs_paths_to_load():
    cfg = DataConfig()  # a CLI default may leave paths empty and fill them in later
    with pytest.raises(DataError, match=r"data\.paths: at least one JSONL file is required"):
        load_datasets(cfg, None)


def test_files_that_are_not_utf8_are_named_with_their_line(tmp_path):
    """Every reader of a user's text file: a byte that is not UTF-8 gives the reader's own
    one-line error naming the file and line, not Python's bare decoding message."""
    from cmat_jax.envs.dbbench import DBBenchDataError, load_tasks
    from cmat_jax.envs.os_task import OSDataError, load_os_tasks
    from cmat_jax.tokenizer import TokenizerError, load_tokenizer

    good = '{"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}'
    path = tmp_path / "sft.jsonl"
    path.write_bytes(good.encode() + b"\n\n" + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: not UTF-8 text")):
        read_jsonl(path)
    for name, load, err in [("db.jsonl", load_tasks, DBBenchDataError),
                            ("os.json", load_os_tasks, OSDataError)]:  # fmt: skip
        path = tmp_path / name
        path.write_bytes(b'[\n{"description": "ok"},\n{"description": "\xff"}\n]\n')
        with pytest.raises(err, match=re.escape(f"{path}:3: not UTF-8 text (byte b'\\xff'")):
            load(path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_bytes(b'{"eos_token": "\x80"}')
    with pytest.raises(TokenizerError, match=re.escape("tokenizer_config.json:1: not UTF-8")):
        load_tokenizer(model)


def test_json_files_a_user_points_at_are_named_when_broken(tmp_path):
    """A model's config.json, a safetensors index and a run's config.json: not UTF-8 or not
    JSON gives the loader's own error naming the file and line."""
    from cmat_jax.model.config import ConfigError, ModelConfig
    from cmat_jax.run_dir import RunDir, RunDirError
    from cmat_jax.weights.errors import WeightsError
    from cmat_jax.weights.safetensors_io import SafetensorsCheckpoint

    cases = [
        ("config.json", lambda p: ModelConfig.from_hf(p), ConfigError),
        ("model.safetensors.index.json", lambda p: SafetensorsCheckpoint(p.parent), WeightsError),
        ("config.json", lambda p: RunDir(p.parent).read_config(), RunDirError),
    ]
    for k, (name, load, err) in enumerate(cases):
        path = tmp_path / str(k) / name
        path.parent.mkdir()
        path.write_bytes(b'{\n  "a": 1,\n  oops\n}\n')
        with pytest.raises(err, match=re.escape(f"{path}:3: invalid JSON")):
            load(path)
        path.write_bytes(b'{"a": "\xff"}')
        with pytest.raises(err, match=re.escape(f"{path}:1: not UTF-8 text")):
            load(path)
