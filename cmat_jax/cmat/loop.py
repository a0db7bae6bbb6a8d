"""The CMAT recipe end to end (CMAT.md section 6) and the project's default job.

`run_cmat(job)`:
  1. load the base (HF dir, GGUF or preset) and add LoRA slots `assistant` and `checker`;
  2. agent tuning (the TinyAgent stage): LoRA SFT of the Assistant on scripted-expert DB
     trajectories (plus any `--sft-data` JSONL), and of the Checker on the verdicts those
     trajectories imply (a step that errors -> reject, else accept);
  3. CMAT rounds: synthetic DB tasks -> `RolloutEngine` (G episodes per task, Checker, revisions,
     memory) -> `cmat_step` for E epochs on the round's Assistant and Checker rows -> LTM already
     written by the episodes -> periodic evaluation; a checkpoint after every round;
  4. evaluation on held-out synthetic tasks (and the AgentBench DB dev split when found) after
     each stage, each with and without the Checker (and with reflexion retries, pass@N, when
     asked); `results.json`, plots, an exported PEFT adapter and a summary table.

A crash at any point resumes with `--resume` from the newest complete checkpoint: the stage,
round, running baseline and results so far live in the checkpoint's data state, and long-term
memory records written after it are dropped so the resumed run sees the memory it had then.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmat_jax.train import LoRAArgs

DEV_DATA_RELATIVE = Path("..") / "shared" / "data" / "agentbench_dbbench" / "dev.jsonl"
EVAL_SEED_OFFSET = 1_000_003  # held-out synthetic tasks: a seed no training stage uses
SFT_SEED_OFFSET = 7_919


@dataclass(frozen=True)
class CMATJob:
    """Agent tuning + CMAT rounds + evaluation, from one frozen config."""

    model: str = "smollm2-135m-instruct"
    """Base model: an HF checkpoint dir, a .gguf file or a preset name."""
    out: str = "runs/cmat"
    """Run directory; never overwritten (pass --resume to continue it)."""
    resume: bool = False
    """Continue the run in --out from its newest complete checkpoint (config must match)."""
    preset: str | None = None
    """Start from a preset in configs/ (explicit flags override it)."""
    seed: int = 0
    """Seeds adapters, task draws and sampling."""
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    remat: Literal["none", "full", "dots_saveable"] = "full"
    """Rematerialize each layer in the backward pass: the SFT / CMAT batches of a 135M model
    otherwise keep ~10 GB of activations."""
    attention_impl: str = "chunked"
    """Attention kernel of the training steps: xla | cudnn | pallas | chunked | auto (chunked:
    blockwise, skips causal blocks — measured ~4x faster than xla fwd+bwd on CPU)."""
    lora: LoRAArgs = field(
        default_factory=lambda: LoRAArgs(rank=8, alpha=16.0, slots=("assistant", "checker"))
    )
    # -- agent tuning (stage 2)
    sft_steps: int = 40
    """SFT optimizer steps (0 = skip agent tuning)."""
    sft_examples: int = 200
    """Scripted-expert trajectories on synthetic DB tasks."""
    synth_wikisql_share: float = 0.0
    """Chance that a synthetic lookup / comparison question (expert data, rollout and held-out
    tasks) is phrased like WikiSQL's, AgentBench DB's main source: one to three conditions,
    "Which A has a C of v, and a N smaller than x?" (0 = the generator's own phrasings only)."""
    sft_data: tuple[str, ...] = ()
    """Extra JSONL conversations (OpenAI `messages`) mixed into the Assistant's SFT data."""
    sft_lr: float = 1e-3
    checker_sft: bool = True
    """Also tune the Checker on the expert trajectories' implied verdicts."""
    sft_batch_size: int = 8
    pack_rows: bool = True
    """Pack several training rows into each sequence of a batch (agent tuning and CMAT
    updates): a step then carries ~1.3x the rows of the default job instead of padding."""
    sft_seq_len: int | None = None
    """Tokens per agent-tuning row (None = seq_len). Longer expert trajectories lose their
    trailing turns, never their start."""
    # -- CMAT rounds (stage 3)
    rounds: int = 2
    tasks_per_round: int = 8
    group_size: int = 4
    epochs: int = 1
    batch_size: int = 8
    seq_len: int = 768
    """Tokens per CMAT training row. Training rollouts run with a context of seq_len + 1, so
    every row is trained whole; a prompt that outgrows it is rebuilt from short-term memory."""
    lr: float = 2e-4
    loss_mode: Literal["rwr", "pg", "ppo"] = "rwr"
    kl_coef: float = 0.05
    anchor_coef: float = 0.0
    """λ of the SFT anchor (CMAT.md section 5): the NLL of `anchor_rows` expert rows mixed into
    every round's update."""
    anchor_rows: int = 0
    """Expert Assistant rows (agent-tuning data, a fresh seeded draw per round) added to each
    round's CMAT update as anchor rows: policy weight 0, trained by anchor_coef·NLL only."""
    clip_eps: float = 0.2
    temperature: float = 0.7
    max_new_tokens: int = 128
    reason_max_new_tokens: int = 0
    """New tokens for a Checker's rejection reason (training and evaluation; 0 = the
    proposals' limit). Only its first line is used."""
    train_max_rounds: int = 8
    """Environment round limit in training rollouts."""
    eval_max_rounds: int = 15
    """Environment round limit in evaluation (AgentBench's protocol: 15)."""
    use_checker: bool = True
    max_revisions: int = 2
    use_reflection: bool = True
    alpha: float = 0.2
    beta: float = 0.1
    tau: float = 0.5
    reflector_slot: str = "assistant"
    """LoRA slot the Reflector writes lessons with ("none" = the frozen base model). An
    agent-tuned slot tends to write the expert's opening thought as its lesson, whatever the
    mistake was."""
    ltm_k: int = 3
    ltm_token_budget: int = 256
    """Tokens of long-term-memory lessons injected into a prompt (training and evaluation)."""
    ltm_solutions: bool = False
    """Also inject similar tasks' solutions from long-term memory (see
    `CMATConfig.ltm_solutions`: a small model copies them onto the wrong table)."""
    ltm_similar: bool = True
    """Also inject other tasks' lessons (see `CMATConfig.ltm_similar`); off = only the same
    task's own earlier reflections (reflexion retries; training tasks do not repeat)."""
    stm_token_budget: int = 1536
    """Training rollouts: the Assistant prompt's token budget (older observations are shortened
    first, then old turns dropped); evaluation keeps the CMATConfig default."""
    max_batch: int = 32
    """Rows per generation call."""
    min_batch: int = 1
    """Generation / verdict calls are padded to at least this many rows (else to the power of
    two of the live rows). Padding saves compiling programs for 4, 2 and 1 rows (2-4 s each on
    a CPU) but costs far more when prompts are long: 96 new tokens after 1000-token prompts
    took 43 s for 16 rows and 7.6 s for 2 (measured, SmolLM2-135M, 2-core CPU)."""
    drop_failed_groups: bool = True
    """rwr: leave out Assistant rows of groups in which every episode failed (their RWR weights
    are all 1, which would be plain SFT on failures)."""
    checker_rows_per_round: int = 0
    """Train the Checker on at most this many of a round's verdict rows (a seeded random
    subset; 0 = all). Each is a whole Checker prompt for one trained token, so on a CPU they
    can cost more than the Assistant's trajectories."""
    # -- evaluation
    eval_tasks: int = 24
    """Held-out synthetic tasks (the same items before and after every stage)."""
    eval_every: int = 0
    """Also evaluate every N rounds (0 = only before and after the stages)."""
    eval_base: bool = False
    """Evaluate the base model (before agent tuning) too."""
    eval_checker: bool = True
    """Report the with-Checker setting beside the single-attempt one."""
    dev_checker: bool = True
    """On the dev split too (when eval_checker is on)."""
    synthetic_checker: bool = True
    """On the held-out synthetic tasks too (when eval_checker is on). Each rejection costs a
    reason and a revision, each a full prefill of the episode, so with a Checker that rejects
    often this doubles an evaluation's time."""
    reflexion_trials: int = 1
    """> 1: also report reflexion retries (pass@N) with this many attempts."""
    dev_data: str = "auto"
    """AgentBench DB dev JSONL; 'auto' = ../shared/data/agentbench_dbbench/dev.jsonl beside the
    repo when it exists; '' = none."""
    dev_limit: int | None = None
    dev_stages: tuple[str, ...] = ("agent_tuning", "cmat")
    """Stages evaluated on the dev split (base, agent_tuning, cmat)."""
    eval_max_new_tokens: int = 192
    eval_max_context: int = 2048
    """Evaluation prompt + reply tokens; longer episodes continue from short-term memory. On a
    CPU the last live episodes of a batch otherwise prefill ~1500-token prompts for 16 padded
    rows per turn."""
    progress: bool = True
    checkpoint_keep: int = 2
    export: bool = True
    """Export the Assistant adapter as PEFT files into DIR/export/assistant-peft."""

    @property
    def sft_row_len(self) -> int:
        return self.sft_seq_len or self.seq_len

    def __post_init__(self) -> None:
        for name in (
            "tasks_per_round",
            "group_size",
            "epochs",
            "batch_size",
            "seq_len",
            "max_new_tokens",
            "train_max_rounds",
            "eval_max_rounds",
            "max_batch",
            "min_batch",
            "sft_batch_size",
            "reflexion_trials",
            "eval_max_new_tokens",
            "eval_max_context",
            "ltm_token_budget",
        ):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        for name in (
            "sft_steps",
            "sft_examples",
            "rounds",
            "eval_tasks",
            "eval_every",
            "checker_rows_per_round",
            "anchor_rows",
            "reason_max_new_tokens",
        ):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}"
                )
        if self.sft_seq_len is not None and self.sft_seq_len < 1:
            raise ValueError(f"--sft-seq-len must be >= 1, got {self.sft_seq_len}")
        if self.seq_len <= self.max_new_tokens:
            raise ValueError(
                f"--seq-len ({self.seq_len}) must exceed --max-new-tokens ({self.max_new_tokens}):"
                " a training rollout's prompt and reply both fit in seq_len + 1 tokens"
            )
        if self.anchor_rows and self.anchor_coef <= 0:
            raise ValueError("--anchor-rows needs --anchor-coef > 0 (λ of the SFT anchor)")
        if self.anchor_rows and self.sft_row_len > self.seq_len:
            raise ValueError(
                f"--anchor-rows: expert rows of --sft-seq-len {self.sft_row_len} tokens do not fit "
                f"CMAT rows of --seq-len {self.seq_len}"
            )
        if "assistant" not in self.lora.slots or "checker" not in self.lora.slots:
            raise ValueError(
                f"--lora.slots must include 'assistant' and 'checker', got {self.lora.slots}"
            )
        if self.reflector_slot != "none" and self.reflector_slot not in self.lora.slots:
            raise ValueError(
                f"--reflector-slot must be 'none' or one of --lora.slots {self.lora.slots}, "
                f"got {self.reflector_slot!r}"
            )
        if not 0.0 <= self.synth_wikisql_share <= 1.0:
            raise ValueError(
                f"--synth-wikisql-share must be in [0, 1], got {self.synth_wikisql_share}"
            )
        bad = set(self.dev_stages) - {"base", "agent_tuning", "cmat"}
        if bad:
            raise ValueError(f"--dev-stages: unknown stage(s) {sorted(bad)}")


# ----------------------------------------------------------------------------- helpers


def resolved_config(job: CMATJob) -> dict:
    from cmat_jax.train import _absolute_if_path

    job = dataclasses.replace(
        job,
        model=_absolute_if_path(job.model),
        sft_data=tuple(_absolute_if_path(d) for d in job.sft_data),
        out=str(Path(job.out).expanduser().resolve()),
        dev_data=str(resolve_dev_data(job.dev_data) or ""),
    )
    # JSON round trip: tuples become lists, as they read back from DIR/config.json on resume.
    return json.loads(json.dumps({"job": "cmat", "slot": "assistant", **dataclasses.asdict(job)}))


def resolve_dev_data(dev_data: str) -> Path | None:
    if dev_data == "auto":
        repo = Path(__file__).resolve().parents[2]
        p = (repo / DEV_DATA_RELATIVE).resolve()
        return p if p.is_file() else None
    if not dev_data:
        return None
    p = Path(dev_data).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"--dev-data: {p}: no such file")
    return p


def synth_tasks(n: int, seed: int, start: int = 0, wikisql_share: float = 0.0) -> list[Any]:
    from cmat_jax.envs.dbbench_synth import generate_tasks

    return [st.task for st in generate_tasks(n, seed, start, wikisql_share)]


def _truncate_ltm(path: Path, keep_records: int) -> None:
    """Drop long-term-memory records written after a checkpoint (ids beyond its count)."""
    if not path.is_file():
        return
    conn = sqlite3.connect(path)
    try:
        with conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM records ORDER BY id")]
            if len(ids) > keep_records:
                conn.execute(
                    "DELETE FROM records WHERE id > ?",
                    (ids[keep_records - 1] if keep_records else -1,),
                )
    finally:
        conn.close()


def _truncate_rounds(path: Path, last_round: int) -> None:
    if not path.is_file():
        return
    keep = [x for x in path.read_text().splitlines() if x.strip()]
    keep = [x for x in keep if json.loads(x).get("round", 0) <= last_round]
    path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")


def _copy_sqlite(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    a = sqlite3.connect(src)
    b = sqlite3.connect(dst)
    try:
        a.backup(b)
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- SFT data


def expert_rows(tokenizer: Any, job: CMATJob, slots: dict[str, int], roles: Any) -> list:
    """Agent-tuning rows: the Assistant on expert trajectories (assistant tokens), the Checker
    on each expert step's verdict (reject when it errored, else accept)."""
    from cmat_jax.cmat import roles as R
    from cmat_jax.cmat.rollout import TrainRow, checker_prompt_ids
    from cmat_jax.data import parse_record, read_jsonl, tokenize_conversation
    from cmat_jax.envs.dbbench import DBBenchEnv
    from cmat_jax.envs.dbbench_synth import expert_episode, generate_tasks
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    sft_len = job.sft_row_len
    rows: list[TrainRow] = []
    convs = []
    checker_items = []
    env = DBBenchEnv(SQLiteBackend())
    seed = job.seed + SFT_SEED_OFFSET
    for st in generate_tasks(job.sft_examples, seed, wikisql_share=job.synth_wikisql_share):
        tr = expert_episode(st, env, seed)
        if tr["reward"] != 1.0:
            continue
        msgs = tr["messages"]
        convs.append(parse_record({"messages": msgs}, f"expert:{st.task.task_id}"))
        steps = tr["steps"]
        history: list[dict[str, str]] = []
        a_idx = 0
        for m in msgs[2:]:
            if m["role"] == "assistant":
                err = bool(steps[a_idx]["error"]) if a_idx < len(steps) else False
                checker_items.append((st.task.prompt, list(history), m["content"], not err))
                a_idx += 1
            history.append(m)
    env.close()
    for path in job.sft_data:
        for where, rec in read_jsonl(path):
            convs.append(parse_record(rec, where))
    for conv in convs:
        ex = tokenize_conversation(tokenizer, conv, seq_len=sft_len + 1, overlong="truncate")
        if ex is None:
            continue
        m = ex.loss_mask.astype(np.float32)
        rows.append(
            TrainRow(
                ex.tokens.astype(np.int32),
                m,
                m,
                m,
                np.zeros_like(m),
                slots["assistant"],
                "assistant",
                -1,
                1.0,
            )
        )
    if job.checker_sft:
        # Capped and balanced: at most half as many rows as the Assistant's (each is a long
        # prompt for one trained token), expert mistakes (reject) and at most twice as many
        # good steps (accept).
        rng = np.random.default_rng(seed)
        bad = [c for c in checker_items if not c[3]]
        good_items = [c for c in checker_items if c[3]]
        rng.shuffle(good_items)
        cap = max(2, len(rows) // 2)
        n_bad = min(len(bad), cap // 2)
        n_good = min(len(good_items), cap - n_bad, 2 * max(n_bad, 1))
        chosen = bad[:n_bad] + good_items[:n_good]
        ids = R.verdict_token_ids(tokenizer)
        for task_text, history, proposal, good in chosen:
            prompt = checker_prompt_ids(
                tokenizer, roles.checker, task_text, history, proposal, sft_len
            )
            toks = np.asarray([*prompt, ids[0] if good else ids[1]], np.int32)
            one = np.zeros(len(toks), np.float32)
            one[-1] = 1.0
            rows.append(
                TrainRow(
                    toks, one, one, one, np.zeros_like(one), slots["checker"], "checker", -1, 1.0
                )
            )
    return rows


# ----------------------------------------------------------------------------- evaluation


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Any],
    roles: Any,
    job: CMATJob,
    *,
    checker: bool,
    ltm_source: Path | None,
    work_dir: Path,
    reflexion_trials: int = 1,
) -> dict[str, Any]:
    """Greedy single-attempt evaluation (`job.eval_max_rounds` rounds), optionally with the
    Checker; with `reflexion_trials > 1` failed items are retried with their reflections
    (reported separately as pass@N). Long-term memory: a copy of the training memory is read
    (policy `evaluation`: nothing written on test items is read, except same-item reflections
    in the reflexion protocol)."""
    from cmat_jax.cmat.config import CMATConfig
    from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
    from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine
    from cmat_jax.envs.dbbench import DBBenchEnv, dbbench_metrics
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    backend = SQLiteBackend(time_limit_s=3.0)
    ltm = None
    if ltm_source is not None and ltm_source.is_file():
        _copy_sqlite(ltm_source, work_dir / "ltm.sqlite")
        ltm = LongTermMemory(work_dir / "ltm.sqlite")
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    try:
        outputs: dict[str, Any] = {}
        first: dict[str, Any] = {}
        todo = list(tasks)
        for trial in range(reflexion_trials):
            engine = RolloutEngine(
                model,
                tokenizer,
                lambda: DBBenchEnv(backend, max_rounds=job.eval_max_rounds),
                roles=roles,
                cmat_cfg=CMATConfig(
                    group_size=1,
                    use_checker=checker,
                    max_revisions=job.max_revisions,
                    use_reflection=reflexion_trials > 1,
                    ltm_k=job.ltm_k if ltm is not None else 0,
                    ltm_token_budget=job.ltm_token_budget,
                    ltm_solutions=job.ltm_solutions,
                    ltm_similar=job.ltm_similar,
                ),
                rollout_cfg=RolloutConfig(
                    temperature=0.0,
                    checker_sample=False,
                    max_new_tokens=job.eval_max_new_tokens,
                    reason_max_new_tokens=job.reason_max_new_tokens,
                    max_batch=job.max_batch,
                    min_batch=job.min_batch,
                    max_context=job.eval_max_context,
                    counterfactual=False,
                    ltm_split="eval" if reflexion_trials > 1 else "",
                ),
                ltm=ltm,
                read_policy=ReadPolicy.evaluation(reflexion=trial > 0),
            )
            res = engine.run(todo, group_size=1, train=False)
            _write_episodes(work_dir / "episodes.jsonl", trial, todo, res)
            for task, out in zip(todo, res.outputs, strict=True):
                outputs[task.task_id] = out
                if trial == 0:
                    first[task.task_id] = out
            if trial == 0:
                results.update(res.stats)
            todo = [t for t in todo if not (outputs[t.task_id] or {}).get("correct")]
            if not todo:
                break
        results.update(dbbench_metrics(first.get(t.task_id) for t in tasks))
        results["success_rate"] = float(
            np.mean([bool((first.get(t.task_id) or {}).get("correct")) for t in tasks])
        )
        results["n"] = len(tasks)
        if reflexion_trials > 1:
            best = dbbench_metrics(outputs.get(t.task_id) for t in tasks)
            results["reflexion"] = {
                "note": f"pass@{reflexion_trials}: solved in any of {reflexion_trials} attempts",
                "success_rate": float(
                    np.mean([bool((outputs.get(t.task_id) or {}).get("correct")) for t in tasks])
                ),
                "overall_cat_accuracy": best["overall_cat_accuracy"],
            }
    finally:
        if ltm is not None:
            ltm.close()
        backend.close()
    results["eval_wall_s"] = time.perf_counter() - t0
    return results


def _write_episodes(path: Path, trial: int, tasks: Sequence[Any], res: Any) -> None:
    """Append one line per evaluated episode (the task, every proposal with its verdict and
    observation, the scored output): what one reads to see why an item failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if trial == 0 else "a", encoding="utf-8") as f:
        for task, rec, out in zip(tasks, res.episodes, res.outputs, strict=True):
            line = {
                "trial": trial + 1,
                "type": task.type,
                "description": task.description,
                "table_name": task.table_name,
                "output": out,
                **rec.to_dict(),  # task_id, reward, every turn
            }
            f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")


# ----------------------------------------------------------------------------- the run


class _Run:
    """The mutable pieces of one CMAT run (model, train state, logs, checkpoints)."""

    def __init__(self, job: CMATJob):
        import jax
        from flax import nnx

        from cmat_jax.cmat import roles as R
        from cmat_jax.cmat.feedback import RunningBaseline
        from cmat_jax.envs.dbbench import SYSTEM_PROMPT
        from cmat_jax.run_dir import MetricsLogger, RunDir
        from cmat_jax.training.checkpoint import CheckpointConfig, Checkpointer
        from cmat_jax.training.step import init_train_state
        from cmat_jax.weights.load import load_model

        self.job = job
        self.config = resolved_config(job)
        self.run = RunDir(self.config["out"])
        resuming = self.run.open(self.config, resume=job.resume)
        self.dir = self.run.path
        self.log(f"run directory {self.dir}" + (" (resuming)" if resuming else ""))
        t = time.perf_counter()
        self.model, self.tok = load_model(
            job.model,
            job.param_dtype,
            compute_dtype=job.compute_dtype,
            remat=job.remat,
            attention_impl=job.attention_impl,
        )
        self.lora_cfg = job.lora.build()
        self.model.add_lora(self.lora_cfg, rngs=nnx.Rngs(job.seed))
        self.log(f"loaded {job.model} in {time.perf_counter() - t:.0f}s")
        self.slots = {s: i for i, s in enumerate(self.lora_cfg.slots)}
        self.roles = R.make_roles(
            "dbbench", assistant_prompt=SYSTEM_PROMPT, reflector_slot=job.reflector_slot
        )
        self.optimizer = self._optimizer()
        self._steps: dict[Any, Any] = {}  # LossConfig -> its compiled CMAT step
        self.graphdef, self.frozen, self.state = init_train_state(
            self.model, self.optimizer, job.seed, base_dtype=job.param_dtype
        )
        self.ckpt = Checkpointer(
            self.run.checkpoint_dir, CheckpointConfig(every=1, keep=job.checkpoint_keep)
        )
        self.progress: dict[str, Any] = {
            "stage": "start",
            "round": 0,
            "baseline": None,
            "results": {},
            "ltm_records": 0,
        }
        if resuming and self.ckpt.latest_step() is not None:
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), self.state)
            self.state, self.progress, _ = self.ckpt.restore(target)
            _truncate_ltm(self.ltm_path, int(self.progress.get("ltm_records", 0)))
            self.log(
                f"resumed at step {int(self.state.step)}: {self.progress['stage']} round {self.progress['round']}"
            )
        self.baseline = RunningBaseline()
        if self.progress.get("baseline"):
            self.baseline.load_state_dict(self.progress["baseline"])
        step = int(self.state.step)
        self.logger = MetricsLogger(self.run, resume_step=step if resuming else None)
        self.rounds_path = self.dir / "rounds.jsonl"
        if resuming:  # round lines written after the checkpoint are recomputed
            _truncate_rounds(self.rounds_path, int(self.progress.get("round", 0)))
        self._sync_model()

    # -- small utilities
    @property
    def ltm_path(self) -> Path:
        return self.dir / "ltm.sqlite"

    @staticmethod
    def log(msg: str) -> None:
        print(f"[cmat] {msg}", file=sys.stderr, flush=True)

    def _optimizer(self):
        import optax

        job = self.job
        sft = optax.warmup_cosine_decay_schedule(
            0.0,
            job.sft_lr,
            min(5, max(job.sft_steps - 1, 0)),
            max(job.sft_steps, 1),
            job.sft_lr * 0.1,
        )
        sched = (
            optax.join_schedules([sft, optax.constant_schedule(job.lr)], [job.sft_steps])
            if job.sft_steps
            else optax.constant_schedule(job.lr)
        )
        adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=sched, weight_decay=0.0)
        return optax.chain(optax.clip_by_global_norm(1.0), adamw)

    def _sync_model(self) -> None:
        """Put the trained LoRA params into the generation model."""
        from flax import nnx

        from cmat_jax.model.lora import LoRAParam

        _, lora_state, _ = nnx.split(self.model, LoRAParam, ...)
        lora_state.replace_by_pure_dict(self.state.params)
        nnx.update(self.model, lora_state)

    def save(self, stage: str, round_: int) -> None:
        from cmat_jax.cmat.memory import LongTermMemory

        n = 0
        if self.ltm_path.is_file():
            with LongTermMemory(self.ltm_path) as m:
                n = len(m)
        self.progress.update(
            stage=stage, round=round_, baseline=self.baseline.state_dict(), ltm_records=n
        )
        self.ckpt.save(
            self.state, data_state=self.progress, meta={"stage": stage, "round": round_}, force=True
        )
        self.ckpt.wait()

    # -- training
    def train_rows(
        self, rows: list, steps: int | None, tag: str, loss_cfg: Any, key_seed: int
    ) -> list[dict]:
        """Steps of `cmat_step` over `rows`, packed (`pack_rows`, or one row per sequence) into
        fixed-shape batches of B sequences; `steps=None` = one pass over the rows, else `steps`
        batches, the rows reshuffled and repacked at every pass."""
        import jax

        from cmat_jax.cmat.loss import make_cmat_step, reference_logp
        from cmat_jax.cmat.rollout import pack_rows, packed_batch

        job = self.job
        if tag == "sft":
            B, T = job.sft_batch_size, job.sft_row_len
        else:
            B, T = job.batch_size, job.seq_len
        # One compiled step per loss config, reused by every round (a fresh jit per round
        # recompiled the remat'd model each time).
        step_fn = self._steps.get(loss_cfg)
        if step_fn is None:
            step_fn = self._steps[loss_cfg] = make_cmat_step(
                self.graphdef, self.optimizer, loss_cfg
            )
        rng = np.random.default_rng(key_seed)

        def one_pass() -> list:
            order = [rows[i] for i in rng.permutation(len(rows))]
            return pack_rows(order, T) if job.pack_rows else [[r] for r in order]

        packs = one_pass()
        if steps is not None:
            while len(packs) < steps * B:
                packs += one_pass()
            packs = packs[: steps * B]
        packs += [[]] * (-len(packs) % B)  # the last batch of a pass: all-padding sequences
        out = []
        pad_id = int(self.tok.pad_id)
        for lo in range(0, len(packs), B):
            batch = packed_batch(packs[lo : lo + B], T, pad_id)
            if loss_cfg.kl_coef > 0:
                batch["ref_logp"] = np.asarray(
                    reference_logp(self.graphdef, self.state.params, self.frozen, batch)
                )
            self.state, metrics = step_fn(self.state, self.frozen, batch)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            m["stage"] = tag
            self.logger.log(
                int(self.state.step), {f"train/{k}": v for k, v in m.items() if k != "stage"}
            )
            out.append(m)
        self._sync_model()
        return out

    def close(self) -> None:
        self.logger.close()
        self.ckpt.close()


def _eval_all(r: _Run, stage: str, held_out: list, dev: list | None) -> dict[str, Any]:
    job = r.job
    res: dict[str, Any] = {}
    ltm = r.ltm_path if r.ltm_path.is_file() else None
    base = r.dir / "eval" / stage
    t = time.perf_counter()
    res["synthetic"] = evaluate_tasks(
        r.model,
        r.tok,
        held_out,
        r.roles,
        job,
        checker=False,
        ltm_source=ltm,
        work_dir=base / "a",
        reflexion_trials=job.reflexion_trials,
    )
    if job.eval_checker and job.synthetic_checker:
        res["synthetic_checker"] = evaluate_tasks(
            r.model,
            r.tok,
            held_out,
            r.roles,
            job,
            checker=True,
            ltm_source=ltm,
            work_dir=base / "b",
        )
    if dev and stage in job.dev_stages:
        res["dev"] = evaluate_tasks(
            r.model,
            r.tok,
            dev,
            r.roles,
            job,
            checker=False,
            ltm_source=ltm,
            work_dir=base / "dev_a",
            reflexion_trials=job.reflexion_trials,
        )
        if job.eval_checker and job.dev_checker:
            res["dev_checker"] = evaluate_tasks(
                r.model,
                r.tok,
                dev,
                r.roles,
                job,
                checker=True,
                ltm_source=ltm,
                work_dir=base / "dev_b",
            )
    r.log(
        f"eval {stage}: synthetic success {res['synthetic']['success_rate']:.3f}"
        + (
            f", dev overall_cat_accuracy {res['dev']['overall_cat_accuracy']:.3f}"
            if "dev" in res
            else ""
        )
        + f" ({time.perf_counter() - t:.0f}s)"
    )
    return res


def run_cmat(job: CMATJob) -> dict[str, Any]:
    """The whole recipe; returns the results dict also written to DIR/results.json."""
    import jax

    from cmat_jax.cmat.config import CMATConfig
    from cmat_jax.cmat.loss import LossConfig
    from cmat_jax.cmat.memory import LongTermMemory, ReadPolicy
    from cmat_jax.cmat.rollout import RolloutConfig, RolloutEngine
    from cmat_jax.envs.dbbench import DBBenchEnv, load_tasks
    from cmat_jax.envs.sqlite_backend import SQLiteBackend

    t_start = time.perf_counter()
    dev_path = resolve_dev_data(job.dev_data)
    anchor_pool: list | None = None
    r = _Run(job)
    try:
        held_out = synth_tasks(
            job.eval_tasks, job.seed + EVAL_SEED_OFFSET, wikisql_share=job.synth_wikisql_share
        )
        dev = load_tasks(dev_path, limit=job.dev_limit) if dev_path else None
        results = r.progress["results"]
        stage = r.progress["stage"]

        if stage == "start":
            if job.eval_base:
                results["base"] = _eval_all(r, "base", held_out, dev)
            if job.sft_steps > 0:
                t = time.perf_counter()
                rows = expert_rows(r.tok, job, r.slots, r.roles)
                anchor_pool = [row for row in rows if row.role == "assistant"]
                r.log(f"agent tuning: {len(rows)} rows, {job.sft_steps} steps")
                hist = r.train_rows(
                    rows, job.sft_steps, "sft", LossConfig(mode="rwr", kl_coef=0.0), job.seed
                )
                r.log(
                    f"agent tuning done: loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f} ({time.perf_counter() - t:.0f}s)"
                )
            results["agent_tuning"] = _eval_all(r, "agent_tuning", held_out, dev)
            r.save("agent_tuning", 0)
            stage = "agent_tuning"

        cmat_cfg = CMATConfig(
            alpha=job.alpha,
            beta=job.beta,
            tau=job.tau,
            group_size=job.group_size,
            max_revisions=job.max_revisions,
            use_checker=job.use_checker,
            use_reflection=job.use_reflection,
            ltm_k=job.ltm_k,
            ltm_token_budget=job.ltm_token_budget,
            ltm_solutions=job.ltm_solutions,
            ltm_similar=job.ltm_similar,
            stm_token_budget=job.stm_token_budget,
        )
        loss_cfg = LossConfig(
            mode=job.loss_mode,
            kl_coef=job.kl_coef,
            anchor_coef=job.anchor_coef,
            clip_eps=job.clip_eps,
        )
        if job.anchor_rows and anchor_pool is None:  # resumed, or no agent tuning this run
            anchor_pool = [
                row for row in expert_rows(r.tok, job, r.slots, r.roles) if row.role == "assistant"
            ]
        backend = SQLiteBackend(time_limit_s=3.0)
        start_round = int(r.progress["round"]) if stage in ("round", "done") else 0
        for rnd in range(start_round, job.rounds):
            t = time.perf_counter()
            tasks = synth_tasks(
                job.tasks_per_round,
                job.seed,
                rnd * job.tasks_per_round,
                wikisql_share=job.synth_wikisql_share,
            )
            with LongTermMemory(r.ltm_path) as ltm:
                engine = RolloutEngine(
                    r.model,
                    r.tok,
                    lambda: DBBenchEnv(backend, max_rounds=job.train_max_rounds),
                    roles=r.roles,
                    cmat_cfg=cmat_cfg,
                    rollout_cfg=RolloutConfig(
                        temperature=job.temperature,
                        max_new_tokens=job.max_new_tokens,
                        reason_max_new_tokens=job.reason_max_new_tokens,
                        max_batch=job.max_batch,
                        min_batch=job.min_batch,
                        # every training row fits seq_len whole: prompts that would outgrow it
                        # are rebuilt from short-term memory instead
                        max_context=job.seq_len + 1,
                    ),
                    ltm=ltm,
                    read_policy=ReadPolicy.training(),
                    baseline=r.baseline,
                )
                res = engine.run(tasks, key=jax.random.key(job.seed * 1000 + rnd))
            t_roll = time.perf_counter() - t
            rows = select_rows(res, job, seed=job.seed * 1000 + rnd)
            if rows and job.anchor_rows:
                rows += draw_anchor_rows(
                    anchor_pool or [], job.anchor_rows, seed=job.seed * 1000 + rnd
                )
            hist = []
            for epoch in range(job.epochs):
                if rows:
                    hist += r.train_rows(
                        rows, None, "cmat", loss_cfg, job.seed * 7 + rnd * 31 + epoch
                    )
            st = dict(res.stats)
            st.update(
                round=rnd + 1,
                rows=len(rows),
                rollout_s=t_roll,
                train_s=time.perf_counter() - t - t_roll,
                loss=float(np.mean([h["loss"] for h in hist])) if hist else None,
                kl=float(np.mean([h["kl"] for h in hist])) if hist else None,
            )
            with r.rounds_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(st) + "\n")
            r.logger.log(
                int(r.state.step),
                {
                    f"round/{k}": v
                    for k, v in st.items()
                    if isinstance(v, (int, float)) and v is not None
                },
            )
            r.log(
                f"round {rnd + 1}/{job.rounds}: reward {st['mean_reward']:.3f}, success {st['success_rate']:.3f}, "
                f"checker P/R {st['checker_precision']}/{st['checker_recall']}, {len(rows)} rows, "
                f"{time.perf_counter() - t:.0f}s"
            )
            if job.eval_every and (rnd + 1) % job.eval_every == 0 and rnd + 1 < job.rounds:
                results[f"round_{rnd + 1}"] = _eval_all(r, f"round_{rnd + 1}", held_out, None)
            r.save("round", rnd + 1)
        backend.close()

        if "cmat" not in results:
            results["cmat"] = _eval_all(r, "cmat", held_out, dev)
            r.save("done", job.rounds)
        r.ckpt.wait()
        final = finish_run(r, results, dev_path, time.perf_counter() - t_start)
    finally:
        r.close()
    return final


def select_rows(res: Any, job: CMATJob, seed: int = 0) -> list:
    """The round's training rows (see `CMATJob.drop_failed_groups` and
    `CMATJob.checker_rows_per_round`)."""
    rows = list(res.rows)
    if job.loss_mode == "rwr" and job.drop_failed_groups:
        best: dict[str, float] = {}
        for e in res.episodes:
            best[e.group_id] = max(best.get(e.group_id, 0.0), e.reward)
        rows = [
            row
            for row in rows
            if row.role != "assistant" or best[res.episodes[row.episode].group_id] > 0.0
        ]
    checker = [row for row in rows if row.role == "checker"]
    rows = [row for row in rows if row.role != "checker"]
    return rows + balance_checker_rows(checker, job.checker_rows_per_round, seed)


def draw_anchor_rows(pool: list, n: int, seed: int) -> list:
    """`n` expert rows drawn from `pool` (without replacement while it lasts) as SFT-anchor rows:
    `anchor` set and the policy weight zeroed, so only λ·NLL trains them."""
    if not pool:
        return []
    rng = np.random.default_rng(seed)
    idx = [int(i) for i in rng.permutation(len(pool))][:n]
    idx += [int(i) for i in rng.integers(0, len(pool), max(0, n - len(idx)))]
    return [
        dataclasses.replace(
            pool[i],
            anchor=True,
            weight=np.zeros_like(pool[i].weight),
            advantage=np.zeros_like(pool[i].advantage),
        )
        for i in idx
    ]


def balance_checker_rows(rows: list, cap: int, seed: int) -> list:
    """Checker rows with both verdicts weighted equally: at most `cap` rows (0 = all), drawn
    half from each label where both have enough, and each label's rows weighted so that the
    two labels carry the same total weight.

    Labels follow the episode's outcome, so in a round where most episodes fail most labels are
    "reject"; trained as they come, a few steps teach the Checker to reject everything, and its
    rejections then derail the Assistant's next round."""
    rng = np.random.default_rng(seed)
    by_label = {True: [r for r in rows if r.label], False: [r for r in rows if not r.label]}
    if cap and len(rows) > cap:
        minority = min(by_label, key=lambda label: len(by_label[label]))
        small, big = by_label[minority], by_label[not minority]
        n_small = min(len(small), cap // 2)
        keep_small = [small[i] for i in rng.permutation(len(small))[:n_small]]
        keep_big = [big[i] for i in rng.permutation(len(big))[: cap - n_small]]
        by_label = {True: [], False: []}
        for r in keep_small + keep_big:
            by_label[bool(r.label)].append(r)
    present = [label for label, rs in by_label.items() if rs]
    total = sum(len(by_label[label]) for label in present)
    out = []
    for label in present:
        scale = total / (len(present) * len(by_label[label]))
        out += [dataclasses.replace(r, weight=r.weight * scale) for r in by_label[label]]
    return out


def finish_run(
    r: _Run, results: dict[str, Any], dev_path: Path | None, wall_s: float
) -> dict[str, Any]:
    """results.json, plots, the exported adapter and the summary table."""
    job = r.job
    out: dict[str, Any] = {"run": str(r.dir), "model": job.model, "wall_s": round(wall_s, 1)}
    # Where the wall time went: the evaluations (every stage, split and protocol) vs the rest.
    eval_s = sum(
        v.get("eval_wall_s", 0.0)
        for stage in results.values()
        for v in stage.values()
        if isinstance(v, dict)
    )
    out["eval_wall_s"] = round(eval_s, 1)
    out["train_wall_s"] = round(wall_s - eval_s, 1)
    for stage in ("base", "agent_tuning", "cmat"):
        if stage in results:
            out[f"success_rate_after_{stage}" if stage != "base" else "success_rate_base"] = (
                results[stage]["synthetic"]["success_rate"]
            )
    out["held_out_synthetic_tasks"] = job.eval_tasks
    out["dev_data"] = str(dev_path) if dev_path else None
    out["stages"] = results
    if job.export:
        try:
            from cmat_jax.export import ExportArgs, export

            target = r.dir / "export" / "assistant-peft"
            if not target.exists():
                export(ExportArgs(run=str(r.dir), out=str(target), format="peft", slot="assistant"))
            out["peft_adapter"] = str(target)
        except Exception as e:  # the run's numbers stand without the export; say why
            out["peft_adapter_error"] = f"{type(e).__name__}: {e}"
    try:
        out["plots"] = make_plots(r.dir)
    except Exception as e:
        out["plots_error"] = f"{type(e).__name__}: {e}"
    (r.dir / "results.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(summary_table(out), flush=True)
    return out


def make_plots(run_dir: Path) -> list[str]:
    """PNG plots: reward / success / Checker precision-recall per round, loss and KL per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmat_jax.run_dir import read_metrics

    paths = []
    rounds = []
    rp = run_dir / "rounds.jsonl"
    if rp.is_file():
        rounds = [json.loads(x) for x in rp.read_text().splitlines() if x.strip()]
    if rounds:
        x = [d["round"] for d in rounds]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot(x, [d["mean_reward"] for d in rounds], "o-", label="mean reward")
        axes[0].plot(x, [d["success_rate"] for d in rounds], "s-", label="success rate")
        axes[0].set_title("rollouts")
        for key in ("checker_precision", "checker_recall"):
            axes[1].plot(x, [np.nan if d[key] is None else d[key] for d in rounds], "o-", label=key)
        axes[1].set_title("Checker (positive = bad proposal)")
        for a in axes:  # rates on a fixed [0, 1] scale, whole rounds (a one-round job reads too)
            lo, hi = a.get_ylim()
            a.set_ylim(min(lo, -0.05), max(hi, 1.05))
            a.set_xticks(x)
            a.set_xlim(min(x) - 0.5, max(x) + 0.5)
            a.set_xlabel("round")
            a.legend()
        p = run_dir / "rounds.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(str(p))
    steps = [m for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]
    if steps:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].plot([m["step"] for m in steps], [m["train/loss"] for m in steps])
        axes[0].set_title("loss per step")
        axes[1].plot([m["step"] for m in steps], [m.get("train/kl") for m in steps])
        axes[1].set_title("KL to the base per step")
        for a in axes:
            a.set_xlabel("step")
        p = run_dir / "train.png"
        fig.tight_layout()
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(str(p))
    return paths


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def summary_table(out: dict[str, Any]) -> str:
    rows = [("stage", "synthetic", "synthetic+checker", "dev", "dev+checker")]
    for stage, res in out["stages"].items():

        def g(k: str, m: str, res: dict = res) -> Any:
            return res.get(k, {}).get(m)

        rows.append(
            (
                stage,
                _fmt(g("synthetic", "success_rate")),
                _fmt(g("synthetic_checker", "success_rate")),
                _fmt(g("dev", "overall_cat_accuracy")),
                _fmt(g("dev_checker", "overall_cat_accuracy")),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    took = f"{out['wall_s']:.0f}s, of which evaluation {out['eval_wall_s']:.0f}s"
    head = f"CMAT run {out['run']} ({took}): success rate on held-out synthetic tasks, AgentBench DB dev overall_cat_accuracy"
    return "\n".join([head, *lines])
