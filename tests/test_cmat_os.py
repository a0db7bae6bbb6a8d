"""The CMAT job on the AgentBench OS task (`train cmat --task os`) and on both tasks at once
(`--task db,os`): agent tuning on the OS expert's sandboxed episodes, rounds of real sandbox
episodes scored by the OS judge with the Checker and memory, evaluation on held-out synthetic
problems and the dev split through the one evaluation protocol."""

from __future__ import annotations

import json

import pytest

from cmat_jax.cmat.expert import expert_rows
from cmat_jax.cmat.job import SFT_SEED_OFFSET, CMATJob
from cmat_jax.cmat.loop import EVAL_SEED_OFFSET, run_cmat
from cmat_jax.cmat.memory import LongTermMemory
from cmat_jax.envs.os_task import load_os_tasks
from cmat_jax.tasks import TASKS, mixed_tasks
from cmat_jax.train import LoRAArgs
from tests.fixtures_hf import save_tiny_model_dir
from tests.os_fixtures import OS_DEV, OS_SCRIPTS, os_image  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("os_image")

OS_STATUSES = {"completed", "agent_validation_failed", "agent_invalid_action",
               "task_limit_reached", "agent_context_limit", "sandbox_failed"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # The tiny tokenizer spends ~1700 tokens on the OS task's instructions and one-shot example.
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), max_position_embeddings=4096)


def tiny_job(model_dir, out, task: str, **kw) -> CMATJob:
    base = dict(
        model=str(model_dir),
        out=str(out),
        task=task,
        param_dtype="float32",
        compute_dtype="float32",
        lora=LoRAArgs(rank=4, alpha=8.0, slots=("assistant", "checker")),
        sft_steps=1,
        sft_examples=2,
        sft_batch_size=2,
        rounds=1,
        tasks_per_round=1,
        group_size=2,
        batch_size=2,  # agent tuning's shape: one compiled train step
        kl_coef=0.0,
        seq_len=2304,
        max_new_tokens=12,
        train_max_rounds=2,
        max_revisions=1,
        stm_token_budget=2200,
        eval_tasks=1,
        eval_max_new_tokens=12,
        eval_max_context=2560,
        eval_checker=False,
        dev_data="",
        dev_limit=1,
        dev_stages=("cmat",),
        progress=False,
        drop_failed_groups=False,  # a random model fails every group; train its rows anyway
        export=False,
    )
    return CMATJob(**{**base, **kw})


def test_os_expert_rows_and_checker_labels_come_from_the_sandbox(tiny_model):
    from cmat_jax.tokenizer import load_tokenizer

    job = tiny_job(tiny_model, "unused", "os", sft_examples=4, sft_seq_len=2304)
    items = [st for _, st in mixed_tasks(job, job.sft_examples, job.seed + SFT_SEED_OFFSET)]
    episodes = TASKS["os"].expert(items, job.seed + SFT_SEED_OFFSET)
    assert len(episodes) == 4  # the expert solves every synthetic problem in the sandbox
    labels = [item.good for ep in episodes for item in ep.checker_items]
    # Expert steps are good; a premature finish / wrong answer is judged bad by the judge.
    assert labels.count(True) >= 8 and labels.count(False) >= 4
    for ep in episodes:
        assert ep.task_text.startswith("Now, I will start a new problem")
        # The one-shot example's replies are context, never trained.
        assert [m.get("weight", 1.0) for m in ep.messages[:6] if m["role"] == "assistant"] == [
            0.0
        ] * 3
        # A revision demo (in a seeded share of episodes): a bad item as an untrained reply,
        # the reviewer's rejection, then the expert's next reply, trained.
        bad = {it.proposal for it in ep.checker_items if not it.good}
        for i, m in enumerate(ep.messages):
            if m["role"] == "user" and m["content"].startswith("A reviewer rejected"):
                assert ep.messages[i - 1]["weight"] == 0.0 and ep.messages[i - 1]["content"] in bad
                assert ep.messages[i + 1]["role"] == "assistant"
                assert ep.messages[i + 1].get("weight", 1.0) == 1.0
    tok = load_tokenizer(str(tiny_model))
    roles = {"os": TASKS["os"].roles()}
    rows = expert_rows(tok, job, {"assistant": 0, "checker": 1}, roles)
    asst = [r for r in rows if r.role == "assistant"]
    checker = [r for r in rows if r.role == "checker"]
    assert len(asst) == 4 and checker and {bool(r.label) for r in checker} >= {False}
    assert all(r.loss_mask.sum() > 0 for r in asst)  # the expert's own replies fit the row
    # A mixed job's agent tuning: both experts' episodes, drawn by the seeded task mix.
    mixed = tiny_job(tiny_model, "unused", "db,os", seed=3, sft_examples=4, sft_seq_len=2304)
    drawn = [name for name, _ in mixed_tasks(mixed, 4, mixed.seed + SFT_SEED_OFFSET)]
    assert set(drawn) == {"db", "os"}
    roles = {name: TASKS[name].roles() for name in ("db", "os")}
    rows = expert_rows(tok, mixed, {"assistant": 0, "checker": 1}, roles)
    assert len([r for r in rows if r.role == "assistant"]) == 4


def test_synthetic_os_streams_never_hold_a_dev_problem():
    dev = {t.description.strip() for t in load_os_tasks(OS_DEV, OS_SCRIPTS)}
    job = CMATJob(task="os")
    for seed in (job.seed, job.seed + SFT_SEED_OFFSET, job.seed + EVAL_SEED_OFFSET):
        for _, st in mixed_tasks(job, 400, seed):
            assert st.task.description.strip() not in dev


def test_cmat_job_on_the_os_task(tiny_model, tmp_path):
    out = tmp_path / "run"
    job = tiny_job(tiny_model, out, "os", os_dev_data=str(OS_DEV), os_dev_script_dir=str(OS_SCRIPTS),
                   share_prefixes=True)  # fmt: skip  # as cmat-os trains
    final = run_cmat(job)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 1 and rounds[0]["episodes"] == 2 and rounds[0]["env_steps"] > 0
    assert rounds[0]["checker_n"] > 0 and rounds[0]["rows"] > 0  # Checker labels, trained rows
    with LongTermMemory(out / "ltm.sqlite") as m:
        recs = m.records()
    # Every rollout episode is in long-term memory, failed ones with the Reflector's lesson.
    assert len(recs) == 2 and {r.task_family for r in recs} == {"os"}
    assert all(r.task_text.startswith("Now, I will start a new problem") for r in recs)
    cmat = final["stages"]["cmat"]
    syn, dev = cmat["synthetic"], cmat["dev"]
    assert syn["n"] == 1 and "accuracy" in syn and "label_accuracy" in syn
    assert dev["n"] == 1 and "accuracy" in dev and "overall_cat_accuracy" not in dev
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["os"] and saved["dev_data"] == str(OS_DEV)
    assert saved["stages"]["cmat"]["dev"]["accuracy"] == dev["accuracy"]
    for split in ("a", "dev_a"):
        lines = [
            json.loads(x)
            for x in (out / "eval" / "cmat" / split / "episodes.jsonl").read_text().splitlines()
        ]
        assert len(lines) == 1 and {x["family"] for x in lines} == {"os"}
        assert {x["status"] for x in lines} <= OS_STATUSES
        # Scored by the OS judge: its output record, the reward it gave.
        assert all(x["reward"] == float(x["output"]["correct"]) for x in lines)
        assert all(x["turns"] for x in lines)


def test_mixed_db_os_job_reports_each_task(tiny_model, tmp_path):
    out = tmp_path / "run"
    # Agent tuning's mix is test_os_expert_rows_...'s; here the rounds and the evaluation.
    job = tiny_job(tiny_model, out, "db,os", seed=3, sft_steps=0, tasks_per_round=2,
                   group_size=1, eval_tasks=2, use_reflection=False, dev_stages=(),
                   share_prefixes=True)  # fmt: skip
    names = [name for name, _ in mixed_tasks(job, 2, job.seed)]
    held = [name for name, _ in mixed_tasks(job, 2, job.seed + EVAL_SEED_OFFSET)]
    assert set(names) == set(held) == {"db", "os"}  # this seed's round and held-out mix both
    final = run_cmat(job)
    rounds = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["db/episodes"] == names.count("db")
    assert rounds[0]["os/episodes"] == names.count("os")
    with LongTermMemory(out / "ltm.sqlite") as m:
        assert {r.task_family for r in m.records()} == {"dbbench", "os"}
    syn = final["stages"]["cmat"]["synthetic"]
    assert syn["n"] == 2
    assert {k: v["n"] for k, v in syn["tasks"].items()} == {"db": held.count("db"),
                                                            "os": held.count("os")}  # fmt: skip
    assert "overall_cat_accuracy" in syn["tasks"]["db"]
    assert "label_accuracy" in syn["tasks"]["os"]
    for name in ("db", "os"):
        assert (out / "eval" / "cmat" / "a" / name / "episodes.jsonl").is_file()


def test_assistant_head_keeps_each_tasks_own_prompt():
    from cmat_jax.cmat import roles as R
    from cmat_jax.cmat.memory import ShortTermMemory
    from cmat_jax.envs.os_task import first_messages

    db = TASKS["db"].roles()
    first = [{"role": "system", "content": "env"}, {"role": "user", "content": "Q?"}]
    assert R.assistant_head(db.assistant, first, ["lesson"]) == R.assistant_messages(
        db.assistant, "Q?", (), ["lesson"]
    )
    os_first = first_messages("Count the files in /tmp.")
    head = R.assistant_head(TASKS["os"].roles().assistant, os_first, ["Use ls -1."])
    assert head[:-1] == os_first[:-1]  # the instructions and one-shot example, unchanged
    assert head[-1]["content"].startswith("Lessons from earlier attempts")
    assert head[-1]["content"].endswith(os_first[-1]["content"])  # the problem comes last
    stm = ShortTermMemory(head, lambda t: len(t.split()), 10_000)
    stm.add_step("Think: count.\n\nAct: bash\n\n```bash\nls -1 /tmp | wc -l\n```", "3")
    stm.add_step("Think: done.\n\nAct: answer(3)", "")
    summary = stm.summary()
    assert "ls -1 /tmp | wc -l" in summary and "answer 3" in summary
    lesson = R.clean_reflection("Count with wc. Act: bash\n```bash\nls\n```")
    assert lesson == "Count with wc."
