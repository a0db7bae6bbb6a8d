"""Cluster recipes: TinyLlama-1.1B, Qwen2-1.5B, Llama-2-7B and CodeLlama-7B (the TinyAgent-7B
setting) on TPU v5e-8, TPU v5p-8 and 8x H100, LoRA rank 16, sequence length 4096.

Every recipe is also an SFT preset (`python -m cmat_jax.train sft --preset NAME --model
ARCH@/path/to/hf_dir --data ...`) and a `tools/aot_memory.py --config NAME` target, which
compiles its LoRA train step and CMAT step for the recipe's mesh and reports per-device memory.

Layout: pure FSDP over all devices (`fsdp = devices`, base weights sharded on the embed dim,
gathered one layer at a time inside the layer scan; batch rows split over the same axis), no
tensor parallelism (Qwen2-1.5B's 2 kv heads would cap it at 2 anyway). `batch_size` is rows per
optimizer step over all devices; `accum_steps` splits it into micro-batches so that one
micro-batch has `micro_rows_per_device` rows on each device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from cmat_jax.model.config import ModelConfig
from cmat_jax.train import LoRAArgs, MeshArgs, OptimArgs, SFTJob
from cmat_jax.training.checkpoint import CheckpointConfig


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_key: str  # cmat_jax.training.mfu.PEAK_FLOPS key
    devices: int  # JAX devices (v5p-8 is 4 chips: a v5p chip is one megacore device)
    hbm_gib: float  # per device
    budget_gib: float  # what a recipe may use per device (HBM minus runtime headroom)
    attention_impl: str  # the kernel a run on this hardware uses


HARDWARE = {
    "v5e-8": Hardware("TPU v5e-8", "tpu-v5e", 8, 16.0, 15.0, "pallas"),
    "v5p-8": Hardware("TPU v5p-8", "tpu-v5p", 4, 95.0, 88.0, "pallas"),
    "h100x8": Hardware("8x H100 80GB", "h100", 8, 80.0, 70.0, "pallas"),
}

# Registry preset (architecture, tokenizer) and the HF repo a user downloads for the weights.
MODELS = {
    "tinyllama-1.1b": ("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"),
    "qwen2-1.5b": ("qwen2-1.5b", "Qwen/Qwen2-1.5B-Instruct"),
    "llama2-7b": ("llama2-7b", "meta-llama/Llama-2-7b-chat-hf"),
    "codellama-7b": ("codellama-7b", "codellama/CodeLlama-7b-Instruct-hf"),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str  # MODELS key
    hardware: str  # HARDWARE key
    batch_size: int  # rows per optimizer step, all devices together
    accum_steps: int  # micro-batches per step
    seq_len: int = 4096
    remat: str = "full"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    slots: tuple[str, ...] = ("assistant", "checker")
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"
    lr: float = 2e-4

    @property
    def hw(self) -> Hardware:
        return HARDWARE[self.hardware]

    @property
    def arch(self) -> str:
        return MODELS[self.model][0]

    @property
    def hf_repo(self) -> str:
        return MODELS[self.model][1]

    @property
    def mesh(self) -> MeshArgs:
        return MeshArgs(data=1, fsdp=self.hw.devices, tensor=1)

    @property
    def micro_rows_per_device(self) -> int:
        return self.batch_size // self.accum_steps // self.hw.devices

    @property
    def weights_dir(self) -> str:
        return f"~/models/{self.hf_repo.split('/')[-1]}"

    def model_config(self, **overrides) -> ModelConfig:
        """The architecture (from the weights registry) with this recipe's runtime settings."""
        from cmat_jax.weights.registry import PRESETS

        settings = dict(
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            attention_impl=self.hw.attention_impl,
            remat=self.remat,
        )
        return ModelConfig.from_hf(
            PRESETS[self.arch].config(), where=f"recipe {self.name}", **{**settings, **overrides}
        )

    def lora(self) -> LoRAArgs:
        return LoRAArgs(rank=self.lora_rank, alpha=self.lora_alpha, slots=self.slots)

    def sft_job(self) -> SFTJob:
        return SFTJob(
            model=f"{self.arch}@{self.weights_dir}",
            mix="0.8,0.2",
            out=f"runs/{self.name}",
            steps=2000,
            seq_len=self.seq_len,
            batch_size=self.batch_size,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            attention_impl=self.hw.attention_impl,
            remat=self.remat,
            lora=self.lora(),
            optim=OptimArgs(lr=self.lr, warmup_steps=50, accum_steps=self.accum_steps),
            mesh=self.mesh,
            checkpoint=CheckpointConfig(every=100, keep=3),
            log_every=10,
        )

    def check(self) -> None:
        per_step = self.accum_steps * self.hw.devices
        if self.batch_size % per_step:
            raise ValueError(
                f"recipe {self.name}: batch_size {self.batch_size} is not a multiple of "
                f"accum_steps x devices = {per_step}"
            )


def _recipes() -> dict[str, Recipe]:
    # (model, hardware) -> (global batch, accum steps); 32 rows x 4096 = 131k tokens per step.
    table = {
        ("tinyllama-1.1b", "v5e-8"): (32, 2),  # 2 rows / device / micro-batch
        ("tinyllama-1.1b", "v5p-8"): (32, 1),  # 8
        ("tinyllama-1.1b", "h100x8"): (32, 1),  # 4
        ("qwen2-1.5b", "v5e-8"): (32, 2),  # 2
        ("qwen2-1.5b", "v5p-8"): (32, 1),  # 8
        ("qwen2-1.5b", "h100x8"): (32, 1),  # 4
        ("llama2-7b", "v5e-8"): (32, 4),  # 1
        ("llama2-7b", "v5p-8"): (32, 2),  # 4
        ("llama2-7b", "h100x8"): (32, 1),  # 4
        ("codellama-7b", "v5e-8"): (32, 4),
        ("codellama-7b", "v5p-8"): (32, 2),
        ("codellama-7b", "h100x8"): (32, 1),
    }
    out = {}
    for (model, hw), (batch, accum) in table.items():
        r = Recipe(f"{model}-{hw}", model, hw, batch, accum)
        r.check()
        out[r.name] = r
    return out


RECIPES: dict[str, Recipe] = _recipes()

# SFT presets for `python -m cmat_jax.train sft --preset NAME`.
PRESETS: dict[str, SFTJob] = {name: r.sft_job() for name, r in RECIPES.items()}


def get(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"--config: unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


def replace(recipe: Recipe, **changes) -> Recipe:
    r = dataclasses.replace(recipe, **changes)
    r.check()
    return r
