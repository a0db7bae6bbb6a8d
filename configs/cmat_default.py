"""CMAT presets for `python -m cmat_jax.train cmat --preset NAME` (flags override any field).

`cmat-default` is the job `python -m cmat_jax.train` runs with no arguments: sized for a 2-core
CPU in about 20 minutes (SmolLM2-135M-Instruct, a short agent tuning, two CMAT rounds)."""

from cmat_jax.cmat.loop import CMATJob
from cmat_jax.train import LoRAArgs

PRESETS = {
    "cmat-default": CMATJob(
        model="smollm2-135m-instruct",
        out="runs/cmat-default",
        lora=LoRAArgs(rank=8, alpha=16.0, slots=("assistant", "checker")),
        sft_steps=30,
        sft_examples=160,
        sft_batch_size=8,
        sft_lr=1e-3,
        rounds=2,
        tasks_per_round=6,
        group_size=4,
        epochs=1,
        batch_size=8,
        seq_len=640,
        lr=2e-4,
        loss_mode="rwr",
        kl_coef=0.05,
        max_new_tokens=96,
        train_max_rounds=5,
        eval_tasks=16,
        eval_max_new_tokens=128,
        dev_stages=("cmat",),
        dev_limit=None,
        max_batch=32,
    ),
}
