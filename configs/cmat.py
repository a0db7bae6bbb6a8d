"""CMAT presets for `python -m cmat_jax.train cmat --preset NAME` (flags override any field).

`cmat-default` is the job `python -m cmat_jax.train` runs with no arguments: SmolLM2-135M-Instruct,
a short agent tuning and one CMAT round, sized for a 2-core CPU in at most ~20 minutes.

`cmat-full` is the full recipe written as its differences from the default: longer agent tuning
on expert trajectories of which half are phrased like AgentBench DB's items (WikiSQL lookups),
two rounds, rank-16 adapters, longer replies, and the evaluations behind the results table —
the whole AgentBench DB dev split after agent tuning and after CMAT, each without the Checker,
with it, and with reflexion retries (pass@2); the held-out synthetic tasks without the Checker
and with pass@2 (`--synthetic-checker` adds their with-Checker run, `--eval-base --dev-stages
base agent_tuning cmat` the base model's row). Measured numbers: docs/results.md.

`cmat-os` is the default job on the AgentBench OS task (`--task os`, docs/os_task.md): agent
tuning on the scripted expert's sandboxed episodes of synthetic OS problems, one CMAT round of
sandbox episodes, and evaluation on held-out synthetic problems and the 26 OS dev problems at
the protocol's 8 rounds. Its rows are 1024 tokens (the task's instructions and one-shot example
take ~570 SmolLM2 tokens, an expert episode at most ~950). That prompt is laid out once per
sequence (`share_prefixes`), so a sequence holds ~2.8 rows instead of ~1.3: 4 sequences per
step carry the rows 8 did without sharing. It rolls out 3 tasks and evaluates 10 held-out
problems to stay within the default job's time.
"""

import dataclasses

from cmat_jax.cmat.job import CMATJob
from cmat_jax.train import LoRAArgs

SLOTS = ("assistant", "checker")

CMAT_DEFAULT = CMATJob(
    model="smollm2-135m-instruct",
    out="runs/cmat-default",
    lora=LoRAArgs(rank=8, alpha=16.0, slots=SLOTS),
    sft_steps=26,
    sft_examples=160,
    sft_batch_size=8,
    sft_seq_len=512,
    sft_lr=2e-3,
    rounds=1,
    tasks_per_round=4,
    group_size=4,
    epochs=1,
    batch_size=8,
    seq_len=640,
    lr=2e-4,
    loss_mode="rwr",
    kl_coef=0.05,
    anchor_coef=1.0,
    anchor_rows=16,
    tau=0.25,
    max_new_tokens=96,
    train_max_rounds=3,
    max_revisions=1,
    ltm_token_budget=128,
    ltm_similar=False,
    temperature=0.5,
    stm_token_budget=1024,
    eval_tasks=16,
    eval_max_new_tokens=96,
    eval_max_context=1024,
    eval_max_rounds=8,
    eval_checker=False,
    dev_stages=("cmat",),
    dev_limit=5,
    dev_checker=False,
    max_batch=16,
    min_batch=1,
    checker_rows_per_round=8,
)

CMAT_FULL = dataclasses.replace(
    CMAT_DEFAULT,
    out="runs/cmat-full",
    lora=LoRAArgs(rank=16, alpha=32.0, slots=SLOTS),
    synth_wikisql_share=0.5,
    sft_steps=90,
    sft_examples=720,
    sft_lr=1e-3,
    rounds=2,
    tasks_per_round=6,
    lr=1e-4,
    max_new_tokens=160,
    train_max_rounds=4,
    eval_max_new_tokens=160,
    eval_checker=True,
    synthetic_checker=False,
    reflexion_trials=2,
    dev_stages=("agent_tuning", "cmat"),
    dev_limit=None,
    dev_checker=True,
    max_batch=32,
)

CMAT_OS = dataclasses.replace(
    CMAT_DEFAULT,
    out="runs/cmat-os",
    task="os",
    sft_examples=96,
    sft_steps=14,
    share_prefixes=True,
    sft_batch_size=4,
    sft_seq_len=1024,
    batch_size=4,
    seq_len=1024,
    tasks_per_round=3,
    anchor_rows=8,
    stm_token_budget=1024,
    eval_tasks=10,
    eval_max_context=1536,
    eval_max_rounds=8,
    dev_limit=None,
)

PRESETS = {"cmat-default": CMAT_DEFAULT, "cmat-full": CMAT_FULL, "cmat-os": CMAT_OS}
