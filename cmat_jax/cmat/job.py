"""The CMAT job's config: one frozen dataclass (`python -m cmat_jax.train cmat --help`), its
validation, and the resolved form written to DIR/config.json."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cmat_jax.cli import AttentionImpl
from cmat_jax.cmat.config import CMATConfig
from cmat_jax.cmat.loss import LossConfig
from cmat_jax.tasks import TASKS, parse_task_list
from cmat_jax.train import LoRAArgs, MeshArgs, _absolute_if_path

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
    task: str = "db"
    """Tasks to train and evaluate on, comma-separated: db (AgentBench DB on SQLite), os
    (AgentBench OS interaction in the sandbox; `python -m cmat_jax.sandbox setup`
    first), or both (db,os: every stream mixes them, metrics are reported per task)."""
    task_weights: tuple[float, ...] = ()
    """Relative shares of --task's tasks in the mixed streams (agent tuning, rounds, held-out
    tasks), in --task's order; empty = even."""
    param_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the frozen base parameters."""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of matmul inputs (accumulation is float32)."""
    remat: Literal["none", "full", "dots_saveable"] = "full"
    """Rematerialize each layer in the backward pass: the SFT / CMAT batches of a 135M model
    otherwise keep ~10 GB of activations."""
    attention_impl: AttentionImpl = "chunked"
    """Attention kernel of the training steps: xla | cudnn | pallas | chunked | auto (chunked:
    blockwise, skips causal blocks — measured ~4x faster than xla fwd+bwd on CPU)."""
    lora: LoRAArgs = field(
        default_factory=lambda: LoRAArgs(rank=8, alpha=16.0, slots=("assistant", "checker"))
    )
    """LoRA adapters: one slot per trained role (assistant, checker)."""
    mesh: MeshArgs = field(default_factory=MeshArgs)
    """Device mesh of rollouts, reference log-probs and updates (as `train sft --mesh.*`)."""
    # -- agent tuning (stage 2)
    sft_steps: int = 40
    """SFT optimizer steps (0 = skip agent tuning)."""
    sft_examples: int = 200
    """Scripted-expert trajectories on synthetic DB tasks."""
    synth_wikisql_share: float = 0.0
    """Chance that a synthetic lookup / comparison question (expert data, rollout and held-out
    tasks) is phrased like WikiSQL's, AgentBench DB's main source: one to three conditions,
    "Which A has a C of v, and a N smaller than x?" (0 = the generator's own phrasings only)."""
    synth_benchmark_share: float = 0.0
    """Share of synthetic tasks drawn in the shape of AgentBench DB as a whole (its type mix, the
    fixed table line, punctuated / digit-led headers, TEXT numbers, LIKE and GROUP BY questions;
    docs/dbbench_synth.md); 0 = the generator's own families only."""
    sft_data: tuple[str, ...] = ()
    """Extra JSONL conversations (OpenAI `messages`) mixed into the Assistant's SFT data."""
    sft_lr: float = 1e-3
    """Peak learning rate of agent tuning (warmup, then cosine decay over sft_steps)."""
    checker_sft: bool = True
    """Also tune the Checker on the expert trajectories' implied verdicts."""
    sft_batch_size: int = 8
    """Sequences per agent-tuning optimizer step."""
    pack_rows: bool = True
    """Pack several training rows into each sequence of a batch (agent tuning and CMAT
    updates): a step then carries ~1.3x the rows of the default job instead of padding."""
    share_prefixes: bool = False
    """With `pack_rows`: rows that begin with the same prompt (a task's instructions and one-shot
    example) are packed together and that prefix is laid out once per sequence, seen by each of
    its rows (`cmat_jax.data.rows.pack_rows`). Each row's loss is the same, but a sequence holds
    more rows, so a step of `batch_size` sequences trains more rows and a pass takes fewer steps:
    size the batches for it (`cmat-os` does; docs/design.md)."""
    sft_seq_len: int | None = None
    """Tokens per agent-tuning row (None = seq_len). Longer expert trajectories lose their
    trailing turns, never their start."""
    # -- CMAT rounds (stage 3)
    rounds: int = 2
    """CMAT rounds after agent tuning (0 = agent tuning only)."""
    tasks_per_round: int = 8
    """Fresh synthetic tasks rolled out per round."""
    group_size: int = 4
    """Episodes per task (G): the group the advantages and RWR weights compare within."""
    epochs: int = 1
    """Passes of the CMAT update over one round's rows."""
    batch_size: int = 8
    """Sequences per CMAT optimizer step."""
    seq_len: int = 768
    """Tokens per CMAT training row. Training rollouts run with a context of seq_len + 1, so
    every row is trained whole; a prompt that outgrows it is rebuilt from short-term memory."""
    lr: float = 2e-4
    """Learning rate of the CMAT updates (constant after agent tuning's schedule)."""
    loss_mode: Literal["rwr", "pg", "ppo"] = "rwr"
    """Policy term of the CMAT loss (docs/method.md §5): reward-weighted regression, REINFORCE
    with the group baseline, or PPO's clipped ratio."""
    kl_coef: float = 0.05
    """κ: weight of the k3 KL estimate to the frozen base (slot none)."""
    anchor_coef: float = 0.0
    """λ of the SFT anchor (docs/method.md §5): the NLL of `anchor_rows` expert rows mixed into
    every round's update."""
    anchor_rows: int = 0
    """Expert Assistant rows (agent-tuning data, a fresh seeded draw per round) added to each
    round's CMAT update as anchor rows: policy weight 0, trained by anchor_coef·NLL only."""
    clip_eps: float = 0.2
    """ε of PPO's ratio clipping (loss_mode ppo)."""
    temperature: float = 0.7
    """Sampling temperature of training rollouts (evaluation is greedy)."""
    max_new_tokens: int = 128
    """New-token cap of one reply in training rollouts."""
    reason_max_new_tokens: int = 0
    """New tokens for a Checker's rejection reason (training and evaluation; 0 = the
    proposals' limit). Only its first line is used."""
    train_max_rounds: int = 8
    """Environment round limit in training rollouts."""
    eval_max_rounds: int = 15
    """Environment round limit in evaluation (AgentBench's protocol: 15)."""
    use_checker: bool = True
    """Run the Checker on each proposal in training rollouts."""
    max_revisions: int = 2
    """K: Assistant revisions after Checker rejections within one round of an episode."""
    use_reflection: bool = True
    """Write a Reflector lesson into long-term memory after each failed training episode."""
    alpha: float = 0.2
    """α: turn-return penalty for a proposal whose execution errs."""
    beta: float = 0.1
    """β: turn-return penalty for a proposal the Checker rejects."""
    tau: float = 0.5
    """τ: temperature of the RWR softmax over a group's rewards."""
    reflector_slot: str = "assistant"
    """LoRA slot the Reflector writes lessons with ("none" = the frozen base model). An
    agent-tuned slot tends to write the expert's opening thought as its lesson, whatever the
    mistake was."""
    ltm_k: int = 3
    """Long-term-memory records retrieved per prompt (BM25 over task text)."""
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
    """AgentBench DB dev JSONL; 'auto' = tests/data/agentbench_dbbench/dev.jsonl of a source
    checkout when it exists (none in a wheel install); '' = none."""
    os_dev_data: str = "auto"
    """AgentBench OS dev problem file (--task os); 'auto' = tests/data/agentbench_os/dev.json
    of a source checkout when it exists; '' = none."""
    os_dev_script_dir: str = ""
    """Folder the OS dev file's script paths are relative to ('' = 'auto''s scripts/dev, else
    the file's folder)."""
    dev_limit: int | None = None
    """Evaluate only the first N dev items (None = all)."""
    dev_stages: tuple[str, ...] = ("agent_tuning", "cmat")
    """Stages evaluated on the dev split (base, agent_tuning, cmat)."""
    eval_max_new_tokens: int = 192
    """New-token cap of one reply in evaluation."""
    eval_max_context: int = 2048
    """Evaluation prompt + reply tokens; longer episodes continue from short-term memory. On a
    CPU the last live episodes of a batch otherwise prefill ~1500-token prompts for 16 padded
    rows per turn."""
    progress: bool = True
    """Show progress bars."""
    checkpoint_keep: int = 2
    """Checkpoints kept in DIR/checkpoints (older ones are deleted)."""
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
        for name, low, strict in (("sft_lr", 0.0, True), ("lr", 0.0, True),
                                  ("kl_coef", 0.0, False), ("anchor_coef", 0.0, False),
                                  ("clip_eps", 0.0, True), ("temperature", 0.0, False),
                                  ("alpha", 0.0, False), ("beta", 0.0, False),
                                  ("tau", 0.0, True)):  # fmt: skip
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
            if not (v > low if strict else v >= low):
                op = ">" if strict else ">="
                raise ValueError(f"--{name.replace('_', '-')} must be {op} {low:g}, got {v}")
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
        for flag, share in (("--synth-wikisql-share", self.synth_wikisql_share),
                            ("--synth-benchmark-share", self.synth_benchmark_share)):  # fmt: skip
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{flag} must be in [0, 1], got {share}")
        names = parse_task_list(self.task)
        if self.task_weights and len(self.task_weights) != len(names):
            raise ValueError(
                f"--task-weights: {len(self.task_weights)} weights for {len(names)} tasks "
                f"({self.task})"
            )
        if any(not (math.isfinite(w) and w > 0) for w in self.task_weights):
            raise ValueError(f"--task-weights must be finite and > 0, got {self.task_weights}")
        bad = set(self.dev_stages) - {"base", "agent_tuning", "cmat"}
        if bad:
            raise ValueError(f"--dev-stages: unknown stage(s) {sorted(bad)}")
        # The rounds' own configs check more (PPO's clip ε < 1, ...): build them now, so a bad
        # value stops the job before it writes anything, and name the flag, not the field.
        try:
            self.cmat_config()
            self.loss_config()
        except ValueError as e:
            flag = lambda m: "--" + m.group(1).replace("_", "-")
            raise ValueError(re.sub(r"\b(?:CMATConfig|LossConfig)\.(\w+)", flag, str(e))) from None

    def cmat_config(self) -> CMATConfig:
        """The rollouts' CMAT hyperparameters (memory, Checker, feedback)."""
        return CMATConfig(
            alpha=self.alpha,
            beta=self.beta,
            tau=self.tau,
            group_size=self.group_size,
            max_revisions=self.max_revisions,
            use_checker=self.use_checker,
            use_reflection=self.use_reflection,
            ltm_k=self.ltm_k,
            ltm_token_budget=self.ltm_token_budget,
            ltm_solutions=self.ltm_solutions,
            ltm_similar=self.ltm_similar,
            stm_token_budget=self.stm_token_budget,
        )

    def loss_config(self) -> LossConfig:
        """The CMAT loss's settings. PG and PPO score the rollouts' tokens at the temperature
        that sampled them; RWR is a weighted maximum likelihood of the model itself (greedy at
        evaluation), so it scores at 1."""
        sampled = self.loss_mode in ("pg", "ppo") and self.temperature > 0
        return LossConfig(
            mode=self.loss_mode,
            kl_coef=self.kl_coef,
            anchor_coef=self.anchor_coef,
            clip_eps=self.clip_eps,
            temperature=self.temperature if sampled else 1.0,
        )


def resolved_config(job: CMATJob) -> dict:
    job = dataclasses.replace(
        job,
        model=_absolute_if_path(job.model),
        sft_data=tuple(_absolute_if_path(d) for d in job.sft_data),
        out=str(Path(job.out).expanduser().resolve()),
        dev_data=str(resolve_dev_data(job.dev_data) or ""),
        os_dev_data=str(resolve_os_dev(job)[0] or ""),
        os_dev_script_dir=str(resolve_os_dev(job)[1] or ""),
    )
    # JSON round trip: tuples become lists, as they read back from DIR/config.json on resume.
    return json.loads(json.dumps({"job": "cmat", "slot": "assistant", **dataclasses.asdict(job)}))


def resolve_dev_data(dev_data: str) -> Path | None:
    if dev_data == "auto":
        p = TASKS["db"].dev_default
        return p if p.is_file() else None
    if not dev_data:
        return None
    p = Path(dev_data).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"--dev-data: {p}: no such file")
    return p


def resolve_os_dev(job: CMATJob) -> tuple[Path | None, Path | None]:
    """(problem file, script dir) of the OS dev split, or (None, None); a job without the OS
    task has none."""
    if "os" not in parse_task_list(job.task) or not job.os_dev_data:
        return None, None
    spec = TASKS["os"]
    if job.os_dev_data == "auto":
        p, sdir = spec.dev_default, spec.dev_scripts
        if not p.is_file():
            return None, None
    else:
        p = Path(job.os_dev_data).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"--os-dev-data: {p}: no such file")
        sdir = p.parent
    if job.os_dev_script_dir:
        sdir = Path(job.os_dev_script_dir).expanduser().resolve()
    if sdir is None or not sdir.is_dir():
        raise FileNotFoundError(f"--os-dev-script-dir: {sdir}: no such folder")
    return p, sdir


def dev_splits(job: CMATJob) -> dict[str, tuple[Path, Path | None]]:
    """Each task's dev split, by task name: (file, script dir); tasks without one are left out."""
    out: dict[str, tuple[Path, Path | None]] = {}
    for name in parse_task_list(job.task):
        if name == "db":
            p = resolve_dev_data(job.dev_data)
            if p is not None:
                out[name] = (p, None)
        elif name == "os":
            p, sdir = resolve_os_dev(job)
            if p is not None:
                out[name] = (p, sdir)
    return out
