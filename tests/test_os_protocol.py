"""The AgentBench OS task's protocol, one fact per test, on the real sandbox: the prompt and
one-shot example, action parsing, observation formatting and truncation, the persistent shell,
init / start scripts, the round limit, and ``match`` / ``check`` scoring with the argument
chain; plus the problem-file loader and its errors."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from cmat_jax.envs.os_sandbox import Limits
from cmat_jax.envs.os_task import (
    EMPTY_OUTPUT,
    INSTRUCTIONS,
    NEW_PROBLEM,
    OUTPUT_PREFIX,
    ROUND_LIMIT,
    TRUNCATION_NOTE,
    OSDataError,
    OSEnv,
    OSTask,
    Script,
    first_messages,
    format_observation,
    load_os_tasks,
    os_metrics,
    parse_action,
    script_argv,
)
from tests.os_fixtures import OS_DEV, OS_SCRIPTS, os_image  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("os_image")


def bash(cmd: str, think: str = "I run it.") -> str:
    return f"Think: {think}\n\nAct: bash\n\n```bash\n{cmd}\n```"


def answer(text: str) -> str:
    return f"Think: I know it.\n\nAct: answer({text})"


# -- pure protocol facts -----------------------------------------------------------------------


def test_first_messages_are_agentbench_prompt_and_one_shot():
    msgs = first_messages("Count the files.")
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    assert msgs[0]["content"] == (
        INSTRUCTIONS + 'Now, my problem is:\n\ntell me how many files are in the directory "/etc"?'
    )
    assert msgs[0]["content"].startswith("You are an assistant that will act like a person")
    assert INSTRUCTIONS.endswith("exact one of the three actions in each turn.\n\n")
    assert msgs[1]["content"].endswith("Act: bash\n\n```bash\nls /etc\n```")
    assert msgs[4]["content"] == "The output of the OS:\n220"
    assert msgs[5]["content"].endswith("Act: answer(220)")
    assert msgs[6]["content"] == NEW_PROBLEM + "Count the files."
    assert NEW_PROBLEM == "Now, I will start a new problem in a new OS. My problem is:\n\n"


def test_last_act_line_wins():
    a = parse_action("Act: answer(1)\nThink: no, run it.\nAct: bash\n```bash\nls\n```")
    assert (a.kind, a.content) == ("bash", "ls")
    a = parse_action("Act: bash\n```bash\nls\n```\nAct: finish")
    assert (a.kind, a.content) == ("commit", None)


def test_bash_blocks_are_joined():
    raw = "Act: bash\n```bash\ncd /tmp\n```\nand\n```bash\npwd\necho x\n```\n```sh\nno\n```"
    assert parse_action(raw).content == "cd /tmp\n\npwd\necho x"
    assert parse_action("Act: bash\nno block").content == ""


def test_answer_between_first_open_and_last_close_paren():
    assert parse_action("Act: answer( f(x) = (2) )").content == " f(x) = (2) "
    assert parse_action("Act: answer()").content == ""
    assert parse_action("Think: t\nAct: answer(a\nb)").kind is None  # only its own line
    # A last Act line without parentheses does not parse: the one before it does.
    a = parse_action("Act: answer(7)\nAct: answer 8")
    assert (a.kind, a.content) == ("commit", "7")


def test_unparsable_replies():
    assert parse_action("I think the answer is 3").has_act_line is False
    a = parse_action("Act: run ls")
    assert a.kind is None and a.has_act_line
    assert parse_action("act: bash").kind is None  # "Act:" is case-sensitive ...
    assert parse_action("Act: BASH\n```bash\nls\n```").kind == "bash"  # ... the action is not
    assert parse_action("Think: a\nThink: b\nAct: finish").thought == "a\nb"


def test_observation_truncation_800_780():
    assert format_observation("") == EMPTY_OUTPUT == "The output of the OS is empty."
    assert format_observation("x" * 800) == OUTPUT_PREFIX + "x" * 800
    cut = format_observation("".join(chr(65 + i % 26) for i in range(801)))
    assert cut == OUTPUT_PREFIX + "".join(chr(65 + i % 26) for i in range(780)) + TRUNCATION_NOTE
    assert TRUNCATION_NOTE == "\n[truncated because the output is too long]"
    assert OUTPUT_PREFIX == "The output of the OS:\n\n"


def test_script_argv_passes_the_argument_chain():
    assert script_argv(Script("bash", "echo $1"), ["a", "b"]) == [
        "bash",
        "-c",
        "echo $1",
        "--",
        "a",
        "b",
    ]
    assert script_argv(Script("bash", "true"), []) == ["bash", "-c", "true"]
    assert script_argv(Script("python", "print(1)"), ["a"]) == ["python3", "-c", "print(1)", "a"]


# -- the loader --------------------------------------------------------------------------------


def test_dev_file_loads_as_agentbench_reads_it():
    tasks = load_os_tasks(OS_DEV, OS_SCRIPTS)
    assert len(tasks) == 26
    assert tasks[0].match == {"answer": "1", "strip": True} and tasks[0].start is not None
    calc = tasks[3]
    assert calc.check is not None and calc.check[0].language == "bash"  # type: ignore[union-attr]
    assert "calc" in calc.check[0].code and calc.example is not None  # type: ignore[union-attr]
    hidden = tasks[6]
    assert hidden.check is not None and hidden.check[0] is None
    assert hidden.check[1] == Script("python", (OS_SCRIPTS / "check/integer-match.py").read_text())
    assert hidden.init and "/home/.tmp" in hidden.init[0].code
    assert tasks[10].init == () and tasks[10].image == "default"  # `create` given as a list
    assert tasks[21].init[0].language == "bash"  # `init` given as a plain string
    assert tasks[25].init[0].code == (OS_SCRIPTS / "init/stock-log.sh").read_text()
    assert tasks[24].labels == ("permission", "user")
    assert len({t.task_id for t in tasks}) == 26


@pytest.mark.parametrize(
    "record, field",
    [
        ({"evaluation": {"match": "1"}}, "description"),
        ({"description": "d"}, "evaluation"),
        ({"description": "d", "evaluation": {}}, "evaluation"),
        ({"description": "d", "evaluation": {"match": 3}}, "evaluation.match"),
        ({"description": "d", "evaluation": {"match": {"regex": "("}}}, "evaluation.match.regex"),
        ({"description": "d", "evaluation": {"check": [None]}}, "evaluation.example"),
        (
            {"description": "d", "evaluation": {"check": {"file": "nope.sh"}}},
            "evaluation.check.file",
        ),
        (
            {"description": "d", "evaluation": {"check": {"language": "ruby", "code": "x"}}},
            "evaluation.check.language",
        ),
        (
            {"description": "d", "create": {"image": "x/windows"}, "evaluation": {"match": "1"}},
            "create.image",
        ),
        ({"description": "d", "evaluation": {"match": "1"}, "labels": "file"}, "labels"),
    ],
)
def test_bad_problem_files_name_file_problem_and_field(tmp_path, record, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"description": "ok", "evaluation": {"match": "1"}}, record]))
    with pytest.raises(OSDataError) as e:
        load_os_tasks(path, tmp_path)
    assert str(e.value).startswith(f"{path}: problem 1.{field}:"), str(e.value)


def test_jsonl_and_invalid_json(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"description": "d", "evaluation": {"match": "1"}}) + "\n\n")
    assert load_os_tasks(good)[0].description == "d"
    bad = tmp_path / "b.jsonl"
    bad.write_text("{\n")
    with pytest.raises(OSDataError, match=r"b.jsonl:1: invalid JSON"):
        load_os_tasks(bad)
    with pytest.raises(OSDataError, match="no such file"):
        load_os_tasks(tmp_path / "missing.json")


# -- facts that need the sandbox ---------------------------------------------------------------


def run_plan(task: OSTask, replies: list[str]) -> tuple[OSEnv, list]:
    env = OSEnv()
    env.reset(task)
    results = []
    try:
        for r in replies:
            results.append(env.step(r))
            if results[-1].done:
                break
    finally:
        env.close()
    return env, results


def test_shell_is_persistent():
    task = OSTask("t", "d", match={"answer": "x", "strip": True})
    _, res = run_plan(
        task,
        [
            bash("X=41; cd /srv; sleep 60 &"),
            bash("cd /srv; export Y=1; f() { echo fn; }"),
            bash("pwd; echo $((X+1)) $Y; f; jobs | wc -l"),
        ],
    )
    assert res[2].observation == OUTPUT_PREFIX + "/srv\n42 1\nfn\n1\n"


def test_long_output_is_truncated_and_empty_output_reported():
    task = OSTask("t", "d", match={"answer": "x", "strip": True})
    _, res = run_plan(task, [bash("seq 1000"), bash("true"), bash("echo -n")])
    full = "".join(f"{i}\n" for i in range(1, 1001))
    assert res[0].observation == OUTPUT_PREFIX + full[:780] + TRUNCATION_NOTE
    assert res[1].observation == res[2].observation == EMPTY_OUTPUT


def test_round_limit_is_8():
    task = OSTask("t", "d", match={"answer": "ok", "strip": True})
    env, res = run_plan(task, [bash(f"echo {i}") for i in range(10)])
    assert ROUND_LIMIT == 8 and len(res) == 8 and res[-1].done
    assert env.transcript()["status"] == "task_limit_reached" and res[-1].reward == 0.0
    env, res = run_plan(task, [bash("true")] * 7 + [answer("ok")])
    assert res[-1].done and res[-1].reward == 1.0 and env.transcript()["rounds"] == 8


def test_invalid_replies_end_the_episode():
    task = OSTask("t", "d", match={"answer": "ok", "strip": True})
    env, res = run_plan(task, ["The answer is ok.", answer("ok")])
    assert len(res) == 1 and env.transcript()["status"] == "agent_validation_failed"
    assert res[0].info["error"] is True and res[0].reward == 0.0
    env, res = run_plan(task, ["Act: sudo reboot", answer("ok")])
    assert len(res) == 1 and env.transcript()["status"] == "agent_invalid_action"


def test_init_scripts_and_start_command():
    task = OSTask(
        "t",
        "d",
        init=(
            Script("bash", "echo init-output; mkdir -p /data && echo from-init > /data/a"),
            Script("python", "open('/data/b', 'w').write('py-init')"),
            Script("bash", "(sleep 100; echo late > /data/c) & echo bg-started"),
        ),
        start=Script("bash", "cd /data; echo started > /data/s; sleep 300 &"),
        match={"answer": "x", "strip": True},
    )
    env, res = run_plan(task, [bash("pwd; cat a b s; ps -e -o cmd | grep -c '^sleep'")])
    # init ran as independent processes (its output unseen, its background job still alive);
    # the start command ran in the agent's own shell (its cwd is the agent's cwd).
    assert res[0].observation == OUTPUT_PREFIX + "/data\nfrom-init\npy-initstarted\n2\n"
    assert "init-output" not in json.dumps(env.transcript())


def test_match_scoring():
    plain = OSTask("t", "d", match={"answer": "log", "strip": True})
    assert run_plan(plain, [answer("  log ")])[1][-1].reward == 1.0
    assert run_plan(plain, [answer("Log")])[1][-1].reward == 0.0
    assert run_plan(plain, ["Think: done\n\nAct: finish"])[1][-1].reward == 0.0
    exact = OSTask("t", "d", match={"answer": "log"})  # dict form: no stripping unless asked
    assert run_plan(exact, [answer(" log")])[1][-1].reward == 0.0
    regex = OSTask("t", "d", match={"regex": r"^\d+ seconds?$"})
    assert run_plan(regex, [answer("3 seconds")])[1][-1].reward == 1.0
    assert run_plan(regex, [answer("about 3 seconds")])[1][-1].reward == 0.0


def test_check_scripts_get_the_argument_chain():
    # Each script gets the answer, then the outputs of the scripts before it; null = example.
    example = Script("bash", "echo ex-$((6*7))")
    record = Script("bash", 'printf "%s|" "$@" > /tmp/args; echo second')
    compare = Script(
        "python",
        "import sys; sys.exit(0 if sys.argv[1:] == ['42', 'ex-42\\n', 'second\\n'] else 1)",
    )
    task = OSTask("t", "d", check=(None, record, compare), example=example)
    _, res = run_plan(task, [answer("42")])
    assert res[-1].reward == 1.0
    assert run_plan(task, [answer("41")])[1][-1].reward == 0.0
    # finish commits no answer: the chain starts with the string "None".
    none_check = OSTask("t", "d", check=(Script("bash", '[ "$1" = None ]'),))
    assert run_plan(none_check, ["Think: done\n\nAct: finish"])[1][-1].reward == 1.0
    # A failing script stops the chain.
    stop = OSTask("t", "d", check=(Script("bash", "exit 3"), Script("bash", "touch /never; true")))
    assert run_plan(stop, [answer("x")])[1][-1].reward == 0.0


def test_check_sees_what_the_agent_did():
    task = OSTask("t", "d", check=(Script("bash", "calc 2 '*' 21 | grep -qx 42"),))
    agent_fix = bash(
        "printf '#!/bin/bash\\necho $(($*))\\n' > /usr/local/bin/calc && chmod +x /usr/local/bin/calc"
    )
    assert run_plan(task, [agent_fix, "Think: ok\n\nAct: finish"])[1][-1].reward == 1.0
    assert run_plan(task, ["Think: ok\n\nAct: finish"])[1][-1].reward == 0.0


def test_snapshot_restore_replays_the_shell():
    task = OSTask("t", "d", match={"answer": "x", "strip": True})
    env = OSEnv()
    env.reset(task)
    try:
        env.step(bash("cd /opt && echo one > f"))
        snap = env.snapshot()
        env.step(bash("echo two > /opt/f; cd /"))
        env.restore(snap)
        res = env.step(bash("pwd; cat f"))
        assert res.observation == OUTPUT_PREFIX + "/opt\none\n"
        assert env.transcript()["rounds"] == 2
    finally:
        env.close()


def test_long_running_commands_are_interrupted():
    env = OSEnv(limits=Limits(command_timeout_s=1.0))
    env.reset(OSTask("t", "d", match={"answer": "x", "strip": True}))
    try:
        t0 = time.monotonic()
        env.step(bash("echo before; sleep 100"))
        env.step(bash("vim /etc/hostname"))  # waits for a keyboard that never types
        env.step(bash("while true; do :; done"))
        assert time.monotonic() - t0 < 12
        res = env.step(bash("echo after; jobs | wc -l"))
        assert res.observation == OUTPUT_PREFIX + "after\n0\n"
    finally:
        env.close()


def test_output_flood_is_cut_and_exit_ends_only_the_shell():
    task = OSTask("t", "d", check=(Script("bash", '[ "$1" = 7 ]'),))
    _, res = run_plan(
        task,
        [bash("yes | head -c 5000000"), bash("exit"), bash("echo gone"), answer("7")],
    )
    assert res[0].observation == OUTPUT_PREFIX + "y\n" * 390 + TRUNCATION_NOTE
    assert res[2].observation == EMPTY_OUTPUT  # the shell exited, as in a closed terminal
    assert res[3].reward == 1.0  # checks run as separate processes: the sandbox still works


def test_a_broken_sandbox_ends_the_episode_as_a_failure():
    env = OSEnv()
    env.reset(OSTask("t", "d", match={"answer": "x", "strip": True}))
    assert env.sandbox is not None and env.sandbox._proc is not None
    os.killpg(env.sandbox._proc.pid, signal.SIGKILL)
    res = env.step(bash("echo hi"))
    assert res.done and res.reward == 0.0 and res.info["error"] is True
    assert env.transcript()["status"] == "sandbox_failed"
    env.close()


def test_images_offer_agentbench_tools():
    from cmat_jax.envs import make_env

    env = make_env("os")
    tools = "python3 pip git vim curl wget unzip zip tree ps useradd su"
    env.reset(OSTask("t", "d", match={"answer": "x", "strip": True}))
    try:
        res = env.step(
            bash(
                f"for t in {tools}; do command -v $t > /dev/null || echo missing $t; done; echo checked"
            )
        )
    finally:
        env.close()
    assert res.observation == OUTPUT_PREFIX + "checked\n"


def test_numbered_test_file_shape_and_label_metrics(tmp_path):
    # The numbered test files: no labels, an extra "explanation", init as a shebang script.
    recs = [
        {
            "description": "How many sleepers?",
            "explanation": "use ps",
            "create": {"init": "#!/bin/bash\nfor i in 1 2 3; do (sleep 60) & done"},
            "evaluation": {
                "check": [None, {"language": "python", "file": "int.py"}],
                "example": "ps -e -o cmd= | grep -c '^sleep 60'",
            },
        },
        {"description": "Say hi.", "evaluation": {"match": {"regex": "^hi$"}}, "labels": ["x"]},
    ]
    (tmp_path / "int.py").write_text("import sys\nsys.exit(int(sys.argv[1]) != int(sys.argv[2]))\n")
    (tmp_path / "7.json").write_text(json.dumps(recs))
    tasks = load_os_tasks(tmp_path / "7.json")
    assert [t.task_id for t in tasks] == ["7-00000", "7-00001"] and tasks[0].labels == ()
    outs = []
    for task, reply in zip(tasks, [answer("3"), answer("hi")], strict=True):
        env, res = run_plan(task, [reply])
        assert res[-1].reward == 1.0, env.transcript()
        outs.append(env.output())
    m = os_metrics([*outs, {"labels": ["x"], "answer": None, "correct": False}])
    assert m["accuracy"] == 2 / 3 and m["label_accuracy"] == {"(none)": 1.0, "x": 0.5}
