"""Export: a PEFT adapter that `peft` loads, a merged checkpoint that `transformers` loads."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from cmat_jax import export, train
from cmat_jax.model.lora import LoRAParam
from cmat_jax.run_dir import RunDir
from cmat_jax.run_loader import load_run
from cmat_jax.training.checkpoint import Checkpointer
from cmat_jax.training.step import init_train_state, make_optimizer
from cmat_jax.weights.load import load_model
from tests.fixtures_hf import save_tiny_model_dir

SLOTS = ("assistant", "checker")
IDS = np.array([[1, 17, 33, 100, 250, 7, 9, 11, 64, 5], [2, 8, 19, 280, 3, 44, 70, 12, 6, 90]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run dir as `train sft` writes it, with random nonzero A and B in both slots."""
    root = tmp_path_factory.mktemp("export")
    model_dir = save_tiny_model_dir(root / "model", "qwen2", seed=3)  # q/k/v biases too
    job = train.SFTJob(
        model=str(model_dir),
        data=("unused.jsonl",),
        out=str(root / "run"),
        slot="checker",
        lora=train.LoRAArgs(rank=4, alpha=8.0, slots=SLOTS),
    )
    rd = RunDir(job.out)
    rd.open(train.resolved_config(job), resume=False)
    model, _ = load_model(model_dir, "float32")
    model.add_lora(job.lora.build(), rngs=nnx.Rngs(0))
    _, lora_state, _ = nnx.split(model, LoRAParam, ...)
    keys = iter(jax.random.split(jax.random.key(7), 100))
    lora_state = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(keys), x.shape), lora_state)
    nnx.update(model, lora_state)
    opt = make_optimizer(job.optim.build(), 10)
    _, _, state = init_train_state(model, opt, 0, base_dtype="float32")
    with Checkpointer(rd.checkpoint_dir) as ck:
        ck.save(state._replace(step=state.step + 5), data_state={}, force=True)
    return root, model_dir, rd.path


def _ours(model_dir, run_dir, slot_id: int) -> np.ndarray:
    model = load_run(run_dir, dtype="float32").model
    base = np.asarray(model(jnp.asarray(IDS, jnp.int32)))
    ours = np.asarray(model(jnp.asarray(IDS, jnp.int32), adapter_ids_B=jnp.full((2,), slot_id)))
    assert np.abs(ours - base).max() > 1e-2  # the adapter really changes the logits
    return ours


def _hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def test_peft_adapter_loads_with_auto_peft_and_matches_our_logits(run):
    """The HF round trip: AutoPeftModelForCausalLM finds the base through the adapter's
    base_model_name_or_path (the local base directory the run used) and computes our logits."""
    import peft

    root, model_dir, run_dir = run
    for slot, slot_id in (("checker", 1), ("assistant", 0)):
        out = root / f"peft-{slot}"
        argv = ["--model", str(run_dir), "--format", "peft", "--out", str(out)]
        export.main([*argv, "--slot", slot] if slot == "assistant" else argv)  # default: run's
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and len(cfg["target_modules"]) == 7
        assert cfg["base_model_name_or_path"] == str(model_dir.resolve())
        peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        np.testing.assert_allclose(
            _hf_logits(peft_model), _ours(model_dir, run_dir, slot_id), atol=1e-3, rtol=0
        )

    from safetensors.numpy import load_file

    tensors = load_file(root / "peft-checker" / "adapter_model.safetensors")
    a = tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)


def test_peft_base_name_is_the_presets_hub_id():
    from cmat_jax.weights.registry import PRESETS, hub_name

    assert hub_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all(p.hf_repo.count("/") == 1 for p in PRESETS.values())
    assert hub_name("qwen2-1.5b@/models/qwen") == "/models/qwen"  # the local path given


def test_merged_checkpoint_loads_in_transformers_with_our_logits(run):
    root, model_dir, run_dir = run
    out = root / "merged"
    export.main(["--run", str(run_dir), "--format", "merged", "--out", str(out)])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_hf_logits(merged), _ours(model_dir, run_dir, 1), atol=1e-4, rtol=0)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_run(run_dir, dtype="float32")
    text = "Action: Operation\n```sql\nSELECT 1;\n```"
    assert hf_tok(text, add_special_tokens=False).input_ids == ours.tokenizer.encode(text)
    info = json.loads((out / "cmat_jax_export.json").read_text())
    assert info["slot"] == "checker" and info["step"] == 5 and info["kind"] == "run"

    # The same greedy tokens from transformers' generate and ours (no end-of-turn stop in ours,
    # so a reply transformers ends at EOS is a prefix of ours).
    from cmat_jax.inference.generate import Generator

    prompt = [1, 17, 33, 100, 250, 7]
    with torch.no_grad():
        hf_out = merged.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    hf_new = hf_out[0, len(prompt) :].tolist()
    gen = Generator(ours.model, ours.tokenizer, cache_dtype="float32")
    mine = gen.generate([prompt], max_new_tokens=12, adapter_ids=["checker"], eos_ids=[])
    assert len(hf_new) >= 1 and mine.tokens[0][: len(hf_new)] == hf_new


def test_export_never_touches_what_exists(run, tmp_path):
    _, _, run_dir = run
    out = tmp_path / "adapter"
    partial = tmp_path / "adapter.partial"  # the user's, not ours
    partial.mkdir()
    (partial / "mine.txt").write_text("keep")
    export.main(["--model", str(run_dir), "--out", str(out)])
    assert (out / "adapter_model.safetensors").is_file()
    assert (partial / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.partial"]


def test_merged_export_of_a_base_source(run):
    root, model_dir, _ = run
    out = root / "base-merged"
    export.main(["--model", str(model_dir), "--format", "merged", "--out", str(out)])
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    np.testing.assert_allclose(_hf_logits(again.eval()), _hf_logits(base.eval()), atol=1e-5)


def test_gguf_tokenizer_files_load_in_transformers(tmp_path):
    from cmat_jax.tokenizer import load_tokenizer
    from cmat_jax.weights.registry import smollm2_gguf_path

    ours = load_tokenizer(smollm2_gguf_path())
    export.write_tokenizer_files(ours, tmp_path, 8192)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    msgs = [
        {"role": "system", "content": "You are a SQL programmer."},
        {"role": "user", "content": "How many rows? Ünïcode 123"},
    ]
    text = ours.apply_chat_template(msgs, add_generation_prompt=True)
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == text
    assert hf_tok(text, add_special_tokens=False).input_ids == ours.encode(text, add_bos=False)
    assert hf_tok.eos_token_id == ours.eos_id
