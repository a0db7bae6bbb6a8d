"""CMAT presets for `python -m cmat_jax.train cmat --preset NAME` (flags override any field).

`cmat-default` is the job `python -m cmat_jax.train` runs with no arguments, meant for a 2-core
CPU in at most 20 minutes (SmolLM2-135M-Instruct, a short agent tuning, one CMAT round).
Measured on the 2-core dev box on a slow day: 1086-1148 s, held-out success 0.250 after agent
tuning and 0.312 after CMAT (see the README, "The default job"). One round, not two: a second
round cost ~400 s and its rollouts succeeded less often than the first's in both runs that
had one."""

from cmat_jax.cmat.job import CMATJob
from cmat_jax.train import LoRAArgs

PRESETS = {
    "cmat-default": CMATJob(
        model="smollm2-135m-instruct",
        out="runs/cmat-default",
        lora=LoRAArgs(rank=8, alpha=16.0, slots=("assistant", "checker")),
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
        max_batch=16,
        min_batch=1,
        checker_rows_per_round=8,
        dev_checker=False,
    ),
}
