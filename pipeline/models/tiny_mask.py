"""Tiny LLaDA- and Dream-architecture checkpoints: character tokenizer, config, random weights.

They are written exactly in the families' published layout (config.json with the real keys and model_type,
model.safetensors under the published tensor names, tokenizer.json + tokenizer_config.json with a mask token
and the family's chat template, generation_config.json), so `load_model(path)` loads them by the code path
that loads LLaDA-8B or Dream-7B. The tests and the tiny-model training job build on these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.models import dream, llada
from pipeline.models.bidirectional import BidirectionalLM, MaskLMSpec
from pipeline.models.mask_checkpoint import save_mask_checkpoint
from pipeline.models.tiny import CHARACTERS

# Special tokens per family (LLaDA's and Qwen's names); the first is <|endoftext|>: padding and EOS.
SPECIALS = {
    "llada": [
        "<|endoftext|>",
        "<|startoftext|>",
        "<|mdm_mask|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<unk>",
    ],
    "dream": ["<|endoftext|>", "<|mask|>", "<|im_start|>", "<|im_end|>", "<unk>"],
}
MASK_TOKENS = {"llada": "<|mdm_mask|>", "dream": "<|mask|>"}
END_OF_TURN = {"llada": "<|eot_id|>", "dream": "<|im_end|>"}
CHAT_TEMPLATES = {
    # LLaDA-8B-Instruct's (LLaMA 3 style) template
    "llada": (
        "{{ '<|startoftext|>' }}"
        "{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Dream-v0-Instruct's (Qwen 2.5 style) template, without the default system turn
    "dream": (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
VOCAB_SIZE = 128  # >= specials + characters; a multiple of 64


def tiny_vocab(family: str) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(SPECIALS[family])}
    for ch in CHARACTERS:
        vocab[ch] = len(vocab)
    return vocab


def build_mask_tokenizer(out_dir: str | os.PathLike[str], family: str) -> Any:
    """Writes a character-level fast tokenizer with the family's special tokens and chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    core = Tokenizer(models.WordLevel(tiny_vocab(family), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    named = {MASK_TOKENS[family], "<|endoftext|>", "<unk>", "<|startoftext|>"}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        bos_token="<|startoftext|>" if family == "llada" else None,
        unk_token="<unk>",
        mask_token=MASK_TOKENS[family],
        additional_special_tokens=[t for t in specials if t not in named],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATES[family]
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_spec(family: str = "llada", **overrides: Any) -> MaskLMSpec:
    """A scaled-down spec of the family (GQA, its bias and shift conventions)."""
    vocab = tiny_vocab(family)
    values: dict[str, Any] = {
        "family": family,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "rms_norm_eps": 1e-5 if family == "llada" else 1e-6,
        "rope_theta": 10000.0,
        "qkv_bias": family == "dream",
        "tie_embeddings": False,
        "mask_token_id": vocab[MASK_TOKENS[family]],
        "shift_logits": family == "dream",
        "context_window": 512,
    }
    values.update(overrides)
    return MaskLMSpec(**values)


def init_weights(model: BidirectionalLM, generator: torch.Generator, std: float = 0.02) -> None:
    """Normal(0, std) matrices and biases, unit norms (deterministic for a generator)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def config_for(spec: MaskLMSpec, **extra: Any) -> dict[str, Any]:
    module = llada if spec.family == "llada" else dream
    vocab = tiny_vocab(spec.family)
    tokens = {"eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"]}
    if spec.family == "llada":
        tokens["bos_token_id"] = vocab["<|startoftext|>"]
    return module.config_for(spec, **tokens, **extra)


def default_generation_config(family: str) -> dict[str, Any]:
    """A generation_config.json in the family's own key names: LLaDA's generate knobs, or Dream's
    DreamGenerationConfig ones (alg, eps; one block)."""
    vocab = tiny_vocab(family)
    config = {
        "eos_token_id": [vocab["<|endoftext|>"], vocab[END_OF_TURN[family]]],
        "pad_token_id": vocab["<|endoftext|>"],
        "max_new_tokens": 32,
        "steps": 32,
    }
    config.update({"block_length": 8} if family == "llada" else {"alg": "entropy", "eps": 1e-3})
    return config


def build_tiny_mask_model(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "llada",
    seed: int = 0,
    spec_overrides: dict[str, Any] | None = None,
    std: float = 0.02,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """A randomly initialised tiny checkpoint of `family` ("llada" or "dream"), deterministic for a seed."""
    if family not in SPECIALS:
        raise ValueError(f"family={family!r} is not one of {', '.join(SPECIALS)}")
    spec = tiny_spec(family, **(spec_overrides or {}))
    model = BidirectionalLM(spec)
    init_weights(model, torch.Generator().manual_seed(seed), std)
    return write_tiny_checkpoint(model, out_dir, generation_config=generation_config)


def write_tiny_checkpoint(
    model: BidirectionalLM,
    out_dir: str | os.PathLike[str],
    *,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Weights, config, tokenizer and generation config of a tiny model in the family's published layout."""
    family = model.spec.family
    out = save_mask_checkpoint(model, out_dir, config_for(model.spec))
    build_mask_tokenizer(out, family)
    with open(out / "generation_config.json", "w", encoding="utf-8") as f:
        json.dump(generation_config or default_generation_config(family), f, indent=2, sort_keys=True)
        f.write("\n")
    return out
