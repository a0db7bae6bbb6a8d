"""The full CMAT recipe on SmolLM2-135M-Instruct for a 2-core CPU: training in well under
2 hours (41 min in runs/s10full: load, agent tuning, two CMAT rounds), then the evaluations
behind the README's table (103 min more there).

Agent tuning runs on expert trajectories of which half are in the style of AgentBench's DB
items (WikiSQL lookups, INSERTs told as facts, UPDATEs of several columns). The AgentBench DB
dev split (all 60 items) is evaluated after agent tuning and after CMAT, each without the
Checker, with it, and with reflexion retries (pass@2). The held-out synthetic tasks are
evaluated without the Checker and with pass@2 only: their with-Checker run cost 11 minutes in
runs/s10full and is not in the table (``--synthetic-checker`` brings it back). The base
model's row (0.000 everywhere) costs ~10-15 more minutes: add it with ``--eval-base
--dev-stages base agent_tuning cmat``. Measured numbers: README, "The full recipe" (dev 0.300
after agent tuning, 0.317 after CMAT, runs/s10full)."""

from cmat_jax.cmat.job import CMATJob
from cmat_jax.train import LoRAArgs

PRESETS = {
    "cmat-full": CMATJob(
        model="smollm2-135m-instruct",
        out="runs/cmat-full",
        lora=LoRAArgs(rank=16, alpha=32.0, slots=("assistant", "checker")),
        synth_wikisql_share=0.5,
        sft_steps=90,
        sft_examples=720,
        sft_batch_size=8,
        sft_seq_len=512,
        sft_lr=1e-3,
        rounds=2,
        tasks_per_round=6,
        group_size=4,
        epochs=1,
        batch_size=8,
        seq_len=640,
        lr=1e-4,
        loss_mode="rwr",
        kl_coef=0.05,
        anchor_coef=1.0,
        anchor_rows=16,
        tau=0.25,
        max_new_tokens=160,
        train_max_rounds=4,
        max_revisions=1,
        ltm_token_budget=128,
        ltm_similar=False,
        temperature=0.5,
        stm_token_budget=1024,
        eval_tasks=16,
        eval_max_new_tokens=160,
        eval_max_context=1024,
        eval_max_rounds=8,
        eval_base=False,
        eval_checker=True,
        synthetic_checker=False,
        reflexion_trials=2,
        dev_stages=("agent_tuning", "cmat"),
        dev_checker=True,
        max_batch=32,
        min_batch=1,
        checker_rows_per_round=8,
    ),
}
