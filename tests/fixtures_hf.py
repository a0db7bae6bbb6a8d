"""Small real fixtures: random-init HF checkpoints saved with `save_pretrained`, a BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "The quick brown fox jumps over the lazy dog.",
    "Action: Operation\n```sql\nINSERT INTO t VALUES ('a', 'b');\n```",
    'Action: Answer\nFinal Answer: ["Paris"]',
    "user assistant system: You are a helpful SQL programmer. 0123456789",
] * 20


def save_tiny_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """Byte-level BPE trained here, with ChatML special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return path


def save_tiny_hf_model(
    path: Path,
    model_type: str = "llama",
    seed: int = 0,
    *,
    max_shard_size: str | int | None = None,
    **overrides,
) -> Path:
    """A random-init HF causal LM (weights perturbed so nothing is trivially zero/one);
    `max_shard_size` splits the safetensors into shards with an index, as large models are."""
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    kw.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def save_tiny_model_dir(
    path: Path,
    model_type: str = "llama",
    seed: int = 0,
    *,
    max_shard_size: str | int | None = None,
    **overrides,
) -> Path:
    """HF model + tokenizer in one directory, loadable by `load_model` and by transformers."""
    save_tiny_hf_model(path, model_type, seed, max_shard_size=max_shard_size, **overrides)
    save_tiny_tokenizer(path, vocab_size=min(300, overrides.get("vocab_size", 320)))
    return path
