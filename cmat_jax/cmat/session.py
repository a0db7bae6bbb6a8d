"""The state of one CMAT run: the model the roles generate with, the one `Trainer` every stage
trains through, the run directory (config, metrics, rounds, long-term memory) and checkpoints.

Multi-process (`python -m cmat_jax.distributed train cmat ...`): every process runs the same
rollouts (generation is SPMD on the global mesh, results are gathered to every host), keeps its
own rows of each batch, and writes private files (long-term memory, evaluation episodes) under
DIR/processes/<index>; the run directory's shared files are written by process 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cmat_jax import sharding as shd
from cmat_jax.cmat import roles as R
from cmat_jax.cmat.feedback import RunningBaseline
from cmat_jax.cmat.job import CMATJob, resolved_config
from cmat_jax.cmat.loss import CMATLoss, LossConfig, reference_logp
from cmat_jax.cmat.memory import LongTermMemory
from cmat_jax.data.rows import TrainRow, pack_rows, packed_batch
from cmat_jax.faults import fault_point
from cmat_jax.run_dir import MetricsLogger, RunDir
from cmat_jax.tasks import TASKS, parse_task_list
from cmat_jax.training.checkpoint import CheckpointConfig, Checkpointer
from cmat_jax.training.step import OptimConfig, make_optimizer, make_schedule, then_constant
from cmat_jax.training.trainer import Trainer
from cmat_jax.weights.load import load_model

# Agent tuning's schedule: warmup over at most 5 steps, cosine to 0.1x at its last step.
SFT_WARMUP_STEPS = 5
SFT_MIN_LR_RATIO = 0.1


def make_cmat_optimizer(job: CMATJob) -> Any:
    """The job's one optimizer: AdamW, global-norm clipping at 1; agent tuning's warmup + cosine
    schedule at `sft_lr` for `sft_steps` steps, then the constant `lr` of the CMAT rounds."""
    sft = OptimConfig(lr=job.sft_lr, warmup_steps=SFT_WARMUP_STEPS, min_lr_ratio=SFT_MIN_LR_RATIO)
    schedule = then_constant(make_schedule(sft, job.sft_steps), job.sft_steps, job.lr)
    return make_optimizer(OptimConfig(lr=job.lr), job.sft_steps, schedule=schedule)


class CMATRun:
    """The mutable pieces of one CMAT run (model, trainer, logs, checkpoints)."""

    def __init__(self, job: CMATJob):
        self.job = job
        self.config = resolved_config(job)
        mesh_cfg = job.mesh.build()
        self.primary = jax.process_index() == 0
        self.run = RunDir(self.config["out"])
        resuming = job.resume
        if self.primary and not self.run.is_fresh():
            # An existing run dir: refuse it, or check its config, before loading anything.
            resuming = self.run.open(self.config, resume=job.resume)
        t = time.perf_counter()
        self.mesh = shd.make_mesh(mesh_cfg)
        # Each device reads only its shard of each weight (a 7B base never sits on one chip).
        self.model, self.tok = load_model(
            job.model,
            job.param_dtype,
            compute_dtype=job.compute_dtype,
            remat=job.remat,
            attention_impl=job.attention_impl,
            mesh=self.mesh,
        )
        self.lora_cfg = job.lora.build()
        self.model.add_lora(self.lora_cfg, rngs=nnx.Rngs(job.seed))
        for batch_size in (job.batch_size, job.sft_batch_size):
            shd.validate(self.model.config, self.mesh, batch_size)
        if self.primary and self.run.is_fresh():
            # Everything the user gave has been validated: only now create the run dir.
            resuming = self.run.open(self.config, resume=job.resume)
        if jax.process_count() > 1:  # the run dir exists before any process writes into it
            multihost_utils.sync_global_devices("cmat run dir")
        self.dir = self.run.path
        self.scratch = self.dir
        if not self.primary:
            self.scratch = self.dir / "processes" / str(jax.process_index())
            self.scratch.mkdir(parents=True, exist_ok=True)
        self.log(f"run directory {self.dir}" + (" (resuming)" if resuming else ""))
        self.log(f"loaded {job.model} in {time.perf_counter() - t:.0f}s")
        self.slots = {s: i for i, s in enumerate(self.lora_cfg.slots)}
        self.tasks = parse_task_list(job.task)
        # Each task's roles: its prompts on the job's adapter slots.
        self.roles: dict[str, R.RoleSet] = {
            name: TASKS[name].roles(reflector_slot=job.reflector_slot) for name in self.tasks
        }
        self.trainer = Trainer(
            self.model,
            make_cmat_optimizer(job),
            mesh=self.mesh,
            seed=job.seed,
            base_dtype=job.param_dtype,
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
            self.progress, _ = self.trainer.restore(self.ckpt)
            self.log(
                f"resumed at step {self.trainer.step_count}: {self.progress['stage']} "
                f"round {self.progress['round']}"
            )
        if resuming and self.ltm_path.is_file():  # records after the checkpoint are rewritten
            with LongTermMemory(self.ltm_path) as m:
                m.truncate(int(self.progress.get("ltm_records", 0)))
        self.baseline = RunningBaseline()
        if self.progress.get("baseline"):
            self.baseline.load_state_dict(self.progress["baseline"])
        step = self.trainer.step_count
        self.logger = MetricsLogger(
            self.run, resume_step=step if resuming else None, enabled=self.primary
        )
        self.rounds_path = self.dir / "rounds.jsonl"
        if resuming and self.primary:  # round lines written after the checkpoint are recomputed
            _truncate_rounds(self.rounds_path, int(self.progress.get("round", 0)))
        self.trainer.sync_into(self.model)

    # -- small utilities
    @property
    def ltm_path(self) -> Path:
        return self.scratch / "ltm.sqlite"

    def log(self, msg: str) -> None:
        if self.primary:
            print(f"[cmat] {msg}", file=sys.stderr, flush=True)

    def write_round(self, stats: dict[str, Any]) -> None:
        """One line of DIR/rounds.jsonl and the round's numbers in the metrics log."""
        if self.primary:
            with self.rounds_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(stats) + "\n")
        self.logger.log(
            self.trainer.step_count,
            {
                f"round/{k}": v
                for k, v in stats.items()
                if isinstance(v, (int, float)) and v is not None
            },
        )

    def save(self, stage: str, round_: int) -> None:
        n = 0
        if self.ltm_path.is_file():
            with LongTermMemory(self.ltm_path) as m:
                n = len(m)
        self.progress.update(
            stage=stage, round=round_, baseline=self.baseline.state_dict(), ltm_records=n
        )
        self.trainer.save(self.ckpt, self.progress, {"stage": stage, "round": round_})
        self.ckpt.wait()

    # -- training
    def train_rows(
        self, rows: list[TrainRow], steps: int | None, tag: str, loss_cfg: LossConfig, key_seed: int
    ) -> list[dict]:
        """Trainer steps of the CMAT loss over `rows`, packed (`pack_rows`, or one row per
        sequence; with `share_prefixes` a common prompt prefix laid out once per sequence) into
        fixed-shape batches of B sequences; `steps=None` = one pass over the
        rows, else `steps` batches, the rows reshuffled and repacked at every pass. With
        `kl_coef > 0` each batch gets the frozen base's log-probs (`ref_logp`) first."""
        job = self.job
        if tag == "sft":
            B, T = job.sft_batch_size, job.sft_row_len
        else:
            B, T = job.batch_size, job.seq_len
        loss = CMATLoss(loss_cfg)
        rng = np.random.default_rng(key_seed)

        def one_pass() -> list:
            order = [rows[i] for i in rng.permutation(len(rows))]
            if not job.pack_rows:
                return [[r] for r in order]
            return pack_rows(order, T, share_prefixes=job.share_prefixes)

        packs = one_pass()
        if steps is not None:
            while len(packs) < steps * B:
                packs += one_pass()
            packs = packs[: steps * B]
        packs += [[]] * (-len(packs) % B)  # the last batch of a pass: all-padding sequences
        out = []
        pad_id = int(self.tok.pad_id)
        tr = self.trainer
        for lo in range(0, len(packs), B):
            arrays = packed_batch(packs[lo : lo + B], T, pad_id, share_prefixes=job.share_prefixes)
            batch = tr.put_batch(arrays, whole=True)
            if loss_cfg.kl_coef > 0:
                batch["ref_logp"] = reference_logp(
                    tr.graphdef,
                    tr.state.params,
                    tr.frozen,
                    batch,
                    temperature=loss_cfg.temperature,
                )
            metrics = tr.step(batch, loss)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self.logger.log(tr.step_count, {f"train/{k}": v for k, v in m.items()})
            out.append({**m, "stage": tag})
            fault_point("update_step")
        tr.sync_into(self.model)
        return out

    def close(self) -> None:
        self.logger.close()
        self.ckpt.close()


def _truncate_rounds(path: Path, last_round: int) -> None:
    """Drop DIR/rounds.jsonl lines of rounds after the checkpoint (and a line torn by a
    crash), atomically: a kill while truncating leaves the old file."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("round", 0) <= last_round:
                keep.append(line)
        except json.JSONDecodeError:
            break
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    os.replace(tmp, path)
