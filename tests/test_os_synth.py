"""Synthetic OS problems: deterministic, disjoint from the dev split, solved by the scripted
expert in the real sandbox, and failed by agents that do nothing or answer wrongly (so every
checker really checks)."""

from __future__ import annotations

import json

import pytest

from cmat_jax.envs.agents import NullAgent
from cmat_jax.envs.os_synth import (
    FAMILIES,
    OSExpert,
    expert_episode,
    generate_os_task,
    generate_os_tasks,
    write_sft_jsonl,
    write_tasks_json,
)
from cmat_jax.envs.os_task import OSEnv, load_os_tasks
from tests.os_fixtures import OS_DEV, os_image  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("os_image")


def test_generation_is_deterministic_and_disjoint_from_dev():
    a, b = generate_os_task(7, 5), generate_os_task(7, 5)
    assert a.record == b.record and a.solve == b.solve
    tasks = generate_os_tasks(64, seed=7)
    assert {st.record["family"] for st in tasks} == set(FAMILIES)
    texts = [st.record["description"] for st in tasks]
    assert len(set(texts)) == len(texts)
    dev = {rec["description"] for rec in json.loads(OS_DEV.read_text())}
    assert not dev & set(texts)
    assert generate_os_task(8, 5).record != a.record


def test_expert_solves_and_null_or_wrong_agents_fail():
    tasks = generate_os_tasks(2 * len(FAMILIES), seed=11)
    expert = OSExpert(tasks, seed=11)
    for st in tasks:
        tr = expert_episode(st, expert)
        assert tr["reward"] == 1.0, (st.record["family"], tr["steps"])
        assert tr["status"] == "completed"
    for st in tasks[: len(FAMILIES)]:
        env = OSEnv()
        env.reset(st.task)
        try:
            res = env.step(NullAgent().act([env.messages])[0] or "")
            assert res.done and res.reward == 0.0
        finally:
            env.close()
        if st.answers:  # a wrong answer after looking around fails the checker too
            env = OSEnv()
            env.reset(st.task)
            try:
                env.step(f"Think: look\n\nAct: bash\n\n```bash\n{st.solve}\n```")
                res = env.step("Think: guess\n\nAct: answer(0 definitely-wrong)")
                assert res.done and res.reward == 0.0, st.record["family"]
            finally:
                env.close()


def test_problem_file_and_sft_data(tmp_path):
    path = tmp_path / "synth.json"
    assert write_tasks_json(path, 16, seed=2) == 16
    loaded = load_os_tasks(path)
    assert [t.description for t in loaded] == [
        st.record["description"] for st in generate_os_tasks(16, seed=2)
    ]
    assert [t.task_id for t in loaded][:2] == ["synth-2-000000", "synth-2-000001"]
    sft = tmp_path / "sft.jsonl"
    assert write_sft_jsonl(sft, 4, seed=2) == 4
    rows = [json.loads(x) for x in sft.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[:7] == ["user", "assistant"] * 3 + ["user"] and roles[-1] == "assistant"
        assert "Act: " in row["messages"][-1]["content"]
