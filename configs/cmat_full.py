"""The full CMAT recipe on SmolLM2-135M-Instruct for a 2-core CPU in about 2 hours:
longer agent tuning, more CMAT rounds, every stage evaluated on the AgentBench DB dev split with
and without the Checker and with reflexion retries (pass@2)."""

from cmat_jax.cmat.loop import CMATJob
from cmat_jax.train import LoRAArgs

PRESETS = {
    "cmat-full": CMATJob(
        model="smollm2-135m-instruct",
        out="runs/cmat-full",
        lora=LoRAArgs(rank=16, alpha=32.0, slots=("assistant", "checker")),
        sft_steps=300,
        sft_examples=1200,
        sft_batch_size=8,
        sft_lr=1e-3,
        rounds=8,
        tasks_per_round=12,
        group_size=4,
        epochs=2,
        batch_size=8,
        seq_len=768,
        lr=1e-4,
        loss_mode="rwr",
        kl_coef=0.05,
        anchor_coef=1.0,
        anchor_rows=24,
        ltm_similar=False,
        max_new_tokens=128,
        train_max_rounds=8,
        eval_tasks=48,
        eval_every=4,
        eval_base=True,
        reflexion_trials=2,
        dev_stages=("base", "agent_tuning", "cmat"),
        max_batch=48,
    ),
}
