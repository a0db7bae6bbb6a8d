"""Short-term memory under a token budget; long-term memory in SQLite with BM25 retrieval."""

import itertools
import math
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from cmat_jax.cmat.memory import (
    LongTermMemory,
    MemoryRecord,
    ReadPolicy,
    ShortTermMemory,
    bm25_scores,
    bm25_tokenize,
)


def words(text: str) -> int:
    """Token counter for hand-countable budgets: one token per whitespace-separated word."""
    return len(text.split())


HEAD = [{"role": "system", "content": "s1 s2"}, {"role": "user", "content": "t1 t2 t3"}]  # 6 + 7
OBS = " ".join(["x"] * 50)  # 50 words, 99 characters -> 54 tokens with the overhead
# shortened to 9 characters: "x x x x x ... [90 characters cut]" = 9 words -> 13 tokens
NOTE_WORDS = 10  # "(Note: N earlier steps are not shown, to save space.)"


def stm(budget: int, keep_recent: int) -> ShortTermMemory:
    m = ShortTermMemory(HEAD, words, budget, keep_recent=keep_recent, short_obs_chars=9)
    for i in range(3):
        m.add_step(f"a{i} b{i}", OBS)  # each turn: 6 + 54 = 60 tokens; shortened 6 + 13 = 19
    return m


def test_stm_fits_without_changes():
    m = stm(budget=193, keep_recent=1)  # 13 + 3 * 60
    msgs = m.messages()
    assert [x["role"] for x in msgs] == ["system", "user"] + ["assistant", "user"] * 3
    assert all(x["content"] == OBS for x in msgs[3::2])
    assert m.token_count(msgs) == 193 and m.fits()


def test_stm_shortens_old_observations_first():
    m = stm(budget=150, keep_recent=1)
    msgs = m.messages()
    # shorten turn 0 -> 152 (over), shorten turn 1 -> 111 (fits); the newest is untouched
    assert msgs[3]["content"] == "x x x x x ... [90 characters cut]"
    assert msgs[5]["content"] == "x x x x x ... [90 characters cut]"
    assert msgs[7]["content"] == OBS
    assert msgs[1]["content"] == "t1 t2 t3"  # nothing dropped, no note
    assert m.token_count(msgs) == 111
    # the stored turns are not modified, only the view
    assert m.turns[0].feedback == OBS


def test_stm_then_drops_old_turn_pairs_with_a_note():
    m = stm(budget=100, keep_recent=1)
    msgs = m.messages()
    # after shortening both old turns: 111; drop turn 0: 13 + 19 + 60 + note 10 = 102; drop turn 1: 83
    assert [x["role"] for x in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "t1 t2 t3\n\n(Note: 2 earlier steps are not shown, to save space.)"
    assert msgs[2]["content"] == "a2 b2" and msgs[3]["content"] == OBS
    assert m.token_count(msgs) == 83 == 13 + NOTE_WORDS + 60
    assert m.turn_messages() == msgs[2:]


def test_stm_protects_recent_turns_until_old_ones_are_gone():
    m = stm(budget=120, keep_recent=2)
    msgs = m.messages()
    # unprotected turn 0: shorten (152), drop (143); then protected turn 1: shorten (102) fits
    assert [x["content"] for x in msgs[2:]] == [
        "a1 b1",
        "x x x x x ... [90 characters cut]",
        "a2 b2",
        OBS,
    ]
    assert "1 earlier steps" in msgs[1]["content"]
    assert m.token_count(msgs) == 13 + NOTE_WORDS + 19 + 60


def test_stm_never_drops_head_or_newest_turn_and_shortens_it_last():
    m = stm(budget=50, keep_recent=1)
    msgs = m.messages()
    # old turns dropped (13 + note 10 + 60 = 83 > 50): the newest observation is shortened
    assert [x["content"] for x in msgs[2:]] == ["a2 b2", "x x x x x ... [90 characters cut]"]
    assert m.token_count(msgs) == 13 + NOTE_WORDS + 19 and m.fits()
    m = stm(budget=30, keep_recent=1)
    assert m.messages()[2]["content"] == "a2 b2" and not m.fits()


def test_stm_keeps_rejections_whole_and_summarises():
    m = ShortTermMemory(HEAD, words, 40, keep_recent=1, short_obs_chars=9)
    m.add_rejection(
        "Action: Operation\n```sql\nSELECT Title FROM t;\n```", "rejected: " + "y " * 20
    )
    m.add_step("Action: Operation\n```sql\nSELECT name FROM t;\n```", "[('a',)]")
    msgs = m.messages()
    # the old rejection cannot be shortened, so it is dropped
    assert "1 earlier steps" in msgs[1]["content"] and len(msgs) == 4
    s = m.summary()
    assert s.startswith("1. SELECT Title FROM t; rejected rejected: y y")
    assert "2. SELECT name FROM t; -> [('a',)]" in s
    assert len(m.summary(max_chars=20)) == 20


def test_bm25_by_hand():
    docs = [["a", "b", "b"], ["b", "c"], ["d"]]
    k1, b = 1.5, 0.75
    avgdl = 2.0
    idf_a = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    idf_b = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))
    s0 = idf_a * 1 * 2.5 / (1 + k1 * (1 - b + b * 3 / avgdl)) + idf_b * 2 * 2.5 / (
        2 + k1 * (1 - b + b * 3 / avgdl)
    )
    s1 = idf_b * 1 * 2.5 / (1 + k1 * (1 - b + b * 2 / avgdl))
    np.testing.assert_allclose(bm25_scores(["a", "b", "a"], docs), [s0, s1, 0.0])  # "a" counts once
    assert bm25_scores(["z"], docs).tolist() == [0.0, 0.0, 0.0]
    assert bm25_scores(["a"], []).shape == (0,)
    assert bm25_tokenize("SELECT singer_name, Age FROM t;") == [
        "select",
        "singer",
        "name",
        "age",
        "from",
        "t",
    ]


def make_clock():
    counter = itertools.count(1)
    return lambda: float(next(counter))


def rec(task_id, text, reflection="", reward=0.0, split="train", summary="", family="dbbench"):
    return MemoryRecord(family, task_id, text, summary, reflection, reward, split)


T1 = "How many singers are from France in table singer?"
LONG = "Lesson: " + " ".join(["w"] * 40)


def fill(mem: LongTermMemory) -> None:
    mem.add(rec("T1", T1, "check the country column spelling"))
    mem.add(rec("T1", T1, LONG))  # newest same-task reflection, 41 words
    mem.add(rec("T1", T1, "", 1.0, summary="SELECT COUNT(*) FROM singer"))  # success: no reflection
    mem.add(rec("T2", "How many albums are from France in table album?", "use album.country"))
    mem.add(rec("T3", "List the names of the oldest singer", "order by age desc"))
    mem.add(rec("T4", "Insert a new employee into table staff", "quote strings"))
    mem.add(
        rec(
            "T2",
            "How many albums are from France in table album?",
            "",
            1.0,
            summary="SELECT COUNT(*) FROM album",
        )
    )
    mem.add(rec("T5", "Delete rows", "irrelevant"))  # no shared word: never retrieved
    mem.add(rec("T9", T1, "other family", family="kg"))
    mem.add(
        rec(
            "E1",
            "How many singers are from Spain in table singer?",
            "test-item lesson",
            split="test",
        )
    )
    mem.add(
        rec(
            "E2",
            "How many singers are from Italy in table singer?",
            "other test lesson",
            split="test",
        )
    )


def test_ltm_retrieval_order_dedup_and_families(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        got = mem.retrieve("dbbench", "T1", T1, k=10, token_budget=10_000, count_tokens=words)
    assert [(r.source, r.record.task_id) for r in got] == [
        ("same_task", "T1"),
        ("same_task", "T1"),
        ("similar", "T2"),
        ("similar", "T3"),  # shares the rare "singer"
        ("similar", "T4"),  # shares only "table", which T2 has too
    ]
    assert (
        got[0].record.reflection == LONG
        and got[1].record.reflection == "check the country column spelling"
    )
    # T2 is represented by its best (successful) record, with its solution summary
    assert got[2].record.reward == 1.0
    assert got[2].snippet.endswith("was solved with: SELECT COUNT(*) FROM album")
    # Another task's lesson is injected without that task's text (its table and columns).
    assert got[3].snippet == "On a similar task: order by age desc"
    assert got[2].score > got[3].score > got[4].score > 0
    assert got[0].snippet == f"Your earlier attempt at this task failed: {LONG}"
    assert all(r.tokens == words(r.snippet) for r in got)


def test_ltm_repeated_lessons_are_injected_once(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        # Two more tasks whose Reflector wrote T3's lesson again (case and spacing aside).
        mem.add(rec("T6", "Which singer in table singer is the oldest", "Order  by AGE desc"))
        mem.add(rec("T7", "Name the oldest singer from table singer", "order by age desc"))
        got = mem.retrieve("dbbench", "T1", T1, k=10, token_budget=10_000, count_tokens=words)
    lessons = [" ".join(r.record.reflection.lower().split()) for r in got]
    assert lessons.count("order by age desc") == 1
    assert len(lessons) == len(set(lessons))


def test_ltm_without_solutions_injects_lessons_only(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        kw = dict(k=10, token_budget=10_000, count_tokens=words)
        full = mem.retrieve("dbbench", "T1", T1, **kw)
        lessons = mem.retrieve("dbbench", "T1", T1, solutions=False, **kw)
    # T2 was solved without a lesson: its SQL is what a small model would copy; left out.
    assert [r.record.task_id for r in lessons] == [
        r.record.task_id for r in full if r.record.task_id != "T2"
    ]
    assert all(r.record.reflection for r in lessons)


def test_ltm_same_task_only_when_similar_is_off(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        kw = dict(k=10, token_budget=10_000, count_tokens=words)
        got = mem.retrieve("dbbench", "T1", T1, similar=False, **kw)
        assert mem.retrieve("dbbench", "T8", "How many albums?", similar=False, **kw) == []
    assert [(r.source, r.record.task_id) for r in got] == [("same_task", "T1")] * 2


def test_ltm_k_and_token_budget_cap(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        full = mem.retrieve("dbbench", "T1", T1, k=10, token_budget=10_000, count_tokens=words)
        top2 = mem.retrieve("dbbench", "T1", T1, k=2, token_budget=10_000, count_tokens=words)
        assert [r.snippet for r in top2] == [r.snippet for r in full[:2]]
        budget = full[0].tokens + full[1].tokens
        assert [
            r.snippet
            for r in mem.retrieve(
                "dbbench", "T1", T1, k=10, token_budget=budget, count_tokens=words
            )
        ] == [r.snippet for r in full[:2]]
        # the long newest reflection does not fit in 30 tokens: skipped, later ones still used
        small = mem.retrieve("dbbench", "T1", T1, k=10, token_budget=30, count_tokens=words)
        assert small[0].record.reflection == "check the country column spelling"
        assert sum(r.tokens for r in small) <= 30
        assert LONG not in [r.record.reflection for r in small]
        assert mem.retrieve("dbbench", "T1", T1, k=0, token_budget=100, count_tokens=words) == []


def test_ltm_split_policy(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        fill(mem)
        e1 = "How many singers are from Spain in table singer?"
        plain = mem.retrieve(
            "dbbench",
            "E1",
            e1,
            k=10,
            token_budget=10_000,
            count_tokens=words,
            policy=ReadPolicy.evaluation(),
        )
        assert all(r.record.split == "train" for r in plain)
        assert {r.record.task_id for r in plain} == {"T1", "T2", "T3", "T4"}
        retry = mem.retrieve(
            "dbbench",
            "E1",
            e1,
            k=10,
            token_budget=10_000,
            count_tokens=words,
            policy=ReadPolicy.evaluation(reflexion=True),
        )
        # reflexion: the item's own earlier reflection first; other test items still never read
        assert (retry[0].source, retry[0].record.task_id, retry[0].record.split) == (
            "same_task",
            "E1",
            "test",
        )
        assert "E2" not in {r.record.task_id for r in retry}
        assert [r.record.task_id for r in retry[1:]] == [r.record.task_id for r in plain]
        # a policy that reads test memory explicitly (e.g. analysis) sees E2 as similar
        both = mem.retrieve(
            "dbbench",
            "E1",
            e1,
            k=10,
            token_budget=10_000,
            count_tokens=words,
            policy=ReadPolicy(("train", "test")),
        )
        assert "E2" in {r.record.task_id for r in both}
        assert ReadPolicy.training() == ReadPolicy(("train",), False)


def test_ltm_persists_across_reopen_and_process_restart(tmp_path):
    path = tmp_path / "run" / "ltm.sqlite"
    path.parent.mkdir()
    with LongTermMemory(path, clock=make_clock()) as mem:
        written = mem.add(rec("T1", T1, "lesson one"))
        assert written.id == 1 and written.created_at == 1.0
    with LongTermMemory(path) as mem:
        (back,) = mem.records()
        assert back == written
    code = (
        "import sys; from cmat_jax.cmat.memory import LongTermMemory, MemoryRecord\n"
        "m = LongTermMemory(sys.argv[1])\n"
        "m.add(MemoryRecord('dbbench', 'T1', sys.argv[2], 'summary', 'lesson two', 0.0, 'train'))\n"
        "m.close()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), T1], check=True)
    with LongTermMemory(path) as mem:
        assert len(mem) == 2
        got = mem.retrieve("dbbench", "T1", T1, k=5, token_budget=100, count_tokens=words)
        assert [r.record.reflection for r in got] == ["lesson two", "lesson one"]  # newest first


def test_ltm_one_writer_many_threads_and_a_reader(tmp_path):
    path = tmp_path / "ltm.sqlite"
    mem = LongTermMemory(path)
    reader = LongTermMemory(path)  # a second connection, as an evaluator process would hold

    def write(worker: int) -> None:
        for i in range(25):
            mem.add(rec(f"T{worker}-{i}", f"task {worker} {i}", "lesson"))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(mem) == 100 and len(reader) == 100
    assert len({r.id for r in reader.records("dbbench")}) == 100
    mem.close()
    reader.close()


def test_ltm_boundary_errors(tmp_path):
    bad = tmp_path / "not_a_db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match=r"not_a_db\.sqlite: not a usable"):
        LongTermMemory(bad)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, text TEXT)")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match=r"other\.sqlite: long-term memory schema"):
        LongTermMemory(other)
    with pytest.raises(ValueError, match=r"missing_dir/ltm\.sqlite: cannot open"):
        LongTermMemory(tmp_path / "missing_dir" / "ltm.sqlite")
    with LongTermMemory(tmp_path / "ok.sqlite") as mem:
        with pytest.raises(ValueError, match=r"MemoryRecord\.reward"):
            mem.add(rec("T1", T1, reward=2.0))
        with pytest.raises(ValueError, match=r"MemoryRecord\.task_id"):
            mem.add(rec("", T1))


def test_failed_record_without_a_lesson_is_not_injected(tmp_path):
    with LongTermMemory(tmp_path / "ltm.sqlite", clock=make_clock()) as mem:
        mem.add(rec("A", "How many singers are from Spain?", "", 0.0, summary="SELECT 1 FROM x"))
        mem.add(rec("B", "How many singers are from Peru?", "count the country column"))
        got = mem.retrieve(
            "dbbench",
            "C",
            "How many singers are from Chile?",
            k=5,
            token_budget=1000,
            count_tokens=words,
        )
    assert [r.record.task_id for r in got] == ["B"]
