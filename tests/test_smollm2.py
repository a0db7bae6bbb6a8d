"""The real SmolLM2-135M-Instruct GGUF preset: logits parity with transformers and a sane answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cmat_jax import load_model
from cmat_jax.weights.registry import smollm2_gguf_path


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m-instruct", dtype="float32")


def test_logits_match_transformers_gguf(smollm2):
    import transformers

    model, tok = smollm2
    path = smollm2_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = np.array([tok.encode("SELECT name FROM users WHERE age > 30; -- the capital of France")])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(model(ids))
    assert np.abs(got - ref).max() <= 1e-3 * max(1.0, float(np.abs(ref).max()))


def test_greedy_answer_names_paris(smollm2):
    model, tok = smollm2
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
    )
    # Right-padded fixed buffer: causal attention makes the padding invisible, one compile.
    width = len(prompt) + 12
    forward = jax.jit(lambda ids: model(ids))
    ids = list(prompt)
    for _ in range(12):
        buf = np.zeros((1, width), np.int32)
        buf[0, : len(ids)] = ids
        nxt = int(jnp.argmax(forward(buf)[0, len(ids) - 1]))
        if nxt in tok.eos_ids:
            break
        ids.append(nxt)
    answer = tok.decode(ids[len(prompt) :])
    assert "Paris" in answer, answer
