"""SFT presets for `python -m cmat_jax.train sft --preset NAME` (flags override any field)."""

from pathlib import Path

from cmat_jax.train import LoRAArgs, OptimArgs, SFTJob
from cmat_jax.training.checkpoint import CheckpointConfig

_HERE = Path(__file__).resolve().parent

PRESETS = {
    # The CPU demo: SmolLM2-135M-Instruct (GGUF preset), a few DB-agent conversations.
    "smollm2-sft-demo": SFTJob(
        model="smollm2-135m-instruct",
        data=(str(_HERE / "data" / "sft_demo.jsonl"),),
        out="runs/smollm2-sft-demo",
        steps=20,
        seq_len=256,
        batch_size=4,
        lora=LoRAArgs(rank=8, alpha=16.0),
        optim=OptimArgs(lr=5e-4, warmup_steps=3),
        checkpoint=CheckpointConfig(every=10, keep=2),
    ),
    # The TinyAgent recipe on SmolLM2: agent trajectories mixed 0.8 : 0.2 with general chat.
    # Pass the two files: --data AGENT.jsonl --data GENERAL.jsonl
    "smollm2-agent-tuning": SFTJob(
        model="smollm2-135m-instruct",
        mix="0.8,0.2",
        out="runs/smollm2-agent-tuning",
        steps=2000,
        seq_len=2048,
        batch_size=16,
        lora=LoRAArgs(rank=16, alpha=32.0, dropout=0.05),
        optim=OptimArgs(lr=2e-4, warmup_steps=100),
        checkpoint=CheckpointConfig(every=200, keep=3),
    ),
}
