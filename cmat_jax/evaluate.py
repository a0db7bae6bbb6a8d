"""Evaluate an agent on DBBench: ``python -m cmat_jax.evaluate --model M --task dbbench
--data FILE.jsonl --out DIR``.

Episodes run batched: up to ``--batch-size`` environments are live at once, the agent is called
on all their message lists together, and a finished episode's slot is refilled from the queue
at once. Writes ``DIR/results.json`` (``overall_cat_accuracy``, every per-type accuracy, ``n``,
the settings, throughput) and ``DIR/transcripts.jsonl`` (one line per episode).

Agents: ``model`` (an LLM through the CMAT ``RolloutEngine``: the Assistant role, with
``--checker`` the Checker role verifying every proposal before it runs; see
:func:`evaluate_model`), ``oracle`` (replays the gold labels: the scorer's ceiling) and ``null``
(answers nothing: its floor). ``--model`` is anything ``load_model`` takes or a training run
directory (``cmat_jax.train`` or ``cmat_jax.cmat.loop``): the base named in its config.json plus
the LoRA adapters of its newest complete checkpoint (see :func:`load_eval_model`).

``--reflexion-trials N`` (N > 1) re-runs the items not yet solved, up to N attempts in all, with
the agent's reflections on the failed attempt (when it can reflect) added to the next attempt's
instructions; the headline numbers stay single-attempt and the retries are reported separately
under ``reflexion`` as a pass@N-style number. With the model agent the reflections come from the
Reflector role (the Assistant in reflect mode) through a long-term memory that only this
evaluation writes (same-item reflections only: the Reflexion protocol).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from cmat_jax.envs.agents import Agent, NullAgent, oracle_agent
from cmat_jax.envs.dbbench import DBBenchEnv, DBTask, dbbench_metrics, load_tasks
from cmat_jax.envs.sql_backend import SQLBackend
from cmat_jax.eval_journal import EvalJournal
from cmat_jax.faults import fault_point

__all__ = [
    "Agent",
    "EvalConfig",
    "EvalModel",
    "evaluate",
    "evaluate_model",
    "load_eval_model",
    "main",
    "make_model_agent",
    "run_episodes",
]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluate an agent on an AgentBench-format task file."""

    data: Path
    """Task file: AgentBench DBBench JSONL (or a JSON list)."""
    out: Path
    """Output directory for results.json and transcripts.jsonl."""
    model: str | None = None
    """Model source for --agent model: anything load_model takes (HF dir, .gguf, preset) or a
    training run directory (base from its config.json + its newest LoRA checkpoint)."""
    step: int | None = None
    """With a run directory as --model: the checkpoint step to load (e.g. the end of agent
    tuning) instead of the newest."""
    task: Literal["dbbench", "os"] = "dbbench"
    script_dir: Path | None = None
    """--task os: the folder the problem file's script paths are relative to (default: the
    problem file's folder)."""
    agent: Literal["model", "oracle", "null"] = "model"
    checker: bool = False
    """Let the Checker role verify each proposal before it runs (model agent only)."""
    reflexion_trials: int = 1
    """Attempts per item; > 1 adds a separately reported reflexion (pass@N-style) number."""
    limit: int | None = None
    """Evaluate only the first N items."""
    batch_size: int = 16
    """Episodes stepped together (and the generation batch)."""
    backend: Literal["sqlite", "mysql"] = "sqlite"
    mysql_option_file: str | None = None
    """MariaDB administrator credentials: a MySQL option file (its [client] group: user,
    password, socket or host/port). Without one the password comes from the
    CMAT_MYSQL_PASSWORD environment variable; it is never a flag (argv is public)."""
    mysql_socket: str | None = None
    mysql_host: str = "localhost"
    mysql_port: int = 3306
    mysql_user: str = "cmat_admin"
    """MariaDB administrator account (needs only CREATE USER and ALL ON `cmat_ep_%`.* WITH
    GRANT OPTION; see cmat_jax.envs.mysql_backend.ADMIN_GRANTS)."""
    statement_time_limit_s: float = 3.0
    max_rounds: int = 15
    max_new_tokens: int = 512
    """Model agent: token cap of one reply (proposal, Checker reason or reflection)."""
    reason_max_new_tokens: int = 0
    """Model agent: token cap of a Checker's rejection reason (0 = max_new_tokens)."""
    max_context: int = 2048
    """Model agent: prompt + reply tokens per generation; longer episodes drop their oldest
    steps first (the default job evaluates with 1024, which is much cheaper on a CPU)."""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Model agent: base parameter and matmul dtype."""
    attention_impl: str = "auto"
    """Model agent: attention kernel of each prompt's prefill (see cmat_jax.model.attention;
    "auto" = chunked on CPU, cuDNN / Pallas on GPU and TPU; "xla" = full scores)."""
    max_revisions: int = 2
    """Model agent with --checker: Assistant revisions after rejections in one round (K)."""
    reuse_prefix: bool = True
    """Model agent: reuse the keys/values of prompt prefixes earlier generation calls computed
    (an episode's history), prefilling only each prompt's new part."""
    live_episodes: int | None = None
    """Model agent: episodes advanced together (default 4 x batch size); their generation calls
    take --batch-size rows each."""
    overwrite: bool = False
    """Replace an existing DIR/results.json (or start an interrupted evaluation over)."""
    resume: bool = False
    """Continue the interrupted evaluation in DIR: items it finished (DIR/journal.jsonl) are
    kept, not run again; the settings must match."""
    progress: bool = True


# -- agents ----------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalModel:
    """A model ready for evaluation: the (LoRA-carrying) model, its tokenizer, the adapter slot
    of each role ("none" = the frozen base) and where it came from."""

    model: Any
    tokenizer: Any
    assistant_slot: str = "none"
    checker_slot: str = "none"
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    ltm_path: Path | None = None
    """A run's training long-term memory (read, never written, by the evaluation)."""
    ltm_read: dict[str, Any] = dataclasses.field(default_factory=dict)
    """How the run read that memory (`CMATConfig` fields ltm_k, ltm_token_budget,
    ltm_solutions, ltm_similar, from its config.json): evaluation injects what training
    injected, never more (another task's solution, say, which the run had turned off)."""


LTM_READ_FIELDS = ("ltm_k", "ltm_token_budget", "ltm_solutions", "ltm_similar")


def _run_config(source: str) -> dict[str, Any] | None:
    """The run config when ``source`` is a training run directory (config.json naming a base
    ``model`` and a ``lora`` config, beside ``checkpoints/``), else None."""
    path = Path(source).expanduser()
    cfg_file = path / "config.json"
    if not (path.is_dir() and cfg_file.is_file() and (path / "checkpoints").exists()):
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file}: unreadable run config ({e})") from None
    if not (isinstance(cfg, dict) and "lora" in cfg and "model" in cfg):
        return None
    return cfg


def load_eval_model(
    source: str | None,
    dtype: str = "bfloat16",
    step: int | None = None,
    attention_impl: str = "auto",
) -> EvalModel:
    """Load ``source``: anything ``load_model`` takes (base model, every role on slot "none"),
    or a training run directory: the base its config.json names, with the LoRA params of
    checkpoint ``step`` (default: the newest complete one). The Assistant uses the slot the
    run trained (``slot``, else the first); the Checker its ``checker`` slot when the run has
    one, else the base."""
    if source is None:
        raise ValueError(
            "--agent model needs --model (an HF dir, a .gguf file, a preset or a run dir)"
        )
    from cmat_jax import load_model

    run_cfg = _run_config(source)
    if run_cfg is None:
        if step is not None:
            raise ValueError(
                f"--step {step} needs a training run directory as --model, got {source}"
            )
        model, tok = load_model(source, dtype, attention_impl=attention_impl)
        return EvalModel(model, tok, info={"source": str(source), "kind": "base"})

    import jax
    from flax import nnx

    from cmat_jax.model.lora import LoRAConfig, LoRAParam
    from cmat_jax.training.checkpoint import Checkpointer

    run_dir = Path(source).expanduser().resolve()
    where = run_dir / "config.json"
    base = run_cfg["model"]
    if not isinstance(base, str):
        raise ValueError(f"{where}: field 'model' must name the base model source")
    try:
        lora = dict(run_cfg["lora"])
        lora["targets"], lora["slots"] = tuple(lora["targets"]), tuple(lora["slots"])
        lora_cfg = LoRAConfig(**lora)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad 'lora' config ({e})") from None
    model, tok = load_model(base, dtype, attention_impl=attention_impl)
    model.add_lora(lora_cfg, rngs=nnx.Rngs(0))
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), lora_state.to_pure_dict()
    )
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        params, meta = ckpt.restore_lora(target, step)
    finally:
        ckpt.close()
    lora_state.replace_by_pure_dict(params)
    nnx.update(model, lora_state)
    assistant = run_cfg.get("slot") or lora_cfg.slots[0]
    if assistant not in lora_cfg.slots:
        raise ValueError(f"{where}: slot {assistant!r} is not among lora.slots {lora_cfg.slots}")
    checker = "checker" if "checker" in lora_cfg.slots else "none"
    ltm = run_dir / "ltm.sqlite"
    info = {
        "source": str(run_dir),
        "kind": "run",
        "base": base,
        "step": step,
        "stage": meta.get("stage"),
        "assistant_slot": assistant,
        "checker_slot": checker,
    }
    ltm_read = {k: run_cfg[k] for k in LTM_READ_FIELDS if k in run_cfg}
    return EvalModel(model, tok, assistant, checker, info, ltm if ltm.is_file() else None, ltm_read)


def make_model_agent(
    model_source: str | None, *, max_new_tokens: int = 512, dtype: str = "bfloat16"
) -> Agent:
    """A plain chat agent (greedy replies from the Assistant slot, no Checker) for
    :func:`run_episodes`; ``evaluate`` runs the model agent through :func:`evaluate_model`."""
    from cmat_jax.inference.generate import Generator

    em = load_eval_model(model_source, dtype)
    return _ModelAgent(Generator(em.model, em.tokenizer), em, max_new_tokens)


class _ModelAgent:
    """Greedy replies from one model; an episode whose prompt no longer fits ends (None)."""

    def __init__(self, generator: Any, em: EvalModel, max_new_tokens: int) -> None:
        self.gen, self.tok, self.max_new_tokens = generator, em.tokenizer, max_new_tokens
        self.slot = em.assistant_slot

    def act(self, batch: Sequence[Sequence[dict[str, str]]]) -> list[str | None]:
        prompts = [
            self.tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True)
            for m in batch
        ]
        fits = [len(p) + self.max_new_tokens <= self.gen.max_cache_len for p in prompts]
        todo = [p for p, ok in zip(prompts, fits, strict=True) if ok]
        texts = iter([])
        if todo:
            out = self.gen.generate(
                todo, max_new_tokens=self.max_new_tokens, adapter_ids=[self.slot] * len(todo)
            )
            texts = iter(out.texts)
        return [next(texts) if ok else None for ok in fits]


def _copy_sqlite(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def evaluate_model(
    em: EvalModel,
    tasks: Sequence[DBTask],
    backend: SQLBackend,
    cfg: EvalConfig,
    on_done: Callable[[int], None] | None = None,
    journal: EvalJournal | None = None,
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """Greedy evaluation of ``em`` through the CMAT ``RolloutEngine`` (the protocol of
    ``cmat.loop.evaluate_tasks``, with this evaluator's backend and transcripts): the Assistant
    proposes, with ``cfg.checker`` the Checker accepts iff p_accept >= 0.5 (a rejection asks for
    up to ``cfg.max_revisions`` revisions), and with ``cfg.reflexion_trials > 1`` unsolved items
    are retried with the Reflector's lessons on their earlier attempts.

    Returns the transcripts per trial (task order; each with the scorer's ``output``, the
    Assistant/Checker turn records and the reflection) and the first trial's engine stats.
    With a ``journal`` every finished chunk of episodes is journaled, and chunks it already
    holds are taken from it instead of run (the long-term memory lives beside it).
    """
    from cmat_jax.cmat import roles as R
    from cmat_jax.cmat.config import CMATConfig
    from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
    from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine
    from cmat_jax.envs.dbbench import SYSTEM_PROMPT

    roles = R.make_roles("dbbench", assistant_prompt=SYSTEM_PROMPT, checker_slot=em.checker_slot)
    # make_roles guards training against an untrainable Assistant; evaluating the frozen base
    # (zero-shot) is exactly the Assistant (and Reflector) on slot "none".
    roles = dataclasses.replace(
        roles,
        assistant=dataclasses.replace(roles.assistant, adapter_slot=em.assistant_slot),
        reflector=dataclasses.replace(roles.reflector, adapter_slot=em.assistant_slot),
    )
    reflexion = cfg.reflexion_trials > 1
    live = cfg.live_episodes or 4 * cfg.batch_size
    if live < 1:
        raise ValueError(f"--live-episodes must be >= 1, got {live}")
    work = Path(tempfile.mkdtemp(prefix="cmat_eval_"))
    ltm_file = work / "ltm.sqlite" if journal is None else journal.ltm_path
    ltm = None
    if em.ltm_path is not None or reflexion:
        kept = journal.last_ltm_records() if journal is not None else None
        if kept is None or not ltm_file.is_file():
            ltm_file.unlink(missing_ok=True)
            if em.ltm_path is not None:  # a copy: evaluation never changes the run's memory
                _copy_sqlite(em.ltm_path, ltm_file)
        ltm = LongTermMemory(ltm_file)
        if kept is not None:  # a resumed evaluation: drop what unjournaled episodes wrote
            ltm.truncate(kept)
    memory_read = dict(em.ltm_read) if ltm is not None else {"ltm_k": 0}  # the run's settings
    trials: list[list[dict[str, Any]]] = []
    stats: dict[str, Any] = {}
    envs: list[DBBenchEnv] = []  # the engine's envs of the current chunk, in task order

    def make_env() -> DBBenchEnv:
        envs.append(DBBenchEnv(backend, max_rounds=cfg.max_rounds))
        return envs[-1]

    try:
        todo = list(tasks)
        for trial in range(cfg.reflexion_trials):
            engine = RolloutEngine(
                em.model,
                em.tokenizer,
                make_env,
                roles=roles,
                cmat_cfg=CMATConfig(
                    group_size=1,
                    use_checker=cfg.checker,
                    max_revisions=cfg.max_revisions,
                    use_reflection=reflexion and trial + 1 < cfg.reflexion_trials,
                    **memory_read,
                ),
                rollout_cfg=RolloutConfig(
                    temperature=0.0,
                    checker_sample=False,
                    max_new_tokens=cfg.max_new_tokens,
                    reason_max_new_tokens=cfg.reason_max_new_tokens,
                    max_context=cfg.max_context,
                    max_batch=cfg.batch_size,
                    counterfactual=False,
                    ltm_split="eval" if reflexion else "",
                    reuse_prefix=cfg.reuse_prefix,
                ),
                ltm=ltm,
                read_policy=ReadPolicy.evaluation(reflexion=trial > 0),
            )
            trs: list[dict[str, Any]] = []
            for lo in range(0, len(todo), live):
                part = todo[lo : lo + live]
                chunk = journal.done(trial, lo) if journal is not None else None
                if chunk is None:
                    chunk = _run_chunk(engine, part, envs, journal, trial, lo, ltm)
                for k, v in chunk["stats"].items():
                    if trial == 0:
                        stats[k] = stats.get(k, 0) + v
                trs += chunk["transcripts"]
                if on_done is not None:
                    on_done(len(part))
            trials.append(trs)
            todo = [t for t, tr in zip(todo, trs, strict=True) if tr["reward"] < 1.0]
            if not todo:
                break
    finally:
        if ltm is not None:
            ltm.close()
        shutil.rmtree(work, ignore_errors=True)
    if cfg.checker:
        turns = [t for tr in trials[0] for t in tr["turns"]] if trials else []
        stats["checker_rejections"] = sum(t["verdict"] == "reject" for t in turns)
        p = [t["p_accept"] for t in turns if t["p_accept"] is not None]
        stats["mean_p_accept"] = round(sum(p) / len(p), 4) if p else None
    return trials, stats


def _run_chunk(
    engine: Any,
    part: Sequence[DBTask],
    envs: list[DBBenchEnv],
    journal: EvalJournal | None,
    trial: int,
    lo: int,
    ltm: Any,
) -> dict[str, Any]:
    """One chunk of episodes run together: `{"transcripts", "stats"}`, journaled."""
    envs.clear()
    res = engine.run(part, group_size=1, train=False)
    stats = {}
    for k in ("wall_s", "generate_calls", "generated_tokens", "verdict_calls",
              "env_steps", "proposals", "executed", "rejections", "revisions"):  # fmt: skip
        if isinstance(res.stats.get(k), (int, float)):
            stats[k] = res.stats[k]
    trs = []
    for env, rec, out, refl in zip(envs, res.episodes, res.outputs, res.reflections, strict=True):
        tr = env.transcript()
        tr["output"] = out
        tr["turns"] = [dataclasses.asdict(t) for t in rec.turns]
        if refl:
            tr["reflection"] = refl
        trs.append(tr)
    if journal is None:
        return {"transcripts": trs, "stats": stats}
    chunk = journal.record(trial, lo, trs, stats, len(ltm) if ltm is not None else None)
    fault_point("eval_recorded")
    return chunk


def _make_backend(cfg: EvalConfig) -> SQLBackend:
    if cfg.backend == "mysql":
        from cmat_jax.envs.mysql_backend import MySQLBackend, MySQLParams

        params = MySQLParams(
            option_file=cfg.mysql_option_file,
            unix_socket=cfg.mysql_socket,
            host=cfg.mysql_host,
            port=cfg.mysql_port,
            user=cfg.mysql_user,
        )
        return MySQLBackend(params, time_limit_s=cfg.statement_time_limit_s)
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    return SQLiteBackend(time_limit_s=cfg.statement_time_limit_s)


# -- the batched episode loop ----------------------------------------------------------------


def run_episodes(
    tasks: Sequence[DBTask],
    agent: Agent,
    backend: SQLBackend,
    *,
    batch_size: int = 16,
    max_rounds: int = 15,
    notes: dict[str, str] | None = None,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    make_env: Callable[[], Any] | None = None,
) -> list[dict[str, Any]]:
    """Run one episode per task with up to ``batch_size`` live at once; returns the
    transcripts in task order (each with the scorer's ``output``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    queue = list(range(len(tasks)))[::-1]
    live: list[tuple[int, DBBenchEnv]] = []

    def start(i: int) -> tuple[int, DBBenchEnv]:
        env = make_env() if make_env is not None else DBBenchEnv(backend, max_rounds=max_rounds)
        note = (notes or {}).get(tasks[i].task_id)
        if note:
            env.system_prompt += "\n\nNotes from your earlier attempts at this task:\n" + note
        env.reset(tasks[i])
        return i, env

    def finish(i: int, env: DBBenchEnv) -> None:
        tr = env.transcript()
        tr["output"] = env.output()
        env.close()
        results[i] = tr
        if on_done is not None:
            on_done(tr)

    try:
        while queue or live:
            while queue and len(live) < batch_size:
                live.append(start(queue.pop()))
            replies = agent.act([env.messages for _, env in live])
            if len(replies) != len(live):
                raise RuntimeError(
                    f"agent returned {len(replies)} replies for {len(live)} episodes"
                )
            still: list[tuple[int, DBBenchEnv]] = []
            for (i, env), reply in zip(live, replies, strict=True):
                result = env.finish() if reply is None else env.step(reply)
                if result.done:
                    finish(i, env)
                else:
                    still.append((i, env))
            live = still
    finally:
        for _, env in live:
            env.close()
    return [r for r in results if r is not None]


def evaluate(cfg: EvalConfig, agent: Agent | None = None) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; writes and returns the results dict."""
    if cfg.task == "os" and cfg.resume:
        raise ValueError("--resume: only --task dbbench evaluations are journaled")
    if cfg.task == "os":
        from cmat_jax.envs.os_eval import evaluate_os  # it builds on run_episodes (a cycle)

        return evaluate_os(cfg, agent)
    if cfg.task != "dbbench":
        raise ValueError(f"unknown task {cfg.task!r}")
    if cfg.reflexion_trials < 1:
        raise ValueError(f"--reflexion-trials must be >= 1, got {cfg.reflexion_trials}")
    if cfg.reason_max_new_tokens < 0:
        raise ValueError(
            f"--reason-max-new-tokens must be >= 0 (0 = --max-new-tokens), got "
            f"{cfg.reason_max_new_tokens}"
        )
    if cfg.checker and cfg.agent != "model":
        raise ValueError("--checker only applies to --agent model")
    if cfg.step is not None and cfg.agent != "model":
        raise ValueError("--step only applies to --agent model")
    if cfg.agent == "model" and cfg.max_context <= cfg.max_new_tokens:
        raise ValueError(
            f"--max-context ({cfg.max_context}) must exceed --max-new-tokens ({cfg.max_new_tokens})"
        )
    out = Path(cfg.out)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    journal = EvalJournal(out, settings, resume=cfg.resume, overwrite=cfg.overwrite)
    tasks = load_tasks(cfg.data, limit=cfg.limit)
    em: EvalModel | None = None
    if agent is None:
        if cfg.agent == "oracle":
            agent = oracle_agent(tasks)
        elif cfg.agent == "null":
            agent = NullAgent()
        else:
            em = load_eval_model(cfg.model, cfg.dtype, cfg.step, cfg.attention_impl)
    backend = _make_backend(cfg)
    journal.start()

    bar = _progress(len(tasks) * 1, cfg.progress)
    t0 = time.perf_counter()
    trials: list[list[dict[str, Any]]] = []
    engine_stats: dict[str, Any] = {}
    try:
        if em is not None:
            trials, engine_stats = evaluate_model(
                em, tasks, backend, cfg, on_done=bar.update, journal=journal
            )
            for i, trs in enumerate(trials):
                for tr in trs:
                    tr["trial"] = i + 1
        else:
            trials = _run_trials(tasks, agent, backend, cfg, bar, journal)
    finally:
        bar.close()
        backend.close()
    wall = time.perf_counter() - t0

    first = trials[0] if trials else []
    results: dict[str, Any] = dict(dbbench_metrics(tr["output"] for tr in first))
    results["n"] = len(first)
    episodes = sum(len(t) for t in trials)
    results["episodes"] = episodes
    results["wall_s"] = round(wall, 3)
    results["episodes_per_minute"] = round(episodes / wall * 60, 1) if wall > 0 else None
    results["status_counts"] = _counts(tr["status"] for tr in first)
    if em is not None:
        results["model_info"] = em.info
        results["engine"] = engine_stats
    results["settings"] = settings
    if cfg.reflexion_trials > 1:
        best = {tr["task_id"]: tr for trs in trials for tr in trs if tr["reward"] == 1.0}
        final = [best.get(tr["task_id"], tr) for tr in first]
        results["reflexion"] = {
            "label": f"pass@{cfg.reflexion_trials}",
            "note": f"pass@{cfg.reflexion_trials}: item counts as solved if any of "
            f"{cfg.reflexion_trials} attempts succeeded (later attempts see reflections)",
            "trials": cfg.reflexion_trials,
            **dbbench_metrics(tr["output"] for tr in final),
        }
    with (out / "transcripts.jsonl").open("w", encoding="utf-8") as f:
        for trs in trials:
            for tr in trs:
                f.write(json.dumps(tr, ensure_ascii=False, default=str) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    journal.finish()
    return results


def _run_trials(
    tasks: Sequence[DBTask],
    agent: Agent,
    backend: SQLBackend,
    cfg: EvalConfig,
    bar: Any,
    journal: EvalJournal | None = None,
) -> list[list[dict[str, Any]]]:
    """Attempts of an ``Agent`` (oracle, null, custom): unsolved items are retried, with the
    agent's reflections (when it has ``reflect``) added to the next attempt's instructions."""
    trials: list[list[dict[str, Any]]] = []
    solved: dict[str, bool] = {}
    notes: dict[str, str] = {}
    for trial in range(cfg.reflexion_trials):
        todo = [t for t in tasks if not solved.get(t.task_id)]
        if not todo:
            break
        if trial > 0:
            bar.reset(total=len(todo))
            bar.set_description(f"trial {trial + 1}")
        done = {
            i: journal.done(trial, i) if journal is not None else None for i in range(len(todo))
        }
        pending = [i for i, rec in done.items() if rec is None]
        bar.update(len(todo) - len(pending))
        unit_of = {}  # task id -> the pending items of that id, in order
        for i in pending:
            unit_of.setdefault(todo[i].task_id, []).append(i)

        def finished(tr: dict[str, Any], trial=trial, done=done, unit_of=unit_of) -> None:
            i = unit_of[tr["task_id"]].pop(0)
            if journal is not None:
                done[i] = journal.record(trial, i, [tr])
                fault_point("eval_recorded")
            else:
                done[i] = {"transcripts": [tr]}
            bar.update(1)

        run_episodes(
            [todo[i] for i in pending],
            agent,
            backend,
            batch_size=cfg.batch_size,
            max_rounds=cfg.max_rounds,
            notes=notes,
            on_done=finished,
        )
        trs = [done[i]["transcripts"][0] for i in range(len(todo))]
        for tr in trs:
            tr["trial"] = trial + 1
            solved[tr["task_id"]] = solved.get(tr["task_id"], False) or tr["reward"] == 1.0
        trials.append(trs)
        reflect = getattr(agent, "reflect", None)
        if callable(reflect) and trial + 1 < cfg.reflexion_trials:
            failed = [tr for tr in trs if tr["reward"] < 1.0]
            for tr, note in zip(failed, reflect(failed), strict=True):
                notes[tr["task_id"]] = note
    return trials


def _counts(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="episodes", unit="ep", disable=not enabled)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import tyro

    cfg = tyro.cli(EvalConfig, args=argv)
    results = evaluate(cfg)
    keys = ("overall_cat_accuracy", "accuracy", "n", "episodes_per_minute")
    summary = {k: results[k] for k in keys if k in results}
    print(json.dumps(summary))
    return results


if __name__ == "__main__":
    from cmat_jax.cli import run_cli

    run_cli(main)
